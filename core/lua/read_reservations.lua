-- Read a batch of one sale's reservations: set membership, hash fields and deadline.
-- Read-only; `RedisGateway.snapshot_sale` reads a sale's reservations through it, a bounded
-- batch per call (one reply instead of a command per reservation).
--
-- KEYS[1]    reservations set     fs:{tag}:sale:<sale_id>:reservations
-- KEYS[2]    deadlines zset       fs:{tag}:deadlines
-- KEYS[2+j]  reservation hash     fs:{tag}:res:<ARGV[j]>
-- ARGV[j]    the j-th reservation id
--
-- Returns  a flat list repeating, per reservation in ARGV order: member ("1"/"0"), status,
--          qty, user_id (each "" where the hash lacks it), deadline ("" when not scheduled)

local members = redis.call('SMISMEMBER', KEYS[1], unpack(ARGV))
local deadlines = redis.call('ZMSCORE', KEYS[2], unpack(ARGV))
local out = {}
for j = 1, #ARGV do
    local r = redis.call('HMGET', KEYS[2 + j], 'status', 'qty', 'user_id')
    table.insert(out, tostring(members[j]))
    table.insert(out, r[1] or '')
    table.insert(out, r[2] or '')
    table.insert(out, r[3] or '')
    table.insert(out, deadlines[j] or '')
end
return out
