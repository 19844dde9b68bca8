"""Is a request private, and why: decided once, before routing, from every source there is.

A request is private when any source says so, checked in this order (the first one found is the
reason reported): the privacy header, the body's `metadata.privacy`, the API key's policy, the
model's policy, content the detector cannot read (attachments with `privacy.attachments: private`;
token ids whenever the detector is on), and the PII detector. An explicit "public" never overrides
another source. A private request may only be served by a local backend; `policy.local_only`
enforces that.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import pii
from gateway.config import ApiKey, ConfigError, Privacy
from gateway.errors import InvalidRequest, PrivacyViolation

LEVELS = ("private", "public")


@dataclass(frozen=True, slots=True)
class Decision:
    private: bool
    # header | metadata | key | model | attachment | token_ids | pii:<kind>; "default" when public
    reason: str

    @property
    def label(self) -> str:
        return "private" if self.private else "public"

    @property
    def header(self) -> str:
        """The `x-phoenix-privacy` value: `private;reason=pii:email` or `public`."""
        return f"private;reason={self.reason}" if self.private else "public"


PUBLIC = Decision(False, "default")


def _level(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower() not in LEVELS:
        raise InvalidRequest(f"{where} must be 'private' or 'public', got {value!r}.", param=where)
    return value.strip().lower()


def _header_level(value: str | None, name: str) -> str | None:
    """A header sent more than once arrives with its values joined by commas: each must be a level,
    and any `private` makes the request private (a proxy's tag is not undone by the app's)."""
    if value is None:
        return None
    levels = {_level(part, name) for part in value.split(",")}
    return "private" if "private" in levels else "public"


def states_private(header: str) -> bool:
    """Whether a privacy header says `private`, read leniently (`classify` is strict about it)."""
    return any(part.strip().lower() == "private" for part in header.split(","))


def classify(
    settings: Privacy,
    headers: Mapping[str, str],
    *,
    metadata: Mapping[str, Any] | None,
    key: ApiKey | None,
    model_policy: str | None,
    texts: Callable[[], Iterable[str]],
    attachments: Callable[[], bool] | None = None,
    token_ids: Callable[[], bool] | None = None,
) -> Decision:
    """`texts` is called only when the PII detector has to look (nothing else made it private);
    `attachments`, whether the request carries content the detector cannot read (images, audio,
    files), only when `privacy.attachments` makes such requests private; `token_ids`, whether its
    input is pre-tokenized, only when the detector is on: with no tokenizer at hand the detector
    cannot read ids, so they are private rather than unread (fail closed)."""
    stated = [
        ("header", _header_level(headers.get(settings.header), settings.header)),
        ("metadata", _level((metadata or {}).get("privacy"), "metadata.privacy")),
        ("key", key.privacy if key is not None else None),
        ("model", model_policy),
    ]
    for source, level in stated:
        if level == "private":
            return Decision(True, source)
    if settings.attachments == "private" and attachments is not None and attachments():
        return Decision(True, "attachment")
    if settings.detect_pii:
        if token_ids is not None and token_ids():
            return Decision(True, "token_ids")
        found = pii.scan_all(texts())
        if found:
            return Decision(True, f"pii:{found[0]}")
    return PUBLIC


def refusal(model: str, decision: Decision, *, chat: bool, substitute: str | None) -> PrivacyViolation:
    """The 403 for a private request that `model` cannot serve locally, saying what would serve
    it. `privacy.local_model` is a chat model: it serves no embeddings."""
    if decision.reason == "token_ids":
        hint = (
            " Its input is token ids, which the PII detector cannot read: send the input as text to"
            " have it checked (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)."
        )
    elif not chat:
        hint = " Give it a local deployment to serve such requests (privacy.local_model serves chat only)."
    elif substitute is None:
        hint = " Set privacy.local_model to serve such requests with a local model."
    else:
        hint = ""
    return PrivacyViolation(
        f"The model '{model}' has no local deployment, and this request is private"
        f" (reason: {decision.reason}); it is never sent to a cloud backend.{hint}"
    )


def require_working_detector(settings: Privacy) -> None:
    """Raises ConfigError when PII detection is on and the detector, on this interpreter, misses
    personal data in its own samples (`pii.self_check`): no start is better than a silent leak."""
    if not settings.detect_pii:
        return
    missed = pii.self_check()
    if missed:
        raise ConfigError(
            f"privacy.detect_pii is on, but on this Python ({platform.python_version()}) the PII"
            f" detector misses {', '.join(missed)} in its own samples, so personal data could reach"
            " a cloud backend. Run the gateway on a Python where the check passes, or set"
            " privacy.detect_pii: false knowingly."
        )
