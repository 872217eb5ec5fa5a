"""``ramctl attach`` and ``ramctl detach``: a shared block in a running VMM (docs/protocol.md §13).

:func:`add_parsers` adds both commands to ``ramctl``'s parser (light: no pydantic);
:data:`COMMANDS` are their handlers, imported with the typed client.

``detach``'s ``--timeout S`` is how long the daemon waits for the VMM to let go (sent as the
command's ``timeout``); ramctl itself then waits for the answer a little longer than that.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ramd_client.cli_output import EXIT_OK, emit, emit_json

if TYPE_CHECKING:
    from ramd_client.client import AsyncClient

__all__ = ["COMMANDS", "add_parsers"]

#: Seconds ramctl waits for a detach's answer beyond the VMM's own deadline.
ANSWER_MARGIN = 5.0


def add_parsers(
    command: Callable[[str, str], argparse.ArgumentParser], size_arg: Callable[[str], int]
) -> None:
    """Add ``attach`` and ``detach``; ``command(name, help)`` makes a sub-parser,
    ``size_arg`` parses a size argument."""
    p = command("attach", "plug a shared block into a running VMM over its QMP socket")
    p.add_argument("id", metavar="ID", help="the memfd or file block")
    p.add_argument(
        "--qmp", metavar="PATH", required=True, help="a QMP socket of the VMM, for ramd alone"
    )
    p.add_argument(
        "--as",
        dest="kind",
        choices=("pc-dimm", "virtio-mem"),
        required=True,
        help="the device the block becomes",
    )
    p.add_argument("--device", metavar="NAME", help="the device id (default ramd-ID)")
    p.add_argument("--bus", metavar="BUS", help="the bus to plug it on (e.g. a root port on q35)")
    p.add_argument(
        "--requested-size",
        metavar="SIZE",
        type=size_arg,
        help="virtio-mem: what the guest is asked to plug (default the block's size)",
    )
    p = command(
        "detach",
        "unplug an attached block from its VMM (--timeout: seconds the VMM may take to let go)",
    )
    p.add_argument("id", metavar="ID", help="the attached block")


async def cmd_attach(client: AsyncClient, args: argparse.Namespace) -> int:
    block = await client.ram_block_attach(
        args.id,
        args.qmp,
        args.kind,
        device=args.device,
        bus=args.bus,
        requested_size=args.requested_size,
    )
    att = block.attachment
    if args.json or att is None:
        emit_json(block.model_dump(mode="json", by_alias=True))
    else:
        emit(f"{block.id}: {att.as_} {att.device} at 0x{att.addr:x} in VMM pid {att.vmm_pid}")
    return EXIT_OK


async def cmd_detach(client: AsyncClient, args: argparse.Namespace) -> int:
    timeout: float | None = args.timeout
    if timeout is not None:
        client.timeout = timeout + ANSWER_MARGIN
    await client.ram_block_detach(args.id, timeout=timeout)
    return EXIT_OK


Handler = Callable[["AsyncClient", argparse.Namespace], Coroutine[Any, Any, int]]

COMMANDS: dict[str, Handler] = {"attach": cmd_attach, "detach": cmd_detach}
