"""One JSON-RPC 2.0 request object through jsonrpcserver's public API (sans-IO).

For each request object, :func:`run` calls :func:`jsonrpcserver.dispatch_to_serializable`,
which does the work of a JSON-RPC server: the validation step (with :func:`validate`, ramd's
structural check, in place of its jsonschema pass: anything but a request object is -32600
with ``id`` null), the method lookup in the connection's :class:`MethodTable` (the command
table: any other name is -32601), the call of the method with the connection's :class:`Call`
as context (an exception it raises becomes -32603), and the response object, or none for a
notification. Each method runs its command through :func:`ramd.api.dispatch.call` and returns
jsonrpcserver's ``Success`` or ``Error`` for the outcome (:func:`result`): -32000 with
``data.class`` for a failure, -32602 naming each bad field, -32602 for positional params.

What ramd does itself: parsing the message (``jsontext``/``bulk``: strict and bounded; and a
batch must be known as one before anything runs, so that its calls run one per pipeline step,
see :mod:`ramd.transport.protocol.jsonrpc`), so jsonrpcserver's deserializer step only hands over
the
parsed object; and the wire text of each response object (:func:`encode`), which splices in
results pydantic already encoded and never sends an exception's text: jsonrpcserver words
its -32603 with one, ramd sends the generic message only.

A command that must wait (its outcome is a :class:`~ramd.api.outcome.Pending`) is answered
once it settles: its method's ``Success(None)`` is never sent; :attr:`Call.outcome` holds the
pending outcome, and :func:`settled` then runs the same request object through jsonrpcserver
with a table whose methods return the final outcome's result (nothing runs twice), so that
answer is jsonrpcserver's too.

Cost: jsonrpcserver's pipeline (its Either values, signature binding, response tuples) is
about 12 µs of CPU per call on the bench machine (``bench/steps.py``: the dialect's answer to
``query-version`` went from 6.5 to 19 µs), within the budget of 0.4x QEMU's QMP server per call
(``bench/run``). The methods state their signature, which it would otherwise work out anew for
every call.

Thread and ownership: loop thread only. A :class:`Call` and a :class:`MethodTable` belong to
one connection, whose pipeline runs one dispatch at a time.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, NoReturn, cast

from jsonrpcserver import Error, InvalidParams, Result, Success, dispatch_to_serializable

from ramd.api import dispatch
from ramd.api.commands import COMMANDS
from ramd.api.outcome import BadArguments, Done, Failed, NotFound, Outcome, Pending
from ramd.api.service import Session

INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
COMMAND_FAILED = -32000

#: A response object as jsonrpcserver builds it: ``jsonrpc``, ``result`` (a
#: :class:`~ramd.api.outcome.Done`) or ``error``, and ``id``.
Response = dict[str, Any]
Method = Callable[..., Result]

BY_NAME = "params must be an object (by-name), not an array"
_INTERNAL = {"code": INTERNAL_ERROR, "message": "Internal error"}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def text(value: Any) -> bytes:
    """``value`` as compact JSON. A lone surrogate (from a ``"\\ud800"`` escape in a request)
    can only sit inside a JSON string; backslashreplace writes it back as that same escape."""
    return _dumps(value).encode("utf-8", "backslashreplace")


def valid_id(value: Any) -> bool:
    return value is None or type(value) in (str, int, float)


def is_request(obj: Any) -> bool:
    """A JSON-RPC 2.0 request object, structurally (the members of the specification and no
    others, as jsonrpcserver's schema has it)."""
    return (
        type(obj) is dict
        and obj.get("jsonrpc") == "2.0"
        and type(obj.get("method")) is str
        and isinstance(obj.get("params", {}), dict | list)
        and valid_id(obj.get("id"))
        and obj.keys() <= {"jsonrpc", "method", "params", "id"}
    )


def validate(obj: Any) -> Any:
    """jsonrpcserver's validator: raises for anything but a request object (-32600)."""
    if not is_request(obj):
        raise ValueError("not a JSON-RPC 2.0 request object")
    return obj


def _parsed(obj: Any) -> Any:
    """jsonrpcserver's deserializer: ramd has parsed the message already."""
    return obj


class Call:
    """The context jsonrpcserver passes to a method: the session, the request object, and
    the outcome of the command the method ran (None when none ran: the request was invalid,
    named no command, or had positional params)."""

    __slots__ = ("outcome", "request", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.request: dict[str, Any] = {}
        self.outcome: Outcome | None = None


def result(outcome: Outcome | None) -> Result:
    """jsonrpcserver's result of one outcome (``Success(None)`` for a pending one: its answer
    is made once it settles; -32603 for none)."""
    if type(outcome) is Done:
        return Success(outcome)
    if type(outcome) is Failed:
        return Error(COMMAND_FAILED, outcome.desc, {"class": outcome.error_class})
    if type(outcome) is BadArguments:
        return Error(INVALID_PARAMS, outcome.message())
    if type(outcome) is NotFound:
        return Error(METHOD_NOT_FOUND, "Method not found", outcome.name)
    if type(outcome) is Pending:
        return Success(None)
    return Error(INTERNAL_ERROR, "Internal error")


#: What jsonrpcserver binds a call's arguments against: ``(call, /, *args, **params)``.
#: ``call`` is positional-only, so a client parameter of that name lands in ``params`` (and is
#: refused by name like any other unknown member).
_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("call", inspect.Parameter.POSITIONAL_ONLY),
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("params", inspect.Parameter.VAR_KEYWORD),
    ]
)


