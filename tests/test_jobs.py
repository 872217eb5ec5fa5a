"""ramd.jobs on a real asyncio loop with real worker threads: QEMU's job statuses, progress,
cancel, dismiss, the concluded-jobs bound, the thread bound and shutdown with a grace."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable, Generator

import pytest

from ramd.errors import RamdError
from ramd.jobs import (
    INTERNAL_ERROR_TEXT,
    Job,
    JobCancelled,
    JobContext,
    JobManager,
    JobStatus,
)

TIMEOUT = 60  # generous: the machine is shared and loaded


class Recorder:
    """Collects (job id, status, thread) of every status change the manager announces."""

    def __init__(self) -> None:
        self.events: list[tuple[str, JobStatus]] = []
        self.threads: set[int] = set()

    def __call__(self, job: Job) -> None:
        self.events.append((job.id, job.status))
        self.threads.add(threading.get_ident())

    def of(self, job_id: str) -> list[JobStatus]:
        return [s for i, s in self.events if i == job_id]


def _wait_in_thread(event: threading.Event) -> None:
    assert event.wait(TIMEOUT), "test gate never opened"


async def _concluded(job: Job) -> None:
    await asyncio.wait_for(job.wait(), TIMEOUT)


async def test_success_goes_created_running_concluded_with_monotone_progress() -> None:
    rec = Recorder()
    jobs = JobManager(rec)
    step = [threading.Event() for _ in range(5)]
    stepped = [threading.Event() for _ in range(5)]
    work_thread: list[int] = []

    def work(ctx: JobContext) -> None:
        work_thread.append(threading.get_ident())
        ctx.set_total(5 * 1000)
        for i in range(5):
            _wait_in_thread(step[i])
            ctx.advance(1000)
            stepped[i].set()

    job = jobs.start("snapshot-save", work)
    assert job.id == "job1"
    assert rec.of("job1") == [JobStatus.CREATED]
    seen = []
    for i in range(5):
        step[i].set()
        await asyncio.to_thread(_wait_in_thread, stepped[i])
        info = jobs.get("job1").info()
        seen.append(info.current_progress)
        assert info.total_progress == 5000 and info.error is None
    await _concluded(job)
    assert seen == [1000, 2000, 3000, 4000, 5000]
    assert rec.of("job1") == [JobStatus.CREATED, JobStatus.RUNNING, JobStatus.CONCLUDED]
    assert rec.threads == {threading.get_ident()}  # status changes: on the loop thread only
    assert work_thread and work_thread[0] != threading.get_ident()
    assert jobs.query()[0].status == JobStatus.CONCLUDED


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (RamdError("Size too large: ram0: 0x2000 > 0x1000: Invalid argument"), None),
        (OSError(errno.ENOSPC, "ignored"), "No space left on device"),
        (RecursionError("maximum recursion depth exceeded in the daemon"), INTERNAL_ERROR_TEXT),
        (ValueError("Exceeds the limit (4300 digits)"), INTERNAL_ERROR_TEXT),
    ],
)
async def test_failure_goes_through_aborting_with_the_error_text(
    exc: Exception, text: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    jobs = JobManager(rec)

    def work(ctx: JobContext) -> None:
        raise exc

    job = jobs.start("snapshot-load", work)
    await _concluded(job)
    assert rec.of(job.id) == [
        JobStatus.CREATED,
        JobStatus.RUNNING,
        JobStatus.ABORTING,
        JobStatus.CONCLUDED,
    ]
    assert job.info().error == (text or str(exc))
    if text == INTERNAL_ERROR_TEXT:  # the details are for the log only
        assert str(exc) in caplog.text


async def test_cancel_while_running_stops_the_work_between_chunks() -> None:
    rec = Recorder()
    jobs = JobManager(rec)
    started = threading.Event()
    chunks: list[int] = []

    def work(ctx: JobContext) -> None:
        started.set()
        while True:
            ctx.check_cancelled()
            chunks.append(1)
            ctx.advance(1)
            threading.Event().wait(0.001)

    job = jobs.start("snapshot-save", work)
    await asyncio.to_thread(_wait_in_thread, started)
    jobs.cancel(job.id)
    assert job.status == JobStatus.RUNNING  # as in QEMU, cancel only sets the flag
    jobs.cancel(job.id)  # asking again is harmless
    await _concluded(job)
    assert rec.of(job.id) == [
        JobStatus.CREATED,
        JobStatus.RUNNING,
        JobStatus.ABORTING,
        JobStatus.CONCLUDED,
    ]
    assert job.info().error == "Operation canceled"
    n = len(chunks)
    await asyncio.sleep(0.05)
    assert len(chunks) == n  # the work really stopped


async def test_a_job_cancelled_before_a_worker_took_it_never_runs() -> None:
    rec = Recorder()
    jobs = JobManager(rec, workers=1)
    gate = threading.Event()
    ran: list[str] = []
    first = jobs.start("a", lambda ctx: _wait_in_thread(gate))
    second = jobs.start("b", lambda ctx: ran.append(ctx.job_id))
    jobs.cancel(second.id)
    assert second.status == JobStatus.CONCLUDED  # at once: nothing of it ever ran
    assert rec.of(second.id) == [JobStatus.CREATED, JobStatus.ABORTING, JobStatus.CONCLUDED]
    assert second.info().error == "Operation canceled"
    gate.set()
    await _concluded(first)
    third = jobs.start("c", lambda ctx: ran.append(ctx.job_id))
    await _concluded(third)
    assert ran == [third.id]  # the worker skipped the cancelled job


async def test_verbs_in_the_wrong_state_and_unknown_jobs_are_refused() -> None:
    jobs = JobManager(Recorder())
    gate = threading.Event()
    job = jobs.start("a", lambda ctx: _wait_in_thread(gate))
    with pytest.raises(RamdError) as e:
        jobs.dismiss(job.id)
    assert e.value.desc in (
        "Job 'job1' in state 'created' cannot accept command verb 'dismiss'",
        "Job 'job1' in state 'running' cannot accept command verb 'dismiss'",
    )
    gate.set()
    await _concluded(job)
    with pytest.raises(RamdError) as e:
        jobs.cancel(job.id)
    assert e.value.desc == "Job 'job1' in state 'concluded' cannot accept command verb 'cancel'"
    with pytest.raises(RamdError) as e:
        jobs.get("nope")
    assert e.value.desc == "Job not found"
    with pytest.raises(RamdError) as e:
        jobs.start("a", lambda ctx: None, job_id="job1")
    assert e.value.desc == "Job ID 'job1' already in use"
    with pytest.raises(RamdError) as e:
        jobs.start("a", lambda ctx: None, job_id="1bad")
    assert e.value.desc == "Invalid job ID '1bad'"


async def test_dismiss_forgets_a_concluded_job_with_a_null_status() -> None:
    rec = Recorder()
    jobs = JobManager(rec)
    job = jobs.start("a", lambda ctx: None)
    await _concluded(job)
    jobs.dismiss(job.id)
    assert rec.of(job.id)[-2:] == [JobStatus.CONCLUDED, JobStatus.NULL]
    assert jobs.query() == []
    with pytest.raises(RamdError, match=r"^Job not found$"):
        jobs.dismiss(job.id)


async def test_at_most_64_concluded_jobs_are_kept_oldest_dismissed_first() -> None:
    rec = Recorder()
    jobs = JobManager(rec)
    for _ in range(70):
        await _concluded(jobs.start("a", lambda ctx: None))
    ids = [i.id for i in jobs.query()]
    assert ids == [f"job{n}" for n in range(7, 71)]
    nulls = [i for i, s in rec.events if s == JobStatus.NULL]
    assert nulls == [f"job{n}" for n in range(1, 7)]


async def test_active_jobs_and_worker_threads_are_bounded() -> None:
    jobs = JobManager(Recorder(), workers=2, max_active=4)
    gate = threading.Event()
    lock = threading.Lock()
    running = peak = 0
    names: set[str] = set()

    def work(ctx: JobContext) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        _wait_in_thread(gate)
        with lock:
            running -= 1

    started = [jobs.start("a", work) for _ in range(4)]
    with pytest.raises(RamdError) as e:
        jobs.start("a", work)
    assert e.value.desc == "Too many jobs: max-jobs 4 are running"
    for _ in range(TIMEOUT * 100):  # until both workers hold a job
        if peak == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert [j.status for j in started].count(JobStatus.CREATED) == 2  # queued, not running
    gate.set()
    for job in started:
        await _concluded(job)
    assert peak == 2 and len(names) == 2
    await _concluded(jobs.start("a", work))  # room again once they concluded


async def test_two_jobs_submitted_to_one_idle_worker_get_two_threads() -> None:
    """An idle worker counts as idle until it runs: the second of two jobs submitted at once
    must get a thread of its own, not wait behind the first (it used to, when the worker had
    not yet taken the first job)."""
    jobs = JobManager(Recorder(), workers=2, max_active=4)
    await _concluded(jobs.start("a", lambda ctx: None))  # one worker, now idle
    gate = threading.Event()
    both = threading.Barrier(2)

    def work(ctx: JobContext) -> None:
        both.wait(TIMEOUT)  # breaks (and fails the job) unless both run at once
        _wait_in_thread(gate)

    pair = [jobs.start("a", work), jobs.start("a", work)]  # back to back, no await between
    try:
        for _ in range(TIMEOUT * 100):
            if all(j.status is JobStatus.RUNNING for j in pair) and both.n_waiting == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        gate.set()
    for job in pair:
        await _concluded(job)
    assert [j.error for j in pair] == [None, None]


async def test_on_finish_runs_on_the_loop_before_concluded_is_announced() -> None:
    order: list[str] = []
    loop_thread = threading.get_ident()

    def on_status(job: Job) -> None:
        order.append(job.status.value)

    def on_finish(job: Job) -> None:
        assert threading.get_ident() == loop_thread
        order.append(f"finish:{job.error}")

    jobs = JobManager(on_status)
    await _concluded(jobs.start("a", lambda ctx: None, on_finish=on_finish))
    assert order == ["created", "running", "finish:None", "concluded"]


async def test_run_on_loop_runs_a_step_on_the_loop_thread_from_the_worker() -> None:
    jobs = JobManager(Recorder())
    loop_thread = threading.get_ident()
    results: list[object] = []

    def boom() -> int:
        raise RamdError("refused on the loop")

    def work(ctx: JobContext) -> None:
        results.append(ctx.run_on_loop(threading.get_ident) == loop_thread)
        try:
            ctx.run_on_loop(boom)
        except RamdError as e:
            results.append(e.desc)

    await _concluded(jobs.start("a", work))
    assert results == [True, "refused on the loop"]
    ctx = JobContext(jobs.get("job1"), asyncio.get_running_loop(), loop_thread)
    with pytest.raises(RuntimeError, match=r"on the loop thread"):
        ctx.run_on_loop(lambda: None)


def _cooperative(started: threading.Event) -> Callable[[JobContext], None]:
    def work(ctx: JobContext) -> None:
        started.set()
        while not ctx.cancelled():
            threading.Event().wait(0.001)
        raise JobCancelled()

    return work


async def test_shutdown_cancels_jobs_and_names_those_still_running_after_the_grace() -> None:
    rec = Recorder()
    jobs = JobManager(rec, workers=3)
    polite_started, stuck_started, release = threading.Event(), threading.Event(), threading.Event()

    def stuck(ctx: JobContext) -> None:
        stuck_started.set()
        _wait_in_thread(release)  # ignores the cancel flag

    polite = jobs.start("a", _cooperative(polite_started))
    hung = jobs.start("b", stuck)
    await asyncio.to_thread(_wait_in_thread, polite_started)
    await asyncio.to_thread(_wait_in_thread, stuck_started)
    abandoned = await jobs.shutdown(5.0)  # ample for the polite job, even on a loaded machine
    assert abandoned == [hung.id]
    assert polite.status == JobStatus.CONCLUDED
    assert polite.info().error == "Operation canceled"
    assert hung.status == JobStatus.RUNNING
    with pytest.raises(RamdError, match=r"^Cannot start a job: shutting down$"):
        jobs.start("c", lambda ctx: None)
    release.set()
    await _concluded(hung)  # it ends on its own later, and is still recorded
    # It never polled the flag and did all its work: a cancel it never saw changes nothing.
    assert hung.info().error is None


async def test_shutdown_without_cancel_lets_jobs_finish_within_the_grace() -> None:
    jobs = JobManager(Recorder())
    gate = threading.Event()
    job = jobs.start("a", lambda ctx: _wait_in_thread(gate))
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, gate.set)
    assert await jobs.shutdown(TIMEOUT, cancel=False) == []
    assert job.status == JobStatus.CONCLUDED and job.info().error is None


async def test_stop_cancels_at_once_and_refuses_new_jobs() -> None:
    """The daemon stops its jobs as SIGTERM arrives, while connections finish their commands,
    so both share one grace."""
    jobs = JobManager(Recorder())
    started = threading.Event()
    job = jobs.start("a", _cooperative(started))
    await asyncio.to_thread(_wait_in_thread, started)
    jobs.stop()
    await _concluded(job)  # no shutdown() call: stop() alone cancelled it
    assert job.info().error == "Operation canceled"
    with pytest.raises(RamdError, match=r"^Cannot start a job: shutting down$"):
        jobs.start("b", lambda ctx: None)
    jobs.stop()  # idempotent
    assert await jobs.shutdown(0) == []


async def test_sliced_work_on_the_loop_lets_other_callbacks_run_between_slices() -> None:
    jobs = JobManager(Recorder())
    loop = asyncio.get_running_loop()
    order: list[str] = []

    def steps() -> Generator[None, None, int]:
        for i in range(3):
            order.append(f"step{i}")
            loop.call_soon(order.append, f"other{i}")
            time.sleep(0.003)  # each step outlasts a slice: the next one waits a turn
            yield
        return 42

    result: list[int] = []
    job = jobs.start("snapshot-load", lambda ctx: result.append(ctx.run_sliced_on_loop(steps())))
    await _concluded(job)
    assert result == [42]
    assert order == ["step0", "other0", "step1", "other1", "step2", "other2"]
