"""Pydantic models of every command's arguments and result and every event's data.

One definition, shared by the daemon (validation), the client library (typed results) and
the JSON Schema in ``schemas/``. Wire names are kebab-case (``max-size``); Python attribute
names are snake_case (``max_size``). Arguments reject unknown members and, per field, values
of the wrong JSON type (no coercion of ``"1"`` to ``1`` or ``1`` to ``true``).
"""

from __future__ import annotations

import binascii
from typing import Annotated, Any, Literal

import pybase64
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
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


class DecodedBase64:
    """A JSON string of base64 text that the transport decoded (and validated) as it parsed
    the request, ``data`` the bytes it stands for (see ramd.transport.protocol.bulk). JSON itself
    never yields one."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _base64(value: object) -> bytes:
    if type(value) is DecodedBase64:
        return value.data
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    try:
        return pybase64.b64decode(value, validate=True)
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


Backend = Literal["anonymous", "memfd", "file"]


PoolName = Annotated[StrictStr, Field(pattern=ID_PATTERN, description="a [[pool]] name")]


def _size_unless_pool(value: int | None, info: ValidationInfo) -> int | None:
    """``size`` is required unless the block is taken from a pool."""
    if value is None and info.data.get("pool") is None:
        raise PydanticCustomError("missing", "Field required")
    return value


class RamBlockAddArgs(Args):
    """``pool``: take a ready block of that ``[[pool]]`` (then no other argument but
    ``id``); otherwise ``size`` is required."""

    id: BlockId
    pool: PoolName | None = Field(
        None, description="take a ready block of this pool (docs/protocol.md §14); only with id"
    )
    size: Annotated[
        Size | None,
        AfterValidator(_size_unless_pool),
        Field(validate_default=True, description="bytes; required unless pool"),
    ] = None
    max_size: Size | None = Field(None, description="reserve this much; makes the block resizable")
    backend: Backend = Field(
        "anonymous",
        description="anonymous (private), memfd or file (shared: an fd other processes can map)",
    )
    hugetlb: StrictBool = Field(False, description="huge pages from hugetlbfs (memfd, file)")
    prealloc: StrictBool = False
    merge: StrictBool = False
    dump: StrictBool = True
    hugepages: StrictBool = False
    lock: StrictBool = False
    align: Align | None = None


class BlockIdArgs(Args):
    id: BlockId


ReleaseMode = Literal["safe", "hard"]
_MODE_DOC = (
    "when a mapper does not acknowledge in time: safe = roll back and fail,"
    " hard = disconnect it and release anyway"
)


class RamBlockDelArgs(Args):
    id: BlockId
    mode: ReleaseMode = Field("safe", description=_MODE_DOC)


class RamBlockResizeArgs(Args):
    id: BlockId
    size: Offset = Field(
        description="bytes; 0 only for a block attached as virtio-mem (a request to the guest)"
    )
    mode: ReleaseMode = Field("safe", description=_MODE_DOC)


class GetFdArgs(Args):
    id: BlockId
    readonly: StrictBool = Field(False, description="an O_RDONLY fd (map it PROT_READ)")
    lease: StrictBool = Field(
        False,
        description="hold a lease instead of mapping: no events, no acknowledgements; the"
        " block cannot shrink or be removed while the connection stays open (docs/protocol.md §12)",
    )


class AckArgs(Args):
    seq: Annotated[StrictInt, Field(gt=0, le=U64_MAX, description="the event's seq")]


FdName = Annotated[
    StrictStr,
    Field(pattern=r"^[A-Za-z_][A-Za-z0-9._-]{0,63}$", description="a name for the fd"),
]


class FdNameArgs(Args):
    fdname: FdName


ImageName = Annotated[
    StrictStr,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="an image file name in the daemon's state-dir (no paths)",
    ),
]


class FileTarget(Args):
    """An image file in the daemon's ``state-dir``."""

    file: ImageName


class FdTarget(Args):
    """An fd passed earlier on this connection with ``getfd`` (a regular file)."""

    fd: FdName


_IMAGE_NAME_RULE = "a letter or digit, then up to 63 of A-Z a-z 0-9 . _ - (no paths)"
_FD_NAME_RULE = "a letter or _, then up to 63 of A-Z a-z 0-9 . _ -"


