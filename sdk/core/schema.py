"""Building blocks of the JSON Schemas infopt checks its files against (the bundle manifest, and
each target's part of it)."""

from __future__ import annotations

from typing import Any

STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
NUM: dict[str, Any] = {"type": "number"}
BOOL: dict[str, Any] = {"type": "boolean"}
COUNT: dict[str, Any] = {"type": "integer", "minimum": 1}
STRS: dict[str, Any] = {"type": "array", "items": STR}
INTS: dict[str, Any] = {"type": "array", "items": INT}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def typed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object whose keys named here have these types (those in `required` present); other
    keys are let through, so a newer writer of the same format version can add one."""
    return {"type": "object", "properties": properties, "required": list(required)}


def open_object(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object whose keys are free (its values of schema `values`, if given)."""
    return {"type": "object", **({"additionalProperties": values} if values else {})}
