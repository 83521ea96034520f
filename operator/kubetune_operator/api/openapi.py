"""Models -> Kubernetes *structural* OpenAPI v3 schemas (what a CRD's openAPIV3Schema must be).

Written as a direct walk over the pydantic fields rather than a rewrite of pydantic's JSON
Schema: a structural schema has rules of its own (a `type` on every node, no $ref/anyOf-null,
OpenAPI v3.0 boolean exclusive bounds, x-kubernetes-* extensions), and walking the fields lets
us carry the CEL rules and defaults exactly as the models state them.

The walk also enforces the API's house rules, so a new field cannot slip in without them:
every field has a description, and every string, list and map has a maximum size (which also
keeps the CEL cost estimates of the rules within the API server's budget).
"""

from __future__ import annotations

import enum
import inspect
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kubetune_trainer.apimodel import (
    ApiModel,
    Format,
    IntOrString,
    ListType,
    PreserveUnknownFields,
    Rule,
    SchemaExtra,
    class_rules,
)

Schema = dict[str, Any]

# Fixed key order: generated files stay byte-for-byte stable and read top-down.
KEY_ORDER = (
    "description", "type", "format", "enum", "default", "minimum", "exclusiveMinimum", "maximum",
    "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "minProperties",
    "maxProperties", "pattern", "anyOf", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "items", "additionalProperties", "required",
    "properties", "x-kubernetes-validations",
)  # fmt: skip


class SchemaError(TypeError):
    """A model cannot be rendered as a structural schema (or breaks a house rule)."""


def describe(cls: type) -> str:
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split())


def _ordered(node: Schema) -> Schema:
    unknown = set(node) - set(KEY_ORDER)
    if unknown:
        raise SchemaError(f"unexpected schema keys {sorted(unknown)}")
    return {k: node[k] for k in KEY_ORDER if k in node}


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        # The whole default object: the API server checks CEL rules against it as written, before
        # nested defaults would apply, so `{}` would break rules that read a defaulted field.
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_json_default(v) for v in value]
    return value


def field_default(info: Any) -> tuple[bool, Any]:
    """(has a server-side default, the default as JSON)."""
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is not PydanticUndefined:
        value = info.default
    else:
        return False, None
    if value is None or value == [] or value == {}:
        return False, None  # "absent" is the default: nothing for the API server to fill in
    return True, _json_default(value)


def _apply_metadata(node: Schema, meta: list[Any], where: str) -> None:
    typ = node.get("type")
    for m in meta:
        if isinstance(m, Rule):
            node.setdefault("x-kubernetes-validations", []).append(m.to_openapi())
        elif isinstance(m, Format):
            node["format"] = m.name
        elif isinstance(m, ListType):
            node["x-kubernetes-list-type"] = m.type
            if m.type == "map":
                node["x-kubernetes-list-map-keys"] = list(m.keys)
        elif isinstance(m, SchemaExtra):
            node.update(m.keywords)
        elif isinstance(m, IntOrString | PreserveUnknownFields):
            continue  # handled where the type is decided
        for attr, key, exclusive in (
            ("ge", "minimum", False),
            ("gt", "minimum", True),
            ("le", "maximum", False),
            ("lt", "maximum", True),
        ):
            value = getattr(m, attr, None)
            if value is not None:
                node[key] = value
                if exclusive:
                    node["exclusiveMinimum" if key == "minimum" else "exclusiveMaximum"] = True
        for attr, suffix in (("min_length", "min"), ("max_length", "max")):
            value = getattr(m, attr, None)
            if value is None:
                continue
            if typ == "string" or node.get("x-kubernetes-int-or-string"):
                node[f"{suffix}Length"] = value
            elif typ == "array":
                node[f"{suffix}Items"] = value
            elif typ == "object":
                node[f"{suffix}Properties"] = value
            else:
                raise SchemaError(f"{where}: length constraint on a {typ}")
        if getattr(m, "pattern", None) is not None:
            raise SchemaError(f"{where}: use a CEL pattern rule (with a message) instead of `pattern`")