def _location_problem(value: object) -> str:
    """Why ``value`` is neither ``{"file": NAME}`` nor ``{"fd": FDNAME}``, in one line."""
    allowed = (
        f'must be {{"file": NAME}} (an image in the daemon\'s state-dir; NAME: {_IMAGE_NAME_RULE})'
        ' or {"fd": FDNAME} (a file descriptor passed with getfd)'
    )
    if isinstance(value, dict) and len(value) == 1:
        ((key, name),) = value.items()
        what = {"file": ("image", _IMAGE_NAME_RULE), "fd": ("fd", _FD_NAME_RULE)}.get(key)
        if what is not None:
            shown = repr(name) if isinstance(name, str) else "(not a string)"
            return f"invalid {what[0]} name {shown}: {what[1]}"
    return allowed


def _one_location(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    """Validate a ``target``/``source`` union, replacing pydantic's per-member errors (each
    member's reason, one per line) by one error naming what is allowed."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "image_location", "{problem}", {"problem": _location_problem(value)}
        ) from None


#: ``target`` of ``ram-save``, ``source`` of ``ram-load``: a state-dir name or a ``getfd`` fd.
ImageLocation = Annotated[FileTarget | FdTarget, WrapValidator(_one_location)]


class RamSaveArgs(Args):
    target: ImageLocation
    blocks: list[BlockId] | None = Field(None, description="block ids; default all")


class RamLoadArgs(Args):
    source: ImageLocation


class ImageRemoveArgs(Args):
    file: ImageName


JobId = Annotated[StrictStr, Field(pattern=ID_PATTERN, description="job id")]


class JobIdArgs(Args):
    id: JobId


class QueryRamBlocksArgs(Args):
    id: BlockId | None = None
    resident: StrictBool = Field(
        False, description="also report each block's resident bytes (costs a scan of its pages)"
    )


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


class HumanMonitorCommandArgs(Args):
    command_line: StrictStr = Field(
        description="an HMP command line: help, info, info ramblock (QEMU's wording for any other)"
    )
    cpu_index: StrictInt | None = Field(
        None, description="accepted (qmp-shell -H always sends it) and ignored: ramd has no CPUs"
    )


AttachAs = Literal["pc-dimm", "virtio-mem"]
QemuId = Annotated[
    StrictStr,
    Field(pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,63}$", description="a QEMU device or bus id"),
]


class RamBlockAttachArgs(Args):
    id: BlockId
    qmp: Annotated[
        StrictStr,
        Field(
            pattern=r"^/[^\x00]{0,106}$",
            description="absolute path of a QMP socket of the VMM (one for ramd alone)",
        ),
    ]
    as_: AttachAs = Field(alias="as", description="the device the block becomes in the VMM")
    device: QemuId | None = Field(None, description='the device id; default "ramd-ID"')
    bus: QemuId | None = Field(
        None, description="passed to device_add (e.g. a pcie-root-port id on q35)"
    )
    requested_size: Offset | None = Field(
        None, description="virtio-mem: bytes the guest is asked to plug; default the block's size"
    )


class RamBlockDetachArgs(Args):
    id: BlockId
    timeout: Annotated[StrictInt | StrictFloat, Field(gt=0, le=3600)] | None = Field(
        None, description="seconds to wait for the VMM to let go; default ack-timeout"
    )


class QmpCapabilitiesArgs(Args):
    """Arguments of the QMP dialect's ``qmp_capabilities``; ramd offers no capability, so
    any name is refused."""

    enable: list[StrictStr] | None = None


# -- results --------------------------------------------------------------------------------


class Empty(Result):
    """``{}``: the command returns nothing."""


class HolderInfo(Result):
    """One process holding a block (docs/protocol.md §12)."""

    kind: Literal["mapper", "lease", "vmm"]
    pid: int
    uid: int


class AttachmentInfo(Result):
    """Where a block is attached (docs/protocol.md §13)."""

    qmp: str = Field(description="the VMM's QMP socket the daemon drives")
    as_: AttachAs = Field(alias="as")
    device: str
    memdev: str = Field(description="QOM path of the memory backend in the VMM")
    addr: int = Field(description="guest-physical address")
    vmm_pid: int
    requested_size: int | None = Field(
        None, exclude_if=lambda v: v is None, description="virtio-mem only"
    )


class RamBlockInfo(Result):
    """A block (docs/protocol.md §4). ``0 < size <= max_size``, except for a block attached as
    virtio-mem (and, after that, until its VMM exits): there ``size`` is what the guest has
    plugged, 0 included, while its file is ``max_size`` long (§13)."""

    id: str
    size: int = Field(
        description="used length in bytes; attached as virtio-mem: what the guest has plugged"
    )
    max_size: int
    resizable: bool
    page_size: int
    host: int | None = Field(None, description="the daemon's address; full-access peers only")
    offset: int
    backend: str
    shared: bool = Field(description="has an fd that other processes can map")
    persistent: bool = Field(description="outlives the daemon process")
    path: str | None = Field(
        None, exclude_if=lambda v: v is None, description="file backend only: the block's file"
    )
    prealloc: bool
    merge: bool
    dump: bool
    hugepages: bool
    hugetlb: bool
    lock: bool
    sealed: bool = Field(
        False, description="a template: its memory can never change (ram-block-seal)"
    )
    mappers: int = Field(0, description="connections holding an fd of this block")
    leases: int = Field(0, description="leases held now (lease holders and VMM attachments)")
    holders: list[HolderInfo] | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="every holder of the block; full-access peers only",
    )
    attachment: AttachmentInfo | None = Field(
        None, exclude_if=lambda v: v is None, description="the VMM it is attached to, if any"
    )
    resident: int | None = Field(
        None,
        description='only with query-ram-blocks "resident": true; attached as virtio-mem: the'
        " allocated bytes anywhere in max-size",
    )


RamBlockInfoList = RootModel[list[RamBlockInfo]]


class PoolInfo(Result):
    name: str
    size: int = Field(description="bytes of each block")
    count: int = Field(description="blocks the pool keeps ready")
    ready: int = Field(description="blocks ready to be taken now")


PoolInfoList = RootModel[list[PoolInfo]]


class GetFdResult(Result):
    """Sent with one fd (``SCM_RIGHTS``) on the first byte of the answer."""

    id: str
    size: int
    max_size: int
    page_size: int
    readonly: bool


class ReadResult(Result):
    data: str = Field(description="base64")


class WriteResult(Result):
    written: int


class JobStarted(Result):
    job_id: str


JobStatusName = Literal["created", "running", "aborting", "concluded", "null"]


class JobInfo(Result):
    id: str
    type: Literal["ram-save", "ram-load"]
    status: JobStatusName
    current_progress: int = Field(description="bytes done")
    total_progress: int = Field(description="bytes expected (may change while running)")
    error: str | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="why the job failed or that it was cancelled; absent on success",
    )


JobInfoList = RootModel[list[JobInfo]]


class ImageEntry(Result):
    """One image file of the daemon's ``state-dir`` (``query-images``)."""

    name: str
    size: int = Field(description="bytes of the file (holes included)")
    disk_size: int = Field(description="bytes it occupies on disk (zero pages are holes)")
    mtime: float = Field(description="last modification, seconds since the Unix epoch")
    blocks: list[str] | None = Field(
        None, description="the ids of the blocks it holds; null if it is no readable image"
    )
    data_bytes: int | None = Field(
        None, description="the sum of its blocks' sizes; null if it is no readable image"
    )
    error: str | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="why its header or table cannot be read; absent for a readable image",
    )


