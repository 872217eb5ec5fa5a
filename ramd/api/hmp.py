"""A small HMP (QEMU's human monitor) for ``human-monitor-command``: ``help``, ``info`` and
``info ramblock``, parsed and worded as QEMU's ``monitor/hmp.c`` does.

``info ramblock`` prints QEMU's ``ram_block_format()`` layout (``system/physmem.c``) with
ramd's blocks: name, page size (``size_to_str``), ram_addr offset, used and total length,
host address and access. The host address is the daemon's, so read-only peers get
``0x0000000000000000`` there (the column stays, for tools that parse it by position).

Any other command gets QEMU's own text (``unknown command: 'NAME'``), never an error: QEMU's
``human-monitor-command`` succeeds and returns what the monitor printed. As QEMU's monitor,
every ``\\n`` goes out as ``\\r\\n``. Output is bounded by the input's length and the number
of blocks. Loop thread only (reads the RAM list).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ramd.api.service import Session

#: C's ``isspace`` in the C locale, as QEMU's ``qemu_isspace``.
_SPACE = " \t\n\v\f\r"
#: QEMU's ``MAX_ARGS``: ``help`` with more words prints nothing.
MAX_ARGS = 16


@dataclass(frozen=True, slots=True)
class HmpCommand:
    """One entry of an HMP command table (QEMU's ``HMPCommand``). ``name`` may list
    aliases (``help|?``); ``rest`` says the command takes the rest of the line (``S?``),
    else it takes no argument; ``run`` gets the session and that rest (or None)."""

    name: str
    params: str
    help: str
    run: Callable[[Session, str | None], str]
    rest: bool = False
    sub_table: tuple[HmpCommand, ...] = ()


def run(session: Session, command_line: str) -> str:
    """What QEMU's monitor prints for ``command_line`` (``handle_hmp_command``)."""
    return _handle(session, command_line).replace("\n", "\r\n")


def _handle(session: Session, line: str) -> str:
    found = _parse_command(line, 0, HMP_COMMANDS)
    if isinstance(found, str):
        return found
    cmd, pos = found
    rest = _skip_space(line, pos)
    if cmd.rest:
        return cmd.run(session, line[rest:] or None)
    if rest < len(line):
        end = pos
        while end > 0 and line[end - 1] in _SPACE:
            end -= 1
        return (
            f"{cmd.name}: extraneous characters at the end of line\n"
            f'Try "help {line[:end]}" for more information\n'
        )
    return cmd.run(session, None)


def _parse_command(
    line: str, pos: int, table: tuple[HmpCommand, ...]
) -> tuple[HmpCommand, int] | str:
    """The command at ``pos`` and where its arguments start (after the spaces), or the text
    to print instead (QEMU's ``monitor_parse_command``)."""
    start = _skip_space(line, pos)
    if start == len(line):
        return ""
    end = start
    while end < len(line) and line[end] != "/" and line[end] not in _SPACE:
        end += 1
    cmd = _search(table, line[start:end])
    if cmd is None:
        return f"unknown command: '{line[:end]}'\n"
    args = _skip_space(line, end)
    if cmd.sub_table and args < len(line):
        return _parse_command(line, args, cmd.sub_table)
    return cmd, args


def _skip_space(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in _SPACE:
        pos += 1
    return pos


def _search(table: tuple[HmpCommand, ...], name: str) -> HmpCommand | None:
    """QEMU's ``hmp_compare_cmd``: ``name`` equals one of the ``|``-separated names."""
    for cmd in table:
        if name in cmd.name.split("|"):
            return cmd
    return None


def _split_words(text: str) -> list[str] | None:
    """QEMU's ``parse_cmdline``: words, double-quoted ones with ``\\n \\r \\\\ \\' \\"``
    escapes; None when malformed or longer than :data:`MAX_ARGS` words."""
    words: list[str] = []
    pos = 0
    while (pos := _skip_space(text, pos)) < len(text):
        if len(words) >= MAX_ARGS:
            return None
        if text[pos] != '"':
            end = pos
            while end < len(text) and text[end] not in _SPACE:
                end += 1
            words.append(text[pos:end])
            pos = end
            continue
        word: list[str] = []
        pos += 1
        while pos < len(text) and text[pos] != '"':
            c = text[pos]
            if c == "\\":
                escaped = text[pos + 1 : pos + 2]
                if escaped not in ("n", "r", "\\", "'", '"'):
                    return None
                c = {"n": "\n", "r": "\r"}.get(escaped, escaped)
                pos += 1
            word.append(c)
            pos += 1
        if pos == len(text):
            return None
        words.append("".join(word))
        pos += 1
    return words


def _help(session: Session, name: str | None) -> str:
    """``help [cmd]`` (QEMU's ``help_cmd``)."""
    words = _split_words(name) if name is not None else []
    if words is None:
        return ""
    return _help_dump(HMP_COMMANDS, words, 0)


def _help_dump(table: tuple[HmpCommand, ...], words: list[str], index: int) -> str:
    prefix = "".join(f"{w} " for w in words[:index])
    if index >= len(words):
        return "".join(f"{prefix}{c.name} {c.params} -- {c.help}\n" for c in table)
    cmd = _search(table, words[index])
    if cmd is None:
        return f"unknown command: '{' '.join(words[: index + 1])}'\n"
    if cmd.sub_table:
        return _help_dump(cmd.sub_table, words, index + 1)
    return f"{prefix}{cmd.name} {cmd.params} -- {cmd.help}\n"


def _info(session: Session, item: str | None) -> str:
    """``info`` alone: the list of ``info`` subcommands (QEMU's ``hmp_info_help``)."""
    return _help(session, "info")


def size_to_str(value: int) -> str:
    """QEMU's ``size_to_str``: ``%0.3g`` of the value in its IEC unit (``4 KiB``)."""
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    unit = int((exponent - 1) / 10)
    return f"{value / (1 << (unit * 10)):0.3g} {_UNITS[unit]}B"


_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def ram_block_format(session: Session) -> str:
    """QEMU's ``ram_block_format``, with ramd's blocks in creation order: the header is
    ``"%24s %8s  %18s %18s %18s %18s %3s"``, each row
    ``"%24s %8s  0x%016x 0x%016x 0x%016x 0x%016x %3s"``."""
    head = ("Block Name", "PSize", "Offset", "Used", "Total", "HVA", "RO")
    lines = ["{:>24} {:>8}  {:>18} {:>18} {:>18} {:>18} {:>3}\n".format(*head)]
    for block in session.service.ram:
        host = 0 if session.readonly else block.host
        lines.append(
            f"{block.id:>24} {size_to_str(block.page_size):>8}  0x{block.offset:016x}"
            f" 0x{block.size:016x} 0x{block.max_size:016x} 0x{host:016x} {'rw':>3}\n"
        )
    return "".join(lines)


INFO_COMMANDS: tuple[HmpCommand, ...] = (
    HmpCommand(
        "ramblock", "", "Display system ramblock information", lambda s, _: ram_block_format(s)
    ),
)

HMP_COMMANDS: tuple[HmpCommand, ...] = (
    HmpCommand("help|?", "[cmd]", "show the help", _help, rest=True),
    HmpCommand(
        "info",
        "[subcommand]",
        "show various information about the system state",
        _info,
        sub_table=INFO_COMMANDS,
    ),
)
