-- Settle a chunked read of one sale's Redis state at one stream position, atomically.
-- Read-only; the last step of `RedisGateway.snapshot_sale`. The client has read the sale in
-- bounded chunks and the partition's log up to ARGV[2], and knows which holders and
-- reservations the sale's events touched since its chunks were read. This script re-reads
-- those, the sale hash, and whatever the sale's events appended after ARGV[2] touched, all
-- at the stream's current last id: every other value the client holds is still valid there.
-- Its cost is bounded by the client's sets and ARGV[3], never by the size of the sale.
--
-- KEYS[1]    sale hash            fs:{tag}:sale:<sale_id>
-- KEYS[2]    holders hash         fs:{tag}:sale:<sale_id>:users
-- KEYS[3]    reservations set     fs:{tag}:sale:<sale_id>:reservations
-- KEYS[4]    deadlines zset       fs:{tag}:deadlines
-- KEYS[5]    partition stream     fs:{tag}:events
-- KEYS[5+j]  reservation hash     fs:{tag}:res:<id> of the j-th reservation id below
-- ARGV[1]    sale_id
-- ARGV[2]    stream position the client read the log up to ("0-0": nothing yet)
-- ARGV[3]    most stream entries after ARGV[2] this script may read itself
-- ARGV[4]    U, then U user ids to re-read from the holders hash
-- then       R reservation ids (R = #KEYS - 5), in the order of KEYS[6..]
--
-- Returns  {"ok", last_id, sale_flat, users, quantities, reservations, unread}
--            users/quantities: the holders re-read ("" for a user holding nothing);
--            reservations repeats id, member ("1"/"0"), status, qty, user_id, deadline
--            ("" where absent); unread: reservation ids the sale's new entries touched whose
--            hash this script could not read (not in KEYS): the client re-reads them at a
--            later position. last_id is "0-0" for an empty stream.
--          {"behind"}  more than ARGV[3] entries follow ARGV[2], or entries after it may
--            have been trimmed: read the log further and call again

local after, limit = ARGV[2], tonumber(ARGV[3])
local tail = redis.call('XRANGE', KEYS[5], '(' .. after, '+', 'COUNT', limit + 1)
if #tail > limit then
    return {'behind'}
end
if #tail > 0 and #redis.call('XRANGE', KEYS[5], '-', after, 'COUNT', 1) == 0 then
    return {'behind'}  -- nothing at or below ARGV[2] is left: a trim may have taken entries
end

local users, seen_users = {}, {}
local nusers = tonumber(ARGV[4])
for i = 1, nusers do
    local user = ARGV[4 + i]
    if not seen_users[user] then
        seen_users[user] = true
        table.insert(users, user)
    end
end
local passed = {}
for j = 1, #KEYS - 5 do
    passed[ARGV[4 + nusers + j]] = true
end

local unread, seen_unread = {}, {}
for _, entry in ipairs(tail) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
        if fields[i] == 'event' then
            local ok, event = pcall(cjson.decode, fields[i + 1])
            if ok and type(event) == 'table' and event.sale_id == ARGV[1] then
                local user, rid = event.user_id, event.reservation_id
                if type(user) == 'string' and not seen_users[user] then
                    seen_users[user] = true
                    table.insert(users, user)
                end
                if type(rid) == 'string' and not passed[rid] and not seen_unread[rid] then
                    seen_unread[rid] = true
                    table.insert(unread, rid)
                end
            end
        end
    end
end

local quantities = {}
for start = 1, #users, 500 do  -- unpack() of a long list would overflow Lua's C stack
    local stop = math.min(start + 499, #users)
    local got = redis.call('HMGET', KEYS[2], unpack(users, start, stop))
    for i = start, stop do
        quantities[i] = got[i - start + 1] or ''
    end
end

local reservations = {}
for j = 1, #KEYS - 5 do
    local id = ARGV[4 + nusers + j]
    local r = redis.call('HMGET', KEYS[5 + j], 'status', 'qty', 'user_id')
    table.insert(reservations, id)
    table.insert(reservations, tostring(redis.call('SISMEMBER', KEYS[3], id)))
    table.insert(reservations, r[1] or '')
    table.insert(reservations, r[2] or '0')
    table.insert(reservations, r[3] or '')
    table.insert(reservations, redis.call('ZSCORE', KEYS[4], id) or '')
end

local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
return {'ok', last_id, redis.call('HGETALL', KEYS[1]), users, quantities, reservations, unread}
