"""jsonrpcserver's dispatcher core, without its package ``__init__``.

jsonrpcserver 5.0.9's ``__init__`` imports its whole-message pipeline, which imports
``jsonschema`` and builds a validator of its request schema at import time: about 8 MiB of
the daemon's resident memory and 60 ms of its start-up, for a pass ramd replaces with its own
structural check. The modules ramd does use (``dispatcher``, ``request``, ``result``,
``sentinels``) need none of that, so when jsonrpcserver is not imported yet, its package is
registered without running ``__init__`` and only those modules are loaded. If something in
the process already imported the whole package, that one is used.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _bare_package(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"no package {name}")
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__package__ = name
    sys.modules[name] = package


_bare_package("jsonrpcserver")

from jsonrpcserver.dispatcher import call  # noqa: E402
from jsonrpcserver.request import Request  # noqa: E402
from jsonrpcserver.result import Success  # noqa: E402
from jsonrpcserver.sentinels import NOID  # noqa: E402

__all__ = ["NOID", "Request", "Success", "call"]
