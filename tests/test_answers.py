"""JSON answers: the work they carry for after the answer (a request's bookkeeping) runs once the
answer has been handed to the server, and also when handing it over fails."""

from __future__ import annotations

import pytest
from starlette.types import Message

from gateway.state import json_response


@pytest.mark.anyio
@pytest.mark.parametrize("fails", [False, True], ids=["sent", "send-fails"])
async def test_the_after_work_runs_once_the_answer_is_handed_over(fails: bool) -> None:
    events: list[str] = []

    async def send(message: Message) -> None:
        events.append(str(message["type"]))
        if fails and message["type"] == "http.response.body":
            raise OSError("the client is gone")

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    answer = json_response({"ok": True}, after=lambda: events.append("after"))
    if fails:
        with pytest.raises(OSError):
            await answer({"type": "http"}, receive, send)
    else:
        await answer({"type": "http"}, receive, send)
    assert events == ["http.response.start", "http.response.body", "after"]
