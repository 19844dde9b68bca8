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
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"rps":%.3f,"mean_us":%.1f,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6), latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
