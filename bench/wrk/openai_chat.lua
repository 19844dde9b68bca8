-- POST /v1/chat/completions with OpenAI's request. Args after "--": stream (true|false), model,
-- and optionally a start window in ms and the connection count (see `stagger` in report.lua),
-- and a rate in requests per second (see `pace`).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "report.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
  wrk.body = '{"model":"' .. (args[2] or "bench") .. '","stream":' .. (args[1] or "false") ..
    ',"messages":[{"role":"user","content":"Why is the sky blue?"}]}'
  stagger(args[3], args[4])
  pace(args[5])
end
