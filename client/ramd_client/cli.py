"""``ramctl``: drive a ramd daemon from the shell.

::

    ramctl [--socket PATH] [--json] COMMAND ...

Sizes and offsets take QEMU suffixes (``64M``, ``1.5G``: powers of 1024) through
:func:`ramd.sizes.parse_size`, the parser the daemon's config uses. Output is human (sizes
by :func:`ramd.sizes.format_size`, tables) or, with ``--json``, JSON documents (``watch``:
one compact JSON object per line).

Exit status: 0 success; 1 the daemon refused (its error class and message on stderr) or a
local file could not be read or written; 2 usage error; 3 the daemon could not be reached
(the message names the socket path tried and how to choose another), or the connection was
lost. ``watch`` runs until interrupted and exits 0 on SIGINT.

``read`` and ``write`` move any length in chunks under the daemon's ``io-chunk`` and
``max-message-size`` limits (asked with ``query-stats``), a few chunks in flight at once,
with a progress bar on stderr when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import IO, Any

from tqdm import tqdm  # type: ignore[import-untyped]

import ramd
from ramd.api import models as m
from ramd.config import default_socket_path
from ramd.sizes import format_size, parse_size
from ramd_client.client import AsyncClient, connect
from ramd_client.error import ConnectError, ConnectionLost, RamdClientError, RamdError
from ramd_client.events import EVENT_NAMES, Event
from ramd_client.transfer import read_range, transfer_chunk, write_range

__all__ = ["EXIT_CONNECT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3

PROG = "ramctl"

Handler = Callable[[AsyncClient, argparse.Namespace], Coroutine[Any, Any, int]]


class Failure(Exception):
    """A local failure with its exit status and message (reported by :func:`main`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- argument parsing -----------------------------------------------------------------------


def size_arg(text: str) -> int:
    """argparse ``type=`` for sizes and offsets: ``parse_size``, errors as usage errors."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def event_arg(text: str) -> str:
    """argparse ``type=`` for event names."""
    if text not in EVENT_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown event {text!r} (choose from {', '.join(EVENT_NAMES)})"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``ramctl`` argument parser (global options come before the command)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Drive the ramd daemon: create, resize, read and watch RAM blocks.",
        epilog=(
            "Sizes take K, M, G, T suffixes (powers of 1024; 1.5G is fine). Exit status: "
            "0 ok, 1 refused by the daemon, 2 usage error, 3 cannot reach the daemon."
        ),
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's JSON-RPC socket (default: $RAMD_SOCKET, else "
        "$XDG_RUNTIME_DIR/ramd/ramd.sock, else /run/ramd/ramd.sock)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--version", action="version", version=f"{PROG} {ramd.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("add", help="create a RAM block")
    p.add_argument("id", metavar="ID")
    p.add_argument("size", metavar="SIZE", type=size_arg)
    p.add_argument("--max-size", metavar="S", type=size_arg, help="make it resizable up to S")
    p.add_argument("--prealloc", action="store_true", help="fault every page in now")
    p.add_argument("--merge", action="store_true", help="allow KSM merging")
    p.add_argument("--no-dump", action="store_true", help="exclude from core dumps")
    p.add_argument("--hugepages", action="store_true", help="use transparent huge pages")
    p.add_argument("--lock", action="store_true", help="lock in RAM (mlock)")
    p.add_argument("--align", metavar="A", type=size_arg, help="alignment (power of two)")

    p = sub.add_parser("del", help="remove a RAM block")
    p.add_argument("id", metavar="ID")

    p = sub.add_parser("resize", help="grow or shrink a resizable RAM block")
    p.add_argument("id", metavar="ID")
    p.add_argument("size", metavar="SIZE", type=size_arg)

    sub.add_parser("list", help="list the RAM blocks")

    p = sub.add_parser("info", help="show one RAM block")
    p.add_argument("id", metavar="ID")

    p = sub.add_parser("read", help="copy a range of a block to stdout or a file")
    p.add_argument("id", metavar="ID")
    p.add_argument("offset", metavar="OFFSET", type=size_arg)
    p.add_argument("length", metavar="LENGTH", type=size_arg)
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")

    p = sub.add_parser("write", help="copy stdin or a file into a block at OFFSET")
    p.add_argument("id", metavar="ID")
    p.add_argument("offset", metavar="OFFSET", type=size_arg)
    p.add_argument("-i", "--input", metavar="FILE", help="read FILE, not stdin")

    p = sub.add_parser("discard", help="drop the pages of a page-aligned range")
    p.add_argument("id", metavar="ID")
    p.add_argument("offset", metavar="OFFSET", type=size_arg)
    p.add_argument("length", metavar="LENGTH", type=size_arg)

    p = sub.add_parser("watch", help="print events as they happen, until interrupted")
    p.add_argument("--replay", action="store_true", help="first, one RAM_BLOCK_ADDED per block")
    p.add_argument(
        "events",
        metavar="EVENT",
        nargs="*",
        type=event_arg,
        help=f"events to show (default all): {', '.join(EVENT_NAMES)}",
    )

    sub.add_parser("stats", help="show the daemon's usage figures and limits")
    sub.add_parser("version", help="show the daemon's version")
    return parser


# -- output ---------------------------------------------------------------------------------


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def emit_json(data: Any) -> None:
    emit(json.dumps(data, indent=2))


def human(n: int) -> str:
    return format_size(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, headers first."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def pairs(items: Sequence[tuple[str, str]]) -> str:
    """``key: value`` lines, values aligned."""
    width = max(len(k) for k, _ in items) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in items)


def flags(block: m.RamBlockInfo) -> str:
    names = [
        name
        for name, on in (
            ("resizable", block.resizable),
            ("prealloc", block.prealloc),
            ("merge", block.merge),
            ("nodump", not block.dump),
            ("hugepages", block.hugepages),
            ("lock", block.lock),
        )
        if on
    ]
    return ",".join(names) or "-"


def block_table(blocks: Sequence[m.RamBlockInfo]) -> str:
    headers = ("ID", "SIZE", "MAX-SIZE", "RESIDENT", "PAGE", "OFFSET", "FLAGS")
    rows = [
        (
            b.id,
            human(b.size),
            human(b.max_size),
            "-" if b.resident is None else human(b.resident),
            human(b.page_size),
            hex(b.offset),
            flags(b),
        )
        for b in blocks
    ]
    return table(headers, rows)


def block_details(b: m.RamBlockInfo) -> str:
    def yes(v: bool) -> str:
        return "yes" if v else "no"

    return pairs(
        [
            ("id", b.id),
            ("size", f"{human(b.size)} ({b.size})"),
            ("max-size", f"{human(b.max_size)} ({b.max_size})"),
            ("resizable", yes(b.resizable)),
            ("page-size", human(b.page_size)),
            ("resident", "-" if b.resident is None else f"{human(b.resident)} ({b.resident})"),
            ("host", "-" if b.host is None else hex(b.host)),
            ("offset", hex(b.offset)),
            ("backend", b.backend),
            ("prealloc", yes(b.prealloc)),
            ("merge", yes(b.merge)),
            ("dump", yes(b.dump)),
            ("hugepages", yes(b.hugepages)),
            ("lock", yes(b.lock)),
        ]
    )


def show_block(args: argparse.Namespace, block: m.RamBlockInfo) -> None:
    if args.json:
        emit_json(block.model_dump(mode="json", by_alias=True))
    else:
        emit(block_details(block))


_SIZE_FIELDS = frozenset({"size", "max-size", "old-size", "new-size", "page-size"})
_SIZE_LIMITS = frozenset({"max-message-size", "max-reserved", "max-used", "io-chunk"})


def event_line(event: Event) -> str:
    """One human line per event: time, name, seq, id, then its other fields."""
    stamp = event.timestamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    data = event.data.model_dump(by_alias=True)
    parts = [stamp, event.name, f"seq={data.pop('seq')}", f"id={data.pop('id')}"]
    replay = data.pop("replay", False)
    for key, value in data.items():
        if key in _SIZE_FIELDS:
            parts.append(f"{key}={human(value)}")
        elif key == "host":
            parts.append(f"host={value:#x}")
        elif isinstance(value, bool):
            parts.append(f"{key}={'yes' if value else 'no'}")
        else:
            parts.append(f"{key}={value}")
    if replay:
        parts.append("(replay)")
    return " ".join(parts)


def progress_bar(total: int | None, desc: str) -> Any:
    """A tqdm byte counter on stderr, disabled unless stderr is a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


# -- commands -------------------------------------------------------------------------------


async def cmd_add(client: AsyncClient, args: argparse.Namespace) -> int:
    block = await client.ram_block_add(
        args.id,
        args.size,
        max_size=args.max_size,
        prealloc=args.prealloc,
        merge=args.merge,
        dump=not args.no_dump,
        hugepages=args.hugepages,
        lock=args.lock,
        align=args.align,
    )
    show_block(args, block)
    return EXIT_OK


async def cmd_del(client: AsyncClient, args: argparse.Namespace) -> int:
    await client.ram_block_del(args.id)
    if args.json:
        emit_json({})
    return EXIT_OK


async def cmd_resize(client: AsyncClient, args: argparse.Namespace) -> int:
    show_block(args, await client.ram_block_resize(args.id, args.size))
    return EXIT_OK


async def cmd_list(client: AsyncClient, args: argparse.Namespace) -> int:
    blocks = await client.query_ram_blocks(resident=True)
    if args.json:
        emit_json([b.model_dump(mode="json", by_alias=True) for b in blocks])
    else:
        emit(block_table(blocks))
    return EXIT_OK


async def cmd_info(client: AsyncClient, args: argparse.Namespace) -> int:
    (block,) = await client.query_ram_blocks(args.id, resident=True)
    show_block(args, block)
    return EXIT_OK


def open_file(path: str, mode: str) -> IO[bytes]:
    try:
        f: IO[bytes] = open(path, mode)  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise Failure(EXIT_FAILED, f"{path}: {e.strerror}") from None
    return f


async def cmd_read(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.output is None and sys.stdout.isatty():
        raise Failure(EXIT_USAGE, "refusing to write binary data to a terminal: use -o FILE")
    chunk = await transfer_chunk(client)
    out = open_file(args.output, "wb") if args.output is not None else sys.stdout.buffer
    try:
        with progress_bar(args.length, f"read {args.id}") as bar:
            async for data in read_range(client, args.id, args.offset, args.length, chunk=chunk):
                out.write(data)
                bar.update(len(data))
        out.flush()
    finally:
        if out is not sys.stdout.buffer:
            out.close()
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
    chunk = await transfer_chunk(client)
    src = open_file(args.input, "rb") if args.input is not None else sys.stdin.buffer
    try:
        with progress_bar(_remaining(src), f"write {args.id}") as bar:
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
        emit(f"wrote {human(written)} ({written} bytes) to {args.id} at offset {args.offset}")
    return EXIT_OK


async def cmd_discard(client: AsyncClient, args: argparse.Namespace) -> int:
    await client.ram_block_discard(args.id, args.offset, args.length)
    if args.json:
        emit_json({})
    return EXIT_OK


async def cmd_watch(client: AsyncClient, args: argparse.Namespace) -> int:
    names = args.events or None
    async with client.events(names, replay=args.replay) as events:
        async for event in events:
            if args.json:
                emit(json.dumps(event.to_dict(), separators=(",", ":")))
            else:
                emit(event_line(event))
    return EXIT_OK


async def cmd_stats(client: AsyncClient, args: argparse.Namespace) -> int:
    stats = await client.query_stats()
    if args.json:
        emit_json(stats.model_dump(mode="json", by_alias=True))
        return EXIT_OK
    items = [
        ("blocks", str(stats.blocks)),
        ("reserved", f"{human(stats.reserved)} ({stats.reserved})"),
        ("used", f"{human(stats.used)} ({stats.used})"),
        ("resident", f"{human(stats.resident)} ({stats.resident})"),
        ("clients", str(stats.clients)),
        ("subscribers", str(stats.subscribers)),
        ("events-emitted", str(stats.events_emitted)),
        ("uptime", f"{stats.uptime:.3f} s"),
    ]
    for name, value in stats.limits.items():
        shown = str(value)
        if name in _SIZE_LIMITS:
            shown = "unlimited" if value == 0 else human(value)
        items.append((f"limits.{name}", shown))
    emit(pairs(items))
    return EXIT_OK


async def cmd_version(client: AsyncClient, args: argparse.Namespace) -> int:
    version = await client.query_version()
    if args.json:
        emit_json(version.model_dump(mode="json", by_alias=True))
    else:
        emit(version.package)
    return EXIT_OK


COMMANDS: dict[str, Handler] = {
    "add": cmd_add,
    "del": cmd_del,
    "resize": cmd_resize,
    "list": cmd_list,
    "info": cmd_info,
    "read": cmd_read,
    "write": cmd_write,
    "discard": cmd_discard,
    "watch": cmd_watch,
    "stats": cmd_stats,
    "version": cmd_version,
}


# -- main -----------------------------------------------------------------------------------


def error(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


async def run(args: argparse.Namespace) -> int:
    """Connect, run the command, close; every failure becomes an exit status."""
    path = args.socket if args.socket is not None else str(default_socket_path())
    try:
        client = await connect(path)
    except ConnectError as e:
        error(str(e))
        error(
            "is ramd running? choose its socket with --socket PATH or the RAMD_SOCKET "
            "environment variable"
        )
        return EXIT_CONNECT
    try:
        return await COMMANDS[args.command](client, args)
    except RamdError as e:
        error(f"{e.error_class}: {e.desc}")
        return EXIT_FAILED
    except ConnectionLost as e:
        error(f"lost the connection to ramd at {path}: {e}")
        return EXIT_CONNECT
    except RamdClientError as e:
        error(str(e))
        return EXIT_FAILED
    except Failure as e:
        error(e.message)
        return e.status
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ramctl`` entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "watch" else 130
    except BrokenPipeError:
        # The reader of stdout went away (``ramctl watch | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK if args.command == "watch" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
