"""``query-qmp-schema``: the command table and the event models in QEMU's introspection
format (``qapi/introspect.json``), which libvirt and other QMP tooling probe.

Derived, never written per command: each command's argument model and QMP result model
(``qmp_result`` when the dialects differ), each event's data model and the QMP dialect's own
``qmp_capabilities`` go through pydantic's JSON Schema, and each schema node becomes a
``SchemaInfo`` entity:

- a model with properties: ``{"meta-type": "object", "members": [{"name", "type"}]}``, an
  optional member with ``"default": null`` (QEMU's marker of an optional member);
- ``integer``/``string``/``boolean``/``number``: the builtins ``int``/``str``/``bool``/
  ``number``; anything else untyped (free-form objects): ``any``;
- an ``enum`` (or a ``const``): ``{"meta-type": "enum", "values", "members"}`` named
  ``MODEL-MEMBER``, one per set of values; an array: ``"[ELEMENT]"`` with ``element-type``; a
  nullable type is the type itself (optional members are optional, not null); several
  types: an ``alternate``; a discriminated union of models: QEMU's flat union (an object
  with ``tag`` and ``variants``).

Every type name used is defined exactly once in the list (commands first, then events, then
types in the order they were met). QEMU masks type names as numbers; ramd keeps the model
names. The list is built once and kept encoded (ASCII JSON bytes).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ramd.api.commands import COMMANDS
from ramd.api.models import EVENT_MODELS, Empty, QmpCapabilitiesArgs

#: JSON Schema type -> (builtin name, QEMU ``JSONType``).
_BUILTINS = {
    "integer": ("int", "int"),
    "string": ("str", "string"),
    "boolean": ("bool", "boolean"),
    "number": ("number", "number"),
    "null": ("null", "null"),
}
_ANY = ("any", "value")


class _Types:
    """The ``SchemaInfo`` entities of the types met so far, by name, in order met."""

    def __init__(self, defs: dict[str, Any]) -> None:
        self._defs = defs
        self.entities: dict[str, dict[str, Any]] = {}
        self._enums: dict[tuple[str, ...], str] = {}

    def name_of(self, node: dict[str, Any], hint: str) -> str:
        """The type name of JSON Schema ``node`` (defined in :attr:`entities`); ``hint``
        names it when it has no name of its own (enums, inline objects, alternates)."""
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            return self.name_of(self._defs[name], name)
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            if len(options) == 1:
                return self.name_of(options[0], hint)
            members = [{"type": self.name_of(o, f"{hint}-{i}")} for i, o in enumerate(options)]
            return self._define(hint, {"meta-type": "alternate", "members": members})
        if "discriminator" in node:
            return self._union(node, hint)
        if "enum" in node:
            return self._enum([str(v) for v in node["enum"]], hint)
        if "const" in node:
            return self._enum([str(node["const"])], hint)
        kind = node.get("type")
        if kind == "array":
            element = self.name_of(node.get("items", {}), hint)
            return self._define(f"[{element}]", {"meta-type": "array", "element-type": element})
        if kind == "object" and "properties" in node:
            return self._object(node, hint)
        name, json_type = _BUILTINS.get(kind, _ANY) if isinstance(kind, str) else _ANY
        return self._define(name, {"meta-type": "builtin", "json-type": json_type})

    def _define(self, name: str, info: dict[str, Any]) -> str:
        self.entities.setdefault(name, {"name": name, **info})
        return name

    def _enum(self, values: list[str], hint: str) -> str:
        known = self._enums.get(tuple(values))
        if known is not None:
            return known
        self._enums[tuple(values)] = hint
        members = [{"name": v} for v in values]
        return self._define(hint, {"meta-type": "enum", "members": members, "values": values})

    def _object(self, node: dict[str, Any], name: str, skip: frozenset[str] = frozenset()) -> str:
        """An object type of the model ``node``'s properties (but those in ``skip``)."""
        if name in self.entities:
            return name
        info: dict[str, Any] = {"name": name, "meta-type": "object", "members": []}
        self.entities[name] = info  # before the members: a model may refer to itself
        required = set(node.get("required", ()))
        for member, schema in node["properties"].items():
            if member in skip:
                continue
            entry: dict[str, Any] = {
                "name": member,
                "type": self.name_of(schema, f"{name}-{member}"),
            }
            if member not in required:
                entry["default"] = None
            info["members"].append(entry)
        return name

    def _union(self, node: dict[str, Any], name: str) -> str:
        """A discriminated union of models as QEMU's flat union: an object of the members
        all variants share, the tag an enum of the cases, and per case an object of that
        variant's other members (named after the variant's model)."""
        if name in self.entities:
            return name
        tag = node["discriminator"]["propertyName"]
        cases = {
            case: self._defs[ref.rsplit("/", 1)[1]]
            for case, ref in node["discriminator"]["mapping"].items()
        }
        variants = list(cases.values())
        shared = [
            p for p in variants[0]["properties"] if all(p in v["properties"] for v in variants)
        ]
        members: list[dict[str, Any]] = []
        info = {"name": name, "meta-type": "object", "members": members, "tag": tag}
        self.entities[name] = info
        for member in shared:
            if member == tag:
                kind = self._enum(list(cases), f"{name}-{member}")
            else:
                kind = self.name_of(variants[0]["properties"][member], f"{name}-{member}")
            members.append({"name": member, "type": kind})
        info["variants"] = [
            {"case": case, "type": self._object(v, v["title"], frozenset(shared))}
            for case, v in cases.items()
        ]
        return name


def _qmp_commands() -> list[tuple[str, type[BaseModel], type[BaseModel]]]:
    """Each command as the QMP dialect offers it: name, arguments, result."""
    out: list[tuple[str, type[BaseModel], type[BaseModel]]] = [
        ("qmp_capabilities", QmpCapabilitiesArgs, Empty)
    ]
    for cmd in COMMANDS.values():
        out.append((cmd.name, cmd.args, cmd.qmp_result or cmd.result))
    return out


def schema_info() -> list[dict[str, Any]]:
    """The ``SchemaInfo`` list: every command, every event, every type they use."""
    commands = _qmp_commands()
    inputs: list[Any] = []
    for _, args, result in commands:
        inputs += [(args, "validation"), (result, "serialization")]
    inputs += [(model, "serialization") for model in EVENT_MODELS.values()]
    refs, top = models_json_schema(inputs, ref_template="#/$defs/{model}")
    types = _Types(top.get("$defs", {}))
    entities: list[dict[str, Any]] = []
    for name, args, result in commands:
        arg_type = types.name_of(refs[(args, "validation")], f"{name}-arg")
        ret_type = types.name_of(refs[(result, "serialization")], f"{name}-ret")
        entities.append(
            {"name": name, "meta-type": "command", "arg-type": arg_type, "ret-type": ret_type}
        )
    for name, model in EVENT_MODELS.items():
        arg_type = types.name_of(refs[(model, "serialization")], f"{name}-arg")
        entities.append({"name": name, "meta-type": "event", "arg-type": arg_type})
    return entities + list(types.entities.values())


@functools.cache
def introspection() -> bytes:
    """:func:`schema_info` encoded once, as ASCII JSON."""
    return json.dumps(schema_info(), separators=(",", ":")).encode("ascii")
