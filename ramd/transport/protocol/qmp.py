"""The QMP dialect, as QEMU's ``docs/interop/qmp-spec.rst`` and ``monitor/qmp.c`` define it.

A connection starts in capabilities-negotiation mode: it is greeted, and only
``qmp_capabilities`` runs until it succeeds. From then on every command of the shared table
runs (through :func:`ramd.api.dispatch.call`, as for JSON-RPC) and the session receives every
event, as QEMU's monitor does, without ``subscribe``. Nothing here knows about memory or
sockets: the connection feeds one JSON text at a time and writes what comes back.

Every message goes out as one compact JSON text ending with ``\\r\\n``. Non-ASCII is escaped
(as QEMU's JSON writer does), so any echoed string, even a lone surrogate, encodes.

Error wording follows QEMU: parse errors (``JSON parse error, ...`` and the parser limits)
and input that is not a JSON object carry no ``id``; bad members
(``QMP input member 'arguments' must be an object``), unknown commands and argument errors
(worded by ``qobject-input-visitor.c``) echo the request's ``id``.

Thread and ownership: loop thread only; one :class:`QmpDialect` per connection, which owns
that connection's :class:`~ramd.api.service.Session`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

import ramd
from ramd.api import dispatch
from ramd.api.commands import version_triple
from ramd.api.events import Event
from ramd.api.models import QmpCapabilitiesArgs
from ramd.api.outcome import BadArguments, Done, Failed, NotFound, Outcome, Pending
from ramd.api.service import Session
from ramd.transport.protocol import jsontext
from ramd.transport.protocol.dialect import Plan, Reply
from ramd.transport.protocol.splitter import SplitError

log = logging.getLogger(__name__)

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

#: Marks a request without ``id`` (``None`` is the JSON ``null`` id).
_NO_ID: Any = object()

#: The JSON type QEMU names in "Invalid parameter type", per pydantic error type.
_EXPECTED = {
    "int_type": "integer",
    "bool_type": "boolean",
    "string_type": "string",
    "float_type": "number",
    "list_type": "array",
    "dict_type": "object",
    "model_type": "object",
}


def _line(obj: Any) -> bytes:
    return (_dumps(obj) + "\r\n").encode()


def _error(error_class: str, desc: str, req_id: Any = _NO_ID) -> bytes:
    response: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if req_id is not _NO_ID:
        response["id"] = req_id
    return _line(response)


def _success(value: Any, req_id: Any) -> bytes:
    response: dict[str, Any] = {"return": value}
    if req_id is not _NO_ID:
        response["id"] = req_id
    return _line(response)


def _greeting() -> bytes:
    version = version_triple().model_dump()
    package = f"ramd {ramd.__version__}"
    return _line({"QMP": {"version": {"qemu": version, "package": package}, "capabilities": []}})


_GREETING = _greeting()


def _parse_error_desc(error: ValueError) -> str:
    """QEMU's wording of why a text is not JSON (:func:`ramd.transport.protocol.jsontext.loads`
    refuses NaN, Infinity and float overflow too, which would not encode back)."""
    reason = str(error)
    return f"JSON parse error, {reason[:1].lower()}{reason[1:]}"


def check_request(request: dict[str, Any]) -> str | None:
    """Why ``request`` is not a QMP command (QEMU's ``qmp_dispatch_check_obj``), or None."""
    for key, value in request.items():
        if key == "execute":
            if type(value) is not str:
                return "QMP input member 'execute' must be a string"
        elif key == "arguments":
            if type(value) is not dict:
                return "QMP input member 'arguments' must be an object"
        elif key != "id":
            return f"QMP input member '{key}' is unexpected"
    if "execute" not in request:
        return "QMP input lacks member 'execute'"
    return None


def split_error_desc(error: SplitError) -> str:
    """QEMU's wording for what the splitter rejected (``json-streamer.c``)."""
    if error.kind == "depth":
        return "JSON nesting depth limit exceeded"
    if error.kind == "size":
        return "JSON token size limit exceeded"
    return f"JSON parse error, {error.reason.replace('unexpected', 'stray', 1)}"


def _parameter(loc: tuple[int | str, ...]) -> str:
    """QEMU's full name of a parameter: ``enable[0]``, ``a.b``."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else part
    return name


def argument_error_desc(errors: list[ErrorDetails]) -> str:
    """The first argument error in QEMU's words (it reports one error per command).

    Missing, unexpected and wrong-type members are worded as QEMU's input visitor words them;
    a value outside its enum as QEMU does for enums; any other bad value names the parameter
    and gives pydantic's reason.
    """
    err = errors[0]
    name = _parameter(err["loc"]) or "arguments"
    kind = err["type"]
    value = err.get("input")
    if kind == "missing":
        return f"Parameter '{name}' is missing"
    if kind == "extra_forbidden":
        return f"Parameter '{name}' is unexpected"
    if kind == "literal_error":
        if isinstance(value, str):
            return f"Parameter '{name}' does not accept value '{value}'"
        kind = "string_type"
    if kind in _EXPECTED:
        return f"Invalid parameter type for '{name}', expected: {_EXPECTED[kind]}"
    return f"Parameter '{name}' is invalid: {err['msg']}"


def _response(outcome: Outcome, name: str, req_id: Any) -> bytes:
    """The QMP answer of one command's outcome."""
    if isinstance(outcome, Done):
        if outcome.raw is None:
            return _success(outcome.value, req_id)
        if not outcome.raw.isascii():  # QEMU's writer escapes non-ASCII: so do we
            return _success(json.loads(outcome.raw), req_id)
        if req_id is _NO_ID:
            return b'{"return":%s}\r\n' % outcome.raw
        if type(req_id) is int:  # the usual id: no encoder needed
            return b'{"return":%s,"id":%d}\r\n' % (outcome.raw, req_id)
        return b'{"return":%s,"id":%s}\r\n' % (outcome.raw, _dumps(req_id).encode())
    if isinstance(outcome, Failed):
        return _error(outcome.error_class, outcome.desc, req_id)
    if isinstance(outcome, BadArguments):
        return _error(GENERIC_ERROR, argument_error_desc(outcome.errors), req_id)
    if isinstance(outcome, NotFound):
        return _error(COMMAND_NOT_FOUND, f"The command {name} has not been found", req_id)
    return _error(GENERIC_ERROR, "Internal error", req_id)


class _Command:
    """The plan of one ``execute`` whose call did not end at once: its outcome is pending
    (work in a thread) or carries fds, which the pipeline sends with the answer."""

    __slots__ = ("_first", "_name", "_req_id", "_unsent", "answer", "fds")

    def __init__(self, name: str, req_id: Any, first: Outcome) -> None:
        self._name = name
        self._req_id = req_id
        self._first: Outcome | None = first
        self.answer: bytes | None = None
        self.fds: list[int] = []
        self._unsent: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return self._first is None

    def step(self) -> Outcome | None:
        first, self._first = self._first, None
        return first

    def record(self, outcome: Outcome) -> None:
        if isinstance(outcome, Done):
            self.fds.extend(outcome.fds)
            self._unsent = outcome.unsent
        self.answer = _response(outcome, self._name, self._req_id)

    def finish(self) -> Reply:
        return self.answer

    def fds_failed(self, reason: str) -> Reply:
        if self._unsent is not None:
            self._unsent()
        return _response(Failed(GENERIC_ERROR, reason), self._name, self._req_id)


class QmpDialect:
    """One QMP connection's protocol logic (see :class:`~.dialect.Dialect`).

    ``negotiated`` goes from False to True once, at a successful ``qmp_capabilities``; at that
    moment the session subscribes to every event (no replay). Before it, no event is encoded
    and the session is not subscribed, so events raised then are dropped for this connection.
    """

    name = "qmp"

    def __init__(self, session: Session) -> None:
        self.session = session
        session.dialect = self.name
        self.negotiated = False
        self._event_key = "qmp-ro" if session.readonly else "qmp"

    def greeting(self) -> bytes | None:
        return _GREETING

    def split_error(self, error: SplitError) -> bytes:
        return _error(GENERIC_ERROR, split_error_desc(error))

    def refusal(self, desc: str) -> bytes:
        return _error(GENERIC_ERROR, desc)

    def no_memory(self) -> bytes:
        return _error(GENERIC_ERROR, "Cannot allocate memory for this request")

    def encode_event(self, event: Event) -> bytes | None:
        if not self.negotiated:
            return None
        key = self._event_key
        wire = event.encoded.get(key)
        if wire is None:
            data = event.data if not self.session.readonly else event.public_data()
            wire = _line({"event": event.name, "data": data, "timestamp": event.timestamp})
            event.encoded[key] = wire
        return wire

    def handle(self, message: bytes | bytearray) -> Reply | Plan:
        try:
            request = jsontext.loads(message)
        except ValueError as e:
            return _error(GENERIC_ERROR, _parse_error_desc(e))
        if type(request) is not dict:
            return _error(GENERIC_ERROR, "QMP input must be a JSON object")
        req_id = request.get("id", _NO_ID)
        problem = check_request(request)
        if problem is not None:
            return _error(GENERIC_ERROR, problem, req_id)
        name: str = request["execute"]
        arguments: dict[str, Any] = request.get("arguments", {})
        if name == "qmp_capabilities":
            return self._negotiate(arguments, req_id)
        if not self.negotiated:
            desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
            return _error(COMMAND_NOT_FOUND, desc, req_id)
        outcome = dispatch.call(self.session, name, arguments)
        if isinstance(outcome, Pending) or (isinstance(outcome, Done) and outcome.fds):
            return _Command(name, req_id, outcome)
        return _response(outcome, name, req_id)

    def _negotiate(self, arguments: dict[str, Any], req_id: Any) -> bytes:
        """``qmp_capabilities``: validate, refuse a repeat or any capability, then subscribe."""
        try:
            args = QmpCapabilitiesArgs.model_validate(arguments)
        except ValidationError as e:
            errors = e.errors(include_url=False, include_context=False)
            return _error(GENERIC_ERROR, argument_error_desc(errors), req_id)
        if self.negotiated:
            desc = "Capabilities negotiation is already complete, command ignored"
            return _error(COMMAND_NOT_FOUND, desc, req_id)
        if args.enable:
            desc = f"Capability {', '.join(args.enable)} not available"
            return _error(GENERIC_ERROR, desc, req_id)
        self.negotiated = True
        self.session.subscribe(None)
        return _success({}, req_id)
