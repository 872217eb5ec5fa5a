"""The asynchronous client: :func:`connect` and :class:`AsyncClient`, one method per command.

Arguments and results are the pydantic models of :mod:`ramd.api.models`, the same ones the
daemon validates with and the JSON Schema is generated from. The client builds each request's
``params`` from the argument model's field names and wire aliases (``max_size`` ->
``max-size``) without validating them itself: the daemon is the one judge, so a bad argument
comes back as the daemon's own :class:`~ramd_client.error.RamdError` (-32602, naming the
field). Results are parsed into the result models.

Every public coroutine runs on the **caller side** (in the awaiting task); the connection's
reader task (the **reader side**) only routes answers and events; see
:mod:`ramd_client.protocol`.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TypeVar

import pybase64
from pydantic import BaseModel, ValidationError

from ramd.api import models as m
from ramd.process.paths import default_socket
from ramd_client.error import (
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RamdClientError,
)
from ramd_client.events import MAX_QUEUE, MAX_REPLAY, Event, EventStream, check_names
from ramd_client.message import Binary, Notification, Spliced
from ramd_client.protocol import MAX_MESSAGE_SIZE, MAX_PENDING, JsonRpcProtocol, Trace

__all__ = ["AsyncClient", "connect"]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)


def wire_params(model: type[m.Args], **values: Any) -> dict[str, Any]:
    """The ``params`` of a request: each value under its field's wire alias.

    A value equal to the model's default (same type and value) is left out, so the daemon's
    default applies; unknown names are a programming error (``KeyError``).
    """
    fields = model.model_fields
    params: dict[str, Any] = {}
    for name, value in values.items():
        info = fields[name]
        default = info.default
        if type(value) is type(default) and value == default:
            continue
        params[info.alias or name] = value
    return params


def _target(file: str | None, fd: str | None) -> dict[str, str]:
    """A ``ram-save`` target or ``ram-load`` source: exactly one of a file name or an fd name."""
    if (file is None) == (fd is None):
        raise ValueError("give exactly one of file and fd")
    return {"file": file} if file is not None else {"fd": fd}  # type: ignore[dict-item]


def parse_result(model: type[R], data: Any) -> R:
    """``data`` (a command's raw result) as ``model``; ProtocolError if it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ProtocolError(f"unexpected result for {model.__name__}: {e}") from None


class AsyncClient(JsonRpcProtocol):
    """A connection to ramd with one typed coroutine per command.

    Get one with :func:`connect`; close it with :meth:`close` or ``async with``. Any number
    of tasks may call its methods concurrently: requests are pipelined on the one connection
    and each answer goes to its caller. ``version`` is the daemon's version, read when
    connecting.
    """

    def __init__(
        self,
        *,
        max_pending: int = MAX_PENDING,
        max_message_size: int = MAX_MESSAGE_SIZE,
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            max_pending=max_pending, max_message_size=max_message_size, timeout=timeout
        )
        self.version: m.VersionResult | None = None
        self._streams: dict[EventStream, None] = {}
        self._subscribe_lock = asyncio.Lock()

    async def close(self) -> None:
        """Close the connection (idempotent). Calls in flight get ConnectionLost; event
        streams end (``StopAsyncIteration``)."""
        await self.disconnect()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- commands --------------------------------------------------------------------------

    async def ram_block_add(
        self,
        id: str,
        size: int,
        max_size: int | None = None,
        prealloc: bool = False,
        merge: bool = False,
        dump: bool = True,
        hugepages: bool = False,
        lock: bool = False,
        align: int | None = None,
        backend: str = "anonymous",
        hugetlb: bool = False,
    ) -> m.RamBlockInfo:
        """``ram-block-add``: create block ``id`` of ``size`` bytes; resizable up to
        ``max_size`` when given; ``backend`` ``"memfd"`` or ``"file"`` makes it shared
        (mappable by other processes, see :mod:`ramd_client.shared`). Returns the new block."""
        params = wire_params(
            m.RamBlockAddArgs,
            id=id,
            size=size,
            max_size=max_size,
            backend=backend,
            hugetlb=hugetlb,
            prealloc=prealloc,
            merge=merge,
            dump=dump,
            hugepages=hugepages,
            lock=lock,
            align=align,
        )
        return parse_result(m.RamBlockInfo, await self.call("ram-block-add", params))

    async def ram_block_add_from_pool(self, id: str, pool: str) -> m.RamBlockInfo:
        """``ram-block-add`` with ``pool``: take a ready block of ``[[pool]]`` ``pool`` as
        block ``id`` at once ("Pool 'NAME' is empty" when none is ready)."""
        params = wire_params(m.RamBlockAddArgs, id=id, pool=pool)
        return parse_result(m.RamBlockInfo, await self.call("ram-block-add", params))

    async def ram_block_seal(self, id: str) -> m.RamBlockInfo:
        """``ram-block-seal``: make ``memfd`` block ``id`` a read-only template (its fds can
        then be mapped privately by clones). Returns the block."""
        params = wire_params(m.BlockIdArgs, id=id)
        return parse_result(m.RamBlockInfo, await self.call("ram-block-seal", params))

    async def query_pools(self) -> list[m.PoolInfo]:
        """``query-pools``: every ``[[pool]]`` with its ``ready`` blocks."""
        return parse_result(m.PoolInfoList, await self.call("query-pools")).root

    async def ram_block_del(self, id: str, mode: m.ReleaseMode = "safe") -> None:
        """``ram-block-del``: remove block ``id`` and unmap its memory (``mode``: what to do
        about mappers that do not acknowledge in time, docs/protocol.md §8)."""
        await self.call("ram-block-del", wire_params(m.RamBlockDelArgs, id=id, mode=mode))

    async def ram_block_resize(
        self, id: str, size: int, mode: m.ReleaseMode = "safe"
    ) -> m.RamBlockInfo:
        """``ram-block-resize``: grow or shrink block ``id`` in place (``mode``: as for
        :meth:`ram_block_del`, for a shrink). Returns the block."""
        params = wire_params(m.RamBlockResizeArgs, id=id, size=size, mode=mode)
        return parse_result(m.RamBlockInfo, await self.call("ram-block-resize", params))

    async def query_ram_blocks(
        self, id: str | None = None, resident: bool = False
    ) -> list[m.RamBlockInfo]:
        """``query-ram-blocks``: every block in creation order, or only block ``id``; with
        ``resident``, each block's resident bytes too (a scan of its pages)."""
        params = wire_params(m.QueryRamBlocksArgs, id=id, resident=resident)
        result = await self.call("query-ram-blocks", params)
        return parse_result(m.RamBlockInfoList, result).root

    async def ram_block_read(self, id: str, offset: int, length: int) -> bytes:
        """``ram-block-read``: ``length`` bytes at ``offset`` (at most the daemon's
        ``io-chunk``; :func:`ramd_client.transfer.read_range` splits larger ranges)."""
        params = wire_params(m.RamBlockReadArgs, id=id, offset=offset, length=length)
        answer = await self.call("ram-block-read", params, binary=True)
        if type(answer) is Binary:  # a large answer, decoded as it was read
            return answer.data
        result = parse_result(m.ReadResult, answer)
        try:
            return pybase64.b64decode(result.data, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("ram-block-read returned data that is not base64") from None

    async def ram_block_write(
        self, id: str, offset: int, data: bytes | bytearray | memoryview
    ) -> int:
        """``ram-block-write``: write ``data`` at ``offset``; returns the bytes written.
        At most ``io-chunk`` bytes per call (see :func:`ramd_client.transfer.write_range`)."""
        encoded = Spliced(pybase64.b64encode(data))  # base64: nothing to escape
        params = wire_params(m.RamBlockWriteArgs, id=id, offset=offset, data=encoded)
        return parse_result(m.WriteResult, await self.call("ram-block-write", params)).written

    async def ram_block_discard(self, id: str, offset: int, length: int) -> None:
        """``ram-block-discard``: drop the pages of a page-aligned range (reads back zeros)."""
        params = wire_params(m.RamBlockDiscardArgs, id=id, offset=offset, length=length)
        await self.call("ram-block-discard", params)

    async def ram_block_attach(
        self,
        id: str,
        qmp: str,
        kind: str,
        device: str | None = None,
        bus: str | None = None,
        requested_size: int | None = None,
    ) -> m.RamBlockInfo:
        """``ram-block-attach``: plug shared block ``id`` into the running VMM whose QMP
        socket is ``qmp``, as ``kind`` (``"pc-dimm"`` or ``"virtio-mem"``, with
        ``requested_size`` the bytes the guest is asked to plug); the result's
        ``attachment`` says where the guest sees it."""
        params = wire_params(
            m.RamBlockAttachArgs,
            id=id,
            qmp=qmp,
            as_=kind,
            device=device,
            bus=bus,
            requested_size=requested_size,
        )
        return parse_result(m.RamBlockInfo, await self.call("ram-block-attach", params))

    async def ram_block_detach(self, id: str, timeout: float | None = None) -> None:
        """``ram-block-detach``: unplug block ``id`` from its VMM, waiting up to ``timeout``
        seconds (default the daemon's ``ack-timeout``) for the guest to let go."""
        params = wire_params(m.RamBlockDetachArgs, id=id, timeout=timeout)
        await self.call("ram-block-detach", params)

    async def ram_save(
        self,
        file: str | None = None,
        *,
        fd: str | None = None,
        blocks: list[str] | None = None,
    ) -> str:
        """``ram-save``: start a job writing an image of ``blocks`` (default all) to ``file``
        in the daemon's ``state-dir``, or to the fd passed earlier with ``getfd`` as ``fd``.
        Returns the job id (follow it with :meth:`query_jobs` or ``JOB_STATUS_CHANGE``)."""
        params = wire_params(m.RamSaveArgs, target=_target(file, fd), blocks=blocks)
        return parse_result(m.JobStarted, await self.call("ram-save", params)).job_id

    async def ram_load(self, file: str | None = None, *, fd: str | None = None) -> str:
        """``ram-load``: start a job loading the image ``file`` (or ``getfd`` fd ``fd``), as
        QEMU's incoming migration. Returns the job id."""
        params = wire_params(m.RamLoadArgs, source=_target(file, fd))
        return parse_result(m.JobStarted, await self.call("ram-load", params)).job_id

    async def query_jobs(self) -> list[m.JobInfo]:
        """``query-jobs``: every job not dismissed, with its progress and error."""
        return parse_result(m.JobInfoList, await self.call("query-jobs")).root

    async def job_cancel(self, id: str) -> None:
        """``job-cancel``: ask job ``id`` to stop."""
        await self.call("job-cancel", wire_params(m.JobIdArgs, id=id))

    async def job_dismiss(self, id: str) -> None:
        """``job-dismiss``: forget the concluded job ``id``."""
        await self.call("job-dismiss", wire_params(m.JobIdArgs, id=id))

    async def query_images(self) -> list[m.ImageEntry]:
        """``query-images``: the image files of the daemon's ``state-dir``, by name."""
        return parse_result(m.ImageEntryList, await self.call("query-images")).root

    async def image_remove(self, file: str) -> None:
        """``image-remove``: remove the image ``file`` from the daemon's ``state-dir``."""
        await self.call("image-remove", wire_params(m.ImageRemoveArgs, file=file))

    async def query_stats(self) -> m.StatsResult:
        """``query-stats``: usage figures of the daemon and its ``limits``."""
        return parse_result(m.StatsResult, await self.call("query-stats"))

    async def query_version(self) -> m.VersionResult:
        """``query-version``: the daemon's version."""
        return parse_result(m.VersionResult, await self.call("query-version"))

    async def query_commands(self) -> list[m.CommandInfo]:
        """``query-commands``: the name of every command."""
        return parse_result(m.CommandInfoList, await self.call("query-commands")).root

    async def query_schema(self) -> dict[str, Any]:
        """``query-schema``: the JSON Schema document of every command and event."""
        result = await self.call("query-schema")
        if not isinstance(result, dict):
            raise ProtocolError("query-schema did not return an object")
        return result

    async def human_monitor_command(self, command_line: str) -> str:
        """``human-monitor-command``: what an HMP command line prints (``info ramblock``,
        ``help``), lines ending with ``\\r\\n`` as in QEMU."""
        params = wire_params(m.HumanMonitorCommandArgs, command_line=command_line)
        result = await self.call("human-monitor-command", params)
        return parse_result(m.HmpOutput, result).root

    async def query_qmp_schema(self) -> list[dict[str, Any]]:
        """``query-qmp-schema``: every command, event and type in QEMU's introspection
        format, as sent (an optional object member is marked by a ``default`` of null)."""
        result = await self.call("query-qmp-schema")
        parse_result(m.SchemaInfoList, result)  # its shape; the raw list keeps every member
        return result  # type: ignore[no-any-return]

    async def quit(self) -> None:
        """``quit``: the daemon answers, then shuts down as on SIGTERM (full access only)."""
        await self.call("quit")

    # -- events ----------------------------------------------------------------------------

    def events(
        self,
        names: Iterable[str] | None = None,
        replay: bool = True,
        *,
        max_queue: int = MAX_QUEUE,
        max_replay: int = MAX_REPLAY,
    ) -> EventStream:
        """A stream of the events named (all when None), for ``async for``.

        It subscribes on ``async with`` or at the first iteration; with ``replay`` it first
        yields one ``RAM_BLOCK_ADDED`` per existing block (if that event is among
        ``names``). At most ``max_queue`` live events wait for the consumer: past that the
        stream raises :class:`~ramd_client.error.EventOverflow`. Several streams may be open
        on one client; each gets the events it names. Not a coroutine: call it without
        ``await``. Raises ValueError for an unknown event name.
        """
        return EventStream(self, check_names(names), replay, max_queue, max_replay)

    async def _open_stream(self, stream: EventStream) -> None:
        """Subscribe for ``stream``. Caller side; one subscription at a time, so a replay
        is never mixed with another's.

        The subscription is the union of the names of all open streams; each stream
        filters its own. The stream turns from replay to live on the reader side, at the
        exact point of the answer (see :meth:`EventStream._activate`).
        """
        async with self._subscribe_lock:
            if not self.connected:
                stream._end(ConnectionLost(self._lost.reason if self._lost else "not connected"))
                raise ConnectionLost(self._lost.reason if self._lost else "not connected")
            self._streams[stream] = None
            stream._pending()
            names = set().union(*(s.names for s in self._streams))
            params = wire_params(
                m.SubscribeArgs,
                events=[n for n in m.EVENT_NAMES if n in names],
                replay=stream.replay,
            )

            def activate(result: Any) -> None:
                stream._activate(parse_result(m.SubscribeResult, result).seq)

            try:
                await self.call("subscribe", params, on_result=activate)
            except BaseException as e:
                self._streams.pop(stream, None)
                stream._end(e if isinstance(e, ConnectionLost) else None)
                raise

    async def _close_stream(self, stream: EventStream) -> None:
        """Forget ``stream``; unsubscribe when it was the last one. Caller side."""
        async with self._subscribe_lock:
            self._streams.pop(stream, None)
            if not self._streams and self.connected:
                try:
                    await self.call("unsubscribe")
                except RamdClientError as e:
                    log.debug("unsubscribe failed: %s", e)

    def _on_notification(self, note: Notification) -> None:
        """Decode an event and offer it to every open stream. Reader side."""
        try:
            event = Event.from_wire(note.method, note.params)
        except ProtocolError as e:
            log.warning("dropped an event: %s", e)
            return
        for stream in list(self._streams):
            stream._offer(event)

    def _on_disconnect(self, lost: ConnectionLost | None) -> None:
        """End every stream: with ``lost``, or cleanly when the client closed. Reader side."""
        for stream in list(self._streams):
            stream._end(lost)
        self._streams.clear()


async def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    max_pending: int = MAX_PENDING,
    max_message_size: int = MAX_MESSAGE_SIZE,
    timeout: float | None = None,
    trace: Trace | None = None,
) -> AsyncClient:
    """Connect to the daemon's JSON-RPC socket and return an :class:`AsyncClient`.

    ``path`` defaults to the protocol's rule (:func:`ramd.process.paths.default_socket`:
    ``$RAMD_SOCKET``, else ``$XDG_RUNTIME_DIR/ramd/ramd.sock``, else
    ``/run/ramd/ramd.sock``). The daemon's version is read at once (``client.version``), so
    a socket that is not ramd's JSON-RPC one, or a daemon that refuses the connection, fails
    here. With ``timeout`` (seconds), connecting and then each call give up after that long
    (:class:`~ramd_client.error.CallTimeout` for a call). ``trace`` is installed before the
    first request (see :data:`ramd_client.protocol.Trace`).

    Raises :class:`~ramd_client.error.ConnectError` naming the path, or
    :class:`~ramd_client.error.RamdError` when the daemon answers by refusing the connection.
    """
    where = os.fspath(path) if path is not None else default_socket()
    client = AsyncClient(
        max_pending=max_pending, max_message_size=max_message_size, timeout=timeout
    )
    client.trace = trace
    raw = await client.open(where)
    try:
        client.version = parse_result(m.VersionResult, raw)
    except ProtocolError as e:
        await client.close()
        raise ConnectError(where, str(e)) from None
    return client
