-- wrk script for benches/cache.sh: a non-streaming OpenAI chat call, POST
-- /v1/chat/completions with the ~1.2 KB JSON body of benches/cache-body.json
-- (a system prompt with two documentation excerpts, then two user turns and
-- one assistant turn: the shape of a support chat). At the end it prints
-- the same machine-readable WRK_RESULT line as benches/chat.lua.
--
-- Environment (set by cache.sh):
--   CACHE_BENCH_BODY  the body file (default benches/cache-body.json)
--   CACHE_BENCH_MODE  same     the same request every time (cache hits);
--                     plain    the same, plus `X-Bench-Route: plain`, which
--                              cache.sh's policy routes to a route without
--                              a cache;
--                     no-store the same, plus `Cache-Control: no-store`
--                              (x-cache: BYPASS);
--                     unique   every request differs: "<tag>-<thread>-<n> "
--                              is put at the start of the last message's
--                              content, so each is a true miss;
--   CACHE_BENCH_TAG   for `unique`: a tag that differs from one wrk run to
--                     the next, so no run repeats an earlier run's bodies.
--   CACHE_BENCH_PACE_MS  when set and > 0: wait this long after each answer
--                     before sending the next request (wrk's `delay()`; the
--                     wait is not part of the measured latency).

local mode = os.getenv("CACHE_BENCH_MODE") or "same"
local path = os.getenv("CACHE_BENCH_BODY") or "benches/cache-body.json"
local f = assert(io.open(path, "rb"), "cannot open " .. path)
local body = f:read("*a"):gsub("%s+$", "")
f:close()

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
-- The caller's user id: cache.sh's policy takes identity.user from it, and
-- the cached route has `scope: user` (the default).
wrk.headers["X-User-Id"] = "bench-user-1"
wrk.body = body

if mode == "plain" then
  wrk.headers["X-Bench-Route"] = "plain"
elseif mode == "no-store" then
  wrk.headers["Cache-Control"] = "no-store"
elseif mode == "unique" then
  local tag = os.getenv("CACHE_BENCH_TAG") or tostring(os.time())
  -- Split the body just after the last `"content":"`.
  local at = assert(body:match('.*()"content":"'), "no \"content\" in the body") + #'"content":"'
  local head, tail = body:sub(1, at - 1), body:sub(at)
  local threads = 0
  function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
  end
  local n = 0
  function request()
    n = n + 1
    return wrk.format(nil, nil, nil, head .. tag .. "-" .. tostring(tid) .. "-" .. n .. " " .. tail)
  end
elseif mode ~= "same" then
  error("CACHE_BENCH_MODE must be same, plain, no-store or unique, not " .. mode)
end

local pace = tonumber(os.getenv("CACHE_BENCH_PACE_MS") or "0") or 0
if pace > 0 then
  function delay()
    return pace
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f "
      .. "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
