"""How a request body that does not fit OpenAI's schema is refused: the field named as the client
would name it, and what is wrong with it. And which of a body's strings the PII detector reads."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.body import validate, written
from gateway.errors import InvalidRequest
from gateway.schemas import ChatRequest


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def with_part(part: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, part]}])


def with_call(call: dict[str, Any]) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}])


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        # inside a content part: the part's own field, not "content is not a string"
        (with_part({"type": "text"}), "messages[0].content[1].text", "Missing required parameter"),
        (with_part({"type": "text", "text": 5}), "messages[0].content[1].text", "valid string"),
        (
            with_part({"type": "image_url", "image_url": {}}),
            "messages[0].content[1].image_url.url",
            "Missing",
        ),
        (
            with_part({"type": "image_url", "image_url": {"url": "data:,", "detail": "medium"}}),
            "messages[0].content[1].image_url.detail",
            "'auto', 'low' or 'high'",
        ),
        (with_part({"type": "video"}), "messages[0].content[1]", "tag 'video'"),
        # elsewhere, as before
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "valid string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "Missing required parameter"),
        (chat(stream="yes"), "stream", "valid boolean"),
        (chat(stop=5), "stop", "valid string"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0]", "needs 'tool_call_id'"),
        # only a user message takes more than text (and an assistant's, a refusal)
        (
            chat(
                messages=[
                    {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
                ]
            ),
            "messages[0]",
            "system messages take no 'image_url' parts (content[0])",
        ),
        # a history tool call: its own fields, not those of the branch pydantic tagged it with
        (
            with_call({"type": "function", "function": {"name": "f"}}),
            "messages[1].tool_calls[0].id",
            "Missing",
        ),
        (with_call({"function": {"name": "f"}}), "messages[1].tool_calls[0].id", "Missing"),
        (with_call({"id": 5, "function": {"name": "f"}}), "messages[1].tool_calls[0].id", "valid string"),
        (with_call({"type": "custom", "custom": {"name": "g"}}), "messages[1].tool_calls[0].id", "Missing"),
        (with_call({"id": "c"}), "messages[1].tool_calls[0].function", "Missing"),
        (
            with_call({"id": "c", "function": {"name": 3}}),
            "messages[1].tool_calls[0].function.name",
            "string",
        ),
        (with_call({"id": "c", "type": "bogus"}), "messages[1].tool_calls[0]", "'function' or 'custom'"),
        # OpenAI's deprecated forms: the answer would not come in their form
        (chat(functions=[{"name": "f", "parameters": {}}]), "functions", "send 'tools' instead"),
        (chat(function_call={"name": "f"}), "function_call", "send 'tool_choice' instead"),
    ],
)
def test_a_refused_body_names_the_field_that_is_wrong(body: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validate(ChatRequest, body)
    assert refused.value.param == param
    assert says in refused.value.message
    assert f"'{param}'" in refused.value.message


def test_the_detector_reads_every_string_a_client_wrote() -> None:
    body = chat(
        user="u@example.org",
        stop=["STOP"],
        metadata={"ticket": "T-1"},
        prediction={"type": "content", "content": "draft"},
        tools=[{"type": "function", "function": {"name": "f", "description": "tool text"}}],
        messages=[
            {"role": "user", "name": "Ana", "content": [{"type": "text", "text": "look"}], "extra": ["x", 7]},
        ],
    )
    assert set(written(body)) >= {"u@example.org", "STOP", "T-1", "draft", "tool text", "Ana", "look", "x"}


def test_the_detector_skips_attachments_bytes_but_not_what_names_them() -> None:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD", "detail": "low"}},
        {"type": "image_url", "image_url": "DATA:image/png;base64,REVG"},  # the short form
        {"type": "image_url", "image_url": {"url": "https://img.example/scan.png?patient=ana"}},
        {"type": "input_audio", "input_audio": {"data": "R0hJ", "format": "wav"}},
        {"type": "file", "file": {"file_data": "SktM", "filename": "ana-lopez.pdf"}},
    ]
    found = written(chat(messages=[{"role": "user", "content": parts}]))
    assert not {"QUJD", "REVG", "R0hJ", "SktM"} & {text.rsplit(",", 1)[-1] for text in found}
    assert {"https://img.example/scan.png?patient=ana", "ana-lopez.pdf", "low", "wav"} <= set(found)


def test_the_detector_reads_member_names_and_attachment_shapes_outside_content_parts() -> None:
    body = chat(
        metadata={"ana@example.org": "reviewer"},
        tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"properties": {"tel_612": {}}}}}
        ],
        context={"input_audio": {"data": "QUJD"}, "image_url": "data:,REVG", "file": {"file_data": "SktM"}},
    )
    found = set(written(body))
    assert {"ana@example.org", "tel_612", "QUJD", "data:,REVG", "SktM"} <= found
    assert not {"role", "content", "model", "messages"} & found  # letters alone hold no personal data


def test_the_detector_reads_the_digits_of_large_integers_only() -> None:
    found = written(chat(max_tokens=512, n=1, seed=7, customer={"card": 4111111111111111, "id": -9876543}))
    assert {"4111111111111111", "-9876543"} <= set(found)
    assert not {"512", "1", "7"} & set(found)
