"""Run the shared-block load (``shared_load_client.py``, one process per client) against a
daemon and sum up what the clients saw: for tests/test_shared_load.py and
bench/shared_load.py.

Each client is a process of its own so that a ``SIGBUS`` kills only that client: its exit
status (``-SIGBUS``) is counted here, beside the counts it prints when it ends normally.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIENT = Path(__file__).resolve().parent / "shared_load_client.py"


@dataclass
class LoadResult:
    clients: int
    seconds: float
    #: exit status of each client process
    returncodes: list[int] = field(default_factory=list)
    #: summed over the clients that reported
    counts: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    #: stderr of the clients that did not report
    failures: list[str] = field(default_factory=list)

    @property
    def sigbus(self) -> int:
        return sum(1 for rc in self.returncodes if rc == -signal.SIGBUS)

    def zeros(self) -> dict[str, int]:
        """What must be 0 after a run."""
        return {
            "SIGBUS exits": self.sigbus,
            "other failed clients": len(self.failures) - self.sigbus,
            "lost answers": self.counts.get("sent", 0) - self.counts.get("answered", 0),
            "-32603 answers": self.counts.get("internal", 0),
            "data mismatches": self.counts.get("mismatch", 0),
            "unexpected answers": self.counts.get("unexpected", 0),
            "disconnections": self.counts.get("disconnected", 0),
            "stray fds": self.counts.get("stray fds", 0),
        }


def run_load(
    socket_path: Path, clients: int = 32, seconds: float = 20.0, seed: int = 1, shared_ids: int = 6
) -> LoadResult:
    """Start ``clients`` client processes at once, each running for ``seconds``, and
    collect them (each is given ``seconds`` + 240 s to end before it is killed)."""
    if not 1 <= clients <= 64:
        raise ValueError("1 to 64 clients (two slots of 32 bytes or more per page each)")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(CLIENT),
                str(socket_path),
                *map(str, (i, clients, seed)),
                *map(str, (seconds, shared_ids)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(clients)
    ]
    t0 = time.monotonic()
    result = LoadResult(clients, seconds)
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, seconds + 240 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        result.returncodes.append(p.returncode)
        if p.returncode != 0:
            result.failures.append(f"client exit {p.returncode}: {err.decode()[-2000:]}")
            continue
        _add(result, json.loads(out))
    result.seconds = time.monotonic() - t0
    return result


def _add(result: LoadResult, report: dict[str, Any]) -> None:
    for name in ("counts", "ops", "outcomes"):
        total: dict[str, int] = getattr(result, name)
        for k, v in report[name].items():
            total[k] = total.get(k, 0) + v
    for k, samples in report["latency"].items():
        result.latency.setdefault(k, []).extend(samples)
    result.unexpected += [f"client {report['index']}: {u}" for u in report["unexpected"]]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(result: LoadResult, title: str) -> str:
    """The figures of a run: requests per method (answers, rate, p50/p99 latency), the
    outcomes, the client-side counts and the zeros."""
    lines = [f"{title}: {result.clients} clients, {result.seconds:.1f} s"]
    lines.append(f"{'method':22}{'answers':>9}{'per s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for method in sorted(result.latency):
        samples = result.latency[method]
        lines.append(
            f"{method:22}{len(samples):9d}{len(samples) / result.seconds:8.0f}"
            f"{percentile(samples, 0.5) * 1e3:9.2f}{percentile(samples, 0.99) * 1e3:9.2f}"
        )
    lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in sorted(result.ops.items())))
    lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items())))
    lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
    lines.append("zeros: " + ", ".join(f"{k} {v}" for k, v in result.zeros().items()))
    lines += result.unexpected[:20] + result.failures[:5]
    return "\n".join(lines)