class _Command:
    """The method of one command. Its signature is given (``__signature__``, which
    :func:`inspect.signature` returns as it is): jsonrpcserver asks for it on every call, and
    working it out from the code would cost more than the rest of the dispatch."""

    __signature__ = _SIGNATURE
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, call: Call, /, *args: Any, **params: Any) -> Result:
        if type(call.request.get("params")) is list:
            return InvalidParams(BY_NAME)
        outcome = call.outcome = dispatch.call(call.session, self._name, params)
        return result(outcome)


class _Settled:
    """The method of every command once its pending outcome settled: that outcome's result."""

    __signature__ = _SIGNATURE
    __slots__ = ()

    def __call__(self, call: Call, /, *args: Any, **params: Any) -> Result:
        return result(call.outcome)


_METHODS: dict[str, Method] = {name: _Command(name) for name in COMMANDS}
_SETTLED: dict[str, Method] = dict.fromkeys(COMMANDS, _Settled())


class MethodTable(dict[str, Method]):
    """The command table as jsonrpcserver's methods, for one session: a name that is not a
    command is logged as the session's refusal, and jsonrpcserver answers -32601."""

    def __init__(self, session: Session) -> None:
        super().__init__(_METHODS)
        self._session = session

    def __missing__(self, name: str) -> NoReturn:
        dispatch.not_found(self._session, name)
        raise KeyError(name)


def _dispatch(call: Call, methods: dict[str, Method], obj: Any) -> Response | None:
    return cast(
        "Response | None",
        dispatch_to_serializable(
            obj, methods, context=call, deserializer=_parsed, validator=validate
        ),
    )


def run(call: Call, methods: MethodTable, obj: Any) -> Response | None:
    """Dispatch one request object (parsed JSON, any value); its response object, or None
    for a notification. ``call.outcome`` is then the outcome of the command it ran, if any."""
    call.request = obj
    call.outcome = None
    return _dispatch(call, methods, obj)


def settled(session: Session, obj: dict[str, Any], final: Outcome) -> Response | None:
    """The response object of the request ``obj`` whose pending outcome settled as
    ``final``, or None for a notification."""
    call = Call(session)
    call.request = obj
    call.outcome = final
    return _dispatch(call, _SETTLED, obj)


def encode(response: Response) -> bytes:
    """A response object's JSON text (without the newline)."""
    req_id = response["id"]
    if "result" in response:
        done: Done = response["result"]
        wire_id = b"%d" % req_id if type(req_id) is int else text(req_id)
        body = done.raw if done.raw is not None else text(done.value)
        return b'{"jsonrpc":"2.0","result":%s,"id":%s}' % (body, wire_id)
    error = response["error"]
    code = error["code"]
    if code == INTERNAL_ERROR or (code == COMMAND_FAILED and type(error.get("data")) is not dict):
        # jsonrpcserver's -32603 for an exception, or its -32000 "Server error" for a
        # failure of its own: both carry the exception's text.
        error = _INTERNAL
    return text({"jsonrpc": "2.0", "error": error, "id": req_id})