ImageEntryList = RootModel[list[ImageEntry]]


class SubscribeResult(Result):
    seq: int
    events: list[EventName]


class StatsResult(Result):
    blocks: int
    reserved: int
    used: int
    pooled: int = Field(0, description="bytes charged to pools ([[pool]]) against max-used")
    resident: int
    clients: int
    subscribers: int
    events_emitted: int
    commands: int = Field(description="commands answered since start, whatever their outcome")
    dropped_subscribers: int = Field(description="subscribers disconnected for falling behind")
    uptime: float
    limits: dict[str, int] = Field(description="each configured limit by name")


class VersionTriple(Result):
    major: int
    minor: int
    micro: int


class VersionResult(Result):
    """``query-version`` on JSON-RPC."""

    version: VersionTriple
    package: str


class QmpVersionResult(Result):
    """``query-version`` on QMP: QEMU's ``VersionInfo`` (as in the greeting)."""

    qemu: VersionTriple
    package: str


class HmpOutput(RootModel[str]):
    """What the HMP command printed, lines ending with ``\\r\\n`` (as QEMU's monitor)."""


# QEMU's introspection (``qapi/introspect.json``): a ``SchemaInfo`` is a union on ``meta-type``.


class SchemaInfoBuiltin(Result):
    name: str
    meta_type: Literal["builtin"]
    json_type: Literal["string", "number", "int", "boolean", "null", "object", "array", "value"]


