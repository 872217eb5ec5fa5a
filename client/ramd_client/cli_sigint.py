"""Ctrl-C for ``ramctl``'s long-running commands (``watch``, ``top``): a clean stop, exit 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


async def until_sigint(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` until it ends or SIGINT arrives; SIGINT cancels it and this returns
    normally. Any other cancellation goes on up.

    Installs its own SIGINT handler for the time it runs, so Ctrl-C stops ``work`` even when
    ``ramctl`` was started with SIGINT ignored (as a shell does for a background job). Loop
    thread only; must run in a task (the one SIGINT cancels)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:
        work.close()
        raise RuntimeError("until_sigint() must run in a task")
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        await work
    except asyncio.CancelledError:
        if not interrupted:
            raise
        task.uncancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
