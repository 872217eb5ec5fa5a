"""The request pipeline of one connection: queued messages -> plans -> outcomes -> output.

Order: messages are answered one at a time, in arrival order; the calls of a batch run one
after the other; nothing runs while an outcome is pending (work in a thread, a replay waiting
for the client) or while the output is backed up (the client does not read). All of that is
one state, held here, and one function advances it (:meth:`Pipeline.run`), whether from the
connection's read callback (inline, which saves a task switch per request) or from the
connection's task. Since ``run`` refuses to start anything while an outcome is pending, an
answer can neither be lost nor overtaken, whatever the event loop delivers in one iteration.

Cost: one ``run`` stops after ``budget`` seconds of work (at least one call), so no
connection keeps the loop from other clients, or from the watchdog, for more than a few ms;
the connection's task then yields and carries on. Input is bounded by the connection (it
stops reading while :meth:`Pipeline.full`).

Ownership and thread: owned by its connection; loop thread only.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque

from ramd.api.outcome import Pending
from ramd.transport.dialect import Dialect, Plan
from ramd.transport.output import Output, close_fds
from ramd.transport.splitter import SplitError

log = logging.getLogger("ramd.connection")

#: Complete messages queued before the connection stops reading from its socket.
INBOX_MAX = 64
#: Bytes of complete messages queued before the connection stops reading.
INBOX_BYTES = 1024 * 1024
#: Seconds of work one turn of the pipeline may take before it yields to the loop.
BUDGET = 0.002


class State(enum.Enum):
    """Why :meth:`Pipeline.run` returned."""

    IDLE = "nothing queued"
    YIELD = "budget spent, more to do"
    OUTPUT = "waiting for the client to read"
    PENDING = "waiting for an outcome"


class Pipeline:
    """Queued messages of one connection and the plan in progress."""

    __slots__ = ("_dialect", "_output", "_plan", "inbox", "inbox_bytes", "pending")

    def __init__(self, dialect: Dialect, output: Output) -> None:
        self._dialect = dialect
        self._output = output
        self.inbox: deque[bytes | bytearray | SplitError] = deque()
        self.inbox_bytes = 0
        self._plan: Plan | None = None
        #: The outcome the plan in progress waits for; set only by :meth:`run`.
        self.pending: Pending | None = None

    def push(self, item: bytes | bytearray | SplitError) -> None:
        self.inbox.append(item)
        self.inbox_bytes += 0 if isinstance(item, SplitError) else len(item)

    @property
    def full(self) -> bool:
        return len(self.inbox) >= INBOX_MAX or self.inbox_bytes > INBOX_BYTES

    @property
    def busy(self) -> bool:
        """A message is being answered (its plan started and not yet finished)."""
        return self._plan is not None

    def run(self, budget: float = BUDGET, start: bool = True) -> State:
        """Advance: answer queued messages until nothing is queued, an outcome is pending,
        the output backs up, or ``budget`` seconds are spent (at least one call runs).
        With ``start`` False, only the message in progress is finished (shutdown).

        The output is checked before each message starts, so at most one answer waits in
        it. A message's answer is written as soon as its last call ran, before anything
        else can run on the loop, so that no event of another connection goes before an
        answer that predates it. The clock is read once per turn, after each call and after
        each message that others wait behind."""
        if self.pending is not None:
            return State.PENDING
        deadline = time.perf_counter() + budget
        output = self._output
        dialect = self._dialect
        inbox = self.inbox
        while True:
            plan = self._plan
            if plan is None:
                if output.backed_up:
                    return State.OUTPUT
                if not (inbox and start):
                    return State.IDLE
                item = inbox.popleft()
                answer: bytes | Plan | None
                try:
                    if isinstance(item, SplitError):
                        answer = dialect.split_error(item)
                    else:
                        self.inbox_bytes -= len(item)
                        answer = dialect.handle(item)
                except MemoryError:
                    answer = dialect.no_memory()
                if answer is None or isinstance(answer, bytes):
                    if answer:
                        output.write(answer)
                    if inbox and time.perf_counter() > deadline:
                        return State.YIELD
                    continue
                self._plan = plan = answer
            elif output.backed_up and not plan.done:
                # a plan whose calls all ran is answered now, even behind a backed-up
                # output: events queued meanwhile must not go before its answer
                return State.OUTPUT
            while (outcome := plan.step()) is not None:
                if isinstance(outcome, Pending):
                    self.pending = outcome
                    return State.PENDING
                plan.record(outcome)
                # never between the last call and the answer: events of other
                # connections would overtake it (a get-fd answer behind the shrink it
                # predates, its size then larger than the file)
                if not plan.done and time.perf_counter() > deadline:
                    return State.YIELD
            self._plan = None
            reply = plan.finish()
            if reply:
                output.write(reply, plan.fds)
            else:
                close_fds(plan.fds)
            if inbox and time.perf_counter() > deadline:
                return State.YIELD

    async def settle(self) -> None:
        """Await the pending outcome and record it; the plan can then go on."""
        pending = self.pending
        assert pending is not None and self._plan is not None
        final = await pending.result
        self.pending = None
        self._plan.record(final)

    def clear(self) -> None:
        """Drop queued input (the connection closed); a pending outcome still settles."""
        self.inbox.clear()
        self.inbox_bytes = 0
