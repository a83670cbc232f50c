-- wrk script (benchmarks/wrk.py): POST the files named after `--` in turn, each as a multipart
-- upload in one form field, and print one JSON line of figures when done.
--   wrk -t1 -c32 -d15s --latency -s benchmarks/wrk_multipart.lua URL -- image a.jpg b.jpg ...
local boundary = "roadsight-wrk-boundary-7d9f"
local prepared = {}
local counter = 0
statuses = {}  -- per thread, read back by done() through thread:get
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local field = args[1]
  for i = 2, #args do
    local file = assert(io.open(args[i], "rb"))
    local data = file:read("*a")
    file:close()
    local body = "--" .. boundary .. "\r\n"
      .. 'Content-Disposition: form-data; name="' .. field .. '"; filename="upload' .. i .. '"\r\n'
      .. "Content-Type: application/octet-stream\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
    prepared[#prepared + 1] = wrk.format("POST", nil,
      {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
  end
end

function request()
  counter = counter + 1
  return prepared[(counter % #prepared) + 1]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals, counts = {}, {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + n
    end
  end
  for status, n in pairs(totals) do
    counts[#counts + 1] = string.format('"%d": %d', status, n)
  end
  local errors = summary.errors
  io.write(string.format(
    '\nWRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "statuses": {%s}, '
    .. '"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, '
    .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes, table.concat(counts, ", "),
    errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
