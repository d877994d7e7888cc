-- Take a lease that is free, or that the caller already holds (a consumer restarted under
-- its name takes its own leases back at once instead of waiting for them to expire).
--
-- KEYS[1]  lease string         fs:{tag}:lease:<group>   (value: the holder's name)
-- ARGV[1]  the caller's name
-- ARGV[2]  time to live in milliseconds
--
-- Safe to run again: a second run finds the caller holding it and sets the same time to live.
--
-- Returns  1 when the caller holds the lease now, 0 when another consumer holds it

local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