def type_schema(tp: Any, meta: list[Any], where: str) -> Schema:
    """The schema of one annotation (with its metadata), without description or default."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *raw = get_args(tp)
        # Field(...) inside Annotated carries its constraints in its own metadata.
        extra = [x for m in raw for x in (m.metadata if isinstance(m, FieldInfo) else [m])]
        if any(isinstance(m, Rule) for m in extra) and where.endswith("[]"):
            raise SchemaError(f"{where}: rules on list items need a model (their mirror runs per field)")
        return type_schema(base, [*extra, *meta], where)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return type_schema(args[0], meta, where)
        if set(args) == {int, str} and any(isinstance(m, IntOrString) for m in meta):
            node: Schema = {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
            }
            _apply_metadata(node, meta, where)
            return _ordered(node)
        raise SchemaError(f"{where}: unions other than int | str (IntOrString) are not structural")

    if origin is Literal:
        values = list(get_args(tp))
        kinds = {type(v) for v in values}
        typ = {str: "string", int: "integer"}.get(kinds.pop()) if len(kinds) == 1 else None
        if typ is None:
            raise SchemaError(f"{where}: enum values must all be strings or all integers")
        node = {"type": typ, "enum": values}
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        node = {"type": "string", "enum": [m.value for m in tp]}
    elif tp is bool:
        node = {"type": "boolean"}
    elif tp is int:
        node = {"type": "integer"}
    elif tp is float:
        node = {"type": "number"}
    elif tp is str:
        node = {"type": "string"}
    elif origin is list:
        (item,) = get_args(tp)
        node = {"type": "array", "items": type_schema(item, [], f"{where}[]")}
    elif origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise SchemaError(f"{where}: map keys must be strings")
        if value is Any:
            if not any(isinstance(m, PreserveUnknownFields) for m in meta) and where != "metadata":
                raise SchemaError(f"{where}: free-form objects must be marked PreserveUnknownFields")
            node = {"type": "object"}
            if where != "metadata":
                node["x-kubernetes-preserve-unknown-fields"] = True
        else:
            node = {"type": "object", "additionalProperties": type_schema(value, [], f"{where}{{}}")}
    elif isinstance(tp, type) and issubclass(tp, ApiModel):
        node = model_schema(tp, where)
    else:
        raise SchemaError(f"{where}: unsupported type {tp!r}")
    _apply_metadata(node, meta, where)
    _check_bounded(node, where)
    return _ordered(node)


def _check_bounded(node: Schema, where: str) -> None:
    """House rule: strings, lists and maps are bounded (the CEL cost estimator needs it)."""
    typ = node.get("type")
    if typ == "string" and "enum" not in node and "maxLength" not in node:
        raise SchemaError(f"{where}: strings need max_length")
    if typ == "array" and "maxItems" not in node:
        raise SchemaError(f"{where}: lists need max_length (maxItems)")
    if typ == "object" and "additionalProperties" in node and "maxProperties" not in node:
        raise SchemaError(f"{where}: maps need max_length (maxProperties)")


def model_schema(cls: type[ApiModel], where: str = "") -> Schema:
    """The object schema of a model: properties, required fields, defaults and CEL rules."""
    description = describe(cls)
    if not description:
        raise SchemaError(f"{cls.__name__} needs a docstring (it describes list items and the object)")
    props: Schema = {}
    required: list[str] = []
    for name, info in cls.model_fields.items():
        alias = info.alias or name
        path = f"{where}.{alias}".lstrip(".")
        if not info.description:
            raise SchemaError(
                f"{cls.__name__}.{name} ({path}) needs a description (kubectl explain prints it)"
            )
        node = dict(type_schema(info.annotation, list(info.metadata), path))
        node["description"] = " ".join(info.description.split())
        has_default, default = field_default(info)
        if has_default:
            node["default"] = default
        elif info.is_required():
            required.append(alias)
        props[alias] = _ordered(node)
    out: Schema = {"description": description, "type": "object", "properties": props}
    if required:
        out["required"] = required
    validations = [r.to_openapi() for r in class_rules(cls)]
    if validations:
        out["x-kubernetes-validations"] = validations
    return _ordered(out)


def root_schema(cls: type[ApiModel]) -> Schema:
    """openAPIV3Schema of a kind: apiVersion, kind, metadata (owned by the API server), spec, status."""
    schema = model_schema(cls)
    props = schema["properties"]
    props["apiVersion"] = {
        "description": "APIVersion of this object: kubetune.io/v1alpha1.",
        "type": "string",
    }
    props["kind"] = {"description": f"Kind of this object: {cls.__name__}.", "type": "string"}
    # The API server validates metadata itself; a CRD may only add rules on name (and generateName).
    props["metadata"] = {"type": "object"}
    name_rules = [r.to_openapi() for r in getattr(cls, "__name_rules__", ())]
    if name_rules:
        props["metadata"]["properties"] = {"name": {"type": "string", "x-kubernetes-validations": name_rules}}
    schema.pop("required", None)
    schema["required"] = ["spec"]
    return _ordered(schema)
