"""What every provider offers the dispatcher: the same five calls whatever the protocol."""

from __future__ import annotations

import os
import string
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol, TypeVar

from gateway.config import GeminiBackend, OllamaBackend, OpenAIBackend
from gateway.schemas import ChatRequest, Chunk, Completion, EmbeddingRequest, Embeddings, ModelInfo

BackendConfig = OllamaBackend | OpenAIBackend | GeminiBackend
T = TypeVar("T")

_ID_ALPHABET = (string.ascii_letters + string.digits).encode()
# Random bytes to letters and digits in one `translate` (a slight bias to the first 8 of the 62).
_ID_TABLE = bytes(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in range(256))


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + os.urandom(length).translate(_ID_TABLE).decode("ascii")


def parse_each(
    items: Iterable[T], parse: Callable[[T], Iterable[Chunk]]
) -> tuple[list[Chunk], Exception | None]:
    """The chunks of every item, and the error that stopped the parsing, if one did: the chunks
    before it are still delivered, then the error."""
    chunks: list[Chunk] = []
    try:
        for item in items:
            chunks.extend(parse(item))
    except Exception as error:
        return chunks, error
    return chunks, None


class Provider(Protocol):
    """One backend instance. Providers translate and do I/O; they record no metrics."""

    @property
    def backend(self) -> BackendConfig: ...

    async def complete(self, request: ChatRequest, model: str) -> Completion: ...

    def stream(self, request: ChatRequest, model: str) -> AsyncIterator[list[Chunk]]:
        """The answer as it comes: each list holds the chunks one read from the backend carried
        (never empty), so a fast backend's burst reaches the client in one write."""
        ...

    async def embed(self, request: EmbeddingRequest, model: str) -> Embeddings: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def probe(self) -> None:
        """Raise an UpstreamError when the backend cannot serve."""
        ...

    async def loaded_models(self) -> list[str] | None:
        """Models in memory right now; None when the backend has no such notion."""
        ...
