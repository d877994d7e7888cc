-- Add stock to a sale (delta > 0) or withdraw unsold stock (delta < 0, never below zero
-- remaining), and append StockAdjusted, atomically.
--
-- KEYS[1]  sale hash            fs:{tag}:sale:<sale_id>
-- KEYS[2]  idempotency string   fs:{tag}:idem-stock:<sale_id>:<key>  (ignored when ARGV[5] is "")
-- KEYS[3]  partition stream     fs:{tag}:events
-- KEYS[4]  operation string     fs:{tag}:op:<event_id>  (set when applied, kept ARGV[6] s)
-- ARGV[1]  event_id (also the operation id)
-- ARGV[2]  sale_id
-- ARGV[3]  delta (non-zero integer)
-- ARGV[4]  idempotency key time-to-live in seconds
-- ARGV[5]  "1" when the request carried an Idempotency-Key, else ""
-- ARGV[6]  operation time-to-live in seconds
--
-- Safe to run again with the same arguments, with or without an Idempotency-Key: a call
-- applied by an earlier run of it (its reply was lost) answers {"ok", "1"} again and
-- changes nothing.
--
-- Returns  {"ok", "1"}  adjusted (now or by an earlier run of this call); StockAdjusted
--                       appended once
--          {"ok", "0"}  this Idempotency-Key was applied before with this delta: nothing changed
--          {"err", reason}  nothing changed; reason in sale_not_found, not_enough_unsold_stock,
--                           idempotency_key_reused (the key was applied with another delta)

if redis.call('EXISTS', KEYS[4]) == 1 then return {'ok', '1'} end
if ARGV[5] == '1' then
    local applied = redis.call('GET', KEYS[2])
    if applied == ARGV[3] then return {'ok', '0'} end
    if applied then return {'err', 'idempotency_key_reused'} end
end
local remaining = redis.call('HGET', KEYS[1], 'remaining')
if not remaining then return {'err', 'sale_not_found'} end
local delta = tonumber(ARGV[3])
if tonumber(remaining) + delta < 0 then
    return {'err', 'not_enough_unsold_stock'}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HINCRBY', KEYS[1], 'stock', delta)
redis.call('HINCRBY', KEYS[1], 'remaining', delta)
if ARGV[5] == '1' then
    redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[4]))
end
redis.call('SET', KEYS[4], '1', 'EX', tonumber(ARGV[6]))
redis.call('XADD', KEYS[3], '*', 'event', cjson.encode({
    type = 'StockAdjusted', v = 1, event_id = ARGV[1], sale_id = ARGV[2],
    occurred_at = now, delta = delta,
}))
return {'ok', '1'}
