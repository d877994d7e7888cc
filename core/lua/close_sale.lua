-- Close a sale early: no further reservations are accepted; pending ones keep their
-- payment window. Appends SaleClosed, atomically.
--
-- KEYS[1]  sale hash            fs:{tag}:sale:<sale_id>
-- KEYS[2]  partition stream     fs:{tag}:events
-- KEYS[3]  operation string     fs:{tag}:op:<event_id>  (set when closed, kept ARGV[3] s)
-- ARGV[1]  event_id (also the operation id)
-- ARGV[2]  sale_id
-- ARGV[3]  operation time-to-live in seconds
--
-- Safe to run again with the same arguments: a call that closed the sale in an earlier run
-- (its reply was lost) answers {"ok", "1"} again and changes nothing.
--
-- Returns  {"ok", "1"}  closed now (or by an earlier run of this call); SaleClosed appended
--          {"ok", "0"}  it was already closed: nothing changed
--          {"err", "sale_not_found"}

local closed = redis.call('HGET', KEYS[1], 'closed')
if not closed then return {'err', 'sale_not_found'} end
if closed == '1' then
    if redis.call('EXISTS', KEYS[3]) == 1 then return {'ok', '1'} end
    return {'ok', '0'}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'closed', 1)
redis.call('SET', KEYS[3], '1', 'EX', tonumber(ARGV[3]))
redis.call('XADD', KEYS[2], '*', 'event', cjson.encode({
    type = 'SaleClosed', v = 1, event_id = ARGV[1], sale_id = ARGV[2], occurred_at = now,
}))
return {'ok', '1'}
