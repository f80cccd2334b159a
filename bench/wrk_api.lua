-- wrk script for bench/api_store.py. Environment:
--   BENCH_TOKEN  bearer token
--   BENCH_MODE   "create": POST the object in BENCH_BODY, its name placeholder replaced by a
--                unique name per request; "get": GET a random name listed in BENCH_NAMES
--   BENCH_BODY   a JSON file with NAMEPLACEHOLDER where the name goes
--   BENCH_NAMES  a file with one object name per line
local token = os.getenv("BENCH_TOKEN")
local mode = os.getenv("BENCH_MODE") or "create"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Accept"] = "application/json"
local body, names = nil, {}
if mode == "create" then
  local f = assert(io.open(os.getenv("BENCH_BODY")))
  body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
else
  for line in io.lines(os.getenv("BENCH_NAMES")) do names[#names + 1] = line end
end

local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local counter = 0
request = function()
  counter = counter + 1
  if mode == "create" then
    local name = string.format("wrk%d-%07d", tid, counter)
    return wrk.format(nil, nil, nil, (body:gsub("NAMEPLACEHOLDER", name)))
  end
  return wrk.format(nil, wrk.path .. "/" .. names[math.random(#names)])
end
