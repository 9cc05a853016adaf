-- wrk script: replay pre-signed webhook requests, one per call, never the same one twice.
-- Usage (one thread: each thread would replay the whole file): wrk -t1 -c64 -d10s -s presigned.lua URL -- requests.bin
-- requests.bin holds complete HTTP requests separated by NUL bytes. Status codes are counted
-- so the benchmark can tell applied events from errors; done() prints one JSON line.
local requests, next_index, threads = {}, 0, {}
statuses = {}  -- global: done() reads it from the thread with thread:get

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local data = file:read("*a")
  file:close()
  for request in string.gmatch(data, "([^%z]+)%z") do requests[#requests + 1] = request end
end

function request()
  next_index = next_index + 1
  if next_index > #requests then
    -- ran out: an impossible path gets a 404, counted as an error rather than a replayed event
    return wrk.format("GET", "/exhausted")
  end
  return requests[next_index]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests_)
  local parts = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do parts[#parts + 1] = string.format('"%d": %d', status, count) end
  end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, table.concat(parts, ", ")))
end
