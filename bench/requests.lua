-- wrk script of the benchmark suite (bench/wrk.py runs it; see bench/__main__.py).
--
-- wrk -t T -c C -d S --latency -s bench/requests.lua URL -- METHOD BODY TOKENS THREADS
--   METHOD  GET or POST
--   BODY    the request body ("-" for none), sent as application/json
--   TOKENS  a file of buyer JWTs, one a line ("-" for none): each request carries the next
--           token of its thread, threads starting at evenly spread lines, so every request
--           of a run is a distinct buyer while the file has more lines than the run sends
--   THREADS the -t given to wrk
--
-- Counts every response by status (each thread in its own table), and done() prints one
-- line "BENCH_JSON {...}": requests, duration_us, socket errors, p50/p99 latency (us) and
-- the status counts summed over threads, for bench/wrk.py to check and read.

local threads = {}

function setup(thread)
    thread:set("id", #threads)
    table.insert(threads, thread)
end

function init(args)
    method = args[1]
    body = args[2] ~= "-" and args[2] or nil
    tokens = {}
    if args[3] ~= "-" then
        for line in io.lines(args[3]) do
            tokens[#tokens + 1] = line
        end
    end
    -- id is set by setup(); wrk gives each thread its own copy of every global.
    position = 0
    if #tokens > 0 then
        position = math.floor(#tokens * id / tonumber(args[4])) % #tokens
    end
    headers = { ["Content-Type"] = "application/json" }
    statuses = {}
end

function request()
    if #tokens > 0 then
        position = position % #tokens + 1
        headers["Authorization"] = "Bearer " .. tokens[position]
    end
    return wrk.format(method, nil, headers, body)
end

function response(status, _, _)
    statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, _)
    local counts = {}
    for _, thread in ipairs(threads) do
        for status, n in pairs(thread:get("statuses")) do
            counts[#counts + 1] = string.format('"%d": %d', status, n)
        end
    end
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {"requests": %d, "duration_us": %d, "socket_errors": %d,'
        .. ' "p50_us": %d, "p99_us": %d, "statuses": [%s]}\n',
        summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(99), "{" .. table.concat(counts, "}, {") .. "}"))
end
