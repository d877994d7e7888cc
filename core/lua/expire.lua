-- Expire the overdue pending reservations of one partition: each returns its stock and
-- the buyer's quota and appends ReservationExpired, atomically per call. Several workers
-- may run this at once; a reservation is expired by exactly one call, and never after it
-- was confirmed or cancelled.
--
-- KEYS[1]  deadlines zset       fs:{pN}:deadlines (reservation_id scored by expires_at ms)
-- KEYS[2]  partition stream     fs:{pN}:events
-- KEYS[3]  operation string     fs:{pN}:op:<operation_id>  (this call's count, kept ARGV[5] s)
-- ARGV[1]  most reservations to expire in this call
-- ARGV[2]  reservation key prefix   fs:{pN}:res:
-- ARGV[3]  sale key prefix          fs:{pN}:sale:
-- ARGV[4]  holders key suffix       :users   (holders key = sale prefix .. sale_id .. suffix)
-- ARGV[5]  operation time-to-live in seconds
-- The sale, holders and reservation keys are built from ARGV[2..4]; they carry the same
-- hash tag as KEYS, so the script still touches one cluster slot.
--
-- Safe to run again with the same arguments: a reservation expires at most once, and its
-- event id "<reservation_id>:expired" is derived from it, so no run can give another
-- reservation's event the same id; a call that expired some in an earlier run (its reply
-- was lost) answers that run's count again and expires nothing more.
--
-- Returns  {expired_count, due_left}  due_left: overdue entries left for another call

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('GET', KEYS[3])
if first then
    return {tonumber(first), redis.call('ZCOUNT', KEYS[1], '-inf', now)}
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local expired = 0
for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[1], id)
    local rkey = ARGV[2] .. id
    local r = redis.call('HMGET', rkey, 'status', 'sale_id', 'user_id', 'qty')
    if r[1] == 'pending' then
        local qty = tonumber(r[4])
        local sale = ARGV[3] .. r[2]
        redis.call('HSET', rkey, 'status', 'expired', 'expired_at', now)
        redis.call('HINCRBY', sale, 'held', -qty)
        redis.call('HINCRBY', sale, 'remaining', qty)
        redis.call('HINCRBY', sale, 'released', qty)
        local holders = sale .. ARGV[4]
        if redis.call('HINCRBY', holders, r[3], -qty) <= 0 then
            redis.call('HDEL', holders, r[3])
        end
        expired = expired + 1
        redis.call('XADD', KEYS[2], '*', 'event', cjson.encode({
            type = 'ReservationExpired', v = 1, event_id = id .. ':expired',
            sale_id = r[2], occurred_at = now, reservation_id = id, user_id = r[3],
            qty = qty,
        }))
    end
end
if expired > 0 then
    redis.call('SET', KEYS[3], expired, 'EX', tonumber(ARGV[5]))
end
local left = redis.call('ZCOUNT', KEYS[1], '-inf', now)
return {expired, left}
