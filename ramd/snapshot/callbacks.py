"""The callable types through which image code reports progress and learns of a cancel.

Both are called in the thread that runs the image operation (a job's worker thread in the
daemon), so they must be thread-safe with respect to the loop thread that reads the results.
"""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(n)``: ``n`` more bytes of block data are done.
ProgressFn = Callable[[int], None]
#: ``cancelled()``: true once the caller wants the operation to stop; polled between chunks.
CancelledFn = Callable[[], bool]


def no_progress(_: int) -> None:
    """The default ``progress``: report nothing."""


def never_cancelled() -> bool:
    """The default ``cancelled``: never stop."""
    return False
