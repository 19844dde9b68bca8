"""A `response_format` JSON Schema as `responseJsonSchema` takes it (contracts/gemini.md §2.3).

Gemini documents a subset of JSON Schema; what a client's schema says beyond it is translated where
the meaning stays the same, and refused (400) where it cannot be:
- draft-07 `definitions` become `$defs`, and `#/definitions/…` references point there;
- `const` becomes a one-value `enum` (beside an `enum` that holds it too; one that does not would
  admit nothing, and is refused); a draft-07 `items` list becomes `prefixItems`;
- `allOf` is merged into one schema when its parts are a plain conjunction (object schemas that
  agree on every keyword they share, references inlined), and refused otherwise;
- a `$ref` keeps only `$`-prefixed siblings (Gemini's rule): annotations beside it are dropped,
  constraints beside it are merged with its target as `allOf` would be;
- keywords that only annotate (`$schema`, `default`, `examples`, …) are dropped;
- other keywords that hold sub-schemas (`not`, `if`, `patternProperties`, …) are refused;
- other constraints Gemini lacks (`pattern`, `minLength`, …) are dropped and named in `dropped`,
  which the provider reports as the `schema_dropped` notice: the answer keeps the schema's shape.
A local `$ref` that would point at nothing in the schema sent is refused. References may be
recursive (Gemini follows them); a merge that would inline a schema into itself is refused.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest

PARAM = "response_format.json_schema.schema"
# The keywords `responseJsonSchema` accepts, kept as they are.
KEPT = {"$id", "$anchor", "type", "format", "title", "description", "enum", "minItems", "maxItems",
        "minimum", "maximum", "required", "propertyOrdering"}  # fmt: skip
ANNOTATIONS = {"$schema", "$comment", "$vocabulary", "default", "examples", "deprecated", "readOnly",
               "writeOnly", "contentMediaType", "contentEncoding", "discriminator"}  # fmt: skip
# Keywords that hold sub-schemas Gemini has no way to say: dropping one loses a whole schema.
SUBSCHEMAS = {"not", "if", "then", "else", "dependentSchemas", "dependencies", "patternProperties",
              "propertyNames", "contains", "unevaluatedProperties", "unevaluatedItems",
              "additionalItems", "$dynamicRef", "$recursiveRef"}  # fmt: skip
# Keywords of a merged part that say nothing about the instance (the first part's are kept).
NEUTRAL = ANNOTATIONS | {"title", "description", "$id", "$anchor", "$defs", "definitions"}
MAX_INLINED = 32  # references followed while merging, one inside another


def response_schema(schema: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The schema to send, and the constraint keywords dropped from it (sorted)."""
    translation = _Translation(schema)
    try:
        out = translation.node(schema)
    except RecursionError:  # a guard missed a cycle, or a schema nested beyond reason
        raise _refused("it nests too deep to be translated") from None
    for ref in translation.refs:
        if _resolve(out, ref) is None:
            raise _refused(f"its '$ref' {ref!r} points at nothing Gemini can be sent")
    return out, sorted(translation.dropped)


def _refused(why: str) -> InvalidRequest:
    return InvalidRequest(f"Gemini cannot take this response_format schema: {why}", param=PARAM)


def _resolve(root: Any, ref: str) -> Any:
    """The target of a local JSON pointer reference (`#`, `#/a/b`), or None."""
    if ref == "#":
        return root
    node = root
    for escaped in ref.removeprefix("#/").split("/"):
        step = escaped.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return None
    return node


def _rewritten(ref: str) -> str:
    return "#/$defs/" + ref.removeprefix("#/definitions/") if ref.startswith("#/definitions/") else ref


def _local(ref: Any) -> bool:
    return isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))


