-- Place a reservation: validate, hold the stock and append ReservationPlaced, atomically.
--
-- KEYS[1]  sale hash            fs:{tag}:sale:<sale_id>
-- KEYS[2]  holders hash         fs:{tag}:sale:<sale_id>:users   (user_id -> qty held or bought)
-- KEYS[3]  idempotency string   fs:{tag}:idem:<sale_id>:<user_id>:<key>
--                                (ignored when ARGV[7] is "")
-- KEYS[4]  reservation hash     fs:{tag}:res:<reservation_id>
-- KEYS[5]  reservations set     fs:{tag}:sale:<sale_id>:reservations
-- KEYS[6]  deadlines zset       fs:{tag}:deadlines
-- KEYS[7]  partition stream     fs:{tag}:events
-- KEYS[8]  buyer's reservations fs:{tag}:sale:<sale_id>:user:<user_id>  (set of ids)
-- ARGV[1]  event_id
-- ARGV[2]  sale_id
-- ARGV[3]  user_id
-- ARGV[4]  qty (integer >= 1)
-- ARGV[5]  reservation_id to use if a new reservation is placed
-- ARGV[6]  idempotency key time-to-live in seconds
-- ARGV[7]  "1" when the request carried an Idempotency-Key, else ""
-- ARGV[8]  "1" when the caller WAITs for replicas on this connection next, else ""
--
-- Safe to run again with the same arguments (a client retrying a call whose reply was
-- lost): a reservation id that is already placed answers that placement again and changes
-- nothing. Under ARGV[8], an answer that places nothing rewrites one field or key with the
-- value it has, so that the caller's WAIT also covers the earlier write it reports.
--
-- Returns  {"ok", reservation_id, expires_at_ms, "0"}   a new reservation was placed (or
--                                                       was by an earlier run of this call)
--          {"ok", reservation_id, "", "1"}              the Idempotency-Key was seen before:
--                                                       the first reservation, nothing changed
--          {"err", reason}  reason in sale_not_found, sale_not_active, limit_reached, sold_out;
--                           nothing changed

local placed = redis.call('HMGET', KEYS[4], 'expires_at', 'user_id')
if placed[1] then
    if ARGV[8] == '1' then redis.call('HSET', KEYS[4], 'user_id', placed[2]) end
    return {'ok', ARGV[5], placed[1], '0'}
end

if ARGV[7] == '1' then
    local previous = redis.call('GET', KEYS[3])
    if previous then
        if ARGV[8] == '1' then redis.call('SET', KEYS[3], previous, 'KEEPTTL') end
        return {'ok', previous, '', '1'}
    end
end

local sale = redis.call('HMGET', KEYS[1],
    'remaining', 'per_user_limit', 'starts_at', 'ends_at', 'hold_seconds', 'closed')
if not sale[1] then
    return {'err', 'sale_not_found'}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends_at = tonumber(sale[4])
if sale[6] == '1' or now < tonumber(sale[3]) or (ends_at > 0 and now >= ends_at) then
    return {'err', 'sale_not_active'}
end

local qty = tonumber(ARGV[4])
local already = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
if already + qty > tonumber(sale[2]) then
    return {'err', 'limit_reached'}
end
if tonumber(sale[1]) < qty then
    return {'err', 'sold_out'}
end

local expires_at = now + tonumber(sale[5]) * 1000
redis.call('HINCRBY', KEYS[1], 'remaining', -qty)
redis.call('HINCRBY', KEYS[1], 'held', qty)
redis.call('HINCRBY', KEYS[2], ARGV[3], qty)
redis.call('HSET', KEYS[4], 'sale_id', ARGV[2], 'user_id', ARGV[3], 'qty', qty,
    'status', 'pending', 'created_at', now, 'expires_at', expires_at)
redis.call('SADD', KEYS[5], ARGV[5])
redis.call('SADD', KEYS[8], ARGV[5])
redis.call('ZADD', KEYS[6], expires_at, ARGV[5])
if ARGV[7] == '1' then
    redis.call('SET', KEYS[3], ARGV[5], 'EX', tonumber(ARGV[6]))
end

local event = cjson.encode({
    type = 'ReservationPlaced', v = 1, event_id = ARGV[1], sale_id = ARGV[2],
    occurred_at = now, reservation_id = ARGV[5], user_id = ARGV[3], qty = qty,
    expires_at = expires_at,
})
redis.call('XADD', KEYS[7], '*', 'event', event)
return {'ok', ARGV[5], tostring(expires_at), '0'}
