"""The daemon process's entry point: keep out what it imports but never uses, then run it.

OpenSSL: ``asyncio`` imports ``ssl`` when it can, and ``hashlib``/``hmac`` (imported by
pydantic, through ``secrets``) import ``_hashlib``; together they map ``libssl`` and
``libcrypto``, about 3.7 MiB resident once initialised. ramd serves Unix sockets only and
hashes nothing through OpenSSL. Python supports builds without either module, so while those
three are first imported, ``ssl`` and ``_hashlib`` are made unimportable: asyncio then offers
no TLS, and hashlib and hmac use their built-in implementations of the same algorithms. Both
modules are importable again afterwards (uvloop imports ``ssl`` itself, and pays for it).

Invariant: :func:`keep_out` runs before anything in the process has imported asyncio, hashlib
or hmac; a module already imported is left as it is. Processes that import ``ramd.cli``
directly (tests, tools) are unaffected.
"""

from __future__ import annotations

import importlib
import sys

#: Imported while ``ssl`` and ``_hashlib`` are unimportable; they keep the choice they made.
_OPENSSL_USERS = ("asyncio", "hashlib", "hmac")
_OPENSSL_MODULES = ("ssl", "_hashlib")


def keep_out() -> None:
    """Import asyncio, hashlib and hmac without OpenSSL. Call first thing in the process
    (see the module's invariant)."""
    blocked = [name for name in _OPENSSL_MODULES if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for name in _OPENSSL_USERS:
            importlib.import_module(name)
    finally:
        for name in blocked:
            del sys.modules[name]


def main() -> int:
    """``ramd`` and ``python -m ramd``: :func:`keep_out`, then :func:`ramd.cli.main`."""
    keep_out()
    from ramd.cli import main as cli_main

    return cli_main()
