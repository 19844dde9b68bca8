"""A response_format JSON Schema as Gemini's `responseJsonSchema` takes it: translated where the
meaning stays, refused where it cannot, never sent with a reference to nothing or a lost sub-schema."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.providers.gemini.schema import response_schema

ADDR = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
NAME = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.mark.parametrize(
    ("schema", "sent"),
    [
        pytest.param(  # zod-to-json-schema with a name
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "$ref": "#/definitions/Answer",
                "definitions": {"Answer": ADDR},
            },
            {"$ref": "#/$defs/Answer", "$defs": {"Answer": ADDR}},
            id="root $ref to draft-07 definitions",
        ),
        pytest.param(  # pydantic v1
            {
                "type": "object",
                "properties": {"home": {"$ref": "#/definitions/Addr"}},
                "definitions": {"Addr": ADDR},
            },
            {"type": "object", "properties": {"home": {"$ref": "#/$defs/Addr"}}, "$defs": {"Addr": ADDR}},
            id="definitions referenced from a property",
        ),
        pytest.param(
            {
                "$ref": "#/$defs/A",
                "$defs": {"A": {"type": "string", "const": "OSL", "examples": ["OSL"]}},
            },
            {"$ref": "#/$defs/A", "$defs": {"A": {"type": "string", "enum": ["OSL"]}}},
            id="$defs beside a root $ref are translated too",
        ),
        pytest.param(  # pydantic < 2.9: a described nested model
            {
                "type": "object",
                "properties": {"home": {"allOf": [{"$ref": "#/$defs/Addr"}], "description": "where"}},
                "$defs": {"Addr": ADDR},
            },
            {"type": "object", "properties": {"home": {"$ref": "#/$defs/Addr"}}, "$defs": {"Addr": ADDR}},
            id="allOf of one reference",
        ),
        pytest.param(
            {"allOf": [{"$ref": "#/$defs/Addr"}, NAME], "description": "a person", "$defs": {"Addr": ADDR}},
            {
                "description": "a person",
                "$defs": {"Addr": ADDR},
                "type": "object",
                "properties": {"city": {"type": "string"}, "name": {"type": "string"}},
                "required": ["city", "name"],
            },
            id="allOf of object schemas is merged",
        ),
        pytest.param(
            {"$ref": "#/$defs/Addr", "required": ["zip"], "$defs": {"Addr": ADDR}},
            {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["zip", "city"],
                "$defs": {"Addr": ADDR},
            },
            id="constraints beside a $ref are merged with its target",
        ),
        pytest.param(
            {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/Tree"}},
                "$defs": {
                    "Tree": {"type": "object", "properties": {"kids": {"items": {"$ref": "#/$defs/Tree"}}}}
                },
            },
            {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/Tree"}},
                "$defs": {
                    "Tree": {"type": "object", "properties": {"kids": {"items": {"$ref": "#/$defs/Tree"}}}}
                },
            },
            id="recursive references are kept (Gemini follows them)",
        ),
        pytest.param(
            {
                "$defs": {
                    "Addr": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "A": {"type": "object", "properties": {"home": {"$ref": "#/$defs/Addr"}}},
                    "B": {"type": "object", "properties": {"home": {"required": ["city"]}}},
                },
                "allOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}],
            },
            {
                "$defs": {
                    "Addr": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "A": {"type": "object", "properties": {"home": {"$ref": "#/$defs/Addr"}}},
                    "B": {"type": "object", "properties": {"home": {"required": ["city"]}}},
                },
                "type": "object",
                "properties": {"home": ADDR},
            },
            id="a property named in two allOf parts is merged in turn",
        ),
        pytest.param(
            {"type": "string", "enum": ["open", "done"], "const": "open"},
            {"type": "string", "enum": ["open"]},
            id="const beside an enum holding it",
        ),
        pytest.param(
            {"type": "string", "const": "open", "enum": ["open", "done"]},
            {"type": "string", "enum": ["open"]},
            id="const before an enum holding it",
        ),
        pytest.param(
            {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]},
            {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
            id="draft-07 tuple items",
        ),
    ],
)
def test_schemas_are_translated_without_changing_what_they_mean(
    schema: dict[str, Any], sent: dict[str, Any]
) -> None:
    assert response_schema(schema) == (sent, [])


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        pytest.param(
            {"$ref": "#/$defs/A", "$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}, NAME]}}},
            "recursive schema '#/$defs/A'",
            id="allOf merging a schema into itself",
        ),
        pytest.param(
            {
                "$defs": {
                    "A": {"type": "object", "properties": {"child": {"$ref": "#/$defs/A"}}},
                    "B": {"type": "object", "properties": {"child": {"$ref": "#/$defs/B"}}},
                },
                "allOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}],
            },
            "recursive schema '#/$defs/A'",
            id="allOf of two recursive schemas that share a property",
        ),
        pytest.param(
            {"allOf": [{"type": "object"}, {"type": "array"}]},
            "disagree on 'type'",
            id="allOf parts that disagree",
        ),
        pytest.param(
            {"allOf": [{**ADDR, "additionalProperties": False}, NAME]},
            "closed by 'additionalProperties'",
            id="allOf adding properties to a closed object",
        ),
        pytest.param(
            {"allOf": [{"$ref": "https://example.org/a.json"}, NAME]},
            "outside the schema",
            id="allOf with a remote reference",
        ),
        pytest.param({"type": "string", "not": {"enum": ["x"]}}, "no 'not'", id="not"),
        pytest.param(
            {"type": "string", "enum": ["open", "done"], "const": "closed"},
            "its 'const' 'closed' is not in its 'enum', so it admits no value at all",
            id="const outside its enum",
        ),
        pytest.param(
            {"enum": [1, 2], "const": True},
            "its 'const' True is not in its 'enum'",
            id="const true is not the number 1",
        ),
        pytest.param({"type": "object", "if": {}, "then": {}}, "no 'if'", id="if/then"),
        pytest.param(
            {"type": "object", "properties": {"a": {"$ref": "#/properties/b/items"}}},
            "'#/properties/b/items' points at nothing",
            id="a reference to nothing",
        ),
    ],
)
def test_schemas_gemini_cannot_take_are_refused_naming_the_field_and_why(
    schema: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(words)) as caught:
        response_schema(schema)
    assert caught.value.param == "response_format.json_schema.schema"


def test_constraints_gemini_lacks_are_dropped_and_named_and_annotations_dropped_quietly() -> None:
    code = {"type": "string", "pattern": "^[A-Z]+$", "minLength": 3, "examples": ["OSL"]}
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "#/$defs/Trip",
        "$defs": {"Trip": {"type": "object", "properties": {"code": code}, "default": {}}},
    }
    assert response_schema(schema) == (
        {
            "$ref": "#/$defs/Trip",
            "$defs": {"Trip": {"type": "object", "properties": {"code": {"type": "string"}}}},
        },
        ["minLength", "pattern"],
    )
