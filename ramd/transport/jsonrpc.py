"""The JSON-RPC 2.0 dialect, on ``jsonrpcserver`` behind this one adapter.

What we take from jsonrpcserver: its request type and its method call (``call``: the method
of the name, with the connection's session as context, its Result), with the command table as
its methods. What we do ourselves, because its defaults do not fit (see design.md) or cost
more than they give: JSON parsing (the splitter hands us one text), a cheap structural
validator in place of its jsonschema pass (same -32600 semantics), method lookup (-32601) and
no signature binding (pydantic validates the params, -32602 naming fields), batches run in
order one call after the other through the request pipeline, and the wording of every
outcome (-32000 with ``data.class``, -32603 with a generic message, never an exception text).

Batches: at most ``max-batch`` members (more: one -32600), and at most ``SCM_MAX_FD`` (253,
what one ``sendmsg`` can carry) calls whose answers carry an fd (more: one -32600, nothing
run); the answer never exceeds ``max-message-size``: room for a refusal of every member is
set aside first (a batch whose refusals alone would not fit is refused whole), and a call
whose answer does not fit is answered by a refusal instead, after which the rest are refused
unrun.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from ramd.api import dispatch
from ramd.api.commands import COMMANDS
from ramd.api.events import Event
from ramd.api.outcome import BadArguments, Done, Failed, Internal, NotFound, Outcome, Pending
from ramd.api.service import Session
from ramd.transport import bulk, jsontext
from ramd.transport.dialect import Plan, Reply
from ramd.transport.jsonrpc_core import NOID, Request, Success
from ramd.transport.jsonrpc_core import call as jsonrpc_call
from ramd.transport.output import SCM_MAX_FD, close_fds
from ramd.transport.splitter import SplitError

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
COMMAND_FAILED = -32000

#: The commands whose answer carries an fd (``ram-block-get-fd``, docs/protocol.md §8).
FD_METHODS = frozenset({"ram-block-get-fd"})

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_BY_NAME = "params must be an object (by-name), not an array"


def _valid_id(value: Any) -> bool:
    return value is None or type(value) in (str, int, float)


def _is_request(obj: Any) -> bool:
    """Structural check of one request object (replaces jsonrpcserver's jsonschema pass)."""
    return (
        type(obj) is dict
        and obj.get("jsonrpc") == "2.0"
        and type(obj.get("method")) is str
        and isinstance(obj.get("params", {}), dict | list)
        and _valid_id(obj.get("id"))
        and obj.keys() <= {"jsonrpc", "method", "params", "id"}
    )


def _error(code: int, message: str, req_id: Any, data: Any = None) -> str:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return _dumps({"jsonrpc": "2.0", "error": err, "id": req_id})


def _line(text: str) -> bytes:
    # A lone surrogate (from a "\ud800" escape in the request) can only sit inside a JSON
    # string; backslashreplace writes it back as that same escape instead of raising.
    return (text + "\n").encode("utf-8", "backslashreplace")


def response(outcome: Outcome, req_id: Any) -> str:
    """The response object of one call, as JSON text."""
    if isinstance(outcome, Done):
        if outcome.raw is not None:
            return f'{{"jsonrpc":"2.0","result":{outcome.raw.decode()},"id":{_dumps(req_id)}}}'
        return _dumps({"jsonrpc": "2.0", "result": outcome.value, "id": req_id})
    if isinstance(outcome, Failed):
        return _error(COMMAND_FAILED, outcome.desc, req_id, {"class": outcome.error_class})
    if isinstance(outcome, BadArguments):
        return _error(INVALID_PARAMS, outcome.message(), req_id)
    if isinstance(outcome, NotFound):
        return _error(METHOD_NOT_FOUND, "Method not found", req_id, outcome.name)
    assert isinstance(outcome, Internal)
    return _error(INTERNAL_ERROR, "Internal error", req_id)


def _method(name: str) -> Any:
    """The jsonrpcserver method for command ``name``: its Result carries the outcome.

    ``session`` is positional-only, so a client parameter of that name lands in ``params``
    (and is refused by name like any other unknown member)."""

    def method(session: Session, /, **params: Any) -> Any:
        return Success(dispatch.call(session, name, params))

    return method


_METHODS = {name: _method(name) for name in COMMANDS}


def run_call(session: Session, obj: dict[str, Any]) -> Outcome:
    """Run one valid request object through jsonrpcserver; its outcome."""
    method = _METHODS.get(obj["method"])
    if method is None:
        return dispatch.not_found(session, obj["method"])
    result = jsonrpc_call(Request(obj["method"], obj.get("params", {}), NOID), session, method)
    outcome = getattr(getattr(result, "_value", None), "result", None)
    if isinstance(outcome, _OUTCOMES):
        return outcome
    return Internal()  # jsonrpcserver caught an exception: a bug, logged by it


_OUTCOMES = (Done, Failed, BadArguments, NotFound, Internal, Pending)


def _single_answer(obj: dict[str, Any], outcome: Outcome) -> bytes | None:
    """The answer to one request object (None for a notification)."""
    if "id" not in obj:
        return None
    req_id = obj["id"]
    if isinstance(outcome, Done) and outcome.raw is not None:
        if type(req_id) is int:  # the usual id: no encoder needed
            return b'{"jsonrpc":"2.0","result":%s,"id":%d}\n' % (outcome.raw, req_id)
        wire_id = _dumps(req_id).encode("utf-8", "backslashreplace")
        return b'{"jsonrpc":"2.0","result":%s,"id":%s}\n' % (outcome.raw, wire_id)
    return _line(response(outcome, req_id))


class _Single:
    """The plan of one request object whose call did not end at once: its outcome is
    pending (work in a thread) or carries fds, which the pipeline sends with the answer."""

    __slots__ = ("_first", "_obj", "_unsent", "answer", "fds")

    def __init__(self, obj: dict[str, Any], first: Outcome) -> None:
        self._obj = obj
        self._first: Outcome | None = first
        self.answer: bytes | None = None
        self.fds: list[int] = []
        self._unsent: list[Callable[[], None]] = []

    def step(self) -> Outcome | None:
        first, self._first = self._first, None
        return first

    def record(self, outcome: Outcome) -> None:
        self.answer = _single_answer(self._obj, outcome)
        if isinstance(outcome, Done):
            if self.answer is None:  # a notification: its fds go nowhere
                unsent(outcome)
            else:
                self.fds.extend(outcome.fds)
                self._unsent.extend(filter(None, [outcome.unsent]))

    def finish(self) -> Reply:
        return self.answer

    def fds_failed(self, reason: str) -> Reply:
        for undo in self._unsent:
            undo()
        return _single_answer(self._obj, Failed("GenericError", reason))


class _Batch:
    """The plan of a batch: its members in order, within the answer's size budget."""

    __slots__ = (
        "_budget",
        "_fd_parts",
        "_full",
        "_i",
        "_members",
        "_parts",
        "_reserved",
        "_session",
        "_size",
        "_unsent",
        "fds",
    )

    def __init__(self, session: Session, members: list[Any], budget: int, reserved: int):
        self._session = session
        self._members = members
        self._budget = budget
        self._reserved = reserved  # bytes set aside for refusals of members not yet answered
        self._parts: list[str] = []
        self._size = 2  # the brackets
        self._i = -1
        self._full = False  # an answer did not fit: the remaining members are refused unrun
        self.fds: list[int] = []
        self._fd_parts: list[tuple[int, Any]] = []  # (part, request id) of answers with fds
        self._unsent: list[Callable[[], None]] = []

    def step(self) -> Outcome | None:
        while True:
            self._i += 1
            if self._i >= len(self._members):
                return None
            req = self._members[self._i]
            immediate = _immediate(req)
            if immediate is not None:
                self._add(immediate, req)
                continue
            if self._full:
                self._add(_refusal(req, self._budget, ran=False), req)
                continue
            return run_call(self._session, req)

    def record(self, outcome: Outcome) -> None:
        req = self._members[self._i]
        fds = outcome.fds if isinstance(outcome, Done) else ()
        if "id" not in req:
            unsent(outcome)
            return
        text = response(outcome, req["id"])
        if self._size + len(text) + 1 + self._reserved - _refusal_size(req) > self._budget:
            self._full = True
            unsent(outcome)
            self._add(_refusal(req, self._budget, ran=True), req)
        else:
            if isinstance(outcome, Done) and outcome.fds:
                self.fds.extend(fds)
                self._fd_parts.append((len(self._parts), req["id"]))
                self._unsent.extend(filter(None, [outcome.unsent]))
            self._add(text, req)

    def _add(self, text: str | None, req: Any) -> None:
        self._reserved -= _refusal_size(req)
        if text:
            self._parts.append(text)
            self._size += len(text) + 1

    def finish(self) -> Reply:
        if not self._parts:
            return None
        return _line("[" + ",".join(self._parts) + "]")

    def fds_failed(self, reason: str) -> Reply:
        for undo in self._unsent:
            undo()
        for part, req_id in self._fd_parts:
            self._parts[part] = _error(COMMAND_FAILED, reason, req_id, {"class": "GenericError"})
        self._fd_parts.clear()
        return self.finish()


def unsent(outcome: Outcome) -> None:
    """The fds of ``outcome`` go nowhere (no answer carries them): close them and undo what
    the call did for their holder."""
    if isinstance(outcome, Done):
        close_fds(outcome.fds)
        if outcome.unsent is not None:
            outcome.unsent()


def _immediate(req: Any) -> str | None:
    """The answer of a batch member that runs nothing (invalid, or positional params), or
    None for a member to run. A notification that runs nothing gets no answer either."""
    if not _is_request(req):
        return _error(INVALID_REQUEST, "Invalid request", None, "not a JSON-RPC 2.0 request")
    if type(req.get("params")) is list and req["method"] in _METHODS:
        return _error(INVALID_PARAMS, "Invalid params", req["id"], _BY_NAME) if "id" in req else ""
    return None


_REFUSAL = (
    "Limit exceeded: max-message-size is {budget}: the batch's answer is full, this call {what}"
)
_RAN = "ran but its answer was dropped"
_NOT_RUN = "was not run"


def _refusal(req: Any, budget: int, *, ran: bool) -> str | None:
    if type(req) is dict and "id" not in req:
        return None
    req_id = req.get("id") if type(req) is dict and _valid_id(req.get("id")) else None
    desc = _REFUSAL.format(budget=budget, what=_RAN if ran else _NOT_RUN)
    return _error(COMMAND_FAILED, desc, req_id, {"class": "GenericError"})


def _refusal_size(req: Any) -> int:
    """Bytes (+1 for the comma) that the longest refusal of this member takes: an upper
    bound of what any immediate answer or refusal of it adds to the batch."""
    if type(req) is dict and "id" not in req and _is_request(req):
        return 0
    req_id = req.get("id") if type(req) is dict and _valid_id(req.get("id")) else None
    return _REFUSAL_BASE + len(_dumps(req_id)) + 1


_REFUSAL_BASE = (
    len(_error(COMMAND_FAILED, _REFUSAL.format(budget=2**64, what=_RAN), None))
    + len(',"data":{"class":"GenericError"}')
    - len("null")
)


class JsonRpcDialect:
    """One JSON-RPC 2.0 connection's protocol logic (see :class:`~.dialect.Dialect`)."""

    name = "jsonrpc"

    def __init__(self, session: Session) -> None:
        self.session = session
        self._event_key = "jsonrpc-ro" if session.readonly else "jsonrpc"

    def greeting(self) -> bytes | None:
        return None

    def split_error(self, error: SplitError) -> bytes:
        return _line(_error(PARSE_ERROR, "Parse error", None, error.reason))

    def refusal(self, desc: str) -> bytes:
        return _line(_error(COMMAND_FAILED, desc, None, {"class": "GenericError"}))

    def no_memory(self) -> bytes:
        desc = "Cannot allocate memory for this request"
        return _line(_error(COMMAND_FAILED, desc, None, {"class": "GenericError"}))

    def encode_event(self, event: Event) -> bytes | None:
        key = self._event_key
        wire = event.encoded.get(key)
        if wire is None:
            data = event.data if not self.session.readonly else event.public_data()
            params = {"data": data, "timestamp": event.timestamp}
            wire = _line(_dumps({"jsonrpc": "2.0", "method": event.name, "params": params}))
            event.encoded[key] = wire
        return wire

    def handle(self, message: bytes | bytearray) -> Reply | Plan:
        try:
            small = len(message) < bulk.BULK_FROM
            obj = jsontext.loads(message) if small else bulk.loads(message)
        except ValueError as e:
            return _line(_error(PARSE_ERROR, "Parse error", None, str(e)))
        if type(obj) is not list:
            immediate = _immediate(obj)
            if immediate is not None:
                return _line(immediate) if immediate else None
            outcome = run_call(self.session, obj)
            if isinstance(outcome, Pending) or (isinstance(outcome, Done) and outcome.fds):
                return _Single(obj, outcome)
            return _single_answer(obj, outcome)
        if not obj:
            return _line(_error(INVALID_REQUEST, "Invalid request", None, "empty batch"))
        limits = self.session.service.limits
        if len(obj) > limits.max_batch:
            why = f"Limit exceeded: max-batch is {limits.max_batch}: {len(obj)} members"
            return _line(_error(INVALID_REQUEST, "Invalid request", None, why))
        with_fds = sum(
            1 for req in obj if _is_request(req) and req["method"] in FD_METHODS and "id" in req
        )
        if with_fds > SCM_MAX_FD:
            why = (
                f"Limit exceeded: a batch's answer carries at most {SCM_MAX_FD} file descriptors"
                f" (SCM_MAX_FD): {with_fds} calls of {', '.join(sorted(FD_METHODS))}"
            )
            return _line(_error(INVALID_REQUEST, "Invalid request", None, why))
        reserved = sum(map(_refusal_size, obj))
        if reserved + 2 > limits.max_message_size:
            why = (
                f"Limit exceeded: max-message-size is {limits.max_message_size}: the answer"
                " to this batch could not fit"
            )
            return _line(_error(INVALID_REQUEST, "Invalid request", None, why))
        return _Batch(self.session, obj, limits.max_message_size, reserved)
