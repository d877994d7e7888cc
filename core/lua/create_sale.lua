-- Create a sale and append SaleCreated to the partition's stream, in one atomic step.
--
-- KEYS[1]  sale hash            fs:{pN}:sale:<sale_id>
-- KEYS[2]  partition stream     fs:{pN}:events
-- ARGV[1]  event_id
-- ARGV[2]  sale_id
-- ARGV[3]  stock (integer >= 0)
-- ARGV[4]  per_user_limit (integer >= 1)
-- ARGV[5]  starts_at in ms since the epoch, or "" for now
-- ARGV[6]  ends_at in ms since the epoch, or "" for none
-- ARGV[7]  hold_seconds (payment window)
--
-- Returns  {"ok", stream_entry_id, starts_at_ms}
--          {"err", "sale_exists"} when the sale already exists (nothing changes)

if redis.call('EXISTS', KEYS[1]) == 1 then
    return {'err', 'sale_exists'}
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
local id = redis.call('XADD', KEYS[2], '*', 'event', cjson.encode(event))
return {'ok', id, tostring(starts_at)}
