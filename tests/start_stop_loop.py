"""Start and stop the daemon in this process N times, on the given socket paths in turn.

Usage: ``python start_stop_loop.py N CONFIG_TOML PATH...``. Each start runs
:func:`ramd.process.daemon.serve` with its stop event already set: the daemon binds, becomes ready,
then shuts down at once (removing its socket), or refuses to start. Prints one JSON list of
``[outcome, path, message]`` (outcome: ``served``, ``refused``, ``running`` or ``oserror``).
In-process, so 200 starts take seconds, not the minutes of 200 interpreters.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib

from ramd.config import parse_config
from ramd.fsdir import UnsafeDirectory
from ramd.process.daemon import CannotStart, serve
from ramd.transport.sockets.unixbind import AlreadyRunning


async def _once(config_data: dict[str, object]) -> None:
    stop = asyncio.Event()
    stop.set()
    await serve(parse_config(config_data), stop)


def main() -> None:
    count, config_text, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    base = tomllib.loads(config_text)
    outcomes: list[list[str]] = []
    for i in range(count):
        path = paths[i % len(paths)]
        try:
            asyncio.run(_once({**base, "socket": path}))
            outcomes.append(["served", path, ""])
        except CannotStart as e:  # the bind's own error is its cause
            cause = e.__cause__
            if isinstance(cause, UnsafeDirectory):
                outcomes.append(["refused", path, str(cause)])
            elif isinstance(cause, AlreadyRunning):
                outcomes.append(["running", path, str(cause)])
            else:
                outcomes.append(["oserror", path, str(cause)])
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
