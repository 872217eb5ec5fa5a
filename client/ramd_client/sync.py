"""The synchronous client for scripts: :class:`Client`, the same methods, blocking.

A :class:`Client` owns a private event loop running in a background thread (a daemon
thread named ``ramd_client``) with an :class:`~ramd_client.client.AsyncClient` on it; each
method submits the coroutine to that loop and blocks until it is done. So the wire logic,
the models and the errors are exactly the asynchronous client's, and the client may be used
from several threads at once (their calls are pipelined on the one connection).

Threads: the public methods run on the **caller's thread** and block; everything that
touches the connection runs on the **loop thread**. Do not call a :class:`Client` from a
``trace`` hook (which runs on the loop thread): it would wait for itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

from ramd.api import models as m
from ramd_client.client import AsyncClient, connect
from ramd_client.events import MAX_QUEUE, MAX_REPLAY, Event, EventStream
from ramd_client.protocol import MAX_MESSAGE_SIZE, MAX_PENDING, Trace

__all__ = ["Client", "EventIterator"]

T = TypeVar("T")


class Client:
    """A blocking connection to ramd; see the module docstring.

    ``Client(path=None)`` connects at once (same path rule and errors as
    :func:`ramd_client.connect`). ``timeout``, when set, bounds connecting and each call in
    seconds (``TimeoutError``; the request may still run in the daemon). Close with
    :meth:`close` or ``with``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
        max_pending: int = MAX_PENDING,
        max_message_size: int = MAX_MESSAGE_SIZE,
        trace: Trace | None = None,
    ) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ramd_client", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._client: AsyncClient = self._run(
                connect(
                    path,
                    max_pending=max_pending,
                    max_message_size=max_message_size,
                    timeout=timeout,
                    trace=trace,
                )
            )
        except BaseException:
            self._stop_loop()
            raise

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop thread and wait for its outcome. Caller's thread."""
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from ramd within {timeout} s") from None
        except BaseException:
            future.cancel()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._run(coro, self.timeout)

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def async_client(self) -> AsyncClient:
        """The underlying client (use it only on its loop, e.g. via ``trace``)."""
        return self._client

    @property
    def version(self) -> m.VersionResult | None:
        """The daemon's version, read when connecting."""
        return self._client.version

    @property
    def path(self) -> str:
        return self._client.path

    @property
    def connected(self) -> bool:
        return self._client.connected

    def close(self) -> None:
        """Close the connection and stop the loop thread. Idempotent."""
        if self._closed:
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- commands (see AsyncClient for each) -----------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Any command by name, raw params in, raw result out."""
        return self._call(self._client.call(method, params))

    def ram_block_add(
        self,
        id: str,
        size: int,
        max_size: int | None = None,
        prealloc: bool = False,
        merge: bool = False,
        dump: bool = True,
        hugepages: bool = False,
        lock: bool = False,
        align: int | None = None,
        backend: str = "anonymous",
        hugetlb: bool = False,
    ) -> m.RamBlockInfo:
        return self._call(
            self._client.ram_block_add(
                id, size, max_size, prealloc, merge, dump, hugepages, lock, align, backend, hugetlb
            )
        )

    def ram_block_add_from_pool(self, id: str, pool: str) -> m.RamBlockInfo:
        return self._call(self._client.ram_block_add_from_pool(id, pool))

    def ram_block_seal(self, id: str) -> m.RamBlockInfo:
        return self._call(self._client.ram_block_seal(id))

    def query_pools(self) -> list[m.PoolInfo]:
        return self._call(self._client.query_pools())

    def ram_block_del(self, id: str, mode: m.ReleaseMode = "safe") -> None:
        self._call(self._client.ram_block_del(id, mode))

    def ram_block_resize(self, id: str, size: int, mode: m.ReleaseMode = "safe") -> m.RamBlockInfo:
        return self._call(self._client.ram_block_resize(id, size, mode))

    def query_ram_blocks(
        self, id: str | None = None, resident: bool = False
    ) -> list[m.RamBlockInfo]:
        return self._call(self._client.query_ram_blocks(id, resident))

    def ram_block_read(self, id: str, offset: int, length: int) -> bytes:
        return self._call(self._client.ram_block_read(id, offset, length))

    def ram_block_write(self, id: str, offset: int, data: bytes | bytearray | memoryview) -> int:
        return self._call(self._client.ram_block_write(id, offset, data))

    def ram_block_discard(self, id: str, offset: int, length: int) -> None:
        self._call(self._client.ram_block_discard(id, offset, length))

    def ram_block_attach(
        self,
        id: str,
        qmp: str,
        kind: str,
        device: str | None = None,
        bus: str | None = None,
        requested_size: int | None = None,
    ) -> m.RamBlockInfo:
        return self._call(self._client.ram_block_attach(id, qmp, kind, device, bus, requested_size))

    def ram_block_detach(self, id: str, timeout: float | None = None) -> None:
        self._call(self._client.ram_block_detach(id, timeout))

    def ram_save(
        self,
        file: str | None = None,
        *,
        fd: str | None = None,
        blocks: list[str] | None = None,
    ) -> str:
        return self._call(self._client.ram_save(file, fd=fd, blocks=blocks))

    def ram_load(self, file: str | None = None, *, fd: str | None = None) -> str:
        return self._call(self._client.ram_load(file, fd=fd))

    def query_jobs(self) -> list[m.JobInfo]:
        return self._call(self._client.query_jobs())

    def job_cancel(self, id: str) -> None:
        self._call(self._client.job_cancel(id))

    def job_dismiss(self, id: str) -> None:
        self._call(self._client.job_dismiss(id))

    def query_images(self) -> list[m.ImageEntry]:
        return self._call(self._client.query_images())

    def image_remove(self, file: str) -> None:
        self._call(self._client.image_remove(file))

    def query_stats(self) -> m.StatsResult:
        return self._call(self._client.query_stats())

    def query_version(self) -> m.VersionResult:
        return self._call(self._client.query_version())

    def query_commands(self) -> list[m.CommandInfo]:
        return self._call(self._client.query_commands())

    def query_schema(self) -> dict[str, Any]:
        return self._call(self._client.query_schema())

    def human_monitor_command(self, command_line: str) -> str:
        return self._call(self._client.human_monitor_command(command_line))

    def query_qmp_schema(self) -> list[dict[str, Any]]:
        return self._call(self._client.query_qmp_schema())

    def quit(self) -> None:
        self._call(self._client.quit())

    def events(
        self,
        names: Iterable[str] | None = None,
        replay: bool = True,
        *,
        max_queue: int = MAX_QUEUE,
        max_replay: int = MAX_REPLAY,
    ) -> EventIterator:
        """A blocking iterator of events; see :meth:`AsyncClient.events`. Use it in
        ``with`` to subscribe before causing events."""
        stream = self._client.events(names, replay, max_queue=max_queue, max_replay=max_replay)
        return EventIterator(self, stream)


class EventIterator:
    """The blocking face of an :class:`~ramd_client.events.EventStream`."""

    def __init__(self, client: Client, stream: EventStream) -> None:
        self._client = client
        self.stream = stream

    def subscribe(self) -> int:
        """Subscribe now (idempotent); the subscription's seq."""
        return self._client._call(self.stream.subscribe())

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds (``TimeoutError``).

        Raises ``StopIteration`` when the stream has ended cleanly.
        """
        try:
            return self._client._run(self.stream.__anext__(), timeout)
        except StopAsyncIteration:
            raise StopIteration from None

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return self.get()

    def close(self) -> None:
        """Stop the stream (and unsubscribe if it was the last one). Idempotent."""
        if not self._client._closed:
            self._client._run(self.stream.aclose())

    def __enter__(self) -> EventIterator:
        self.subscribe()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
