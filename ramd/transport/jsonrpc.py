"""The JSON-RPC 2.0 dialect, on ``jsonrpcserver`` behind this one adapter.

What we take from jsonrpcserver: the request/response types, method lookup (-32601), the
params binding check and the call with its Result, through its per-request core
(``create_request`` -> ``dispatch_request`` -> ``to_response``). What we do ourselves,
because its defaults do not fit (see design.md) or cost more than they give: JSON parsing
(the splitter hands us one text), a cheap structural validator in place of its jsonschema
pass (same -32600 semantics), batches run in order one call after the other (its async
dispatcher gathers them), notifications detected by id, and every exception mapped to a
protocol error (-32602 naming fields, -32000 with ``data.class``, -32603 with a generic
message, never an exception text). Skipping its whole-message pipeline (deserialize,
validate, list handling) saves about 3 of its 11 µs per request.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from ramd.api import dispatch
from ramd.api.commands import COMMANDS
from ramd.api.events import Event
from ramd.api.service import Session
from ramd.errors import RamdError
from ramd.transport import jsontext
from ramd.transport.dialect import Reply
from ramd.transport.splitter import SplitError

with warnings.catch_warnings():
    # jsonrpcserver 5.0.9 reads its bundled schema with a deprecated importlib API.
    warnings.filterwarnings("ignore", category=DeprecationWarning, message="read_text")
    from jsonrpcserver import Error, Success
    from jsonrpcserver.dispatcher import create_request, dispatch_request, to_response
    from jsonrpcserver.response import ErrorResponse, SuccessResponse
    from jsonrpcserver.sentinels import NODATA, NOID

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
COMMAND_FAILED = -32000
#: Batch members run between two yields to the event loop.
BATCH_SLICE = 64

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class InvalidRequest(Exception):
    """The request object is not a JSON-RPC 2.0 request."""


def validate_request(obj: Any) -> Any:
    """Structural check of one request object (replaces jsonrpcserver's jsonschema pass)."""
    if (
        type(obj) is not dict
        or obj.get("jsonrpc") != "2.0"
        or type(obj.get("method")) is not str
        or not isinstance(obj.get("params", {}), dict | list)
        or not _valid_id(obj.get("id"))
        or not obj.keys() <= {"jsonrpc", "method", "params", "id"}
    ):
        raise InvalidRequest
    return obj


def _valid_id(value: Any) -> bool:
    return value is None or type(value) in (str, int, float)


def _error(code: int, message: str, req_id: Any, data: Any = NODATA) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not NODATA:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": req_id}


def _line(obj: Any) -> bytes:
    # A lone surrogate (from a "\ud800" escape in the request) can only sit inside a JSON
    # string; backslashreplace writes it back as that same escape instead of raising.
    return (_dumps(obj) + "\n").encode("utf-8", "backslashreplace")


class _BatchReply:
    """The responses of one batch, encoded as they come. Once they pass ``budget`` bytes
    (``max-message-size``), the remaining calls are refused unrun, so a batch of large reads
    cannot make the daemon build an answer of unbounded size."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.parts: list[str] = []
        self.size = 0

    @property
    def full(self) -> bool:
        return self.size > self.budget

    def add(self, response: dict[str, Any] | None) -> None:
        if response is not None:
            text = _dumps(response)
            self.parts.append(text)
            self.size += len(text)

    def refuse(self, req: Any) -> dict[str, Any] | None:
        """The error for a call not run because the batch's answer is full."""
        if type(req) is dict and "id" not in req:
            return None
        req_id = req.get("id") if type(req) is dict and _valid_id(req.get("id")) else None
        desc = (
            f"Limit exceeded: max-message-size is {self.budget}: the batch's answer is full,"
            " this call was not run"
        )
        return _error(COMMAND_FAILED, desc, req_id, {"class": "GenericError"})

    def reply(self) -> Reply:
        if not self.parts:
            return None
        return ("[" + ",".join(self.parts) + "]\n").encode("utf-8", "backslashreplace")


class _Deferred:
    """A response that is still being computed (an awaitable of it)."""

    __slots__ = ("pending",)

    def __init__(self, pending: Awaitable[Any]) -> None:
        self.pending = pending


def _method(name: str) -> Callable[..., Any]:
    """The jsonrpcserver method for command ``name``: maps every outcome to a Result.

    A command that must wait leaves its awaitable in ``dialect.deferred`` (jsonrpcserver's
    dispatcher is synchronous) and returns a placeholder result.
    """

    # ``dialect`` is positional-only, so a client parameter of that name lands in ``params``
    # (and is refused by name like any other unknown member). Array params never get here.
    def method(dialect: JsonRpcDialect, /, **params: Any) -> Any:
        try:
            result = dispatch.call(dialect.session, name, params)
        except dispatch.ArgumentError as e:
            return Error(INVALID_PARAMS, e.message())
        except RamdError as e:
            return Error(COMMAND_FAILED, e.desc, {"class": e.error_class})
        except Exception:
            log.exception("internal error in %s", name)
            return Error(INTERNAL_ERROR, "Internal error")
        if inspect.isawaitable(result):
            dialect.deferred = result
            return Success(None)
        return Success(result)

    # jsonrpcserver checks the params with inspect.signature(...).bind on every call; a
    # precomputed signature makes that check cheap (about a third of its cost otherwise).
    method.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return method


_METHODS = {name: _method(name) for name in COMMANDS}


async def _settle(pending: Awaitable[Any], req_id: Any, name: str) -> dict[str, Any] | None:
    """Await a deferred command; its response (None for a notification)."""
    try:
        result = await pending
    except RamdError as e:
        return _error(COMMAND_FAILED, e.desc, req_id, {"class": e.error_class})
    except Exception:
        log.exception("internal error in %s", name)
        return _error(INTERNAL_ERROR, "Internal error", req_id)
    return {"jsonrpc": "2.0", "result": result, "id": req_id}


_NOTIFICATION = object()


class JsonRpcDialect:
    """One JSON-RPC 2.0 connection's protocol logic (see :class:`~.dialect.Dialect`)."""

    name = "jsonrpc"

    def __init__(self, session: Session) -> None:
        self.session = session
        #: Set by a method whose command must wait; consumed right after dispatch.
        self.deferred: Awaitable[Any] | None = None

    def greeting(self) -> bytes | None:
        return None

    def split_error(self, error: SplitError) -> bytes:
        return _line(_error(PARSE_ERROR, "Parse error", None, error.reason))

    def refusal(self, desc: str) -> bytes:
        return _line(_error(COMMAND_FAILED, desc, None, {"class": "GenericError"}))

    def encode_event(self, event: Event) -> bytes | None:
        wire = event.encoded.get(self.name)
        if wire is None:
            wire = _line(
                {
                    "jsonrpc": "2.0",
                    "method": event.name,
                    "params": {"data": event.data, "timestamp": event.timestamp},
                }
            )
            event.encoded[self.name] = wire
        return wire

    def handle(self, message: bytes) -> Reply | Awaitable[Reply]:
        try:
            obj = jsontext.loads(message)
        except ValueError as e:
            return _line(_error(PARSE_ERROR, "Parse error", None, str(e)))
        if type(obj) is not list:
            single = self._one(obj)
            if isinstance(single, _Deferred):
                return self._later(single.pending)
            return None if single is None else _line(single)
        if not obj:
            return _line(_error(INVALID_REQUEST, "Invalid request", None, "empty batch"))
        return self._batch(obj)

    def _batch(self, requests: list[Any]) -> Reply | Awaitable[Reply]:
        """Run batch members in order. Goes async at the first member that must wait, and
        after every ``BATCH_SLICE`` members, yielding to the loop so that one large batch does
        not stall every other client."""
        out = _BatchReply(self.session.service.limits.max_message_size)
        for i, req in enumerate(requests):
            if i == BATCH_SLICE:
                return self._batch_rest(out, None, requests[i:])
            one = out.refuse(req) if out.full else self._one(req)
            if isinstance(one, _Deferred):
                return self._batch_rest(out, one.pending, requests[i + 1 :])
            out.add(one)
        return out.reply()

    async def _batch_rest(
        self, out: _BatchReply, pending: Awaitable[Any] | None, rest: list[Any]
    ) -> Reply:
        if pending is not None:
            out.add(await pending)
        for i, req in enumerate(rest):
            if i % BATCH_SLICE == 0:
                await asyncio.sleep(0)
            one = out.refuse(req) if out.full else self._one(req)
            out.add(await one.pending if isinstance(one, _Deferred) else one)
        return out.reply()

    async def _later(self, pending: Awaitable[dict[str, Any] | None]) -> Reply:
        response = await pending
        return None if response is None else _line(response)

    def _one(self, obj: Any) -> dict[str, Any] | _Deferred | None:
        """Dispatch one request object: its response dict, None for a notification, or a
        :class:`_Deferred` whose awaitable yields one of those."""
        try:
            validate_request(obj)
        except InvalidRequest:
            return _error(INVALID_REQUEST, "Invalid request", None, "not a JSON-RPC 2.0 request")
        if type(obj.get("params")) is list and obj["method"] in _METHODS:
            if "id" not in obj:
                return None
            return _error(INVALID_PARAMS, "Invalid params", obj["id"], _BY_NAME)
        self.deferred = None
        request, result = dispatch_request(_METHODS, self, create_request(obj))
        pending, self.deferred = self.deferred, None
        if pending is not None:
            req_id = obj.get("id", _NOTIFICATION)
            return _Deferred(self._settle_one(pending, req_id, obj["method"]))
        if request.id is NOID:
            return None
        either: Any = to_response(request, result)
        value = either._value if hasattr(either, "_value") else either._error
        if isinstance(value, SuccessResponse):
            return {"jsonrpc": "2.0", "result": value.result, "id": value.id}
        assert isinstance(value, ErrorResponse)
        return _error(value.code, value.message, value.id, value.data)

    @staticmethod
    async def _settle_one(pending: Awaitable[Any], req_id: Any, name: str) -> dict[str, Any] | None:
        response = await _settle(pending, None if req_id is _NOTIFICATION else req_id, name)
        return None if req_id is _NOTIFICATION else response


_BY_NAME = "params must be an object (by-name), not an array"
