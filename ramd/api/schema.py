"""The JSON Schema document of every command and event, derived from the command table.

The same document is returned by ``query-schema`` and written to ``schemas/ramd.schema.json``
by ``python -m ramd.api.schema``; a test fails when that file is stale.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

from pydantic.json_schema import models_json_schema

import ramd
from ramd.api.commands import COMMANDS
from ramd.api.models import EVENT_MODELS


@functools.cache
def schema_document() -> dict[str, Any]:
    """Build the document once: ``commands`` (``arguments``, ``returns``, and
    ``qmp-returns`` where the QMP dialect answers another shape), ``events`` (data),
    ``$defs``."""
    inputs: list[Any] = []
    for cmd in COMMANDS.values():
        inputs.append((cmd.args, "validation"))
        inputs.append((cmd.result, "serialization"))
        if cmd.qmp_result is not None:
            inputs.append((cmd.qmp_result, "serialization"))
    for model in EVENT_MODELS.values():
        inputs.append((model, "serialization"))
    refs, top = models_json_schema(inputs, ref_template="#/$defs/{model}")
    commands: dict[str, Any] = {}
    for cmd in COMMANDS.values():
        entry = {
            "description": cmd.doc,
            "arguments": refs[(cmd.args, "validation")],
            "returns": refs[(cmd.result, "serialization")],
        }
        if cmd.qmp_result is not None:
            entry["qmp-returns"] = refs[(cmd.qmp_result, "serialization")]
        commands[cmd.name] = entry
    events = {
        name: {"data": refs[(model, "serialization")]} for name, model in EVENT_MODELS.items()
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"ramd {ramd.__version__} commands and events",
        "commands": commands,
        "events": events,
        "$defs": top.get("$defs", {}),
    }


def main() -> None:
    """Print the document (the generator of ``schemas/ramd.schema.json``)."""
    json.dump(schema_document(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
