-- Close a sale early: no further reservations are accepted; pending ones keep their
-- payment window. Appends SaleClosed, atomically.
--
-- KEYS[1]  sale hash            fs:{pN}:sale:<sale_id>
-- KEYS[2]  partition stream     fs:{pN}:events
-- ARGV[1]  event_id
-- ARGV[2]  sale_id
--
-- Returns  {"ok", "1"}  closed now; SaleClosed appended
--          {"ok", "0"}  it was already closed: nothing changed
--          {"err", "sale_not_found"}

local closed = redis.call('HGET', KEYS[1], 'closed')
if not closed then return {'err', 'sale_not_found'} end
if closed == '1' then return {'ok', '0'} end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'closed', 1)
redis.call('XADD', KEYS[2], '*', 'event', cjson.encode({
    type = 'SaleClosed', v = 1, event_id = ARGV[1], sale_id = ARGV[2], occurred_at = now,
}))
return {'ok', '1'}
