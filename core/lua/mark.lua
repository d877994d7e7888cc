-- A write for WAIT to count from (core.gateway.scripts.PartitionMarks): the projector's
-- replication check and the admin's sale writes. Once replicas acknowledge this write,
-- they hold every write its node made before it: the stream entries in the projector's
-- hands, the sale just opened, restocked or closed. WAIT counts the writes of its own
-- connection only (and Valkey moves that count on a real write only): hence a write here,
-- on the connection the WAIT follows on.
--
-- KEYS[1]  the partition's mark   fs:{tag}:mark   (string: a counter)
-- ARGV[1]  how long the mark lives (ms) once no projector writes it
--
-- Returns  the counter

local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
