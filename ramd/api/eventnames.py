"""The names of the daemon's events, without pydantic: what a light client (``ramctl``'s
argument parser) needs before it knows whether it will decode any event.

:mod:`ramd.api.models` re-exports both names; this module is their one definition.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["EVENT_NAMES", "EventName"]

EventName = Literal[
    "RAM_BLOCK_ADDED",
    "RAM_BLOCK_RESIZED",
    "RAM_BLOCK_REMOVED",
    "JOB_STATUS_CHANGE",
    "RAM_BLOCK_ATTACHED",
    "RAM_BLOCK_DETACHED",
]
#: Every event name, in the order the protocol lists them.
EVENT_NAMES: tuple[EventName, ...] = (
    "RAM_BLOCK_ADDED",
    "RAM_BLOCK_RESIZED",
    "RAM_BLOCK_REMOVED",
    "JOB_STATUS_CHANGE",
    "RAM_BLOCK_ATTACHED",
    "RAM_BLOCK_DETACHED",
)
