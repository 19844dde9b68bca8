-- Shared by the other scripts: at the end, one machine-readable line for bench/gateway.py.
-- Latencies are in microseconds; "status" counts answers that were not 2xx/3xx.

-- Optional, from the scripts' args 3 and 4 (window_ms, connections): the first `connections`
-- requests (one a connection: they all connect at the start) each wait a random 0..window_ms, so that the connections' streams start spread out, as
-- independent users' do, instead of all in the same millisecond. wrk starts a request's clock when
-- it writes it, so the wait is not counted as latency. Later requests go at once. Without the
-- args, no `delay` is defined and wrk takes its usual path.
function stagger(window_ms, connections)
  local window, first, calls = tonumber(window_ms or "0") or 0, tonumber(connections or "0") or 0, 0
  if window <= 0 or first <= 0 then
    return
  end
  math.randomseed(7)
  delay = function()
    calls = calls + 1
    if calls <= first then
      return math.random(0, window)
    end
    return 0
  end
end
-- Optional, from the scripts' arg 5 (requests per second over all connections): requests leave on
-- a fixed schedule, the k-th due at start + k / rate, instead of each one as soon as its
-- connection's previous answer has arrived. A connection still carries one request at a time, so
-- when every connection is waiting for an answer the schedule slips: a connection that comes free
-- after its next request was due sends it at once, and that request is counted as late (more than
-- 1 ms behind). wrk times a request from when it is sent, so a run with many late requests
-- understates the latency a client on that schedule would see; the count says when that happened.
-- Overrides `stagger`.
late, late_max_ms = 0, 0
function pace(rate_per_s)
  local rate = tonumber(rate_per_s or "0") or 0
  if rate <= 0 then
    return
  end
  local ffi = require("ffi")
  ffi.cdef("typedef struct { long sec; long nsec; } pace_time; int clock_gettime(int, pace_time *);")
  local now_buffer = ffi.new("pace_time")
  local function now_ms()
    ffi.C.clock_gettime(1, now_buffer) -- CLOCK_MONOTONIC
    return tonumber(now_buffer.sec) * 1000 + tonumber(now_buffer.nsec) / 1e6
  end
  local start, slot = nil, 0
  delay = function()
    local now = now_ms()
    start = start or now
    local due = start + slot * 1000 / rate
    slot = slot + 1
    if now - due > 1 then
      late = late + 1
    end
    late_max_ms = math.max(late_max_ms, now - due)
    return math.max(0, math.floor(due - now)) -- wrk waits whole milliseconds
  end
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local e = summary.errors
  local late_count, late_max = 0, 0
  for _, thread in ipairs(threads) do
    late_count = late_count + (thread:get("late") or 0)
    late_max = math.max(late_max, thread:get("late_max_ms") or 0)
  end
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"rps":%.3f,"mean_us":%.1f,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"late":%d,"late_max_ms":%.1f}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6), latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout, late_count, late_max))
end
