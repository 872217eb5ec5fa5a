"""The daemon process keeps out what it never uses (ramd/process/slim.py): the compression
libraries, by standard means only: every module of a third-party package it imports is that
package's own, and works as its documentation says (jsonrpcserver whole, prometheus_client
with the HTTPS support it imports). Proven on a real daemon through /proc/PID/maps, and on the
entry's imports in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from daemon import Daemon, Raw


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {Path(parts[5]).name for line in f if len(parts := line.split()) > 5}


def test_the_daemon_maps_no_compression_library(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon("", "--event-loop", "asyncio")
    with Raw(d.path) as r:
        assert r.call("query-version")["package"].startswith("ramd ")
    libs = mapped_files(d.pid)
    assert Path(sys.executable).resolve().name in libs, libs  # the maps were read
    # (libz comes with OpenSSL's libcrypto, which ssl maps anyway)
    assert not [name for name in libs if name.startswith(("libbz2", "liblzma"))], libs


ENTRY = """
import sys
from ramd.process import slim
slim.keep_out()
import ramd.process.cli, ramd.process.daemon
import hashlib, hmac
assert hashlib.sha256(b"ramd").hexdigest().startswith("e169c653")
assert hmac.new(b"k", b"m", "sha256").digest()
from ramd.api.models import RamBlockAddArgs
assert RamBlockAddArgs.model_validate({"id": "a", "size": 4096}).size == 4096
import argparse
argparse.ArgumentParser().add_argument("--x")  # imports shutil
kept_out = ("zlib", "_bz2", "_lzma")
print(sorted(m for m in kept_out if m in sys.modules))
deps = ("pydantic", "pydantic_core", "jsonrpcserver", "oslash", "jsonschema", "pybase64", "xxhash")
stand_ins = sorted(
    name
    for name, module in list(sys.modules.items())
    if name.split(".")[0] in deps
    and getattr(module, "__file__", None) != getattr(getattr(module, "__spec__", None), "origin", 0)
)
print(stand_ins, sorted(d for d in deps if d in sys.modules))
from jsonrpcserver import dispatch
print(dispatch('{"jsonrpc": "2.0", "method": "nope", "id": 1}'))
from urllib.request import HTTPSHandler
import prometheus_client
print(HTTPSHandler.__name__, prometheus_client.generate_latest.__name__)
"""


def test_entry_keeps_out_compression_and_replaces_no_third_party_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", ENTRY], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out == [
        "[]",
        "[] ['jsonrpcserver', 'jsonschema', 'oslash', 'pybase64', 'pydantic', 'pydantic_core',"
        " 'xxhash']",
        '{"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found", "data":'
        ' "nope"}, "id": 1}',
        "HTTPSHandler generate_latest",
    ]
