"""One request's record: what was asked, where it went, how it ended.

Routes create it, dispatch and relay fill it in, and `finish` is called exactly once, when the
last byte has gone (or the client has gone): it records the request metrics and writes the audit
line. The audit line carries ids, names, decisions and counts, never prompt or completion text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.audit import AuditError, AuditLog
from gateway.metrics import Metrics
from gateway.ratelimit import Reservation
from gateway.schemas import Usage

CANCELLED = 499  # nginx's "client closed request": the client went away before the end


@dataclass(slots=True)
class Exchange:
    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    stream: bool = False
    requested_model: str = ""
    model_label: str = ""  # configured client-facing name, "" when unknown
    served_model: str = ""  # what the backend ran
    # the client-facing model that answered: the requested one, a fallback, or privacy.local_model
    answered_as: str = ""
    backend: str = ""
    reached: bool = False  # a backend got the request: it answered, or failed or was left after that
    prompt_estimate: int = 0  # the rate limiter's estimate of the prompt's tokens
    relayed: int = 0  # a stream's chunks of output sent to the client: about a token each
    local: bool | None = None  # whether `backend` keeps the data on the premises
    affinity: str | None = None  # conversation key for instance affinity
    key_name: str = ""
    privacy: str = "public"
    privacy_reason: str = "default"
    status: int = 0
    error_type: str | None = None
    usage: Usage | None = None
    upstream_seconds: float = 0.0
    first_token_at: float | None = None
    time_per_token: float | None = None
    reservation: Reservation | None = None  # what the rate limiter took for this request
    finished: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def branch(self) -> Exchange:
        """A record for one of several backend requests made for this one (the prompts of a
        completions request, sent at once): it carries what dispatch reads, and takes what
        dispatch writes apart from its siblings'. `absorb` joins them back."""
        return Exchange(
            request_id=self.request_id,
            endpoint=self.endpoint,
            stream=self.stream,
            requested_model=self.requested_model,
            model_label=self.model_label,
            affinity=self.affinity,
            key_name=self.key_name,
            privacy=self.privacy,
            privacy_reason=self.privacy_reason,
        )

    def absorb(self, branches: list[Exchange]) -> None:
        """The branches' backend requests as this request's. Metrics take one backend: the first
        branch's (and its model); the request line lists every backend when they differ. Local
        only when every branch that reached a backend was; the wait upstream is the longest."""
        first = branches[0]
        self.backend, self.served_model, self.answered_as = (
            first.backend,
            first.served_model,
            first.answered_as,
        )
        tried = [branch.local for branch in branches if branch.backend]
        self.local = all(tried) if tried else None
        self.reached = any(branch.reached for branch in branches)
        self.upstream_seconds += max(branch.upstream_seconds for branch in branches)
        for branch in branches:
            self.notes.update(branch.notes)
        backends = sorted({branch.backend for branch in branches if branch.backend})
        if len(backends) > 1:
            self.notes["backends"] = backends

    def finish(self, status: int, metrics: Metrics, log: Any, audit: AuditLog | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.status = status
        elapsed = time.perf_counter() - self.started
        self._record(metrics, elapsed)
        # The request line is built only when something writes it: the log at info, or the audit file.
        if audit is None and not log.is_enabled_for(logging.INFO):
            return
        fields = self._fields(elapsed)
        log.info("request", **fields)
        if audit is not None:
            try:
                audit.append(fields)
            except AuditError as error:
                audit_failed(metrics, log, error, 1)

    def _record(self, metrics: Metrics, elapsed: float) -> None:
        backend = self.backend
        label = self.model_label
        status = str(self.status)
        metrics.child(metrics.requests, self.endpoint, label, backend, status).inc()
        stream = "true" if self.stream else "false"
        metrics.child(metrics.duration, self.endpoint, label, backend, stream).observe(elapsed)
        metrics.child(metrics.overhead, self.endpoint).observe(max(elapsed - self.upstream_seconds, 0.0))
        if self.first_token_at is not None:
            metrics.child(metrics.ttft, label, backend).observe(self.first_token_at - self.started)
        if self.time_per_token is not None:
            metrics.child(metrics.tpot, label, backend).observe(self.time_per_token)
        if backend and (reason := self.notes.get("upstream_error")):  # failed after the first byte
            metrics.child(metrics.upstream_errors, backend, reason).inc()
        counted = self.usage if backend else None
        if counted is not None:
            metrics.child(metrics.tokens, label, backend, "prompt").inc(counted.prompt_tokens)
            metrics.child(metrics.tokens, label, backend, "completion").inc(counted.completion_tokens)
        if key := self.key_name:  # a request the gateway's auth let in, or refused after naming the key
            metrics.child(metrics.key_requests, key, status).inc()
            if counted is not None:
                metrics.child(metrics.key_tokens, key, "prompt").inc(counted.prompt_tokens)
                metrics.child(metrics.key_tokens, key, "completion").inc(counted.completion_tokens)

    def _fields(self, elapsed: float) -> dict[str, Any]:
        """The request line: ids, names, decisions and counts."""
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "key": self.key_name or None,
            "model": self.requested_model,
            "served_model": self.served_model or None,
            "backend": self.backend or None,
            "local": self.local,
            "privacy": self.privacy,
            "privacy_reason": self.privacy_reason,
            "stream": self.stream,
            "status": self.status,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if self.usage is not None:
            fields["prompt_tokens"] = self.usage.prompt_tokens
            fields["completion_tokens"] = self.usage.completion_tokens
        if self.first_token_at is not None:
            fields["ttft_ms"] = round((self.first_token_at - self.started) * 1000, 3)
        if self.error_type:
            fields["error"] = self.error_type
        if self.answered_as and self.answered_as != self.requested_model:
            fields["answered_as"] = self.answered_as
        fields.update(self.notes)
        return fields


def audit_failed(metrics: Metrics, log: Any, error: AuditError, records: int) -> None:
    """The answers have gone; say loudly that their records did not (an alert watches the count)."""
    metrics.audit_failures.inc(records)
    log.error("audit write failed", error=str(error), records=records)
