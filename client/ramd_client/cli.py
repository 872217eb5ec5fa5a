"""``ramctl``: drive a ramd daemon from the shell.

::

    ramctl [--socket PATH] [--json] [--timeout SECONDS] COMMAND ... [--json] ...

Sizes and offsets take QEMU suffixes (``64M``, ``1.5G``: powers of 1024) through
:func:`ramd.sizes.parse_size`, the parser the daemon's config uses, or hex (``0x10000``, as
ramctl prints offsets). Output is human (sizes by :func:`ramd.sizes.format_size`, tables) or,
with ``--json``, JSON documents (``watch``: one compact JSON object per line), and then
errors too are one JSON object on stderr: ``{"error": {"class", "desc", "status", ...}}``.

Exit status: 0 success; 1 the daemon refused (its error class and message on stderr) or a
local file could not be read or written; 2 usage error; 3 the daemon could not be reached
(the message names the socket path tried), did not answer within ``--timeout`` seconds, or
the connection was lost. A command that timed out is not cancelled: the daemon may still
complete it, and the message says so and how to check. ``watch`` runs until interrupted and
exits 0 on SIGINT. A daemon refusal holding sizes (hex on the wire) is followed by the same
sizes in powers of 1024, as ramctl takes them (:mod:`ramd_client.cli_errors`); ``--json``
errors carry the daemon's message unchanged.

Start-up cost: this module imports neither asyncio, nor pydantic, nor the typed client.
``version``, ``call`` and ``commands`` are one blocking exchange
(:mod:`ramd_client.oneshot`); the other commands import asyncio and
:mod:`ramd_client.cli_commands` (and with it the models) when they run.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ramd.process.paths import default_socket
from ramd_client.cli_errors import timeout_hints, with_human_sizes
from ramd_client.cli_output import (
    EXIT_CONNECT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Failure,
    emit,
    emit_json,
)
from ramd_client.cli_parser import PROG, RAW_COMMANDS, UsageError, build_parser
from ramd_client.error import (
    CallTimeout,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RamdClientError,
    RamdError,
)
from ramd_client.oneshot import Exchange

__all__ = ["EXIT_CONNECT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

#: Connection errors after which "is ramd running?" is a useful question.
_NOT_RUNNING = frozenset({errno.ENOENT, errno.ECONNREFUSED})

#: Error classes of ramctl's own (not QMP's): their human line is the message alone.
_LOCAL_CLASSES = frozenset(
    {"LocalError", "UsageError", "ConnectError", "ConnectionLost", "Timeout"}
)


# -- reporting ------------------------------------------------------------------------------


def report(
    as_json: bool,
    status: int,
    error_class: str,
    desc: str,
    *,
    hints: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> int:
    """Print one error on stderr and return ``status``.

    Human: ``ramctl: CLASS: desc`` (or ``ramctl: desc`` for a local error class), then one
    ``ramctl: hint`` line per hint. JSON: one object ``{"error": {...}}`` on one line.
    """
    if as_json:
        body: dict[str, Any] = {"class": error_class, "desc": desc, "status": status}
        body.update(extra or {})
        if hints:
            body["hints"] = list(hints)
        lines = [json.dumps({"error": body}, separators=(",", ":"))]
    else:
        local = error_class in _LOCAL_CLASSES
        lines = [f"{PROG}: {desc}" if local else f"{PROG}: {error_class}: {desc}"]
        lines += [f"{PROG}: {hint}" for hint in hints]
    sys.stderr.write("".join(line + "\n" for line in lines))
    sys.stderr.flush()
    return status


def _notes(e: BaseException) -> list[str]:
    return list(getattr(e, "__notes__", ()))


# -- the raw commands -----------------------------------------------------------------------


def _call_params(args: argparse.Namespace) -> Any:
    """``call``'s PARAMS argument (or stdin for ``-``) as JSON: an object, or None."""
    text = sys.stdin.read() if args.params == "-" else args.params
    if text is None:
        return None
    try:
        params = json.loads(text)
    except ValueError as e:
        raise UsageError("", f"call: PARAMS is not JSON: {e}") from None
    if not isinstance(params, dict):
        raise UsageError("", "call: PARAMS must be a JSON object")
    return params


