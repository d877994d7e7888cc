-- Cancel a pending reservation at the buyer's request: the stock and the buyer's quota go
-- back, atomically.
--
-- KEYS[1]  reservation hash     fs:{tag}:res:<reservation_id>
-- KEYS[2]  sale hash            fs:{tag}:sale:<sale_id>
-- KEYS[3]  holders hash         fs:{tag}:sale:<sale_id>:users
-- KEYS[4]  deadlines zset       fs:{tag}:deadlines
-- KEYS[5]  partition stream     fs:{tag}:events
-- ARGV[1]  event_id (also the operation id, kept in the reservation's "ended_by")
-- ARGV[2]  reservation_id
-- ARGV[3]  user_id the reservation must belong to
-- ARGV[4]  "1" when the caller WAITs for replicas on this connection next, else ""
--
-- Safe to run again with the same arguments: a call that cancelled the reservation in an
-- earlier run (its reply was lost) answers {"ok", "1"} again and changes nothing. Under
-- ARGV[4], an answer that finds the reservation already cancelled rewrites its status with
-- the value it has, so that the caller's WAIT also covers the earlier write it reports
-- (made on another connection, by this call's first run or by an earlier request).
--
-- Returns  {"ok", "1"}  pending -> cancelled; ReservationCancelled appended
--          {"ok", "0"}  already cancelled: nothing changed
--          {"err", reason}  nothing changed; reason in reservation_not_found,
--                           reservation_expired, reservation_closed (it was confirmed)

local r = redis.call('HMGET', KEYS[1],
    'status', 'sale_id', 'user_id', 'qty', 'expires_at', 'ended_by')
if not r[1] or r[3] ~= ARGV[3] then
    return {'err', 'reservation_not_found'}
end
if r[1] == 'cancelled' then
    if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'status', r[1]) end
    if r[6] == ARGV[1] then return {'ok', '1'} end
    return {'ok', '0'}
end
if r[1] == 'expired' then return {'err', 'reservation_expired'} end
if r[1] ~= 'pending' then return {'err', 'reservation_closed'} end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now >= tonumber(r[5]) then
    return {'err', 'reservation_expired'}
end

local qty = tonumber(r[4])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', now, 'ended_by', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'held', -qty)
redis.call('HINCRBY', KEYS[2], 'remaining', qty)
redis.call('HINCRBY', KEYS[2], 'released', qty)
if redis.call('HINCRBY', KEYS[3], r[3], -qty) <= 0 then
    redis.call('HDEL', KEYS[3], r[3])
end
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('XADD', KEYS[5], '*', 'event', cjson.encode({
    type = 'ReservationCancelled', v = 1, event_id = ARGV[1], sale_id = r[2],
    occurred_at = now, reservation_id = ARGV[2], user_id = r[3], qty = qty,
}))
return {'ok', '1'}
