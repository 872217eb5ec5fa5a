"""``ramctl``'s command line: the argparse parser and its argument types.

Light by design: it imports neither pydantic nor the client, so building the parser (for
every command, for the man page and the shell completions) costs a few milliseconds.

Global options (``--socket``, ``--json``, ``--timeout``) are accepted before the command
and after it (``ramctl list --json``): each command's parser repeats them with
``argparse.SUPPRESS`` defaults, so a value given after the command overrides the one before
and an absent one leaves it alone.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, NoReturn

import ramd
from ramd.api.eventnames import EVENT_NAMES
from ramd.sizes import SIZE_MAX, parse_size
from ramd_client import cli_vmm
from ramd_client.cli_top import add_parser as add_top_parser

__all__ = [
    "COMPLETIONS",
    "GLOBAL_OPTIONS",
    "IMAGE_NAME_PATTERN",
    "LIVE_COMPLETIONS",
    "PROG",
    "RAW_COMMANDS",
    "UsageError",
    "build_parser",
    "size_arg",
]

PROG = "ramctl"

#: Commands that talk raw JSON-RPC (no pydantic models: the fast path).
RAW_COMMANDS = frozenset({"version", "call", "commands"})

#: The option strings of the global options (documented once, not per command).
GLOBAL_OPTIONS = frozenset({"--socket", "--json", "--timeout"})

#: Words the shell completions offer for an argument, by metavar, where argparse has no
#: ``choices`` (``watch``'s EVENT: ``nargs="*"`` with ``choices`` refuses an empty list in
#: Python 3.11, so the names are checked by :func:`event_arg`).
COMPLETIONS: dict[str, tuple[str, ...]] = {"EVENT": EVENT_NAMES}

#: Arguments the shell completions complete by asking the daemon (quietly, with a short
#: timeout), by metavar: the ``ramctl`` words whose output is one word per line.
LIVE_COMPLETIONS: dict[str, tuple[str, ...]] = {
    "ID": ("list", "--name"),
    "NAME": ("images", "--name"),
    "METHOD": ("commands",),
    "JOB": ("jobs", "--name"),
}

#: An image name (``ram-save``'s ``{"file": NAME}``, ramd.snapshot.files.NAME_PATTERN).
IMAGE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
IMAGE_NAME_RULE = "a letter or digit, then up to 63 of A-Z a-z 0-9 . _ - (no paths)"

#: Default seconds for connecting and for each call.
DEFAULT_TIMEOUT = 10.0

_HEX_RE = re.compile(r"\s*0[xX]([0-9a-fA-F]+)\s*", re.ASCII)


class UsageError(Exception):
    """A command line argparse refused: ``usage`` (the parser's usage line) and ``message``.

    Raised instead of argparse's exit so that ``ramctl --json`` can report it as JSON.
    """

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it ($COLUMNS, else the
    terminal on standard output, else 80), without importing shutil (and the compression
    modules it imports): argparse would import it for every parser it builds."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, told the width (:func:`_columns`, less 2 as argparse does)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` (help and --version still
    print and exit), with :class:`_Formatter` unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.format_usage(), f"{self.prog}: error: {message}")


def size_arg(text: str) -> int:
    """argparse ``type=`` for sizes and offsets: hex (``0x10``, as ramctl prints offsets)
    or :func:`ramd.sizes.parse_size` (``4096``, ``64K``, ``1.5G``)."""
    match = _HEX_RE.fullmatch(text)
    if match is not None:
        value = int(match.group(1), 16)
        if value > SIZE_MAX:
            raise argparse.ArgumentTypeError(f"invalid size {text!r}: larger than 2**64 - 1")
        return value
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def timeout_arg(text: str) -> float | None:
    """argparse ``type=`` for ``--timeout``: seconds >= 0; 0 means no limit (None)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: seconds expected") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: seconds >= 0 expected")
    return value or None


def image_name_arg(text: str) -> str:
    """argparse ``type=`` for image names: the daemon's own rule, checked before asking."""
    if re.fullmatch(IMAGE_NAME_PATTERN, text, re.ASCII) is None:
        raise argparse.ArgumentTypeError(
            f"invalid image name {text!r}: images live in the daemon's state-dir, named by "
            f"{IMAGE_NAME_RULE}"
        )
    return text


