"""A misbehaving Ollama for the soak (`bench/soak.py`): `/api/chat` fails as the model's name says.

A raw-asyncio HTTP/1.1 server (keep-alive, one request at a time per connection). `/api/version`,
`/api/tags` (which lists the fault models), `/api/ps` and `/api/show` answer well, so that the
gateway's health and inventory probes keep the instance in service; `/api/chat` misbehaves:

    fault-500         answers 500 with Ollama's error body
    fault-429         answers 429 with `Retry-After: 7`
    fault-reset       resets the connection (RST) right behind three NDJSON lines, which the
                      gateway may read in one go with the reset (non-streaming: behind half the
                      JSON body)
    fault-truncated   ends the stream without the `done: true` line (non-streaming: an object with
                      `done: false`)
    fault-malformed   three good lines and one that is not JSON, in one chunk written at once with
                      the head, so that they reach the gateway in one read (non-streaming: a body
                      that is not JSON)
    fault-stall       STALL_SECONDS of silence after three lines (half the JSON), then the rest
    fault-hang        never answers; gives up on a client still waiting after HANG_SECONDS

Any other model gets Ollama's 404. A stream is NDJSON in chunked transfer encoding, one line a chunk
but for fault-malformed's.

    .venv/bin/python bench/faulty_upstream.py --port 11600 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# the models this upstream serves, one fault each (FaultyOllama.faults)
MODELS = (
    "fault-500",
    "fault-429",
    "fault-reset",
    "fault-truncated",
    "fault-malformed",
    "fault-stall",
    "fault-hang",
)
FAULT_LINES = ("The", " sky", " is")  # what a faulty stream sends before it misbehaves
STALL_SECONDS = 1.5  # longer than the soak's idle timeout (0.5 s)
HANG_SECONDS = 5.0  # this upstream gives up on a client that waits this long

REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
NDJSON = "application/x-ndjson"
LAST_CHUNK = b"0\r\n\r\n"


def ndjson_line(model: str, content: str, *, done: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "created_at": "2026-01-01T00:00:00.000000001Z",
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    if done:
        body |= {
            "done_reason": "stop",
            "total_duration": 1000,
            "load_duration": 10,
            "prompt_eval_count": 3,
            "prompt_eval_duration": 100,
            "eval_count": len(FAULT_LINES),
            "eval_duration": 200,
        }
    return orjson.dumps(body) + b"\n"


def response_head(
    status: int, *, length: int | None = None, content_type: str = "application/json", extra: str = ""
) -> bytes:
    """A response head; chunked when `length` is None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    reason = REASONS.get(status, "Status")
    return f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n{extra}\r\n".encode()


def json_reply(status: int, body: Any, extra: str = "", *, head_only: bool = False) -> bytes:
    data = orjson.dumps(body)
    head = response_head(status, length=len(data), extra=extra)
    return head if head_only else head + data


def framed(line: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(line), line)


def first_lines(model: str) -> bytes:
    """A stream's head and its first lines, all well-formed."""
    lines = b"".join(framed(ndjson_line(model, word)) for word in FAULT_LINES)
    return response_head(200, content_type=NDJSON) + lines


def whole_answer(model: str, *, done: bool = True) -> bytes:
    """A non-streaming answer (Ollama's final object with the whole text)."""
    body = orjson.loads(ndjson_line(model, "", done=True))
    body["message"]["content"], body["done"] = "".join(FAULT_LINES), done
    return orjson.dumps(body)


@dataclass
class Peer:
    """The gateway's end of one connection to the faulty upstream."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def pause(self, seconds: float) -> bool:
        """Waits `seconds` unless the client goes away first (it sends nothing while it waits for
        its answer); False when it went away."""
        try:
            async with asyncio.timeout(seconds):
                await self.reader.read(1)
        except TimeoutError:
            return True
        except ConnectionError:
            return False
        return False  # end of stream, or bytes a waiting client does not send

    def reset(self) -> None:
        """Aborts the connection with a TCP RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Fault = Callable[[Peer, str, bool], Awaitable[bool]]


