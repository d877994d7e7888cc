-- Prune reservations of one sale that reached a final state: Redis forgets them once the
-- PostgreSQL archive holds their final event (the caller checks that). Holders and the
-- sale's counters are not touched, and no event is appended: no domain state changes, the
-- reservation stays in the log and in PostgreSQL's orders table.
--
-- KEYS[1]       reservations set     fs:{tag}:sale:<sale_id>:reservations
-- KEYS[2i]      reservation hash     fs:{tag}:res:<ARGV[i]>
-- KEYS[2i+1]    buyer's set          fs:{tag}:sale:<sale_id>:user:<user_id of ARGV[i]>
-- ARGV[i]       reservation_id, for i = 1 .. #ARGV  (#KEYS == 1 + 2 * #ARGV)
--
-- A reservation whose hash says confirmed, cancelled or expired is deleted and its id
-- removed from both sets; one whose hash is already gone only has its id removed from the
-- sets; a pending one is left alone. Running it twice changes nothing more and returns the
-- same counts.
--
-- Returns  {gone, kept}  gone: ids now absent from Redis (pruned by this call or before);
--                        kept: ids left because their reservation is still pending

local gone, kept = 0, 0
for i, id in ipairs(ARGV) do
    local rkey = KEYS[2 * i]
    local status = redis.call('HGET', rkey, 'status')
    if status == 'confirmed' or status == 'cancelled' or status == 'expired' then
        redis.call('DEL', rkey)
        status = false
    end
    if status then
        kept = kept + 1
    else
        redis.call('SREM', KEYS[1], id)
        redis.call('SREM', KEYS[2 * i + 1], id)
        gone = gone + 1
    end
end
return {gone, kept}
