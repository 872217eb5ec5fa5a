"""The JSON-RPC 2.0 dialect: messages, batches and events; each call through jsonrpcserver.

Each request object, alone or in a batch, is dispatched by jsonrpcserver
(:mod:`ramd.transport.protocol.jsonrpc_core`: method lookup, call, response object). What this
module
does around it: parsing each message with ramd's strict parser (-32700), refusing an empty
or too large batch (-32600), running a batch's calls in order, one per pipeline step (so a
long batch yields to other clients, and a call whose outcome is pending holds the next one
back until it settled), and the answer's text.

Batches: at most ``max-batch`` members (more: one -32600), and at most ``SCM_MAX_FD`` (253,
what one ``sendmsg`` can carry) calls whose answers carry an fd (more: one -32600, nothing
run); the answer never exceeds ``max-message-size``: room for a refusal of every member is
set aside first (a batch whose refusals alone would not fit is refused whole), and a call
whose answer does not fit is answered by a refusal instead, after which the rest are refused
unrun. When the fds of an answer cannot be sent, the calls that carried them are answered
with an error instead and what they did for their holder is undone (:meth:`fds_failed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ramd.api.commands import COMMANDS
from ramd.api.events import Event
from ramd.api.outcome import Done, Outcome, Pending
from ramd.api.service import Session
from ramd.transport.protocol import bulk, jsontext
from ramd.transport.protocol.dialect import Plan, Reply
from ramd.transport.protocol.jsonrpc_core import (
    COMMAND_FAILED,
    Call,
    MethodTable,
    Response,
    encode,
    is_request,
    run,
    settled,
    text,
    valid_id,
)
from ramd.transport.protocol.splitter import SplitError
from ramd.transport.sockets.output import SCM_MAX_FD, close_fds

PARSE_ERROR = -32700
INVALID_REQUEST = -32600

#: The commands whose answer carries an fd (``ram-block-get-fd``, docs/protocol.md §8).
FD_METHODS = frozenset({"ram-block-get-fd"})


def _error(code: int, message: str, req_id: Any, data: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return text({"jsonrpc": "2.0", "error": err, "id": req_id})


def _runs_nothing(req: Any) -> bool:
    """A batch member whose dispatch runs no command (invalid, or positional params)."""
    return not is_request(req) or (type(req.get("params")) is list and req["method"] in COMMANDS)


class _Single:
    """The plan of one request object whose call did not end at once: its outcome is
    pending (work in a thread) or carries fds, which the pipeline sends with the answer."""

    __slots__ = ("_first", "_obj", "_response", "_session", "_settle", "_unsent", "fds")

    def __init__(
        self, session: Session, obj: dict[str, Any], first: Outcome, response: Response | None
    ) -> None:
        self._session = session
        self._obj = obj
        self._first: Outcome | None = first
        self._settle = isinstance(first, Pending)
        self._response = response
        self.fds: list[int] = []
        self._unsent: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self._first is None

    def step(self) -> Outcome | None:
        first, self._first = self._first, None
        return first

    def record(self, outcome: Outcome) -> None:
        if self._settle:
            self._response = settled(self._session, self._obj, outcome)
        if isinstance(outcome, Done):
            if self._response is None:  # a notification: its fds go nowhere
                unsent(outcome)
            else:
                self.fds.extend(outcome.fds)
                self._unsent.extend(filter(None, [outcome.unsent]))

    def finish(self) -> Reply:
        return None if self._response is None else encode(self._response) + b"\n"

    def fds_failed(self, reason: str) -> Reply:
        for undo in self._unsent:
            undo()
        req_id = self._obj.get("id")
        return _error(COMMAND_FAILED, reason, req_id, {"class": "GenericError"}) + b"\n"


class _Batch:
    """The plan of a batch: its members in order, within the answer's size budget."""

    __slots__ = (
        "_budget",
        "_call",
        "_fd_parts",
        "_full",
        "_i",
        "_members",
        "_methods",
        "_parts",
        "_reserved",
        "_response",
        "_settle",
        "_size",
        "_unsent",
        "fds",
    )

    def __init__(
        self, call: Call, methods: MethodTable, members: list[Any], budget: int, reserved: int
    ) -> None:
        self._call = call
        self._methods = methods
        self._members = members
        self._budget = budget
        self._reserved = reserved  # bytes set aside for refusals of members not yet answered
        self._parts: list[bytes] = []
        self._size = 2  # the brackets
        self._i = -1
        self._full = False  # an answer did not fit: the remaining members are refused unrun
        self._response: Response | None = None  # of the call the last step ran
        self._settle = False  # that call's outcome is pending: its response comes later
        self.fds: list[int] = []
        self._fd_parts: list[tuple[int, Any]] = []  # (part, request id) of answers with fds
        self._unsent: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self._i + 1 >= len(self._members)

    def step(self) -> Outcome | None:
        call = self._call
        while True:
            self._i += 1
            if self._i >= len(self._members):
                return None
            req = self._members[self._i]
            if self._full and not _runs_nothing(req):
                self._add(_refusal(req, self._budget, ran=False), req)
                continue
            response = run(call, self._methods, req)
            outcome = call.outcome
            if outcome is None:  # no command ran
                self._answer(req, response, None)
                continue
            self._response = response
            self._settle = isinstance(outcome, Pending)
            return outcome

    def record(self, outcome: Outcome) -> None:
        req = self._members[self._i]
        if self._settle:
            self._response = settled(self._call.session, req, outcome)
        self._answer(req, self._response, outcome)

    def _answer(self, req: Any, response: Response | None, outcome: Outcome | None) -> None:
        """Add a member's response if it fits (else a refusal); take its fds, or close them
        and undo what they were for when no answer carries them."""
        if response is None:
            unsent(outcome)
            self._add(None, req)
            return
        answer = encode(response)
        if self._size + len(answer) + 1 + self._reserved - _refusal_size(req) > self._budget:
            self._full = True
            unsent(outcome)
            self._add(_refusal(req, self._budget, ran=True), req)
            return
        if isinstance(outcome, Done) and outcome.fds:
            self.fds.extend(outcome.fds)
            self._fd_parts.append((len(self._parts), req.get("id")))
            self._unsent.extend(filter(None, [outcome.unsent]))
        self._add(answer, req)

    def _add(self, answer: bytes | None, req: Any) -> None:
        self._reserved -= _refusal_size(req)
        if answer:
            self._parts.append(answer)
            self._size += len(answer) + 1

    def finish(self) -> Reply:
        if not self._parts:
            return None
        return b"[" + b",".join(self._parts) + b"]\n"

    def fds_failed(self, reason: str) -> Reply:
        for undo in self._unsent:
            undo()
        for part, req_id in self._fd_parts:
            self._parts[part] = _error(COMMAND_FAILED, reason, req_id, {"class": "GenericError"})
        self._fd_parts.clear()
        return self.finish()