def run_raw(args: argparse.Namespace, path: str) -> int:
    """``version``, ``call`` and ``commands``: one blocking exchange, no asyncio, no
    models."""
    params = _call_params(args) if args.command == "call" else None
    with Exchange(path, args.timeout) as exchange:
        version = exchange.version
        if args.command == "call":
            emit_json(exchange.call(args.method, params))
        elif args.command == "commands":
            listed = exchange.call("query-commands", None)
            if args.json:
                emit_json(listed)
            else:
                emit("\n".join(str(c["name"]) for c in listed))
        elif args.json:
            emit_json(version)
        else:
            package = version.get("package") if isinstance(version, dict) else None
            if not isinstance(package, str):
                raise ProtocolError("query-version returned no package")
            emit(package)
    return EXIT_OK


async def run_typed(args: argparse.Namespace, path: str) -> int:
    """Every other command, with the typed client."""
    from ramd_client.cli_commands import COMMANDS
    from ramd_client.client import connect

    client = await connect(path, timeout=args.timeout)
    try:
        return await COMMANDS[args.command](client, args)
    finally:
        await client.close()


# -- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the command; every failure becomes a report and an exit status."""
    path = default_socket() if args.socket is None else args.socket
    as_json: bool = args.json
    try:
        if args.command in RAW_COMMANDS:
            return run_raw(args, path)
        if args.command == "exec":
            from ramd_client.cli_exec import run_exec

            run_exec(args, path)
        import asyncio  # only here: the raw commands start faster without it

        return asyncio.run(run_typed(args, path))
    except ConnectError as e:
        hints = []
        if e.errno in _NOT_RUNNING:
            hints.append(
                "is ramd running? choose its socket with --socket PATH or the RAMD_SOCKET "
                "environment variable"
            )
        return report(
            as_json, EXIT_CONNECT, "ConnectError", str(e), hints=hints, extra={"socket": path}
        )
    except CallTimeout as e:
        return report(
            as_json,
            EXIT_CONNECT,
            "Timeout",
            f"{e} (at {path})",
            hints=timeout_hints(args, e.method),
            extra={"method": e.method},
        )
    except RamdError as e:
        extra = {"code": e.code} if e.code != -32000 else {}
        desc = e.desc if as_json else with_human_sizes(e.desc)
        return report(as_json, EXIT_FAILED, e.error_class, desc, hints=_notes(e), extra=extra)
    except ConnectionLost as e:
        return report(
            as_json, EXIT_CONNECT, "ConnectionLost", f"lost the connection to ramd at {path}: {e}"
        )
    except RamdClientError as e:
        return report(as_json, EXIT_FAILED, type(e).__name__, str(e))
    except UsageError as e:
        return report(as_json, EXIT_USAGE, "UsageError", e.message)
    except Failure as e:  # its daemon-like refusals (GenericError, JobFailed) get sizes too
        local = as_json or e.error_class in _LOCAL_CLASSES
        desc = e.message if local else with_human_sizes(e.message)
        return report(as_json, e.status, e.error_class, desc, hints=_notes(e))


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` is on the command line (for reporting usage errors)."""
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ramctl`` entry point; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(words)
    except UsageError as e:
        if _wants_json(words):
            return report(True, EXIT_USAGE, "UsageError", e.message)
        sys.stderr.write(e.usage + e.message + "\n")
        return EXIT_USAGE
    try:
        return run(args)
    except KeyboardInterrupt:
        return EXIT_OK if args.command in ("watch", "map") else 130
    except BrokenPipeError:
        # The reader of stdout went away (``ramctl watch | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK if args.command in ("watch", "map") else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
