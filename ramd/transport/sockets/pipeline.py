"""The request pipeline of one connection: queued messages -> plans -> outcomes -> output.

Order: messages are answered one at a time, in arrival order; the calls of a batch run one
after the other; nothing runs while an outcome is pending (work in a thread, a replay waiting
for the client) or while the output is backed up (the client does not read). All of that is
one state, held here, and one function advances it (:meth:`Pipeline.run`), whether from the
connection's read callback (inline, which saves a task switch per request) or from the
connection's task. Since ``run`` refuses to start anything while an outcome is pending, an
answer can neither be lost nor overtaken, whatever the event loop delivers in one iteration.

Received fds (docs/protocol.md §11: an fd is kept only for a ``getfd`` in the same message): the
connection hands over the fds of each read with the messages that read has bytes of
(:meth:`Pipeline.push_fds`), as one group: the fds are offered to ``getfd`` from when the
group's first message starts until its last one is answered, then the ones left are closed.
Which messages a read has bytes of is all the connection can tell (the kernel attaches fds
to the first byte of a ``sendmsg``, and one read may end with the start of such a send): the
messages completed in the read, the one still incomplete at its end, or, for a read of
whitespace only (``qemu.qmp``'s ``send_fd_scm`` sends one space with the fd), the next one.
At most ``MAX_RECEIVED_FDS`` wait at once; more are closed on arrival.

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
from ramd.transport.protocol.dialect import Dialect, Plan
from ramd.transport.protocol.splitter import SplitError
from ramd.transport.sockets.output import Output, close_fds

log = logging.getLogger("ramd.connection")

#: Complete messages queued before the connection stops reading from its socket.
INBOX_MAX = 64
#: Bytes of complete messages queued before the connection stops reading.
INBOX_BYTES = 1024 * 1024
#: Seconds of work one turn of the pipeline may take before it yields to the loop.
BUDGET = 0.002
#: Received fds one connection keeps at once for ``getfd``; more are closed on arrival.
MAX_RECEIVED_FDS = 4


class State(enum.Enum):
    """Why :meth:`Pipeline.run` returned."""

    IDLE = "nothing queued"
    YIELD = "budget spent, more to do"
    OUTPUT = "waiting for the client to read"
    PENDING = "waiting for an outcome"


class Pipeline:
    """Queued messages of one connection and the plan in progress."""

    __slots__ = (
        "_dialect",
        "_fd_count",
        "_groups",
        "_offered",
        "_offered_until",
        "_output",
        "_plan",
        "_popped",
        "_pushed",
        "inbox",
        "inbox_bytes",
        "pending",
    )

    def __init__(self, dialect: Dialect, output: Output) -> None:
        self._dialect = dialect
        self._output = output
        self.inbox: deque[bytes | bytearray | SplitError] = deque()
        self.inbox_bytes = 0
        self._plan: Plan | None = None
        #: The outcome the plan in progress waits for; set only by :meth:`run`.
        self.pending: Pending | None = None
        self._pushed = 0  # messages pushed so far (a message's number is its rank, from 1)
        self._popped = 0  # messages started so far: the one in progress is number _popped
        # Received fds: groups waiting for their first message (first, last, fds), and the
        # fds offered to the message in progress until message _offered_until is answered.
        self._groups: deque[tuple[int, int, list[int]]] = deque()
        self._offered: list[int] = []
        self._offered_until = 0
        self._fd_count = 0  # fds in _groups and _offered

    def push(self, item: bytes | bytearray | SplitError) -> None:
        self.inbox.append(item)
        self._pushed += 1
        self.inbox_bytes += 0 if isinstance(item, SplitError) else len(item)

    def push_fds(self, fds: list[int], completed: int, incomplete: bool) -> None:
        """fds that came with a read: ``completed`` messages were just pushed from it and,
        if ``incomplete``, another one began in it. With neither, they go with the next
        message. Owned here from now on."""
        room = MAX_RECEIVED_FDS - self._fd_count
        close_fds(fds[room:])
        fds = fds[:room]
        if not fds:
            return
        first = self._pushed - completed + 1
        last = self._pushed + (1 if incomplete or not completed else 0)
        self._groups.append((first, last, fds))
        self._fd_count += len(fds)

    def take_fd(self) -> int | None:
        """The first fd offered to the message in progress (now the caller's), or None."""
        if not self._offered:
            return None
        self._fd_count -= 1
        return self._offered.pop(0)

    def _started(self) -> None:
        """A message starts: offer it the fds of the groups it belongs to."""
        self._popped += 1
        groups = self._groups
        while groups and groups[0][0] <= self._popped:
            _, last, fds = groups.popleft()
            self._offered += fds
            self._offered_until = max(self._offered_until, last)

    def _answered(self) -> None:
        """The message in progress is answered: close the fds no later message may take."""
        if self._offered and self._popped >= self._offered_until:
            self._fd_count -= len(self._offered)
            close_fds(self._offered)
            self._offered = []

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
                self._started()
                answer: bytes | Plan | None
                try:
                    if isinstance(item, SplitError):
                        memory = item.kind == "memory"
                        answer = dialect.no_memory() if memory else dialect.split_error(item)
                    else:
                        self.inbox_bytes -= len(item)
                        answer = dialect.handle(item)
                except MemoryError:
                    answer = dialect.no_memory()
                if answer is None or isinstance(answer, bytes):
                    self._answered()
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
            self._answered()
            reply = plan.finish()
            if reply:
                output.write(reply, plan.fds, plan.fds_failed)
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
        """Drop queued input and received fds (the connection closed); a pending outcome
        still settles."""
        self.inbox.clear()
        self.inbox_bytes = 0
        for _, _, fds in self._groups:
            close_fds(fds)
        self._groups.clear()
        close_fds(self._offered)
        self._offered = []
        self._fd_count = 0
