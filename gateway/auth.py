"""API keys: who is calling, and which models they may use.

Keys are kept only as SHA-256 digests (from the config, or hashed at start from an environment
variable). A presented key is hashed and compared with every configured digest in constant time,
so neither the answer nor its timing says how close a guess came. With no keys configured the
gateway is open and every caller is anonymous.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from fnmatch import fnmatchcase

from gateway.config import ApiKey, Auth, ConfigError
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.policy import other_name


class Keys:
    def __init__(self, auth: Auth, environ: Mapping[str, str]) -> None:
        self._keys: list[tuple[bytes, ApiKey]] = []
        for key in auth.keys:
            if key.key_env is not None:
                secret = environ.get(key.key_env)
                if not secret:
                    raise ConfigError(
                        f"auth.keys: key {key.name!r} reads its secret from ${key.key_env}, which is not set"
                    )
                digest = hashlib.sha256(secret.encode()).digest()
            else:
                digest = bytes.fromhex(key.key_sha256 or "")
            if any(digest == other for other, _ in self._keys):
                raise ConfigError(
                    f"auth.keys: key {key.name!r} has the same secret as another key; each key needs its own"
                )
            self._keys.append((digest, key))

    @property
    def open(self) -> bool:
        return not self._keys

    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key behind an `Authorization` header; None when the gateway is open."""
        if self.open:
            return None
        scheme, _, secret = (authorization or "").strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer YOUR_KEY' (the OpenAI SDKs do this"
                " with api_key=...)."
            )
        digest = hashlib.sha256(secret.encode()).digest()
        found: ApiKey | None = None
        for candidate, key in self._keys:  # no early exit: every digest is compared
            if hmac.compare_digest(digest, candidate):
                found = key
        if found is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return found


def allows(key: ApiKey | None, model: str) -> bool:
    """Whether the key's globs take `model`. Ollama's `llama3.2` and `llama3.2:latest` are one
    model, so either name stands for both (`/v1/models` lists the tagged one)."""
    if key is None or any(fnmatchcase(model, pattern) for pattern in key.models):
        return True
    other = other_name(model)
    return other is not None and any(fnmatchcase(other, pattern) for pattern in key.models)


def check_model(key: ApiKey | None, model: str) -> None:
    if not allows(key, model):
        assert key is not None
        raise PermissionDenied(
            f"The API key '{key.name}' may not use the model '{model}'.",
            param="model",
            code="model_not_allowed",
        )
