"""The daemon process's entry point: keep out what it imports but never uses, then run it.

OpenSSL: ``asyncio`` imports ``ssl`` when it can, ``http.client`` too (imported by
jsonrpcserver for its development server, which ramd does not run), and ``hashlib``/``hmac``
(imported by pydantic, through ``secrets``) import ``_hashlib``; together they map ``libssl``
and ``libcrypto``: 4.6 MiB of the idle daemon's RSS on the asyncio loop. ramd serves Unix
sockets only and hashes nothing through OpenSSL. Python supports builds without either module,
so while those standard modules are first imported, ``ssl`` and ``_hashlib`` are made
unimportable: asyncio then offers no TLS, ``http.client`` no HTTPS, and hashlib and hmac use
their built-in implementations of the same algorithms. Both modules are importable again
afterwards (uvloop imports ``ssl`` itself, and pays for it).

Compression: ``shutil`` (imported by ``argparse``, for the terminal's width) and ``zipfile``
(imported by ``importlib.resources``, for packages run from a zip archive) import ``zlib``,
``bz2`` and ``lzma``, mapping three libraries (about 0.4 MiB). The daemon makes no archive and
is not run from one; both are first imported while those are made unimportable in the same
way, and then offer no compressed formats.

Only standard modules are imported here, and only standard modules are kept out: no
third-party package is replaced or reached into.

Invariant: :func:`keep_out` runs before anything in the process has imported asyncio, hashlib,
hmac, shutil, http.client or zipfile; a module already imported is left as it is. Processes that
import ``ramd.process.cli`` directly (tests, tools) are unaffected.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

#: Imported while ``ssl``, ``_hashlib`` and the compression modules are unimportable; they
#: keep the choice they made.
_KEPT_OUT_USERS = ("asyncio", "hashlib", "hmac", "shutil", "http.client", "zipfile")
_KEPT_OUT = ("ssl", "_hashlib", "zlib", "_bz2", "_lzma")


def keep_out() -> None:
    """Import asyncio, hashlib, hmac and http.client without OpenSSL, and shutil and zipfile
    without compression. Call first thing in the process (see the module's invariant)."""
    blocked = [name for name in _KEPT_OUT if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for name in _KEPT_OUT_USERS:
            importlib.import_module(name)
    finally:
        for name in blocked:
            del sys.modules[name]


def main() -> int:
    """``ramd`` and ``python -m ramd``: :func:`keep_out`, then :func:`ramd.process.cli.main`, then
    the end of the process without tearing the interpreter down.

    When :func:`ramd.process.cli.main` returns, the daemon has shut down: its sockets are removed,
    its commands finished or abandoned (and logged) within ``stop-timeout``, its jobs
    cancelled. Freeing every module and object one by one would then take 0.1-0.5 s more,
    and joining worker threads would wait for work the daemon already abandoned; so the logs
    and standard streams are flushed and the process exits with the status."""
    keep_out()
    from ramd.process.cli import main as cli_main

    status = cli_main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
