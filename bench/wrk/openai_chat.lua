-- POST /v1/chat/completions with OpenAI's request. Args after "--": stream (true|false), model.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "report.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
  wrk.body = '{"model":"' .. (args[2] or "bench") .. '","stream":' .. (args[1] or "false") ..
    ',"messages":[{"role":"user","content":"Why is the sky blue?"}]}'
end