class FaultyOllama:
    """An Ollama whose `/api/chat` misbehaves as the model's name says. `/api/version`, `/api/tags`,
    `/api/ps` and `/api/show` answer well, so that the gateway's probes keep it healthy. A fault
    returns whether the connection can serve another request."""

    def __init__(self) -> None:
        self.faults: dict[str, Fault] = {
            "fault-500": self.status_500,
            "fault-429": self.status_429,
            "fault-reset": self.reset,
            "fault-truncated": self.truncated,
            "fault-malformed": self.malformed,
            "fault-stall": self.stall,
            "fault-hang": self.hang,
        }
        assert set(self.faults) == set(MODELS)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        try:
            while await self.one(peer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the gateway closed the connection, or sent what this server does not parse
        finally:
            writer.close()

    async def one(self, peer: Peer) -> bool:
        head = await peer.reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        length = 0
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await peer.reader.readexactly(length) if length else b""
        if (method, path) == ("POST", "/api/chat"):
            return await self.chat(peer, body)
        status, answer = self.static(path)
        await peer.send(json_reply(status, answer, head_only=method == "HEAD"))
        return True

    @staticmethod
    def static(path: str) -> tuple[int, Any]:
        if path == "/api/version":
            return 200, {"version": "0.5.4"}
        if path == "/api/tags":
            details = {"format": "gguf", "family": "llama", "parameter_size": "3.2B"}
            entry = {"size": 1, "digest": "0" * 64, "modified_at": "2026-01-01T00:00:00Z", "details": details}
            models = [{"name": f"{name}:latest", "model": f"{name}:latest", **entry} for name in MODELS]
            return 200, {"models": models}
        if path == "/api/ps":
            return 200, {"models": []}
        if path == "/api/show":
            return 200, {"parameters": "num_ctx 4096", "details": {}, "model_info": {}}
        return 404, {"error": "404 page not found"}

    async def chat(self, peer: Peer, body: bytes) -> bool:
        request = orjson.loads(body)
        model = str(request.get("model", "")).removesuffix(":latest")
        fault = self.faults.get(model)
        if fault is None:
            await peer.send(json_reply(404, {"error": f"model '{model}' not found"}))
            return True
        return await fault(peer, model, request.get("stream", True) is not False)

    async def status_500(self, peer: Peer, model: str, stream: bool) -> bool:
        await peer.send(json_reply(500, {"error": "llama runner process has terminated: exit status 2"}))
        return True

    async def status_429(self, peer: Peer, model: str, stream: bool) -> bool:
        busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
        await peer.send(json_reply(429, busy, "Retry-After: 7\r\n"))
        return True

    async def reset(self, peer: Peer, model: str, stream: bool) -> bool:
        if stream:
            await peer.send(first_lines(model))
        else:
            whole = whole_answer(model)
            await peer.send(response_head(200, length=len(whole)) + whole[: len(whole) // 2])
        peer.reset()  # on loopback the bytes are on their way: the RST follows them
        return False

    async def truncated(self, peer: Peer, model: str, stream: bool) -> bool:
        if stream:
            await peer.send(first_lines(model) + LAST_CHUNK)
        else:
            whole = whole_answer(model, done=False)
            await peer.send(response_head(200, length=len(whole)) + whole)
        return True

    async def malformed(self, peer: Peer, model: str, stream: bool) -> bool:
        garbage = b"<html><body>502 Bad Gateway</body></html>\n"
        if stream:
            lines = b"".join(ndjson_line(model, word) for word in FAULT_LINES) + garbage
            done = framed(ndjson_line(model, "", done=True))
            await peer.send(response_head(200, content_type=NDJSON) + framed(lines) + done + LAST_CHUNK)
        else:
            await peer.send(response_head(200, length=len(garbage)) + garbage)
        return True

    async def stall(self, peer: Peer, model: str, stream: bool) -> bool:
        if stream:
            await peer.send(first_lines(model))
            rest = framed(ndjson_line(model, "", done=True)) + LAST_CHUNK
        else:
            whole = whole_answer(model)
            await peer.send(response_head(200, length=len(whole)) + whole[: len(whole) // 2])
            rest = whole[len(whole) // 2 :]
        if not await peer.pause(STALL_SECONDS):
            return False
        await peer.send(rest)
        return True

    async def hang(self, peer: Peer, model: str, stream: bool) -> bool:
        await peer.pause(HANG_SECONDS)
        return False


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(FaultyOllama().serve, host, port, backlog=1024)
    print(f"faulty upstream on http://{host}:{port} ({', '.join(MODELS)})", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11600, help="the port (default 11600)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
