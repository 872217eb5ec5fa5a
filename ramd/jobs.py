"""Long operations as jobs, after QEMU's job API (``qapi/job.json``, ``job.c``).

A job has an id, a type, a status, byte progress (current/total) and, once it failed or was
cancelled, an error text. Its work function runs in a worker thread from a small bounded pool;
everything else happens on the asyncio loop thread that created the :class:`JobManager`.

Statuses, a subset of QEMU's ``JobStatus`` with the same meaning and transitions::

    created -> running -> concluded               the work returned
    created -> running -> aborting -> concluded   the work raised, or stopped on a cancel
    created -> aborting -> concluded              cancelled before a worker took it
    concluded -> null                             dismissed, or pushed out by newer ones

As in QEMU, ``job-cancel`` does not change the status by itself: it sets a flag that the work
polls between chunks (:meth:`JobContext.cancelled`), and the job goes to aborting when the work
stops. A job cancelled while still waiting for a worker concludes at once and never runs. A
cancel that arrives after the work's last poll has no effect: the job concludes normally, so a
concluded job without an error always did all its work.

Threads and ownership:

- loop thread: every :class:`JobManager` method, every status change, the ``on_status`` and
  ``on_finish`` callbacks, :meth:`Job.info` and :meth:`Job.wait`;
- worker thread: the work function and the :class:`JobContext` methods it calls. Progress is
  guarded by a lock; the cancel flag is a :class:`threading.Event`.

The worker threads are daemon threads: a job abandoned at shutdown (still running after the
grace) cannot keep the process from exiting; the caller must then keep whatever the job uses
(its pinned blocks) alive until exit, since its ``on_finish`` never runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import errno
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

from ramd.errors import RamdError
from ramd.ids import ID_PATTERN

log = logging.getLogger(__name__)

_ID_RE = re.compile(ID_PATTERN)
T = TypeVar("T")

#: Longest a slice of :meth:`JobContext.run_sliced_on_loop` holds the loop (seconds).
SLICE_SECONDS = 0.002
#: The error text of a job that failed on something unexpected (the log has the details).
INTERNAL_ERROR_TEXT = "Internal error (details in the daemon's log)"

#: The error text of a cancelled job (``strerror(ECANCELED)``, as QEMU reports it).
CANCELED_TEXT = os.strerror(errno.ECANCELED)


class JobStatus(enum.StrEnum):
    """QEMU's job statuses that ramd jobs go through."""

    CREATED = "created"
    RUNNING = "running"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobCancelled(Exception):
    """Raised by :meth:`JobContext.check_cancelled` once the job was asked to stop."""

    def __init__(self) -> None:
        super().__init__(CANCELED_TEXT)


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job, as ``query-jobs`` reports it."""

    id: str
    type: str
    status: JobStatus
    current_progress: int
    total_progress: int
    error: str | None


class Job:
    """One job. Created only by :meth:`JobManager.start`.

    ``status`` and ``error`` are written on the loop thread only. ``current``/``total`` are
    written by the worker through :class:`JobContext` under ``_lock``.
    """

    def __init__(
        self, job_id: str, job_type: str, total: int, work: WorkFn, on_finish: FinishFn | None
    ) -> None:
        self.id = job_id
        self.type = job_type
        self.status = JobStatus.CREATED
        self.error: str | None = None
        self._work = work
        self._on_finish = on_finish
        self._lock = threading.Lock()
        self._current = 0
        self._total = total
        self._cancel = threading.Event()
        self._started = False  # a worker took the job (guarded by _lock)
        self._concluded = asyncio.Event()

    def info(self) -> JobInfo:
        """A consistent snapshot of the job (loop thread)."""
        with self._lock:
            current, total = self._current, self._total
        return JobInfo(self.id, self.type, self.status, current, total, self.error)

    @property
    def cancel_requested(self) -> bool:
        """True once :meth:`JobManager.cancel` was called for this job (any thread)."""
        return self._cancel.is_set()

    async def wait(self) -> None:
        """Return once the job has concluded (loop thread)."""
        await self._concluded.wait()


class JobContext:
    """What a work function gets: progress reporting, the cancel flag, loop access.

    Every method is meant to be called from the job's worker thread.
    """

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        self._job = job
        self._loop = loop
        self._loop_thread = loop_thread

    @property
    def job_id(self) -> str:
        return self._job.id

    def cancelled(self) -> bool:
        """True once the job was asked to stop; poll it between chunks of work."""
        return self._job._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if the job was asked to stop."""
        if self._job._cancel.is_set():
            raise JobCancelled()

    def set_total(self, total: int) -> None:
        """Set the expected total of progress bytes (it may change while the job runs)."""
        if total < 0:
            raise ValueError("negative progress total")
        with self._job._lock:
            self._job._total = total

    def advance(self, done: int) -> None:
        """Add ``done`` bytes to the progress; progress never goes backwards."""
        if done < 0:
            raise ValueError("negative progress")
        with self._job._lock:
            self._job._current += done

    def run_on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread, wait for it, and return its result (or raise).

        For steps that must touch loop-owned state (e.g. resizing blocks between the verify
        and load passes). Calling it from the loop thread itself would deadlock: refused.
        """
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("run_on_loop called on the loop thread")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

        self._loop.call_soon_threadsafe(call)
        return fut.result()

    def run_sliced_on_loop(self, steps: Generator[None, None, T]) -> T:
        """Run the generator ``steps`` on the loop thread in slices, wait for it, and return
        what it returns (or raise what it raises).

        Each slice advances it for at most :data:`SLICE_SECONDS` (it should yield after each
        small unit of work), then the loop serves everything else ready before the next
        slice: a step that touches many blocks never holds the loop for long. The loop may
        run other commands between two slices, so each unit must check what it relies on.
        """
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("run_sliced_on_loop called on the loop thread")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def step() -> None:
            deadline = time.monotonic() + SLICE_SECONDS
            try:
                while time.monotonic() < deadline:
                    next(steps)
            except StopIteration as done:
                fut.set_result(done.value)
                return
            except BaseException as e:
                fut.set_exception(e)
                return
            self._loop.call_soon(step)

        if fut.set_running_or_notify_cancel():
            self._loop.call_soon_threadsafe(step)
        return fut.result()


#: ``work(ctx)``: the job's work, run in a worker thread. Returning means success; raising
#: means failure: the job's error is a :class:`RamdError`'s text, an ``OSError``'s
#: ``strerror``, or for anything else :data:`INTERNAL_ERROR_TEXT` (the exception is logged in
#: full; its text, which may describe the daemon's internals, never reaches a client).
WorkFn = Callable[[JobContext], None]
#: ``on_status(job)``: called on the loop thread right after each status change.
StatusFn = Callable[[Job], None]
#: ``on_finish(job)``: called once on the loop thread when the work is over (or will never
#: run), before the job goes to concluded; ``job.error`` is already set if it failed.
FinishFn = Callable[[Job], None]


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, RamdError):
        return exc.desc
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    log.error("job failed unexpectedly", exc_info=exc)
    return INTERNAL_ERROR_TEXT


class _WorkerPool:
    """At most ``size`` daemon threads, started on demand, running jobs in FIFO order.

    A thread is started when a job is submitted and more jobs wait to be taken than threads
    are idle (both counted under the lock; a thread counts as idle from before it waits on the
    queue until it has taken an item). Counting jobs not yet taken, not only idle threads,
    matters: a thread that was just handed a job still counts as idle until it runs, and must
    not be counted again for the next job.
    """

    def __init__(self, size: int, run: Callable[[Job], None]) -> None:
        self._size = size
        self._run = run
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._waiting = 0  # jobs submitted and not yet taken by a thread

    def submit(self, job: Job) -> None:
        with self._lock:
            self._waiting += 1
            if self._waiting > self._idle and len(self._threads) < self._size:
                t = threading.Thread(
                    target=self._worker, name=f"ramd-job-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        self._queue.put(job)

    def stop(self) -> None:
        """Let every thread exit once it is idle (jobs still queued are not run)."""
        with self._lock:
            for _ in self._threads:
                self._queue.put(None)

    def _worker(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._queue.get()
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._waiting -= 1
            if job is None:
                return
            self._run(job)


class JobManager:
    """All jobs of the daemon: start, query, cancel, dismiss, shutdown (loop thread).

    Bounds: at most ``max_active`` jobs not yet concluded (more are refused), at most
    ``workers`` threads, at most ``max_concluded`` concluded jobs kept (the oldest is dismissed
    when one more concludes). Construct it on the loop thread, inside the running loop.
    """

    def __init__(
        self,
        on_status: StatusFn,
        *,
        workers: int = 2,
        max_active: int = 16,
        max_concluded: int = 64,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._on_status = on_status
        self._max_active = max_active
        self._max_concluded = max_concluded
        self._jobs: dict[str, Job] = {}
        self._concluded: collections.deque[Job] = collections.deque()
        self._pool = _WorkerPool(workers, self._run)
        self._next_id = 1
        self._closing = False
        #: Progress bytes of the concluded jobs, dismissed or not, by job type.
        self._concluded_bytes: dict[str, int] = {}

    # -- commands (loop thread) ----------------------------------------------------------

    def start(
        self,
        job_type: str,
        work: WorkFn,
        *,
        total: int = 0,
        on_finish: FinishFn | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Create a job (status created, announced) and queue its work for a worker.

        ``job_id`` defaults to the next free ``jobN``. Refused (:class:`RamdError`): an
        invalid or used id, ``max-jobs`` active jobs already, or a manager shutting down.
        """
        if self._closing:
            raise RamdError("Cannot start a job: shutting down")
        active = len(self._jobs) - len(self._concluded)
        if active >= self._max_active:
            raise RamdError(f"Too many jobs: max-jobs {self._max_active} are running")
        if job_id is None:
            while f"job{self._next_id}" in self._jobs:
                self._next_id += 1
            job_id = f"job{self._next_id}"
            self._next_id += 1
        elif not _ID_RE.match(job_id):
            raise RamdError(f"Invalid job ID '{job_id}'")
        elif job_id in self._jobs:
            raise RamdError(f"Job ID '{job_id}' already in use")
        job = Job(job_id, job_type, total, work, on_finish)
        self._jobs[job_id] = job
        self._notify(job)
        self._pool.submit(job)
        return job

    def get(self, job_id: str) -> Job:
        """The job with this id (not dismissed), else :class:`RamdError` "Job not found"."""
        job = self._jobs.get(job_id)
        if job is None:
            raise RamdError("Job not found")
        return job

    def query(self) -> list[JobInfo]:
        """Every job not dismissed, in creation order."""
        return [j.info() for j in self._jobs.values()]

    def bytes_by_type(self) -> dict[str, int]:
        """Progress bytes of every job this manager ran, by job type: those that concluded
        (kept when dismissed) plus the current progress of the others. Never decreases."""
        out = dict(self._concluded_bytes)
        for job in self._jobs.values():
            if job.status != JobStatus.CONCLUDED:
                out[job.type] = out.get(job.type, 0) + job.info().current_progress
        return out

    def cancel(self, job_id: str) -> None:
        """Ask a job to stop (QEMU's ``job-cancel``); allowed while created or running."""
        job = self.get(job_id)
        self._check_verb(job, "cancel", (JobStatus.CREATED, JobStatus.RUNNING))
        with job._lock:
            job._cancel.set()
            started = job._started
        if not started:
            self._finish(job, JobCancelled())

    def dismiss(self, job_id: str) -> None:
        """Forget a concluded job (QEMU's ``job-dismiss``): it goes to null and is removed."""
        job = self.get(job_id)
        self._check_verb(job, "dismiss", (JobStatus.CONCLUDED,))
        self._concluded.remove(job)
        self._drop(job)

    def stop(self, *, cancel: bool = True) -> None:
        """Stop taking jobs and cancel (unless ``cancel`` is false) every active job, without
        waiting (idempotent; :meth:`shutdown` waits)."""
        self._closing = True
        if cancel:
            for job in list(self._jobs.values()):
                if job.status in (JobStatus.CREATED, JobStatus.RUNNING):
                    self.cancel(job.id)

    async def shutdown(self, grace: float, *, cancel: bool = True) -> list[str]:
        """:meth:`stop`, then wait up to ``grace`` seconds for the active jobs to conclude.

        Returns the ids of the jobs that had not concluded by then (abandoned: their work may
        still run, their ``on_finish`` has not run). The worker threads exit once idle.
        """
        self.stop(cancel=cancel)
        pending = [j for j in self._jobs.values() if j.status != JobStatus.CONCLUDED]
        if pending:
            waits = [asyncio.ensure_future(j.wait()) for j in pending]
            _, not_done = await asyncio.wait(waits, timeout=grace)
            for w in not_done:
                w.cancel()
        self._pool.stop()
        return [j.id for j in pending if j.status != JobStatus.CONCLUDED]

    # -- worker side -----------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        """Worker thread: run one job's work unless it was cancelled before it started."""
        with job._lock:
            if job._cancel.is_set():
                return
            job._started = True
        self._post(self._started, job)
        exc: BaseException | None = None
        try:
            job._work(JobContext(job, self._loop, self._loop_thread))
        except Exception as e:
            exc = e
        self._post(self._finish, job, exc)

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        """Worker thread: schedule ``fn(*args)`` on the loop thread, in call order."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            log.warning("job finished after its event loop closed")

    # -- transitions (loop thread) ---------------------------------------------------------

    def _started(self, job: Job) -> None:
        if job.status == JobStatus.CREATED:
            self._set(job, JobStatus.RUNNING)

    def _finish(self, job: Job, exc: BaseException | None) -> None:
        if exc is not None:
            job.error = CANCELED_TEXT if job._cancel.is_set() else _error_text(exc)
        if job._on_finish is not None:
            try:
                job._on_finish(job)
            except Exception as e:
                log.error("on_finish of job %s failed", job.id, exc_info=e)
                job.error = job.error or _error_text(e)
        if job.error is not None:
            self._set(job, JobStatus.ABORTING)
        done = job.info().current_progress
        self._concluded_bytes[job.type] = self._concluded_bytes.get(job.type, 0) + done
        self._set(job, JobStatus.CONCLUDED)
        job._concluded.set()
        self._concluded.append(job)
        while len(self._concluded) > self._max_concluded:
            self._drop(self._concluded.popleft())

    def _drop(self, job: Job) -> None:
        self._set(job, JobStatus.NULL)
        del self._jobs[job.id]

    def _set(self, job: Job, status: JobStatus) -> None:
        job.status = status
        self._notify(job)

    def _notify(self, job: Job) -> None:
        try:
            self._on_status(job)
        except Exception as e:
            log.error("on_status of job %s failed", job.id, exc_info=e)

    @staticmethod
    def _check_verb(job: Job, verb: str, allowed: tuple[JobStatus, ...]) -> None:
        if job.status not in allowed:
            raise RamdError(
                f"Job '{job.id}' in state '{job.status}' cannot accept command verb '{verb}'"
            )