def event_arg(text: str) -> str:
    """argparse ``type=`` for event names."""
    if text not in EVENT_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown event {text!r} (choose from {', '.join(EVENT_NAMES)})"
        )
    return text


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Add ``--socket``, ``--json`` and ``--timeout``: with their defaults on the main parser,
    with ``SUPPRESS`` on each command's (see the module docstring)."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help="the daemon's JSON-RPC socket (default: $RAMD_SOCKET, else "
        "$XDG_RUNTIME_DIR/ramd/ramd.sock, else /run/ramd/ramd.sock)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON instead of tables, and errors as JSON on stderr",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=timeout_arg,
        default=default(DEFAULT_TIMEOUT),
        help=f"give up connecting, or waiting for any one answer, after SECONDS "
        f"(default {DEFAULT_TIMEOUT:g}; 0: wait forever, e.g. for a large --prealloc)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``ramctl`` argument parser."""
    parser = Parser(
        prog=PROG,
        description="Drive the ramd daemon: create, resize, read and watch RAM blocks.",
        epilog=(
            "Sizes and offsets take K, M, G, T, P, E suffixes (powers of 1024; 1.5G is fine) "
            "or hex (0x10000). Exit status: 0 ok, 1 refused by the daemon (or a local file "
            "failed), 2 usage error, 3 cannot reach the daemon, no answer in time (the command "
            "may still complete in the daemon), or the connection was lost."
        ),
    )
    _global_options(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"{PROG} {ramd.__version__}")
    common = Parser(add_help=False)
    _global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".", parents=[common]
        )
        return p

    def block_id(p: argparse.ArgumentParser, what: str = "the RAM block") -> None:
        p.add_argument("id", metavar="ID", help=what)

    p = command("add", "create a RAM block")
    p.add_argument(
        "id",
        metavar="NEW-ID",
        help="the new block's id (a letter, then letters, digits, '-', '.', '_')",
    )
    p.add_argument("size", metavar="SIZE", type=size_arg, help="its size in bytes (used part)")
    p.add_argument("--max-size", metavar="S", type=size_arg, help="make it resizable up to S")
    p.add_argument(
        "--backend",
        choices=("anonymous", "memfd", "file"),
        default="anonymous",
        help="its memory: private (anonymous, the default), or shared with other processes "
        "through an fd (memfd; file: a file in the daemon's memory-dir)",
    )
    p.add_argument("--hugetlb", action="store_true", help="huge pages from hugetlbfs (shared)")
    p.add_argument("--prealloc", action="store_true", help="fault every page in now")
    p.add_argument("--merge", action="store_true", help="allow KSM merging")
    p.add_argument("--no-dump", action="store_true", help="exclude from core dumps")
    p.add_argument("--hugepages", action="store_true", help="use transparent huge pages")
    p.add_argument("--lock", action="store_true", help="lock in RAM (mlock)")
    p.add_argument("--align", metavar="A", type=size_arg, help="alignment (power of two)")

    def release_mode(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--mode",
            choices=("safe", "hard"),
            default="safe",
            help=f"when a mapper does not acknowledge the {what} in time: safe (the default) "
            "fails and changes nothing, hard disconnects it and goes on",
        )

    p = command("del", "remove a RAM block")
    block_id(p, "the block to remove")
    p.add_argument("--if-exists", action="store_true", help="succeed when there is no such block")
    release_mode(p, "removal")

    p = command("resize", "grow or shrink a resizable RAM block")
    block_id(p)
    p.add_argument("size", metavar="SIZE", type=size_arg, help="the new size, up to max-size")
    release_mode(p, "shrink")

    p = command("list", "list the RAM blocks")
    p.add_argument("--name", action="store_true", help="print only the ids, one per line")

    p = command("info", "show one RAM block")
    block_id(p)

    p = command("read", "copy a range of a block to stdout or a file (through a mapping if shared)")
    block_id(p)
    p.add_argument("offset", metavar="OFFSET", type=size_arg, help="first byte to read")
    p.add_argument("length", metavar="LENGTH", type=size_arg, help="bytes to read")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE, not stdout (replaced only once the whole range is read)",
    )

    p = command("map", "map a shared block and follow its events, until interrupted")
    block_id(p)
    p.add_argument("--readonly", action="store_true", help="ask for a read-only fd")

    p = command(
        "write", "copy stdin or a file into a block at OFFSET (through a mapping if shared)"
    )
    block_id(p)
    p.add_argument("offset", metavar="OFFSET", type=size_arg, help="where the data goes")
    p.add_argument("-i", "--input", metavar="FILE", help="read FILE, not stdin")

    p = command("discard", "drop the pages of a page-aligned range")
    block_id(p)
    p.add_argument("offset", metavar="OFFSET", type=size_arg, help="first byte (page-aligned)")
    p.add_argument("length", metavar="LENGTH", type=size_arg, help="bytes (whole pages)")

    p = command("watch", "print events as they happen, until interrupted")
    p.add_argument("--replay", action="store_true", help="first, one RAM_BLOCK_ADDED per block")
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the daemon goes away, wait for it and go on (what changed meanwhile "
        "is reported on stderr)",
    )
    p.add_argument(
        "events",
        metavar="EVENT",
        nargs="*",
        type=event_arg,
        help=f"events to show (default all): {', '.join(EVENT_NAMES)}",
    )

    p = command("save", "save RAM blocks to an image in the daemon's state-dir")
    p.add_argument(
        "name", metavar="NAME", type=image_name_arg, help=f"the image's name: {IMAGE_NAME_RULE}"
    )
    p.add_argument("blocks", metavar="ID", nargs="*", help="blocks to save (default all)")
    p.add_argument("--force", action="store_true", help="replace an existing image of that name")
    p.add_argument("--no-wait", action="store_true", help="print the job id, do not wait")

    p = command("load", "load an image from the daemon's state-dir (QEMU's incoming rules)")
    p.add_argument("name", metavar="NAME", type=image_name_arg, help="the image's name")
    p.add_argument("--no-wait", action="store_true", help="print the job id, do not wait")

    p = command("images", "list the images in the daemon's state-dir")
    p.add_argument("--name", action="store_true", help="print only the names, one per line")

    p = command("rm-image", "remove images from the daemon's state-dir")
    p.add_argument(
        "names", metavar="NAME", nargs="+", type=image_name_arg, help="the images to remove"
    )

    p = command("jobs", "list the daemon's save and load jobs, or cancel or dismiss one")
    p.add_argument(
        "action",
        metavar="ACTION",
        nargs="?",
        choices=("list", "cancel", "dismiss"),
        default="list",
        help="list (the default); cancel JOB: ask it to stop; dismiss JOB: forget a concluded job",
    )
    p.add_argument("job", metavar="JOB", nargs="?", help="the job id (cancel, dismiss)")
    p.add_argument("--name", action="store_true", help="list: print only the ids, one per line")

    cli_vmm.add_parsers(command, size_arg)

    command("stats", "show the daemon's usage figures and limits")
    add_top_parser(command)
    command("version", "show the daemon's version")
    command("commands", "list the commands the daemon answers (JSON-RPC methods)")

    p = command("exec", "run a program holding leases of RAM blocks (it inherits their fds)")
    p.add_argument(
        "--block",
        metavar="ID",
        action="append",
        help="lease this block (repeatable); {fd:ID} (or {fd}) in ARGS becomes its fd",
    )
    p.add_argument("--readonly", action="store_true", help="read-only fds")
    p.add_argument(
        "program",
        metavar="PROGRAM",
        nargs=argparse.REMAINDER,
        help="-- then the program and its arguments",
    )

    p = command("call", "send any command and print its result as JSON")
    p.add_argument("method", metavar="METHOD", help="the command, e.g. query-ram-blocks")
    p.add_argument(
        "params",
        metavar="PARAMS",
        nargs="?",
        help="its arguments: a JSON object, or - to read it from stdin (default: none)",
    )
    return parser
