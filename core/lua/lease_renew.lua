-- Renew a lease if the caller still holds it (compare and extend).
--
-- KEYS[1]  lease string         fs:{tag}:lease:<group>   (value: the holder's name)
-- ARGV[1]  the caller's name
-- ARGV[2]  new time to live in milliseconds
--
-- Safe to run again: renewing twice only sets the same time to live.
--
-- Returns  1 when renewed, 0 when the lease expired or another consumer holds it

if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
    return 1
end
return 0
