-- Read one sale's whole Redis state and the log position it reflects, atomically.
-- Read-only; used by `flashsale replay verify` so that a purchase landing mid-read cannot
-- produce a false difference.
--
-- KEYS[1]  sale hash            fs:{pN}:sale:<sale_id>
-- KEYS[2]  holders hash         fs:{pN}:sale:<sale_id>:users
-- KEYS[3]  reservations set     fs:{pN}:sale:<sale_id>:reservations
-- KEYS[4]  partition stream     fs:{pN}:events
-- ARGV[1]  reservation key prefix, fs:{pN}:res: (same slot as the keys above)
--
-- Returns  {sale_fields_flat, holders_flat, reservations_flat, last_stream_id}
--          reservations_flat repeats reservation_id, status, qty, user_id;
--          last_stream_id is "0-0" for an empty stream.

local sale = redis.call('HGETALL', KEYS[1])
local holders = redis.call('HGETALL', KEYS[2])
local reservations = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local r = redis.call('HMGET', ARGV[1] .. id, 'status', 'qty', 'user_id')
    table.insert(reservations, id)
    table.insert(reservations, r[1] or '')
    table.insert(reservations, r[2] or '0')
    table.insert(reservations, r[3] or '')
end
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
return {sale, holders, reservations, last_id}