class _Translation:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.dropped: set[str] = set()
        self.refs: list[str] = []  # local references in the output, checked at the end
        # An `allOf` a merge made of a property named in two parts -> (it, the references inlined
        # to make those parts): merging it in turn must not inline them again.
        self._chains: dict[int, tuple[dict[str, Any], tuple[str, ...]]] = {}

    def node(self, schema: Any) -> Any:
        if not isinstance(schema, dict):
            return schema  # true and false are schemas too
        while "allOf" in schema or ("$ref" in schema and _constrains(schema, besides=("$ref",))):
            schema = self._merge(schema, self._chain(schema))
        if "$ref" in schema:  # only `$`-prefixed siblings
            return self._reference(schema)
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                out[key] = {name: self.node(sub) for name, sub in value.items()}
            elif key in ("$defs", "definitions") and isinstance(value, dict):
                self._definitions(out, value)
            elif key in ("items", "additionalProperties"):
                out["prefixItems" if isinstance(value, list) else key] = self._nodes(value)
            elif key in ("prefixItems", "anyOf", "oneOf"):
                out[key] = self._nodes(value)
            elif key == "const":
                out["enum"] = _const_enum(value, schema.get("enum"))
            elif key == "enum" and "const" in schema:
                continue  # met with the const
            elif key in KEPT:
                out[key] = value
            elif key in SUBSCHEMAS:
                raise _refused(
                    f"it has no '{key}', and dropping it would leave a part of the schema unchecked"
                )
            elif key not in ANNOTATIONS:
                self.dropped.add(key)
        return out

    def _nodes(self, value: Any) -> Any:
        return [self.node(item) for item in value] if isinstance(value, list) else self.node(value)

    def _definitions(self, out: dict[str, Any], value: dict[str, Any]) -> None:
        defs = out.setdefault("$defs", {})
        for name, sub in value.items():
            if name in defs:
                raise _refused(f"'{name}' is defined both in 'definitions' and in '$defs'")
            defs[name] = self.node(sub)

    def _reference(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema["$ref"]
        out: dict[str, Any] = {"$ref": _rewritten(ref) if isinstance(ref, str) else ref}
        if _local(ref):
            self.refs.append(out["$ref"])
        for key, value in schema.items():
            if key in ("$defs", "definitions") and isinstance(value, dict):
                self._definitions(out, value)
            elif key in ("$id", "$anchor"):
                out[key] = value
        return out

    def _merge(self, schema: dict[str, Any], inlining: tuple[str, ...]) -> dict[str, Any]:
        """`allOf` (or a `$ref` with constraints beside it) as one schema, where that means the same."""
        items = schema.get("allOf", [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise _refused("'allOf' must be a list of schemas")
        rest = {key: value for key, value in schema.items() if key != "allOf"}
        if "$ref" in rest:  # a reference and the constraints beside it both hold
            items = [{"$ref": rest.pop("$ref")}, *items]
        parts = [rest, *items]
        neutral = {key: value for part in reversed(parts) for key, value in part.items() if key in NEUTRAL}
        constraining = [part for part in parts if _constrains(part)]
        if len(constraining) <= 1:  # pydantic's {"allOf": [{"$ref": …}], "description": …}
            return {**neutral, **(constraining[0] if constraining else {})}
        inlined = [self._inlined(part, inlining) for part in constraining]
        chain = tuple(dict.fromkeys(ref for _, refs in inlined for ref in refs))
        names = {name for part, _ in inlined for name in part.get("properties") or ()}
        merged: dict[str, Any] = {}
        for part, _ in inlined:
            if part.get("additionalProperties", True) is not True and names - set(
                part.get("properties") or ()
            ):
                raise _refused("its 'allOf' adds properties to an object closed by 'additionalProperties'")
            self._conjoin(merged, part, chain)
        return {**neutral, **merged}

    def _chain(self, schema: dict[str, Any]) -> tuple[str, ...]:
        made = self._chains.get(id(schema))
        return made[1] if made is not None and made[0] is schema else ()

    def _conjoin(self, merged: dict[str, Any], part: dict[str, Any], chain: tuple[str, ...]) -> None:
        """Adds one part to a merge: properties joined (one named in both holds both, to be merged
        without inlining `chain` again), `required` united, any other keyword the same in both or
        refused."""
        for key, value in part.items():
            if key in NEUTRAL:
                continue
            if key == "properties" and isinstance(value, dict):
                properties = merged.setdefault(key, {})
                for name, sub in value.items():
                    known = properties.get(name, sub)
                    joined = sub if known == sub else {"allOf": [known, sub]}
                    if joined is not sub:
                        self._chains[id(joined)] = (joined, chain)
                    properties[name] = joined
            elif key == "required" and isinstance(value, list):
                required = merged.setdefault(key, [])
                required += [name for name in value if name not in required]
            elif key in merged and merged[key] != value:
                raise _refused(
                    f"the parts of its 'allOf' disagree on '{key}' and cannot be merged into one schema"
                )
            else:
                merged[key] = value

    def _inlined(
        self, part: dict[str, Any], inlining: tuple[str, ...]
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """A part to merge, with what its reference points at in place of the reference, and the
        references inlined on the way."""
        while "$ref" in part or "allOf" in part:
            if "allOf" in part:
                part = self._merge(part, (*inlining, *self._chain(part)))
                continue
            ref = part["$ref"]
            if not _local(ref):
                raise _refused(f"its 'allOf' refers to {ref!r}, outside the schema, and cannot be merged")
            if ref in inlining:
                raise _refused(f"its 'allOf' would merge the recursive schema {ref!r} into itself")
            if len(inlining) >= MAX_INLINED:
                raise _refused(f"its 'allOf' references nest more than {MAX_INLINED} deep")
            target = _resolve(self.root, ref)
            if not isinstance(target, dict):
                raise _refused(f"its '$ref' {ref!r} points at nothing")
            siblings = {key: value for key, value in part.items() if key != "$ref"}
            inlining = (*inlining, ref)
            part = {"allOf": [target], **siblings} if _constrains(siblings) else target
        return part, inlining


def _const_enum(const: Any, enum: Any) -> list[Any]:
    """`const` as an `enum`, beside the schema's own `enum` when there is one: both must hold."""
    if not isinstance(enum, list) or any(_same(const, value) for value in enum):
        return [const]
    raise _refused(f"its 'const' {const!r} is not in its 'enum', so it admits no value at all")


def _same(a: Any, b: Any) -> bool:
    """JSON equality, where true is not 1 (as it is in Python)."""
    return a is b if isinstance(a, bool) or isinstance(b, bool) else bool(a == b)


def _constrains(schema: dict[str, Any], besides: tuple[str, ...] = ()) -> bool:
    return any(key not in NEUTRAL and key not in besides for key in schema)
