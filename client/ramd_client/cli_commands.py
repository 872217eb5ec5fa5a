"""``ramctl``'s commands that use the typed client (everything but ``version`` and ``call``).

Imported by :mod:`ramd_client.cli` only when such a command runs: this is where pydantic and
the models come in. Each handler runs one command on a connected
:class:`~ramd_client.client.AsyncClient` and returns the exit status; refusals propagate as
:class:`~ramd_client.error.RamdError` (a hint for the user attached with ``add_note``), local
failures as :class:`~ramd_client.cli_output.Failure`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import stat
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import IO, Any

from ramd.api import models as m
from ramd.api.eventnames import EVENT_NAMES
from ramd.sizes import format_size
from ramd_client import cli_vmm
from ramd_client.cli_holders import holders_text
from ramd_client.cli_jobs import cmd_images, cmd_jobs, cmd_load, cmd_rm_image, cmd_save
from ramd_client.cli_output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Failure,
    block_details,
    block_table,
    emit,
    emit_json,
    event_line,
    pairs,
)
from ramd_client.cli_progress import progress_bar, waiting
from ramd_client.cli_shared import CHUNK, cmd_map, read_mapped, write_mapped
from ramd_client.cli_sigint import until_sigint
from ramd_client.cli_top import cmd_top
from ramd_client.client import AsyncClient
from ramd_client.error import ConnectionLost, EventOverflow, RamdError
from ramd_client.events import Event, EventStream
from ramd_client.state import BlockTable, StateDiff, resync
from ramd_client.transfer import read_range, transfer_chunk, write_range

__all__ = ["COMMANDS"]

Handler = Callable[[AsyncClient, argparse.Namespace], Coroutine[Any, Any, int]]

_SIZE_LIMITS = frozenset({"max-message-size", "max-reserved", "max-used", "io-chunk"})


def _show_block(args: argparse.Namespace, block: Any) -> None:
    if args.json:
        emit_json(block.model_dump(mode="json", by_alias=True))
    else:
        emit(block_details(block))


def _same_settings(block: m.RamBlockInfo, args: argparse.Namespace) -> bool:
    """Whether ``block`` is what ``ramctl add`` with ``args`` would have created (sizes as the
    daemon rounds them up to the block's page size)."""
    page = block.page_size

    def up(n: int) -> int:
        return -(-n // page) * page

    return (
        block.size == up(args.size)
        and (args.max_size is None or block.max_size == up(args.max_size))
        and block.resizable == (args.max_size is not None)
        and (block.backend, block.hugetlb, block.prealloc, block.merge, block.dump)
        == (args.backend, args.hugetlb, args.prealloc, args.merge, not args.no_dump)
        and (block.hugepages, block.lock) == (args.hugepages, args.lock)
    )


async def _explain_existing(client: AsyncClient, args: argparse.Namespace, e: RamdError) -> None:
    """Add a note to ``add``'s "already exists" refusal: whether the block there is the one
    asked for (an earlier ``add`` that timed out completed it) or another one."""
    try:
        (block,) = await client.query_ram_blocks(args.id)
    except RamdError:
        return  # removed meanwhile: the refusal says enough
    if _same_settings(block, args):
        e.add_note(
            f"{args.id} exists with the size and settings asked ({format_size(block.size)}, "
            f"{block.backend}): an earlier add, one that timed out perhaps, created it; "
            f"`ramctl info {args.id}` shows it"
        )
    else:
        e.add_note(
            f"{args.id} exists with other settings ({format_size(block.size)} of "
            f"{format_size(block.max_size)}, {block.backend}): `ramctl info {args.id}` shows it"
        )


async def cmd_add(client: AsyncClient, args: argparse.Namespace) -> int:
    call = client.ram_block_add(
        args.id,
        args.size,
        max_size=args.max_size,
        backend=args.backend,
        hugetlb=args.hugetlb,
        prealloc=args.prealloc,
        merge=args.merge,
        dump=not args.no_dump,
        hugepages=args.hugepages,
        lock=args.lock,
        align=args.align,
    )
    faulting = [w for w, on in (("preallocating", args.prealloc), ("locking", args.lock)) if on]
    try:
        if faulting:
            what = f"add {args.id}: {' and '.join(faulting)} {format_size(args.size)}"
            block = await waiting(call, what)
        else:
            block = await call
    except RamdError as e:
        if e.desc == f"RAM block '{args.id}' already exists":
            await _explain_existing(client, args, e)
        raise
    _show_block(args, block)
    return EXIT_OK


async def cmd_del(client: AsyncClient, args: argparse.Namespace) -> int:
    try:
        await client.ram_block_del(args.id, args.mode)
    except RamdError as e:
        if not (args.if_exists and e.error_class == "DeviceNotFound"):
            raise
        removed = False
    else:
        removed = True
    if args.json:
        emit_json({"id": args.id, "removed": removed})
    elif removed:
        emit(f"removed {args.id}")
    else:
        emit(f"no block {args.id}: nothing removed")
    return EXIT_OK


async def cmd_resize(client: AsyncClient, args: argparse.Namespace) -> int:
    try:
        block = await client.ram_block_resize(args.id, args.size, args.mode)
    except RamdError as e:
        if e.desc.startswith("Size mismatch"):
            e.add_note(
                f"{args.id} is not resizable: only a block created with --max-size can change size"
            )
        raise
    _show_block(args, block)
    return EXIT_OK


async def cmd_list(client: AsyncClient, args: argparse.Namespace) -> int:
    blocks = await client.query_ram_blocks(resident=not args.name)
    if args.json:
        emit_json([b.model_dump(mode="json", by_alias=True) for b in blocks])
    elif args.name:
        if blocks:
            emit("\n".join(b.id for b in blocks))
    else:
        emit(block_table(blocks))
    return EXIT_OK


async def cmd_info(client: AsyncClient, args: argparse.Namespace) -> int:
    (block,) = await client.query_ram_blocks(args.id, resident=True)
    _show_block(args, block)
    if not args.json:
        emit(holders_text(block))
    return EXIT_OK


def _open(path: str, mode: str) -> IO[bytes]:
    try:
        f: IO[bytes] = open(path, mode)  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise Failure(EXIT_FAILED, f"{path}: {e.strerror}") from None
    return f


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[IO[bytes]]:
    """A file to write ``path``'s new contents to, in place only once the block ends
    without an exception: a regular file (or a new one) is written as a temporary file
    beside it and renamed over it (keeping an existing file's mode), so a failure leaves
    ``path`` as it was; anything else (a FIFO, a device) is written directly."""
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise Failure(EXIT_FAILED, f"{path}: {e.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        with _open(path, "wb") as f:
            yield f
        return
    directory, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.part")
    try:  # mode 0666 less the umask, as for any new file
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise Failure(EXIT_FAILED, f"{path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if mode is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(mode))
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


async def cmd_read(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.output is None and sys.stdout.isatty():
        raise Failure(EXIT_USAGE, "refusing to write binary data to a terminal: use -o FILE")
    (block,) = await client.query_ram_blocks(args.id)
    asked = f"offset {args.offset:#x} length {args.length:#x}"
    if args.offset + args.length > block.size:
        raise Failure(
            EXIT_FAILED,
            f"Range out of bounds: {args.id}: {asked} exceeds size {block.size:#x}",
            "GenericError",
        )
    chunk = CHUNK if block.shared else await transfer_chunk(client)
    with contextlib.ExitStack() as stack:
        out = (
            stack.enter_context(_replacing(args.output))
            if args.output is not None
            else sys.stdout.buffer
        )
        bar = stack.enter_context(progress_bar(args.length, f"read {args.id}"))
        try:
            if block.shared:
                await read_mapped(client.path, args, out, bar.update)
            else:
                async for data in read_range(
                    client, args.id, args.offset, args.length, chunk=chunk
                ):
                    out.write(data)
                    bar.update(len(data))
        except RamdError as e:  # the block changed meanwhile: name the range asked for
            e.add_note(f"while reading {asked} of {args.id}")
            raise
        out.flush()
    if args.json and args.output is not None:
        emit_json({"read": args.length})
    return EXIT_OK


async def _file_chunks(f: IO[bytes], size: int) -> AsyncIterator[bytes]:
    """``f``'s bytes in pieces of ``size``, read on a worker thread (stdin may block)."""
    while True:
        data = await asyncio.to_thread(f.read, size)
        if not data:
            return
        yield data


def _remaining(f: IO[bytes]) -> int | None:
    """Bytes left in ``f`` when it is a regular file, else None (a pipe)."""
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(st.st_size - f.tell(), 0)
    except (OSError, ValueError):
        return None


async def cmd_write(client: AsyncClient, args: argparse.Namespace) -> int:
    (block,) = await client.query_ram_blocks(args.id)
    chunk = CHUNK if block.shared else await transfer_chunk(client)
    src = _open(args.input, "rb") if args.input is not None else sys.stdin.buffer
    try:
        with progress_bar(_remaining(src), f"write {args.id}") as bar:
            if block.shared:
                written = await write_mapped(
                    client.path, args, _file_chunks(src, chunk), bar.update
                )
            else:
                written = await write_range(
                    client,
                    args.id,
                    args.offset,
                    _file_chunks(src, chunk),
                    chunk=chunk,
                    progress=bar.update,
                )
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    if args.json:
        emit_json({"written": written})
    else:
        emit(
            f"wrote {format_size(written)} ({written} bytes) to {args.id} "
            f"at offset {args.offset:#x}"
        )
    return EXIT_OK


async def cmd_discard(client: AsyncClient, args: argparse.Namespace) -> int:
    await client.ram_block_discard(args.id, args.offset, args.length)
    if args.json:
        emit_json({})
    return EXIT_OK


def _print_event(args: argparse.Namespace, event: Event) -> None:
    if args.json:
        emit(json.dumps(event.to_dict(), separators=(",", ":")))
    else:
        emit(event_line(event))


def _notice(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    """A line about the watch itself (not an event), on stderr: JSON under ``--json``."""
    line = json.dumps(data, separators=(",", ":")) if args.json else f"ramctl: {text}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _diff_text(diff: StateDiff) -> str:
    parts = [
        f"{what} {', '.join(ids)}"
        for what, ids in (
            ("added", diff.added),
            ("removed", diff.removed),
            ("resized", diff.resized),
            ("replaced", diff.replaced),
        )
        if ids
    ]
    return "; ".join(parts) or "no change"


async def _watch_once(stream: EventStream, args: argparse.Namespace, table: BlockTable) -> None:
    """Print ``stream``'s events that ``args.events`` names, applying all to ``table``."""
    shown = set(args.events or EVENT_NAMES)
    async for event in stream:
        table.apply(event)
        if event.name in shown:
            _print_event(args, event)


async def _watch_reconnecting(client: AsyncClient, args: argparse.Namespace) -> None:
    """Watch until interrupted; after each loss, :func:`ramd_client.resync` (waiting for
    the daemon as long as it takes) and report what changed on stderr. ``client`` is the
    first connection (closed by the caller); the later ones are closed here."""
    path = client.path
    stream = client.events(EVENT_NAMES, replay=True)
    seq = await stream.subscribe()
    table = BlockTable(seq=seq)
    for _ in range(stream.replayed):
        event = await anext(stream)
        table.apply(event)
        if args.replay and event.name in (args.events or EVENT_NAMES):
            _print_event(args, event)
    current = client
    try:
        while True:
            try:
                await _watch_once(stream, args, table)
                return  # the stream ended because the client was closed
            except (ConnectionLost, EventOverflow) as e:
                _notice(args, f"{e}; reconnecting to {path}", {"lost": str(e), "socket": path})
            await current.close()
            r = await resync(table, path, timeout=float("inf"), call_timeout=client.timeout)
            current, stream, table = r.client, r.events, r.table
            diff = r.diff
            _notice(
                args,
                f"reconnected to {path} at seq {r.seq}: {_diff_text(diff)}",
                {
                    "reconnected": path,
                    "seq": r.seq,
                    "added": list(diff.added),
                    "removed": list(diff.removed),
                    "resized": list(diff.resized),
                    "replaced": list(diff.replaced),
                },
            )
    finally:
        if current is not client:
            await current.close()


async def _print_events(client: AsyncClient, args: argparse.Namespace) -> None:
    async with client.events(args.events or None, replay=args.replay) as events:
        async for event in events:
            _print_event(args, event)


async def cmd_watch(client: AsyncClient, args: argparse.Namespace) -> int:
    """Print events until SIGINT (exit 0, :func:`until_sigint`) or, without ``--reconnect``,
    the connection ends."""
    if args.reconnect:
        await until_sigint(_watch_reconnecting(client, args))
    else:
        await until_sigint(_print_events(client, args))
    return EXIT_OK


async def cmd_stats(client: AsyncClient, args: argparse.Namespace) -> int:
    stats = await client.query_stats()
    if args.json:
        emit_json(stats.model_dump(mode="json", by_alias=True))
        return EXIT_OK

    def size(n: int) -> str:
        return f"{format_size(n)} ({n})"

    items = [
        ("blocks", str(stats.blocks)),
        ("reserved", size(stats.reserved)),
        ("used", size(stats.used)),
        ("resident", size(stats.resident)),
        ("clients", str(stats.clients)),
        ("subscribers", str(stats.subscribers)),
        ("dropped-subscribers", str(stats.dropped_subscribers)),
        ("events-emitted", str(stats.events_emitted)),
        ("uptime", f"{stats.uptime:.3f} s"),
    ]
    for name, value in stats.limits.items():
        shown = str(value)
        if name in _SIZE_LIMITS:
            shown = "unlimited" if value == 0 else format_size(value)
        items.append((f"limits.{name}", shown))
    emit(pairs(items))
    return EXIT_OK


COMMANDS: dict[str, Handler] = {
    "save": cmd_save,
    "load": cmd_load,
    "images": cmd_images,
    "rm-image": cmd_rm_image,
    "jobs": cmd_jobs,
    "add": cmd_add,
    "del": cmd_del,
    "resize": cmd_resize,
    "list": cmd_list,
    "info": cmd_info,
    "read": cmd_read,
    "map": cmd_map,
    "write": cmd_write,
    "discard": cmd_discard,
    "watch": cmd_watch,
    "stats": cmd_stats,
    "top": cmd_top,
    **cli_vmm.COMMANDS,
}
