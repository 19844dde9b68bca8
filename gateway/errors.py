"""The gateway's one error tree. Every failure a client can see is one of these.

    GatewayError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error   (param names the field)
    │   ├── BodyTooLarge              413
    │   ├── UnsupportedEncoding       415 a compressed body (Content-Encoding other than identity)
    │   ├── BodyTimeout               408 code=request_timeout: the body stopped arriving
    │   ├── NoRoute                   404 no endpoint at the path, 405 not with the method
    │   └── ClientGone                499 the client left before the answer began
    ├── AuthenticationFailed          401 invalid_request_error   code=invalid_api_key
    ├── PermissionDenied              403 permission_error
    │   └── PrivacyViolation          403 code=privacy_violation
    ├── ModelNotFound                 404 invalid_request_error   code=model_not_found
    │   └── ModelMissing              one Ollama instance lacks it: retried on the others
    ├── RateLimited                   429 rate_limit_error        (retry_after seconds)
    ├── Unavailable                   503 the gateway itself cannot serve (rate-limit store down,
    │   │                                 out of file descriptors)
    │   └── ShuttingDown              503 cut at the shutdown deadline
    └── UpstreamError                 502 server_error            (the backend failed us)
        ├── UpstreamUnavailable       503 connection refused / DNS / reset before a byte
        ├── UpstreamTimeout           504 connect, first token, idle or total deadline
        │   ├── UpstreamConnectTimeout    the connect deadline: the request was never sent
        │   └── StreamOverTime            a stream's total deadline: not counted against the instance
        ├── UpstreamRejected          the backend's own 4xx/429/5xx, status mapped per class;
        │                                 `busy` (429, a 503 'server busy' or 'overloaded'): not its failure
        └── UpstreamProtocol          502 the backend answered something we cannot parse

Each class carries its HTTP status, OpenAI error `type`, and the log level it deserves:
a client's mistake is `info`, a backend's failure is `warning`, our own bug is `error`.
Messages never carry a stack trace, a secret or prompt text, except a backend's own words quoted
for the client (`quoting`), which may repeat the request's text and never reach a log line.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

E = TypeVar("E", bound="GatewayError")
NOT_LOGGED = "[the backend's message, not logged]"
# Characters of an error's message in a log line. Messages quote what the client sent (a model
# name, a field's value), which may be as long as the body: a 1 MB value wrote its megabyte into
# the log for every request. The client still gets the whole message.
LOGGED_MESSAGE = 1000


def quoting(error: E, words: str) -> E:
    """`error`, whose message quotes a backend's `words`: the client gets them (it sent what they may
    repeat: vLLM's validation errors quote the offending field's value, the prompt included); the
    log line gets `log_message`, without them."""
    error.quoted = words
    return error


class GatewayError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    log_level: ClassVar[str] = "error"
    quoted: str | None = None  # a backend's own words in `message` (see `quoting`)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def log_message(self) -> str:
        """The message for a log line: without a backend's words it quotes, and cut at LOGGED_MESSAGE."""
        message = self.message.replace(self.quoted, NOT_LOGGED) if self.quoted else self.message
        if len(message) > LOGGED_MESSAGE:
            message = (
                f"{message[:LOGGED_MESSAGE]}... [{len(message) - LOGGED_MESSAGE} more characters, not logged]"
            )
        return message

    @property
    def type(self) -> str:
        """The OpenAI error type: what the client gets, and what the logs and the audit record say."""
        return self.error_type

    @property
    def retryable(self) -> bool:
        """Upstream failures are retried on another instance; client errors never are."""
        return False

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"
    log_level = "info"


class BodyTooLarge(InvalidRequest):
    status = 413


class UnsupportedEncoding(InvalidRequest):
    status = 415


class BodyTimeout(InvalidRequest):
    status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_timeout")


class NoRoute(InvalidRequest):
    """The router found no endpoint for the request: 404 for the path, 405 for its method."""

    def __init__(
        self, message: str, *, status: int, code: str | None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.route_status = status

    @property
    def http_status(self) -> int:
        return self.route_status


class ClientGone(InvalidRequest):
    """The client went away before the answer began; nobody reads it."""

    status = 499


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    log_level = "info"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class PermissionDenied(GatewayError):
    status = 403
    error_type = "permission_error"
    log_level = "info"


class PrivacyViolation(PermissionDenied):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="privacy_violation")


class ModelNotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    log_level = "info"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_not_found")


class ModelMissing(ModelNotFound):
    """One instance lacks the model (Ollama's 404, its pull hint in the message). Its inventory may
    be out of date, or unknown: another instance of the pool may have the model, so the request
    moves on, and the client gets this only when every instance it tried answered it."""

    @property
    def retryable(self) -> bool:
        return True


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"
    log_level = "info"


class Unavailable(GatewayError):
    status = 503
    log_level = "warning"


class ShuttingDown(Unavailable):
    def __init__(self) -> None:
        super().__init__(
            "The gateway is shutting down and its deadline for requests in flight"
            " (server.shutdown_timeout) has passed; retry the request.",
            code="shutting_down",
        )


class UpstreamError(GatewayError):
    status = 502
    log_level = "warning"
    # Label for gateway_upstream_errors_total{reason}.
    reason: ClassVar[str] = "protocol"

    @property
    def retryable(self) -> bool:
        return True


class UpstreamUnavailable(UpstreamError):
    status = 503
    reason = "connect"


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = "timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """The backend did not take the connection in time: it never got the request."""


class StreamOverTime(UpstreamTimeout):
    """A stream still going at its total deadline: a long answer, no fault of the instance's."""


# Failures that leave the request unsent: the backend did no work for it.
NOT_SENT = (UpstreamUnavailable, UpstreamConnectTimeout)


class UpstreamProtocol(UpstreamError):
    reason = "protocol"


class UpstreamRejected(UpstreamError):
    """The backend answered with an error status; we keep its meaning, not its words verbatim.
    `busy`: it answered that it has no room now (its 429, or `busy=True` from the provider, as for
    Ollama's 503 'server busy' when its queue is full, Gemini's 503 for an overloaded model). The
    request moves on, but the instance is alive and working: that is no failure to eject it for."""

    reason = "status"

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        busy: bool = False,
    ) -> None:
        if upstream_status in (401, 403):  # the gateway's own credentials: retrying cannot help
            headers = {**(headers or {}), "x-should-retry": "false"}
        super().__init__(message, param=param, code=code, headers=headers)
        self.upstream_status = upstream_status
        self.busy = busy or upstream_status == 429

    @property
    def http_status(self) -> int:
        if self.upstream_status == 429:
            return 429
        if self.upstream_status in (400, 413, 422):
            return 400
        if self.upstream_status in (401, 403):
            # The gateway's own credentials were refused: the client cannot fix that.
            return 502
        if self.upstream_status in (503, 504):
            # 504: the backend's own deadline ran out (Gemini's DEADLINE_EXCEEDED, a proxy's timeout)
            return self.upstream_status
        return 502

    @property
    def type(self) -> str:
        status = self.http_status
        if status == 400:
            return "invalid_request_error"
        if status == 429:
            return "rate_limit_error"
        return self.error_type

    @property
    def retryable(self) -> bool:
        return self.upstream_status == 429 or self.upstream_status >= 500
