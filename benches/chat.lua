-- wrk script for benches/load.sh: a small non-streaming OpenAI chat call,
-- POST /v1/chat/completions with a JSON body, as an LLM SDK would send it.
-- At the end it prints one machine-readable line (latencies in microseconds).
-- BENCH_PATH (default /v1/chat/completions) and BENCH_AUTHORIZATION (an
-- Authorization header; none when unset or empty) come from the environment:
-- load.sh sets them for the copilot targets (the example's /chat route and
-- its JWT).

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
local authorization = os.getenv("BENCH_AUTHORIZATION")
if authorization and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
-- The caller's user id, as an app behind floodwall would send it: only the
-- floodwall+3rules target reads it (identity.user for its per-user rule);
-- the other targets pass it through untouched.
wrk.headers["X-User-Id"] = "bench-user-1"
wrk.body = '{"model":"mock-model","messages":['
  .. '{"role":"system","content":"You are a terse assistant."},'
  .. '{"role":"user","content":"Say hello to the load benchmark in five words."}'
  .. '],"max_tokens":16,"temperature":0}'

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f "
      .. "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
