"""Helpers of the client tests: a wire recorder that checks traffic against the JSON Schema.

:class:`WireRecorder` is installed as a client's ``trace`` hook. It keeps every request the
client sent and every message it received, and :meth:`WireRecorder.check` proves, against
``schemas/ramd.schema.json`` (the generator's document):

- the params of every request validate against ``commands[method].arguments``, except the
  ones the daemon refused as invalid params (-32602), which must not validate: the schema
  and the daemon agree on every request the tests sent;
- every result validates against ``commands[method].returns``, and every event's data
  against ``events[name].data``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jsonschema

from ramd.api.schema import schema_document


@cache
def _validator(pointer: str) -> jsonschema.Draft202012Validator:
    """A validator of the document's subschema at ``pointer`` (``$defs`` resolvable)."""
    doc = schema_document()
    node: Any = doc
    for part in pointer.split("/"):
        node = node[part]
    return jsonschema.Draft202012Validator({**node, "$defs": doc["$defs"]})


def arguments_validator(method: str) -> jsonschema.Draft202012Validator:
    return _validator(f"commands/{method}/arguments")


def returns_validator(method: str) -> jsonschema.Draft202012Validator:
    return _validator(f"commands/{method}/returns")


def event_validator(name: str) -> jsonschema.Draft202012Validator:
    return _validator(f"events/{name}/data")


def params_valid(method: str, params: dict[str, Any]) -> bool:
    return arguments_validator(method).is_valid(params)


@dataclass
class Conversation:
    """The traffic of one connection: a client's ``trace`` hook (thread-safe: the
    synchronous client calls it on its loop thread)."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, direction: str, message: dict[str, Any]) -> None:
        with self._lock:
            (self.sent if direction == "send" else self.received).append(message)


@dataclass
class WireRecorder:
    """The traffic of every connection of a test, one :class:`Conversation` each (request
    ids are per connection)."""

    conversations: list[Conversation] = field(default_factory=list)

    def trace(self) -> Conversation:
        """A new conversation, to install as one client's ``trace``."""
        conversation = Conversation()
        self.conversations.append(conversation)
        return conversation

    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        """``(method, params)`` of every request sent, on every connection."""
        return [(r["method"], r.get("params", {})) for c in self.conversations for r in c.sent]

    def check(self) -> int:
        """Check the whole traffic (see the module docstring); the number of requests."""
        for conversation in self.conversations:
            _check(conversation)
        return len(self.requests())


def _check(conversation: Conversation) -> None:
    schema = schema_document()
    answers = {m["id"]: m for m in conversation.received if "id" in m}
    for request in conversation.sent:
        method, params = request["method"], request.get("params", {})
        if method not in schema["commands"]:
            continue  # an unknown command, sent on purpose: no schema to hold it to
        answer = answers.get(request["id"])
        refused_params = (
            answer is not None and "error" in answer and answer["error"]["code"] == -32602
        )
        errors = [e.message for e in arguments_validator(method).iter_errors(params)]
        if refused_params:
            assert errors, f"daemon refused {method} {params} but the schema accepts them"
        else:
            assert not errors, f"{method} {params} fails the schema: {errors}"
        if answer is not None and "result" in answer:
            returns_validator(method).validate(answer["result"])
    for message in conversation.received:
        if "id" not in message and message.get("method") in schema["events"]:
            event_validator(message["method"]).validate(message["params"]["data"])
