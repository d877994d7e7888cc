-- Give a lease back if the caller holds it (compare and delete): a partition's lease, or
-- the verify lock (a run that outlived its time to live must not free the next run's).
--
-- KEYS[1]  lease string         fs:{tag}:lease:<group>   (value: the holder's name)
--                               or fs:verify-lock        (value: the run's token)
-- ARGV[1]  the caller's name (or token)
--
-- Safe to run again: a lease already given back, or taken by another, is left alone.
--
-- Returns  1 when released, 0 when the caller did not hold it

if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
