-- Write part of one sale's Redis state from the fold of the event log, fenced on the log
-- position the fold reflects: if any event was appended to the partition's stream since,
-- nothing is written and the caller folds again. Every script that changes a sale appends to
-- this stream in the same step, so an unmoved stream means no reservation slipped in between
-- the fold and this write, and what it writes is the fold's state now. A large repair is
-- sent as several calls of bounded size, each fenced on the same position. Used by
-- `flashsale replay repair --redis`; appends no event (it brings Redis back to what the log
-- already says). Writing the same arguments twice leaves the same state.
--
-- KEYS[1]    sale hash            fs:{tag}:sale:<sale_id>
-- KEYS[2]    holders hash         fs:{tag}:sale:<sale_id>:users
-- KEYS[3]    reservations set     fs:{tag}:sale:<sale_id>:reservations
-- KEYS[4]    deadlines zset       fs:{tag}:deadlines
-- KEYS[5]    partition stream     fs:{tag}:events
-- KEYS[5+j]  reservation hash     fs:{tag}:res:<id> of the j-th record below
-- ARGV[1]    last stream id the fold reflects ("0-0" for an empty stream)
-- ARGV[2]    sale_id
-- then       F, and F field/value pairs set on the sale hash (counters and configuration)
-- then       H, and H user_id/qty pairs set on the holders hash; qty "0" removes the user
-- then       R, and R records of 7: reservation_id, status, qty, user_id, created_at_ms,
--            expires_at_ms, ended_at_ms ("" if none); each reservation hash is rewritten
--            whole and added to the set; status "" deletes the reservation and its deadline
-- then       D, and D reservation_id/expires_at_ms pairs set in the deadlines zset;
--            expires_at_ms "0" removes the reservation from it
--
-- Returns  {"ok", F, H, R, D}               written
--          {"err", "moved", last_stream_id}  the stream is past ARGV[1]: nothing written

local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
if last_id ~= ARGV[1] then
    return {'err', 'moved', last_id}
end

local i = 3
local fields = tonumber(ARGV[i])
for j = 1, fields do
    redis.call('HSET', KEYS[1], ARGV[i + 2 * j - 1], ARGV[i + 2 * j])
end

i = i + 2 * fields + 1
local holders = tonumber(ARGV[i])
for j = 1, holders do
    local user, qty = ARGV[i + 2 * j - 1], ARGV[i + 2 * j]
    if qty == '0' then
        redis.call('HDEL', KEYS[2], user)
    else
        redis.call('HSET', KEYS[2], user, qty)
    end
end

i = i + 2 * holders + 1
local records = tonumber(ARGV[i])
for j = 0, records - 1 do
    local b = i + 7 * j
    local id, status = ARGV[b + 1], ARGV[b + 2]
    local key = KEYS[6 + j]
    redis.call('DEL', key)
    if status == '' then
        redis.call('SREM', KEYS[3], id)
        redis.call('ZREM', KEYS[4], id)
    else
        redis.call('HSET', key, 'sale_id', ARGV[2], 'user_id', ARGV[b + 4], 'qty', ARGV[b + 3],
            'status', status, 'created_at', ARGV[b + 5], 'expires_at', ARGV[b + 6])
        if ARGV[b + 7] ~= '' then
            redis.call('HSET', key, status .. '_at', ARGV[b + 7])
        end
        redis.call('SADD', KEYS[3], id)
        if status ~= 'pending' then
            redis.call('ZREM', KEYS[4], id)
        end
    end
end

i = i + 7 * records + 1
local deadlines = tonumber(ARGV[i])
for j = 1, deadlines do
    local id, at = ARGV[i + 2 * j - 1], ARGV[i + 2 * j]
    if at == '0' then
        redis.call('ZREM', KEYS[4], id)
    else
        redis.call('ZADD', KEYS[4], at, id)
    end
end
return {'ok', fields, holders, records, deadlines}
