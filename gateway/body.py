"""Reading a request body: size limit, JSON, and validation errors that name the field."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from gateway.errors import BodyTooLarge, ClientGone, InvalidRequest, UnsupportedEncoding
from gateway.incoming import Incoming
from gateway.schemas import Wire

M = TypeVar("M", bound=Wire)
# JSON nesting accepted in a request. A chat request with tool schemas needs well under 20; the
# bound keeps every body re-encodable for the backend (orjson writes at most 255 levels).
MAX_DEPTH = 64


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests containers more than `limit` levels deep (walked level by level)."""
    level = [value]
    for _ in range(limit):
        below: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            below.extend(child for child in children if isinstance(child, (dict, list)))
        if not below:
            return False
        level = below
    return True


# Content parts whose payload is an attachment's bytes, not text: the part's key, the payload's.
_PAYLOADS = {"image_url": "url", "input_audio": "data", "file": "file_data"}


def written(data: dict[str, Any]) -> list[str]:
    """Every string in a JSON body, for the PII detector. Whatever the client sends may reach a
    backend (an OpenAI-compatible one gets unknown fields too), so any of it may hold personal
    data: `user`, a message's `name`, a tool's description, `prediction`, an image's URL, the
    names of an object's members (`metadata`'s keys, a schema's properties), and the digits of large
    integers. Left out are a content
    part's attachment bytes (a data URL, base64 audio, a file's data), which the detector cannot
    read; `privacy.attachments` decides for them."""
    out: list[str] = []
    _from_object(data, out)
    return out


# Integers of this size and more are read as their digits: a card number sent as a JSON number is
# a card number (`max_tokens`, `n` and token ids stay below it).
BIG = 1_000_000


# Recursive and by exact type (what orjson makes), which keeps the walk of an ordinary request
# short; read_json has bounded the nesting.
def _from_object(value: dict[str, Any], out: list[str]) -> None:
    # A content part ({"type": "image_url", "image_url": ...}) is the one place attachment bytes are
    # left out: an object of that shape anywhere else is text that goes upstream as it is.
    part = value.get("type")
    for key, item in value.items():
        if not key.isalpha():  # letters alone (`role`, `content`) hold no personal data of any kind
            out.append(key)
        kind = type(item)
        if kind is str:
            if key != "image_url" or part != key or not _is_bytes("url", item):  # {"image_url": "data:..."}
                out.append(item)
        elif kind is list:
            _from_array(item, out)
        elif kind is dict:
            payload = _PAYLOADS.get(key)
            if payload is None or part != key or not _is_bytes(payload, item.get(payload)):
                _from_object(item, out)
            else:  # a content part's attachment: what names it, not its bytes
                _from_object({name: field for name, field in item.items() if name != payload}, out)
        elif kind is int and not -BIG < item < BIG:
            out.append(str(item))


def _from_array(value: list[Any], out: list[str]) -> None:
    for item in value:
        kind = type(item)
        if kind is str:
            out.append(item)
        elif kind is dict:
            _from_object(item, out)
        elif kind is list:
            _from_array(item, out)
        elif kind is int and not -BIG < item < BIG:
            out.append(str(item))


def _is_bytes(field: str, value: Any) -> bool:
    """Whether `value`, a content part's payload field, holds the bytes (a URL only as data:)."""
    return type(value) is str and (field != "url" or value[:5].lower() == "data:")


async def _body(request: Incoming, limit: int) -> bytes:
    """The whole body, from as many ASGI messages as it came in."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientGone("The client closed the connection before sending the whole body.")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        request.received = size
        if size > limit:
            raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        if not message.get("more_body", False):
            request.body_read = True
            return b"".join(chunks) + chunk if chunks else chunk
        chunks.append(chunk)


async def read_json(request: Incoming, limit: int) -> Any:
    headers = request.headers
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    encoding = headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not accepted; send the JSON body uncompressed."
        )
    content_type = headers.get("content-type")
    if content_type is not None and content_type != "application/json":
        content_type = content_type.split(";")[0].strip().lower()
        if content_type not in ("application/json", "") and not content_type.endswith("+json"):
            raise InvalidRequest(f"Expected 'Content-Type: application/json', got {content_type!r}.")
    raw = await _body(request, limit)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if not raw.strip():
            raise InvalidRequest("The request body is empty; expected a JSON object.") from None
        if "UTF-8" in str(error):
            raise InvalidRequest("The request body is not valid UTF-8.") from None
        if "depth" in str(error):
            raise InvalidRequest(f"The request body nests deeper than {MAX_DEPTH} levels.") from None
        raise InvalidRequest("The request body is not valid JSON.") from None
    # Counting brackets first keeps the walk off ordinary requests: fewer containers than the
    # limit cannot nest deeper than it.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _deeper_than(data, MAX_DEPTH):
        raise InvalidRequest(f"The request body nests deeper than {MAX_DEPTH} levels.")
    return data


def _param(loc: tuple[int | str, ...], data: Any, missing: bool) -> str:
    """The field an error is about, as the client would name it: the steps of `loc` that lead
    into the request body. The others are names pydantic gives a union's branches (`str`,
    `ImageURL`, a content part's type); a missing field is named although it is not there."""
    out, here = "", data
    for position, part in enumerate(loc):
        if isinstance(part, int) and isinstance(here, list) and 0 <= part < len(here):
            out, here = f"{out}[{part}]", here[part]
        elif isinstance(part, str) and isinstance(here, dict) and part in here:
            out, here = f"{out}.{part}" if out else part, here[part]
        elif missing and position == len(loc) - 1 and isinstance(part, str):
            out = f"{out}.{part}" if out else part
    return out


def _depth(param: str) -> int:
    return param.count(".") + param.count("[")


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for field, instead in model.REFUSED.items():
        if data.get(field) is not None:
            message = f"'{field}' is deprecated by OpenAI and not served here: send '{instead}' instead."
            raise InvalidRequest(message, param=field)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        # A value that fits no branch of a union fails once per branch, the shallowest first
        # (`content` is not a string): the one that went deepest into the value says what is wrong.
        located = [
            (_param(e["loc"], data, e["type"] == "missing"), e) for e in error.errors(include_url=False)
        ]
        first = located[0][0]
        param, chosen = max(
            (item for item in located if item[0] == first or item[0].startswith((first + ".", first + "["))),
            key=lambda item: _depth(item[0]),
        )
        if chosen["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {chosen['msg'].removeprefix('Value error, ')}."
        raise InvalidRequest(message, param=param or None) from None
