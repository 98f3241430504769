-- wrk script: POST the JSON bodies of a file (one per line) in turn, e.g. graph-only requests.
-- usage: BODIES=file.jsonl wrk -t2 -c64 -d20s -s loadtest/wrk_bodies.lua http://127.0.0.1:8000/v1/completions
local bodies = {}
for line in io.lines(os.getenv("BODIES")) do
  bodies[#bodies + 1] = line
end
local next_body = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_body])
end

response = function(status)
  if status ~= 200 then
    error("status " .. status)
  end
end
