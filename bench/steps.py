"""CPU per step of one ``query-version``, in-process, for each dialect (a table).

Run as ``python bench/steps.py``. Each step is timed with the thread's CPU clock (so time
the process spends waiting for a CPU on a loaded machine does not count), as the best of 7
runs of 20,000 calls: the splitter on the request line, the strict JSON parse, the command's
dispatch (validation, handler, result serialization) and the dialect's whole answer (parse,
checks, dispatch, wire text; through the plan when the dialect makes one). Compare commits by
running it from each checkout in turn; absolute values depend on the machine's load.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from typing import Any

from ramd.api import dispatch
from ramd.api.service import Service, Session
from ramd.transport.protocol import jsontext
from ramd.transport.protocol.jsonrpc import JsonRpcDialect
from ramd.transport.protocol.qmp import QmpDialect
from ramd.transport.protocol.splitter import JsonSplitter

REQUESTS = {
    "qmp": b'{"execute":"query-version","id":7}',
    "jsonrpc": b'{"jsonrpc":"2.0","method":"query-version","id":7}',
}


class _NoEvents:
    def send_event(self, event: Any, live: bool = True) -> None:
        pass


def _cpu_us(fn: Callable[[], object], number: int = 20_000) -> float:
    runs = timeit.repeat(fn, number=number, repeat=7, timer=time.thread_time)
    return min(runs) / number * 1e6


def measure(dialect_name: str) -> dict[str, float]:
    session = Session(Service(), _NoEvents(), peer="bench")
    message = REQUESTS[dialect_name]
    dialect: Any
    if dialect_name == "qmp":
        dialect = QmpDialect(session)
        dialect.negotiated = True
    else:
        dialect = JsonRpcDialect(session)
    splitter = JsonSplitter()
    line = message + b"\n"

    def answer() -> object:
        plan = dialect.handle(message)
        if plan is None or isinstance(plan, bytes):
            return plan
        while (outcome := plan.step()) is not None:
            plan.record(outcome)
        return plan.finish()

    first = answer()
    assert isinstance(first, bytes) and b"micro" in first, first
    return {
        "split": _cpu_us(lambda: splitter.feed(line)),
        "parse": _cpu_us(lambda: jsontext.loads(message)),
        "dispatch": _cpu_us(lambda: dispatch.call(session, "query-version", {})),
        "answer": _cpu_us(answer),
    }


def main() -> None:
    print("| step (CPU µs per request) | QMP | JSON-RPC |")
    print("|---|---:|---:|")
    results = {name: measure(name) for name in REQUESTS}
    for step in ("split", "parse", "dispatch", "answer"):
        print(f"| {step} | {results['qmp'][step]:.2f} | {results['jsonrpc'][step]:.2f} |")


if __name__ == "__main__":
    main()
