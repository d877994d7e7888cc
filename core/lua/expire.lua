-- Expire overdue pending reservations of one partition: each returns its stock and the
-- buyer's quota and appends ReservationExpired, atomically per call. The caller reads the
-- overdue ids first (ZRANGEBYSCORE on the deadlines, and each reservation's sale) and
-- passes every key this script touches; the script checks each id again under its
-- atomicity, so a read that went stale meanwhile changes nothing. Several workers may run
-- this at once with the same ids: a reservation is expired by exactly one call, and never
-- after it was confirmed or cancelled.
--
-- KEYS[1]          deadlines zset    fs:{tag}:deadlines (reservation_id scored by expires_at ms)
-- KEYS[2]          partition stream  fs:{tag}:events
-- KEYS[3]          operation string  fs:{tag}:op:<operation_id>  (this call's count,
--                                    kept ARGV[1] s)
-- KEYS[3+j]        reservation hash  fs:{tag}:res:<ARGV[2+j]>, for j = 1 .. R
-- KEYS[3+R+2k-1]   sale hash         fs:{tag}:sale:<ARGV[2+R+k]>, for k = 1 .. S
-- KEYS[3+R+2k]     holders hash      fs:{tag}:sale:<ARGV[2+R+k]>:users
-- ARGV[1]          operation time-to-live in seconds
-- ARGV[2]          R, the number of reservation ids
-- ARGV[2+j]        the j-th reservation id
-- ARGV[2+R+k]      the k-th sale id: the sales of those reservations, each once
--                  (S = (#KEYS - 3 - R) / 2)
--
-- A reservation is expired only if, now, it is still in the deadlines with a deadline at or
-- before Redis's clock and its hash says pending; an id still in the deadlines whose hash is
-- not pending (ended, or gone) only leaves the deadlines; a pending one whose sale is not
-- among ARGV is left for a later call. The call's cost is bounded by R.
--
-- Safe to run again with the same arguments: a reservation expires at most once, and its
-- event id "<reservation_id>:expired" is derived from it, so no run can give another
-- reservation's event the same id; a call that expired some in an earlier run (its reply
-- was lost) answers that run's count again and expires nothing more.
--
-- Returns  {expired_count, due_left}  due_left: overdue entries of the partition left for
--                                     another call

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('GET', KEYS[3])
if first then
    return {tonumber(first), redis.call('ZCOUNT', KEYS[1], '-inf', now)}
end

local count = tonumber(ARGV[2])
local sales = {}  -- sale_id -> index in KEYS of its sale hash (its holders hash follows)
for k = 1, (#KEYS - 3 - count) / 2 do
    sales[ARGV[2 + count + k]] = 3 + count + 2 * k - 1
end

local expired = 0
for j = 1, count do
    local id, rkey = ARGV[2 + j], KEYS[3 + j]
    local deadline = redis.call('ZSCORE', KEYS[1], id)
    if deadline and tonumber(deadline) <= now then
        local r = redis.call('HMGET', rkey, 'status', 'sale_id', 'user_id', 'qty')
        local s = r[2] and sales[r[2]]
        if r[1] ~= 'pending' then
            redis.call('ZREM', KEYS[1], id)
        elseif s then
            local qty = tonumber(r[4])
            local sale, holders = KEYS[s], KEYS[s + 1]
            redis.call('ZREM', KEYS[1], id)
            redis.call('HSET', rkey, 'status', 'expired', 'expired_at', now)
            redis.call('HINCRBY', sale, 'held', -qty)
            redis.call('HINCRBY', sale, 'remaining', qty)
            redis.call('HINCRBY', sale, 'released', qty)
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
end
if expired > 0 then
    redis.call('SET', KEYS[3], expired, 'EX', tonumber(ARGV[1]))
end
return {expired, redis.call('ZCOUNT', KEYS[1], '-inf', now)}
