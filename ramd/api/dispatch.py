"""Run one command for a session: look it up, check access, validate, call, and say how it
ended as an :class:`~ramd.api.outcome.Outcome`.

Dialect-independent. Nothing a client sends makes :func:`call` raise: refusals are
:class:`~ramd.api.outcome.Failed`, bad arguments :class:`~ramd.api.outcome.BadArguments`,
unknown names :class:`~ramd.api.outcome.NotFound`, bugs :class:`~ramd.api.outcome.Internal`
(logged with their traceback). A handler that must wait returns a coroutine or a future;
it becomes a :class:`~ramd.api.outcome.Pending` whose result is mapped the same way.

Logging: each refusal of a peer's request is logged once at INFO with the peer and the
reason, rate-limited per session; each successful change (commands marked ``audit``) is one
audit line with the peer's pid and uid. Names chosen by clients are logged with ``repr``.

Metrics: every call is counted here, once, when its outcome is final (a pending one when it
settles), with its time from the call to that outcome, in the service's
:class:`~ramd.metrics.counters.CommandStats` (loop thread, no lock).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import replace
from types import CoroutineType
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from ramd.api.commands import COMMANDS, Raw, WithFds
from ramd.api.outcome import (
    OUTCOME_INDEX,
    BadArguments,
    Done,
    Failed,
    Final,
    Internal,
    NotFound,
    Outcome,
    Pending,
)
from ramd.api.service import Session
from ramd.errors import RamdError
from ramd.metrics.counters import UNKNOWN

log = logging.getLogger("ramd.requests")
audit = logging.getLogger("ramd.audit")

#: What a handler that must wait returns (an ``async def`` helper's coroutine, or a future).
_AWAITABLES = (CoroutineType, asyncio.Future)

_NO_MEMORY = Failed("GenericError", "Cannot allocate memory for this request")


def call(session: Session, name: str, params: dict[str, Any]) -> Outcome:
    """Run command ``name`` with ``params`` for ``session``."""
    started = time.perf_counter()
    outcome = _call(session, name, params, started)
    if type(outcome) is not Pending:
        _count(session, name, outcome, started)
    return outcome


def _count(session: Session, name: str, outcome: Outcome, started: float) -> None:
    label = name if name in COMMANDS else UNKNOWN
    seconds = time.perf_counter() - started
    session.service.command_stats.record(label, OUTCOME_INDEX[type(outcome)], seconds)


def _call(session: Session, name: str, params: dict[str, Any], started: float) -> Outcome:
    cmd = COMMANDS.get(name)
    if cmd is None:
        return _not_found(session, name)
    if session.readonly and not cmd.readonly:
        return _failed(
            session, name, RamdError(f"Permission denied: read-only peer may not run '{name}'")
        )
    try:
        args = cmd.args.model_validate(params) if params else cmd.no_args()
    except ValidationError as e:
        bad = BadArguments(e.errors(include_url=False, include_context=False))
        _refused(session, name, f"invalid arguments: {bad.message()}")
        return bad
    try:
        result = cmd.handler(session, args)
    except RamdError as e:
        return _failed(session, name, e)
    except MemoryError:
        return _NO_MEMORY
    except Exception:
        log.exception("internal error in %s", name)
        return Internal()
    if isinstance(result, _AWAITABLES):
        return Pending(_settle(session, name, params, cmd.audit, result, started))
    if cmd.audit:
        _audit(session, name, params)
    return _done(result)


def not_found(session: Session, name: str) -> NotFound:
    """The outcome of a call of an unknown command (logged as a refusal, and counted)."""
    started = time.perf_counter()
    outcome = _not_found(session, name)
    _count(session, name, outcome, started)
    return outcome


def _not_found(session: Session, name: str) -> NotFound:
    _refused(session, name, "unknown command")
    return NotFound(name)


async def _settle(
    session: Session,
    name: str,
    params: dict[str, Any],
    audited: bool,
    pending: Awaitable[Any],
    started: float,
) -> Final:
    outcome = await _settled(session, name, params, audited, pending)
    _count(session, name, outcome, started)
    return outcome


async def _settled(
    session: Session, name: str, params: dict[str, Any], audited: bool, pending: Awaitable[Any]
) -> Final:
    try:
        result = await pending
    except RamdError as e:
        return _failed(session, name, e)
    except MemoryError:
        return _NO_MEMORY
    except Exception:
        log.exception("internal error in %s", name)
        return Internal()
    if audited:
        _audit(session, name, params)
    return _done(result)


def _done(result: BaseModel | Raw | WithFds) -> Done:
    if isinstance(result, WithFds):
        return replace(_done(result.result), fds=result.fds, unsent=result.unsent)
    if isinstance(result, Raw):
        return Done(raw=result.text)
    try:
        # pydantic's own serializer writes the JSON directly (the dialects splice it in)
        return Done(
            raw=result.__pydantic_serializer__.to_json(result, by_alias=True, exclude_none=True)
        )
    except PydanticSerializationError:  # a lone surrogate from a client's text
        return Done(result.model_dump(mode="json", by_alias=True, exclude_none=True))


def _failed(session: Session, name: str, e: RamdError) -> Failed:
    _refused(session, name, f"{e.error_class}: {e.desc}")
    return Failed(e.error_class, e.desc)


def _refused(session: Session, name: str, why: str) -> None:
    if not session.peer or not session.refusal_log.allow():
        return
    shown = repr(name[:64])
    log.info(
        "refused %s from %s: %s%s",
        shown,
        session.peer,
        why[:512],
        session.refusal_log.suppressed_note(),
        extra={"fields": {"event": "refused-request", "command": name[:64], "reason": why[:512]}},
    )


def _audit(session: Session, name: str, params: dict[str, Any]) -> None:
    if not session.peer:
        return
    target = params.get("id")
    shown = repr(target[:64]) if isinstance(target, str) else "-"
    size = params.get("size")
    extra = f" size={size}" if isinstance(size, int) else ""
    audit.info(
        "%s %s%s by %s",
        name,
        shown,
        extra,
        session.peer,
        extra={
            "fields": {
                "event": "change",
                "command": name,
                "target": target if isinstance(target, str) else None,
                **session.peer_fields,
            }
        },
    )
