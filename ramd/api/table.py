"""The command table: every command's name, argument model, result model, handler and doc.

A handler takes the calling :class:`~ramd.api.service.Session` and its validated arguments
and returns a result model (or :class:`Raw` JSON text, or :class:`WithFds`), or an awaitable
of one when it must wait. It raises :class:`~ramd.errors.RamdError` to refuse. Handlers run on
the loop thread; a handler that must wait takes whatever pin it needs *before* it returns
its awaitable (:mod:`ramd.ramblock.pins`), so no other request slips in between.

The command modules (:mod:`ramd.api.block_commands`, :mod:`ramd.api.fd_commands`, ...)
register here with :func:`command`; :mod:`ramd.api.commands` imports them all. Adding a
command is one model plus one handler.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from ramd.api import models as m
from ramd.api.service import Session
from ramd.ramblock import RAMBlock

A = TypeVar("A", bound=BaseModel)
Handler = Callable[[Session, Any], Any]


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of the table. ``readonly``: allowed to read-only peers. ``audit``: each
    success is logged as a change, with the peer. ``qmp_result``: the result on the QMP
    dialect when it differs from ``result`` (the handler answers per ``session.dialect``)."""

    name: str
    args: type[m.Args]
    result: type[BaseModel]
    handler: Handler
    doc: str
    readonly: bool
    audit: bool

    def no_args(self) -> m.Args:
        """The arguments when none are given (validated once, then shared: args are frozen)."""
        return _no_args(self.args)

    qmp_result: type[BaseModel] | None = None


@functools.cache
def _no_args(model: type[m.Args]) -> m.Args:
    return model.model_validate({})


@dataclass(frozen=True, slots=True)
class WithFds:
    """A result sent with file descriptors (owned by this object until sent or closed)."""

    result: BaseModel
    fds: tuple[int, ...]
    #: Undoes the call if the fds cannot be sent (see :attr:`ramd.api.outcome.Done.unsent`).
    unsent: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class Raw:
    """A result already encoded as ASCII JSON, valid against the command's result model."""

    text: bytes


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    args: type[A],
    result: type[BaseModel],
    *,
    readonly: bool = False,
    audit: bool = False,
    qmp_result: type[BaseModel] | None = None,
) -> Callable[[Callable[[Session, A], Any]], Callable[[Session, A], Any]]:
    """Register the decorated handler as command ``name``; its docstring is the doc."""

    def register(fn: Callable[[Session, A], Any]) -> Callable[[Session, A], Any]:
        if not issubclass(args, m.Args):
            raise TypeError(f"{name}: arguments must be an m.Args model")
        doc = " ".join((fn.__doc__ or "").split())
        COMMANDS[name] = Command(name, args, result, fn, doc, readonly, audit, qmp_result)
        return fn

    return register


def block_info(session: Session, block: RAMBlock) -> Raw:
    """``RamBlockInfo`` of ``block`` as this session may see it."""
    return Raw(session.service.infos.info(block, not session.readonly))
