"""``ramctl``'s work on shared blocks (docs/protocol.md §8): ``map``, and ``read``/``write``
through a mapping of the block instead of base64 over JSON.

Each opens an :class:`~ramd_client.shared.AsyncSharedBlock` (its own connection, fd and
mapping), so the block's events are handled on the event loop between two chunks: a copy
touches the mapping only between two awaits, so a shrink can never drop memory under it, and
a range the block no longer covers fails with the daemon's "Range out of bounds" message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

from ramd.sizes import format_size
from ramd_client.cli_output import EXIT_CONNECT, EXIT_FAILED, EXIT_OK, Failure, emit, event_line
from ramd_client.client import AsyncClient
from ramd_client.events import Event
from ramd_client.message import Notification
from ramd_client.shared import AsyncSharedBlock

__all__ = ["CHUNK", "cmd_map", "read_mapped", "write_mapped"]

#: Bytes copied between two turns of the event loop.
CHUNK = 8 << 20


def _notice(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    line = json.dumps(data, separators=(",", ":")) if args.json else f"ramctl: {text}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def cmd_map(client: AsyncClient, args: argparse.Namespace) -> int:
    """Map block ``args.id``, print each of its events (after handling and, when asked,
    acknowledging it) until SIGINT (exit 0), the block's removal (exit 0) or the loss of the
    connection (exit 3). A line on stderr says when the block is mapped."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    path = client.path

    def on_event(note: Notification) -> None:
        event = Event.from_wire(note.method, note.params)
        if args.json:
            emit(json.dumps(event.to_dict(), separators=(",", ":")))
        else:
            emit(event_line(event))
        if block.block.removed:
            stop.set()

    block = await AsyncSharedBlock.open(path, args.id, args.readonly, timeout=args.timeout)
    block.on_event = on_event
    mode = "read-only" if block.block.readonly else "read-write"
    _notice(
        args,
        f"mapped {args.id}: {format_size(block.size)} of {format_size(block.block.max_size)} "
        f"at {block.block.address:#x}, {mode}; following its events until interrupted",
        {"mapped": args.id, "size": block.size, "address": block.block.address, "mode": mode},
    )
    loop.add_signal_handler(signal.SIGINT, stop.set)
    failed = loop.create_task(block.failed.wait())
    stopped = loop.create_task(stop.wait())
    try:
        await asyncio.wait([failed, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        failed.cancel()
        stopped.cancel()
        await block.close()
    if block.error is not None:
        raise Failure(EXIT_CONNECT, f"stopped following {args.id}: {block.error}", "LocalError")
    if block.block.removed:
        _notice(args, f"{args.id} was removed", {"removed": args.id})
    return EXIT_OK


def _check_range(block: AsyncSharedBlock, id: str, offset: int, length: int) -> None:
    """The daemon's refusal when ``[offset, offset+length)`` is not inside the block now."""
    if block.block.removed:
        raise Failure(EXIT_FAILED, f"RAM block '{id}' was removed meanwhile", "DeviceNotFound")
    if offset + length > block.size:
        raise Failure(
            EXIT_FAILED,
            f"Range out of bounds: {id}: offset {offset:#x} length {length:#x} exceeds "
            f"size {block.size:#x}",
            "GenericError",
        )


async def read_mapped(
    path: str,
    args: argparse.Namespace,
    out: IO[bytes],
    progress: Callable[[int], object],
) -> None:
    """Copy ``[args.offset, +args.length)`` of the mapped block to ``out``."""
    async with await AsyncSharedBlock.open(path, args.id, True, timeout=args.timeout) as block:
        done = 0
        while done < args.length:
            n = min(CHUNK, args.length - done)
            _check_range(block, args.id, args.offset + done, n)
            start = args.offset + done
            out.write(block.view[start : start + n])
            done += n
            progress(n)
            await asyncio.sleep(0)  # let the loop handle the block's events


async def write_mapped(
    path: str,
    args: argparse.Namespace,
    chunks: AsyncIterator[bytes],
    progress: Callable[[int], object],
) -> int:
    """Copy ``chunks`` into the mapped block at ``args.offset``; the bytes written."""
    async with await AsyncSharedBlock.open(path, args.id, timeout=args.timeout) as block:
        if block.block.readonly:
            raise Failure(EXIT_FAILED, f"{args.id}: this peer may only read the block")
        done = 0
        async for data in chunks:
            start = args.offset + done
            _check_range(block, args.id, start, len(data))
            block.view[start : start + len(data)] = data
            done += len(data)
            progress(len(data))
        return done