def unsent(outcome: Outcome | None) -> None:
    """The fds of ``outcome`` go nowhere (no answer carries them): close them and undo what
    the call did for their holder."""
    if isinstance(outcome, Done):
        close_fds(outcome.fds)
        if outcome.unsent is not None:
            outcome.unsent()


_REFUSAL = (
    "Limit exceeded: max-message-size is {budget}: the batch's answer is full, this call {what}"
)
_RAN = "ran but its answer was dropped"
_NOT_RUN = "was not run"


def _refusal(req: Any, budget: int, *, ran: bool) -> bytes | None:
    if type(req) is dict and "id" not in req:
        return None
    req_id = req.get("id") if type(req) is dict and valid_id(req.get("id")) else None
    desc = _REFUSAL.format(budget=budget, what=_RAN if ran else _NOT_RUN)
    return _error(COMMAND_FAILED, desc, req_id, {"class": "GenericError"})


def _refusal_size(req: Any) -> int:
    """Bytes (+1 for the comma) that the longest refusal of this member takes: an upper
    bound of what the answer of a member that runs nothing, or a refusal, adds to the
    batch."""
    if type(req) is dict and "id" not in req and is_request(req):
        return 0
    req_id = req.get("id") if type(req) is dict and valid_id(req.get("id")) else None
    return _REFUSAL_BASE + len(text(req_id)) + 1


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
        self._call = Call(session)
        self._methods = MethodTable(session)

    def greeting(self) -> bytes | None:
        return None

    def split_error(self, error: SplitError) -> bytes:
        return _error(PARSE_ERROR, "Parse error", None, error.reason) + b"\n"

    def refusal(self, desc: str) -> bytes:
        return _error(COMMAND_FAILED, desc, None, {"class": "GenericError"}) + b"\n"

    def no_memory(self) -> bytes:
        desc = "Cannot allocate memory for this request"
        return _error(COMMAND_FAILED, desc, None, {"class": "GenericError"}) + b"\n"

    def encode_event(self, event: Event) -> bytes | None:
        key = self._event_key
        wire = event.encoded.get(key)
        if wire is None:
            data = event.data if not self.session.readonly else event.public_data()
            params = {"data": data, "timestamp": event.timestamp}
            wire = text({"jsonrpc": "2.0", "method": event.name, "params": params}) + b"\n"
            event.encoded[key] = wire
        return wire

    def handle(self, message: bytes | bytearray) -> Reply | Plan:
        try:
            small = len(message) < bulk.BULK_FROM
            obj = jsontext.loads(message) if small else bulk.loads(message)
        except ValueError as e:
            return _error(PARSE_ERROR, "Parse error", None, str(e)) + b"\n"
        if type(obj) is not list:
            call = self._call
            response = run(call, self._methods, obj)
            outcome = call.outcome
            if isinstance(outcome, Pending) or (isinstance(outcome, Done) and outcome.fds):
                return _Single(self.session, obj, outcome, response)
            return None if response is None else encode(response) + b"\n"
        if not obj:
            return _error(INVALID_REQUEST, "Invalid request", None, "empty batch") + b"\n"
        limits = self.session.service.limits
        if len(obj) > limits.max_batch:
            why = f"Limit exceeded: max-batch is {limits.max_batch}: {len(obj)} members"
            return _error(INVALID_REQUEST, "Invalid request", None, why) + b"\n"
        with_fds = sum(
            1 for req in obj if is_request(req) and req["method"] in FD_METHODS and "id" in req
        )
        if with_fds > SCM_MAX_FD:
            why = (
                f"Limit exceeded: a batch's answer carries at most {SCM_MAX_FD} file descriptors"
                f" (SCM_MAX_FD): {with_fds} calls of {', '.join(sorted(FD_METHODS))}"
            )
            return _error(INVALID_REQUEST, "Invalid request", None, why) + b"\n"
        reserved = sum(map(_refusal_size, obj))
        if reserved + 2 > limits.max_message_size:
            why = (
                f"Limit exceeded: max-message-size is {limits.max_message_size}: the answer"
                " to this batch could not fit"
            )
            return _error(INVALID_REQUEST, "Invalid request", None, why) + b"\n"
        return _Batch(self._call, self._methods, obj, limits.max_message_size, reserved)
