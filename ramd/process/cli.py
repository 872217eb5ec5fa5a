"""``ramd`` command line: options over the config file over the embedded defaults.

Exit codes: 0 clean shutdown; 1 cannot start (socket in use, no permission); 2 bad usage or
bad configuration (one message naming the key).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import ramd
from ramd.config import Config, ConfigError, load_config
from ramd.logs import setup_logging

log = logging.getLogger("ramd")


def build_parser() -> argparse.ArgumentParser:
    """The ``ramd`` argument parser (also the source of its man page and completions)."""
    p = argparse.ArgumentParser(
        prog="ramd",
        description="Serve resizable RAM blocks over JSON-RPC 2.0 and QMP.",
        epilog="Options override the configuration file, which overrides the built-in "
        "defaults. Directories: memory-dir (file blocks) defaults to "
        "$XDG_RUNTIME_DIR/ramd/memory, else /run/ramd/memory; state-dir (images) to "
        "$STATE_DIRECTORY, else /var/lib/ramd for root, else $XDG_STATE_HOME/ramd or "
        "~/.local/state/ramd. A directory that cannot be used is reported at start; ramd "
        "serves anyway, refusing file blocks or image files until it is fixed. Exit status: 0 "
        "clean shutdown (SIGTERM, SIGINT), 1 cannot start (socket in use, no permission, "
        "memory-dir held by another ramd; the message says what to do), 2 bad usage or "
        "configuration.",
    )
    p.add_argument(
        "--socket",
        type=Path,
        help="JSON-RPC socket path (default: $RAMD_SOCKET, "
        "else $XDG_RUNTIME_DIR/ramd/ramd.sock, else /run/ramd/ramd.sock)",
    )
    p.add_argument("--qmp-socket", type=Path, help="QMP socket path (default: none)")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="least severe messages logged (default: log-level of the config, else info)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text, or as one JSON object per line (default: log-format of the "
        "config, else text)",
    )
    p.add_argument(
        "--event-loop",
        choices=["asyncio", "uvloop"],
        help="event loop implementation (uvloop needs the 'fast' extra; default asyncio)",
    )
    p.add_argument("--version", action="version", version=f"ramd {ramd.__version__}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(ns: argparse.Namespace, *, reload: bool = False) -> Config:
    """The configuration: the file (read as :func:`~ramd.config.read_config_file` says,
    ``reload`` on SIGHUP) with the command line's overrides."""
    config = load_config(ns.config, reload=reload)
    overrides = {
        k: v
        for k, v in {
            "socket": ns.socket,
            "qmp_socket": ns.qmp_socket,
            "log_level": ns.log_level,
            "log_format": ns.log_format,
            "event_loop": ns.event_loop,
        }.items()
        if v is not None
    }
    return config.model_copy(update=overrides)


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``event-loop``; None means asyncio's default loop."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        config = build_config(ns)
    except ConfigError as e:
        print(f"ramd: {e}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    from ramd.process.daemon import CannotStart, serve
    from ramd.transport.sockets.unixbind import AlreadyRunning

    try:
        loop_factory = _loop_factory(config.event_loop)
    except ImportError:
        print(
            "ramd: event-loop uvloop: uvloop is not installed (pip install 'ramd[fast]')",
            file=sys.stderr,
        )
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config, reread=lambda: build_config(ns, reload=True)))
    except ConfigError as e:
        print(f"ramd: {e}", file=sys.stderr)
        return 2
    except (CannotStart, AlreadyRunning) as e:
        log.error("cannot start: %s", e)
        return 1
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