class SchemaInfoEnumMember(Result):
    name: str


class SchemaInfoEnum(Result):
    name: str
    meta_type: Literal["enum"]
    members: list[SchemaInfoEnumMember]
    values: list[str]


class SchemaInfoArray(Result):
    name: str
    meta_type: Literal["array"]
    element_type: str


class SchemaInfoObjectMember(Result):
    name: str
    type: str
    default: Any = Field(None, description="present (null) when the member is optional")


class SchemaInfoObjectVariant(Result):
    case: str
    type: str


class SchemaInfoObject(Result):
    name: str
    meta_type: Literal["object"]
    members: list[SchemaInfoObjectMember]
    tag: str | None = Field(None, description="the member that selects the variant")
    variants: list[SchemaInfoObjectVariant] | None = None


class SchemaInfoAlternateMember(Result):
    type: str


class SchemaInfoAlternate(Result):
    name: str
    meta_type: Literal["alternate"]
    members: list[SchemaInfoAlternateMember]


class SchemaInfoCommand(Result):
    name: str
    meta_type: Literal["command"]
    arg_type: str
    ret_type: str


class SchemaInfoEvent(Result):
    name: str
    meta_type: Literal["event"]
    arg_type: str


class SchemaInfo(
    RootModel[
        Annotated[
            SchemaInfoBuiltin
            | SchemaInfoEnum
            | SchemaInfoArray
            | SchemaInfoObject
            | SchemaInfoAlternate
            | SchemaInfoCommand
            | SchemaInfoEvent,
            Field(discriminator="meta_type"),
        ]
    ]
):
    """One entity of ``query-qmp-schema``: a type, command or event, by ``meta-type``."""


SchemaInfoList = RootModel[list[SchemaInfo]]


class CommandInfo(Result):
    name: str


CommandInfoList = RootModel[list[CommandInfo]]


class SchemaResult(RootModel[dict[str, object]]):
    """The JSON Schema document of all commands and events."""


# -- events ---------------------------------------------------------------------------------


class RamBlockAddedData(Result):
    seq: int
    id: str
    host: int | None = Field(None, description="the daemon's address; full-access peers only")
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
    host: int | None = Field(None, description="the daemon's address; full-access peers only")
    old_size: int
    new_size: int
    max_size: int
    ack: bool = Field(False, description="this connection maps the block: ram-block-ack it")


class RamBlockRemovedData(Result):
    seq: int
    id: str
    host: int | None = Field(None, description="the daemon's address; full-access peers only")
    size: int
    max_size: int
    ack: bool = Field(False, description="this connection maps the block: ram-block-ack it")


class JobStatusChangeData(Result):
    seq: int
    id: str
    status: JobStatusName


class RamBlockAttachedData(Result):
    seq: int
    id: str
    device: str
    as_: AttachAs = Field(alias="as")
    addr: int
    vmm_pid: int


class RamBlockDetachedData(Result):
    seq: int
    id: str
    device: str
    reason: Literal["detached", "vmm-exited"]


EVENT_MODELS: dict[str, type[Result]] = {
    "RAM_BLOCK_ADDED": RamBlockAddedData,
    "RAM_BLOCK_RESIZED": RamBlockResizedData,
    "RAM_BLOCK_REMOVED": RamBlockRemovedData,
    "JOB_STATUS_CHANGE": JobStatusChangeData,
    "RAM_BLOCK_ATTACHED": RamBlockAttachedData,
    "RAM_BLOCK_DETACHED": RamBlockDetachedData,
}
