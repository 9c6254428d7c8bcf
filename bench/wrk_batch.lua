-- wrk script of the bench's cross-check (`just bench --scenario wrk`): POSTs JSON arrays
-- of 1,000 events over 1,000 keys whose timestamps are spread over one past day.
--
--   wrk -t 1 -c 16 -d 8s --timeout 30s --latency -s bench/wrk_batch.lua \
--       http://127.0.0.1:8000 -- [DAY_START] [KEYS] [EVENTS] [POOL]
--
-- DAY_START: Unix seconds of the first hour (default: 24 h before this hour);
-- KEYS (default 1000) keys k000000..; EVENTS per request (default 1000); POOL distinct
-- requests (default 64), all rendered in init() before the clock starts and sent
-- round-robin. Every answer must be 2xx: wrk prints "Non-2xx or 3xx responses" otherwise.

local requests = {}
local next_request = 0

function init(args)
  local now = os.time()
  local start = tonumber(args[1]) or (now - now % 3600 - 86400)
  local keys = tonumber(args[2]) or 1000
  local events = tonumber(args[3]) or 1000
  local pool = tonumber(args[4]) or 64
  math.randomseed(start)
  local headers = { ["Content-Type"] = "application/json" }
  for r = 1, pool do
    local parts = {}
    for e = 1, events do
      local ts = start + math.floor(math.random() * 86400)
      parts[e] = string.format(
        '{"key":"k%06d","ts":"%s","value":%.3f}',
        math.random(0, keys - 1),
        os.date("!%Y-%m-%dT%H:%M:%SZ", ts),
        math.random() * 100
      )
    end
    requests[r] = wrk.format("POST", "/v1/events", headers, "[" .. table.concat(parts, ",") .. "]")
  end
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end
