"""The daemon process's entry point: keep out what it imports but never uses, then run it.

Compression: ``shutil`` (imported by ``argparse``, for the terminal's width) and ``zipfile``
(imported by ``importlib.resources``, for packages run from a zip archive) import ``zlib``,
``bz2`` and ``lzma``, mapping three libraries (about 0.4 MiB; ``libz`` comes with OpenSSL's
``libcrypto`` anyway). The daemon makes no archive and
is not run from one; both are first imported while those are made unimportable in the same
way, and then offer no compressed formats.

OpenSSL is not kept out: jsonrpcserver (imported whole, through its public API) imports
``http.client``, and ``prometheus_client`` (``metrics-listen``) needs ``urllib.request`` with
HTTPS support, which needs ``ssl``; an ``http.client`` imported without it would break that.

Only standard modules are imported here, and only standard modules are kept out: no
third-party package is replaced or reached into.

Invariant: :func:`keep_out` runs before anything in the process has imported shutil or
zipfile; a module already imported is left as it is. Processes that
import ``ramd.process.cli`` directly (tests, tools) are unaffected.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

#: Imported while the compression modules are unimportable; they keep the choice they made.
_KEPT_OUT_USERS = ("shutil", "zipfile")
_KEPT_OUT = ("zlib", "_bz2", "_lzma")


def keep_out() -> None:
    """Import shutil and zipfile without compression. Call first thing in the process (see
    the module's invariant)."""
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
