"""The shared-block load as a benchmark: N client processes (default 32) run the mixed
workload of tests/shared_load_client.py (add/resize/del, get-fd + MAP_SHARED mapping with
every mapper touching its whole range after every event, acknowledgements, put-fd,
write/read round trips, save/load of their own blocks) against a fresh daemon on each event
loop; one table per loop: answers, answers/s and p50/p99 latency per method, the outcomes,
and the counts that must be 0 (SIGBUS, lost answers, -32603, data mismatches).

    .venv/bin/python bench/shared_load.py [--clients 32] [--seconds 20] [--seed 1]
        [--loops asyncio,uvloop]

Exits 1 if any of those counts is not 0.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from servers import stop, wait_socket  # noqa: E402
from shared_load_run import run_load, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args()
    failed = False
    for loop in args.loops.split(","):
        tmp = Path(tempfile.mkdtemp(prefix="ramd-bench-", dir="/dev/shm"))
        cfg = tmp / "ramd.toml"
        cfg.write_text(
            f'memory-dir = "{tmp}/mem"\nstate-dir = "{tmp}/state"\nlog-level = "warning"\n'
            "[limits]\nack-timeout = 30\nmax-connections = 1024\n"
        )
        (tmp / "state").mkdir()
        sock = tmp / "ramd.sock"
        cmd = [sys.executable, "-m", "ramd", "--socket", str(sock), "--config", str(cfg)]
        proc = subprocess.Popen([*cmd, "--event-loop", loop])
        try:
            wait_socket(sock, proc)
            result = run_load(sock, args.clients, args.seconds, args.seed)
            alive = proc.poll() is None
        finally:
            stop([proc])
            shutil.rmtree(tmp)
        print(table(result, f"shared load, {loop}"))
        print(f"daemon alive at the end: {alive}\n")
        failed |= any(result.zeros().values()) or not alive
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
