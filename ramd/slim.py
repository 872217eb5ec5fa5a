"""The daemon process's entry point: keep out what it imports but never uses, then run it.

OpenSSL: ``asyncio`` imports ``ssl`` when it can, and ``hashlib``/``hmac`` (imported by
pydantic, through ``secrets``) import ``_hashlib``; together they map ``libssl`` and
``libcrypto``: 4.6 MiB of the idle daemon's RSS on the asyncio loop. ramd serves Unix sockets
only and hashes nothing through OpenSSL. Python supports builds without either module, so
while those three are first imported, ``ssl`` and ``_hashlib`` are made unimportable: asyncio
then offers no TLS, and hashlib and hmac use their built-in implementations of the same
algorithms. Both modules are importable again afterwards (uvloop imports ``ssl`` itself, and
pays for it).

Compression: ``argparse`` imports ``shutil`` (for the terminal's width), which imports
``zlib``, ``bz2`` and ``lzma`` to offer compressed archives, mapping three libraries (about
0.4 MiB). The daemon makes no archive; ``shutil`` is first imported while those are made
unimportable in the same way, and then offers no compressed formats.

pydantic's plugins: pydantic looks for plugins (the ``pydantic`` entry point group) when it
builds its first model, which imports ``importlib.metadata`` (with ``email``, ``zipfile``,
``csv``) and reads the metadata of every installed distribution: 2.4 MiB of RSS and tens of
ms of start-up. The daemon runs no pydantic plugin, so it registers a plugin loader that finds
none; pydantic then builds exactly the validators it builds when no plugin is installed.

Invariant: :func:`keep_out` runs before anything in the process has imported asyncio, hashlib,
hmac, shutil or pydantic's plugin loader; a module already imported is left as it is. Processes that
import ``ramd.cli`` directly (tests, tools) are unaffected.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import types

#: Imported while ``ssl``, ``_hashlib`` and the compression modules are unimportable; they
#: keep the choice they made.
_KEPT_OUT_USERS = ("asyncio", "hashlib", "hmac", "shutil")
_KEPT_OUT = ("ssl", "_hashlib", "zlib", "_bz2", "_lzma")
_PLUGIN_LOADER = "pydantic.plugin._loader"
#: The module of pydantic that imports the loader.
_PLUGIN_USER = "pydantic.plugin._schema_validator"


def _no_plugins() -> tuple[()]:
    """pydantic's ``get_plugins``: the daemon runs none."""
    return ()


def keep_out() -> None:
    """Import asyncio, hashlib and hmac without OpenSSL, and shutil without compression, and
    give pydantic a plugin loader that loads none. Call first thing in the process (see the
    module's invariant)."""
    blocked = [name for name in _KEPT_OUT if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for name in _KEPT_OUT_USERS:
            importlib.import_module(name)
    finally:
        for name in blocked:
            del sys.modules[name]
    if _PLUGIN_LOADER not in sys.modules:
        loader = types.ModuleType(_PLUGIN_LOADER, "ramd: no pydantic plugins in the daemon")
        loader.get_plugins = _no_plugins  # type: ignore[attr-defined]
        sys.modules[_PLUGIN_LOADER] = loader
        try:
            importlib.import_module(_PLUGIN_USER)
        except ImportError:
            # A pydantic that wants more of its loader: give it the real one (the daemon
            # then pays for the scan; tests/test_slim.py says so).
            del sys.modules[_PLUGIN_LOADER]
            sys.modules.pop(_PLUGIN_USER, None)


def main() -> int:
    """``ramd`` and ``python -m ramd``: :func:`keep_out`, then :func:`ramd.cli.main`, then
    the end of the process without tearing the interpreter down.

    When :func:`ramd.cli.main` returns, the daemon has shut down: its sockets are removed,
    its commands finished or abandoned (and logged) within ``stop-timeout``, its jobs
    cancelled. Freeing every module and object one by one would then take 0.1-0.5 s more,
    and joining worker threads would wait for work the daemon already abandoned; so the logs
    and standard streams are flushed and the process exits with the status."""
    keep_out()
    from ramd.cli import main as cli_main

    status = cli_main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
