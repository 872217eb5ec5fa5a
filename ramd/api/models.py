"""Pydantic models of every command's arguments and result and every event's data.

One definition, shared by the daemon (validation), the client library (typed results) and
the JSON Schema in ``schemas/``. Wire names are kebab-case (``max-size``); Python attribute
names are snake_case (``max_size``). Arguments reject unknown members and, per field, values
of the wrong JSON type (no coercion of ``"1"`` to ``1`` or ``1`` to ``true``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from ramd.api.eventnames import EVENT_NAMES as EVENT_NAMES
from ramd.api.eventnames import EventName as EventName
from ramd.ids import ID_PATTERN

U64_MAX = 2**64 - 1


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Args(BaseModel):
    """Base of command arguments: kebab-case members, unknown members refused."""

    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, frozen=True)


class Result(BaseModel):
    """Base of results and event data: kebab-case members."""

    model_config = ConfigDict(alias_generator=_kebab, validate_by_name=True, frozen=True)


BlockId = Annotated[StrictStr, Field(pattern=ID_PATTERN, description="RAM block name")]
Size = Annotated[StrictInt, Field(gt=0, le=U64_MAX, description="bytes")]
Offset = Annotated[StrictInt, Field(ge=0, le=U64_MAX, description="bytes")]


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError("must be a power of two")
    return value


def _base64(value: object) -> bytes:
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


Align = Annotated[
    Size, AfterValidator(_power_of_two), Field(description="power of two >= page size")
]
Base64 = Annotated[
    bytes,
    BeforeValidator(_base64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


# -- arguments ------------------------------------------------------------------------------


class NoArgs(Args):
    """No arguments."""


class RamBlockAddArgs(Args):
    id: BlockId
    size: Size
    max_size: Size | None = Field(None, description="reserve this much; makes the block resizable")
    prealloc: StrictBool = False
    merge: StrictBool = False
    dump: StrictBool = True
    hugepages: StrictBool = False
    lock: StrictBool = False
    align: Align | None = None


class BlockIdArgs(Args):
    id: BlockId


class RamBlockResizeArgs(Args):
    id: BlockId
    size: Size


class QueryRamBlocksArgs(Args):
    id: BlockId | None = None


class RamBlockReadArgs(Args):
    id: BlockId
    offset: Offset
    length: Offset


class RamBlockWriteArgs(Args):
    id: BlockId
    offset: Offset
    data: Base64 = Field(description="the bytes to write, base64-encoded")


class RamBlockDiscardArgs(Args):
    id: BlockId
    offset: Offset
    length: Offset


class SubscribeArgs(Args):
    events: list[EventName] | None = Field(None, description="event names; default all")
    replay: StrictBool = True


# -- results --------------------------------------------------------------------------------


class Empty(Result):
    """``{}``: the command returns nothing."""


class RamBlockInfo(Result):
    id: str
    size: int
    max_size: int
    resizable: bool
    page_size: int
    host: int
    offset: int
    backend: str
    prealloc: bool
    merge: bool
    dump: bool
    hugepages: bool
    lock: bool
    resident: int


RamBlockInfoList = RootModel[list[RamBlockInfo]]


class ReadResult(Result):
    data: str = Field(description="base64")


class WriteResult(Result):
    written: int


class SubscribeResult(Result):
    seq: int
    events: list[EventName]


class StatsResult(Result):
    blocks: int
    reserved: int
    used: int
    resident: int
    clients: int
    subscribers: int
    events_emitted: int
    dropped_subscribers: int = Field(description="subscribers disconnected for falling behind")
    uptime: float
    limits: dict[str, int] = Field(description="each configured limit by name")


class VersionTriple(Result):
    major: int
    minor: int
    micro: int


class VersionResult(Result):
    version: VersionTriple
    package: str


class CommandInfo(Result):
    name: str


CommandInfoList = RootModel[list[CommandInfo]]


class SchemaResult(RootModel[dict[str, object]]):
    """The JSON Schema document of all commands and events."""


# -- events ---------------------------------------------------------------------------------


class RamBlockAddedData(Result):
    seq: int
    id: str
    host: int
    offset: int
    size: int
    max_size: int
    page_size: int
    resizable: bool
    backend: str
    replay: bool


class RamBlockResizedData(Result):
    seq: int
    id: str
    host: int
    old_size: int
    new_size: int
    max_size: int


class RamBlockRemovedData(Result):
    seq: int
    id: str
    host: int
    size: int
    max_size: int


EVENT_MODELS: dict[str, type[Result]] = {
    "RAM_BLOCK_ADDED": RamBlockAddedData,
    "RAM_BLOCK_RESIZED": RamBlockResizedData,
    "RAM_BLOCK_REMOVED": RamBlockRemovedData,
}
