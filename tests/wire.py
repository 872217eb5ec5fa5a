"""Raw blocking clients of both dialects for the fuzz and load tests.

They decode every line the daemon writes strictly (RFC 8259: no ``NaN``/``Infinity``), keep
events apart from answers, and reduce an answer to an :data:`Outcome` that is the same for
both dialects, so one model can check either.
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any, Self

INTERNAL = "Internal"
#: ``("ok", result)`` or ``(error class, message)``. JSON-RPC argument errors (-32602) are
#: ``"InvalidParams"``; other JSON-RPC protocol errors are ``"rpc-327xx"``-like names.
Outcome = tuple[str, Any]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def strict_loads(raw: bytes | str) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity``."""
    return json.loads(raw, parse_constant=_reject_constant)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Conn:
    """A Unix stream connection read line by line (``\\n``; QMP's ``\\r`` is stripped)."""

    def __init__(self, path: Path | str, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = bytearray()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def raw_line(self) -> bytes:
        """The next line without its end; ``ConnectionError`` at EOF."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i]).rstrip(b"\r")
                del self.buf[: i + 1]
                return line
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk

    def msg(self) -> Any:
        return strict_loads(self.raw_line())

    def lines_until_eof(self) -> list[bytes]:
        """Every remaining line; the daemon must close the connection at the end."""
        out: list[bytes] = []
        while True:
            try:
                out.append(self.raw_line())
            except ConnectionError:
                break
        assert not self.buf, f"unterminated output: {bytes(self.buf[:200])!r}"
        return out


def is_rpc_event(msg: Any) -> bool:
    return isinstance(msg, dict) and "method" in msg and "id" not in msg


def is_qmp_event(msg: Any) -> bool:
    return isinstance(msg, dict) and "event" in msg


def rpc_outcome(resp: dict[str, Any]) -> Outcome:
    """The outcome of one JSON-RPC response object; checks its shape."""
    assert resp.get("jsonrpc") == "2.0", resp
    if "result" in resp:
        assert "error" not in resp, resp
        return "ok", resp["result"]
    err = resp["error"]
    code = err["code"]
    if code == -32603:
        return INTERNAL, err
    if code == -32000:
        return err["data"]["class"], err["message"]
    if code == -32602:
        return "InvalidParams", err["message"]
    return f"rpc{code}", err.get("message")


def qmp_outcome(resp: dict[str, Any]) -> Outcome:
    """The outcome of one QMP response object; checks its shape."""
    if "return" in resp:
        assert "error" not in resp, resp
        return "ok", resp["return"]
    err = resp["error"]
    assert set(err) == {"class", "desc"}, resp
    if err["desc"] == "Internal error" or "Traceback" in err["desc"]:
        return INTERNAL, err
    return err["class"], err["desc"]


class Rpc(Conn):
    """JSON-RPC 2.0: requests with increasing ids; events go to ``self.events``."""

    dialect = "jsonrpc"
    arg_error = "InvalidParams"

    def __init__(self, path: Path | str, timeout: float = 20.0) -> None:
        super().__init__(path, timeout)
        self.next_id = 1
        self.events: list[dict[str, Any]] = []

    def answer(self) -> Any:
        """The next message that is not an event."""
        while True:
            msg = self.msg()
            if is_rpc_event(msg):
                self.events.append(msg)
                continue
            return msg

    def send_request(self, method: str, params: Any = None, req_id: Any = None) -> Any:
        if req_id is None:
            req_id = self.next_id
            self.next_id += 1
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
        if params is not None:
            req["params"] = params
        self.send(json.dumps(req).encode() + b"\n")
        return req_id

    def request(self, method: str, params: Any = None) -> dict[str, Any]:
        req_id = self.send_request(method, params)
        resp = self.answer()
        assert isinstance(resp, dict) and resp.get("id") == req_id, (req_id, resp)
        return resp

    def outcome(self, method: str, params: Any = None) -> Outcome:
        return rpc_outcome(self.request(method, params))

    def call(self, method: str, params: Any = None) -> Any:
        kind, value = self.outcome(method, params)
        assert kind == "ok", (method, params, kind, value)
        return value


class Qmp(Conn):
    """QMP: greeted and negotiated on connect; events go to ``self.events``."""

    dialect = "qmp"
    arg_error = "GenericError"

    def __init__(self, path: Path | str, timeout: float = 20.0, negotiate: bool = True) -> None:
        super().__init__(path, timeout)
        self.next_id = 1
        self.events: list[dict[str, Any]] = []
        self.greeting = self.msg()
        assert "QMP" in self.greeting, self.greeting
        if negotiate:
            assert self.request("qmp_capabilities") == {"return": {}, "id": 0}

    def answer(self) -> Any:
        while True:
            msg = self.msg()
            if is_qmp_event(msg):
                self.events.append(msg)
                continue
            return msg

    def send_request(self, name: str, arguments: Any = None, req_id: Any = None) -> Any:
        if req_id is None:
            req_id = self.next_id if name != "qmp_capabilities" else 0
            self.next_id += 1
        req: dict[str, Any] = {"execute": name, "id": req_id}
        if arguments is not None:
            req["arguments"] = arguments
        self.send(json.dumps(req).encode())
        return req_id

    def request(self, name: str, arguments: Any = None) -> dict[str, Any]:
        req_id = self.send_request(name, arguments)
        resp = self.answer()
        assert isinstance(resp, dict) and resp.get("id") == req_id, (req_id, resp)
        return resp

    def outcome(self, name: str, arguments: Any = None) -> Outcome:
        return qmp_outcome(self.request(name, arguments))

    def call(self, name: str, arguments: Any = None) -> Any:
        kind, value = self.outcome(name, arguments)
        assert kind == "ok", (name, arguments, kind, value)
        return value


Client = Rpc | Qmp


def delete_all_blocks(path: Path | str) -> None:
    """Remove every block through a fresh JSON-RPC connection."""
    with Rpc(path) as rpc:
        for block in rpc.call("query-ram-blocks"):
            rpc.call("ram-block-del", {"id": block["id"]})


def read_proc_status(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` in bytes (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")
