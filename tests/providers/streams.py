"""Helpers for provider tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx


def httpx_stream(pieces: list[bytes]) -> httpx.AsyncByteStream:
    """A response body that arrives in exactly these reads, to prove decoders reassemble lines."""

    class Pieces(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

    return Pieces()
