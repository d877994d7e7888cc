-- Create a sale and append SaleCreated to the partition's stream, in one atomic step.
--
-- KEYS[1]  sale hash            fs:{tag}:sale:<sale_id>
-- KEYS[2]  partition stream     fs:{tag}:events
-- KEYS[3]  operation string     fs:{tag}:op:<event_id>  (this call's outcome, kept ARGV[8] s)
-- ARGV[1]  event_id (also the operation id)
-- ARGV[2]  sale_id
-- ARGV[3]  stock (integer >= 0)
-- ARGV[4]  per_user_limit (integer >= 1)
-- ARGV[5]  starts_at in ms since the epoch, or "" for now
-- ARGV[6]  ends_at in ms since the epoch, or "" for none
-- ARGV[7]  hold_seconds (payment window)
-- KEYS[4]  idempotency string   fs:{tag}:idem-sale:<sale_id>:<key>  (ignored when ARGV[9] is "")
-- ARGV[8]  operation time-to-live in seconds
-- ARGV[9]  what the request asked for (its arguments 3 to 7, joined), when it carried an
--          Idempotency-Key; else ""
-- ARGV[10] idempotency key time-to-live in seconds
--
-- Safe to run again with the same arguments: a call whose sale was created by an earlier
-- run of it (its reply was lost) answers that creation again and changes nothing. So does
-- a request repeated with the same Idempotency-Key and the same sale.
--
-- Returns  {"ok", stream_entry_id, starts_at_ms}  created (now, or by an earlier run)
--          {"ok", "", starts_at_ms}  this Idempotency-Key created this sale before
--          {"err", reason}  nothing changed; reason in sale_exists (another call created
--                           the sale), idempotency_key_reused (the key created it with
--                           other values)

if redis.call('EXISTS', KEYS[1]) == 1 then
    local first = redis.call('GET', KEYS[3])
    if first then
        return {'ok', first, redis.call('HGET', KEYS[1], 'starts_at')}
    end
    if ARGV[9] ~= '' then
        local asked = redis.call('GET', KEYS[4])
        if asked == ARGV[9] then return {'ok', '', redis.call('HGET', KEYS[1], 'starts_at')} end
        if asked then return {'err', 'idempotency_key_reused'} end
    end
    return {'err', 'sale_exists'}
end

-- cjson writes numbers with 14 significant digits, which rounds times of 10^14 ms (year
-- 5138) and later; sale windows reach year 9999, so every number here is written whole.
-- (The other scripts' numbers are Redis's clock and small counts, far below that.)
local function encode(event)
    local parts = {}
    for name, value in pairs(event) do
        if type(value) == 'number' then
            value = string.format('%d', value)
        else
            value = cjson.encode(value)
        end
        parts[#parts + 1] = cjson.encode(name) .. ':' .. value
    end
    return '{' .. table.concat(parts, ',') .. '}'
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local starts_at = now
if ARGV[5] ~= '' then starts_at = tonumber(ARGV[5]) end
local ends_at = 0
if ARGV[6] ~= '' then ends_at = tonumber(ARGV[6]) end
local stock = tonumber(ARGV[3])

redis.call('HSET', KEYS[1],
    'stock', stock, 'remaining', stock, 'held', 0, 'confirmed', 0, 'released', 0,
    'per_user_limit', ARGV[4], 'starts_at', starts_at, 'ends_at', ends_at,
    'hold_seconds', ARGV[7], 'closed', 0)

local event = {
    type = 'SaleCreated', v = 1, event_id = ARGV[1], sale_id = ARGV[2], occurred_at = now,
    stock = stock, per_user_limit = tonumber(ARGV[4]), starts_at = starts_at,
    hold_seconds = tonumber(ARGV[7]),
}
if ends_at > 0 then event.ends_at = ends_at end
local id = redis.call('XADD', KEYS[2], '*', 'event', encode(event))
redis.call('SET', KEYS[3], id, 'EX', tonumber(ARGV[8]))
if ARGV[9] ~= '' then redis.call('SET', KEYS[4], ARGV[9], 'EX', tonumber(ARGV[10])) end
return {'ok', id, string.format('%d', starts_at)}
