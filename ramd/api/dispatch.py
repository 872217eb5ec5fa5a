"""Run one command for a session: look it up, check access, validate, call, encode.

Dialect-independent. Failures come out as exceptions the dialects translate:
:class:`CommandNotFound`, :class:`ArgumentError` (pydantic's error list, worded per dialect)
and :class:`~ramd.errors.RamdError`. Anything else is an internal bug.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ramd.api.commands import COMMANDS, Command
from ramd.api.service import Session
from ramd.errors import RamdError

log = logging.getLogger("ramd.requests")


class CommandNotFound(Exception):
    """No command of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class ArgumentError(Exception):
    """The arguments failed validation; ``errors`` is pydantic's list."""

    def __init__(self, errors: list[ErrorDetails]) -> None:
        super().__init__(errors)
        self.errors = errors

    def message(self) -> str:
        """``field: reason`` for each bad field, joined by ``; ``."""
        parts = []
        for err in self.errors:
            field = ".".join(str(p) for p in err["loc"]) or "params"
            parts.append(f"{field}: {err['msg']}")
        return "; ".join(parts)


def encode(result: BaseModel) -> Any:
    """A result model as JSON-ready Python data (kebab-case keys)."""
    return result.model_dump(mode="json", by_alias=True)


def lookup(session: Session, name: str) -> Command:
    """The command ``name`` if this session may run it."""
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise CommandNotFound(name)
    if session.readonly and not cmd.readonly:
        raise RamdError(f"Permission denied: read-only peer may not run '{name}'")
    return cmd


def call(session: Session, name: str, params: dict[str, Any]) -> Any:
    """Run command ``name``; returns JSON-ready data, or an awaitable of it.

    Every refusal of a peer's request is logged once, with the peer and the reason (the
    daemon's own start-up session has no peer: its failures are reported by the caller).
    """
    try:
        cmd = lookup(session, name)
        try:
            args = cmd.args.model_validate(params)
        except ValidationError as e:
            raise ArgumentError(e.errors(include_url=False, include_context=False)) from None
        result = cmd.handler(session, args)
    except (RamdError, ArgumentError, CommandNotFound) as e:
        _log_refusal(session, name, e)
        raise
    if inspect.isawaitable(result):
        return _finish(session, name, result)
    return encode(result)


async def _finish(session: Session, name: str, pending: Awaitable[BaseModel]) -> Any:
    try:
        return encode(await pending)
    except RamdError as e:
        _log_refusal(session, name, e)
        raise


def _log_refusal(session: Session, name: str, e: Exception) -> None:
    if not session.peer:
        return
    if isinstance(e, RamdError):
        why = f"{e.error_class}: {e.desc}"
    elif isinstance(e, ArgumentError):
        why = f"invalid arguments: {e.message()}"
    else:
        why = "unknown command"
    log.info(
        "refused %s from %s: %s",
        name[:64],
        session.peer,
        why,
        extra={"fields": {"event": "refused-request", "command": name[:64], "reason": why}},
    )
