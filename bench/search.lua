-- wrk script shared by bench_search.py and bench_peer.py: POST /api/search with queries read from
-- BENCH_QUERIES (one per line) and the bearer token BENCH_TOKEN.
-- Each query gets a unique suffix so no cache can answer it (" (TAG<thread>-<n>)", BENCH_TAG optional),
-- unless BENCH_CACHED=1; BENCH_PAUSE_MS > 0 paces each connection (offered load at a fixed rate).
local queries = {}
for line in io.lines(os.getenv("BENCH_QUERIES")) do queries[#queries + 1] = line end
local token = os.getenv("BENCH_TOKEN")
local tag = os.getenv("BENCH_TAG") or ""
local counter = 0
local thread_id = 0
setup = function(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end
request = function()
  counter = counter + 1
  local q = queries[(counter % #queries) + 1]
  if os.getenv("BENCH_CACHED") ~= "1" then q = q .. " (" .. tag .. tid .. "-" .. counter .. ")" end
  local body = '{"query": "' .. q:gsub('\\', '\\\\'):gsub('"', '\\"') .. '", "config": {"max_results": 10}}'
  return wrk.format("POST", "/api/search", {["Content-Type"] = "application/json",
                                           ["Authorization"] = "Bearer " .. token}, body)
end
local pause = tonumber(os.getenv("BENCH_PAUSE_MS") or "0")
if pause > 0 then
  -- paced users: each connection waits between its requests, so the offered load is a fixed rate
  delay = function() return math.random(math.floor(pause / 2), math.floor(pause * 3 / 2)) end
end
