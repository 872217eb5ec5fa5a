"""A two-stage pipeline: the calling thread produces items, one helper thread consumes them.

Image I/O alternates a read (``pread``, which releases the GIL), a zero scan and a hash (which
hold it) and a write (``pwrite``, which releases it). Run in one thread, the read and hash of
one buffer wait for the write of the previous one; with the write in a helper thread, the two
overlap, on two cores when the machine has them.

Order and bounds: items are consumed one at a time, in the order :meth:`Pipeline.put` got
them. At most ``depth`` items are in flight (put and not yet fully consumed): :meth:`put`
blocks while there are that many. A producer cycling through ``depth + 1`` buffers can
therefore fill the next one while the others are in flight: none of them is the one it fills.

Errors: the first exception the consumer raises stops the helper thread; the next
:meth:`put` or :meth:`drain` re-raises it in the calling thread. :meth:`close` (also the
context manager's exit) drops the items not yet consumed, waits for the helper thread to end
and never raises; after it, no consumer call is running or will run.

Threads: ``put``, ``drain`` and ``close`` are for the one producing thread; the consumer
runs in the helper thread only.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class Pipeline(Generic[T]):
    """Consumes items in a helper thread named ``name``, at most ``depth`` in flight."""

    def __init__(self, consume: Callable[[T], None], depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError("pipeline depth must be at least 1")
        self._consume = consume
        self._depth = depth
        self._cond = threading.Condition()
        self._items: collections.deque[T] = collections.deque()
        self._in_flight = 0  # queued + being consumed (guarded by _cond)
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __enter__(self) -> Pipeline[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def put(self, item: T) -> None:
        """Queue ``item``, first waiting while ``depth`` items are in flight."""
        with self._cond:
            while self._in_flight >= self._depth and self._error is None:
                self._cond.wait()
            self._check()
            self._items.append(item)
            self._in_flight += 1
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every item put so far was consumed; re-raise the consumer's error."""
        with self._cond:
            while self._in_flight and self._error is None:
                self._cond.wait()
            self._check()

    def close(self) -> None:
        """Drop the items not yet consumed and end the helper thread (idempotent)."""
        with self._cond:
            self._closing = True
            self._items.clear()
            self._cond.notify_all()
        self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                item = self._items.popleft()
            try:
                self._consume(item)
            except BaseException as e:
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()
