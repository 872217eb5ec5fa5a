"""The metrics endpoint: ``GET /metrics`` over HTTP on ``metrics-listen``, served by threads.

Nothing here runs on the event loop. One acceptor thread (``socketserver``'s
``serve_forever``) accepts connections on the listening socket, TCP or Unix, and hands each to
a handler thread of its own; at most :data:`MAX_SCRAPES` are served at once (one more is
answered 503 at once and closed). A handler reads its request and writes its answer with a
socket timeout of :data:`CLIENT_TIMEOUT` seconds and within :data:`CONNECTION_DEADLINE` seconds
in all, so a scraper that connects and sends nothing, or reads nothing, holds one handler thread
for that long and delays nothing else: the loop is reached only once a whole request has been
read, for one snapshot (:class:`~ramd.metrics.figures.LoopFigures`).

Rendering the text (``prometheus_client``, on the handler thread) shares the interpreter lock
with the loop thread, which gets it back at every switch interval (5 ms): measured, the
median ``query-version`` round trip did not change while 1000 blocks were scraped back to back.

Ownership: :class:`MetricsServer` owns its threads and its listening socket; a Unix socket's
file is created by :func:`ramd.transport.sockets.unixbind.bind_unix` (mode ``socket-mode``) and
removed
by :meth:`MetricsServer.close`. Start and close on the loop thread.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import socketserver
import sys
import threading
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from ramd.metrics.address import MetricsAddress
from ramd.metrics.figures import SnapshotUnavailable
from ramd.transport.sockets.unixbind import BoundSocket, bind_unix

log = logging.getLogger("ramd.metrics")

#: Scrapes served at once; more are answered 503.
MAX_SCRAPES = 4
#: Seconds a scraper may take to send a piece of its request, or to read one of the answer.
CLIENT_TIMEOUT = 10.0
#: Seconds a connection may last in all (a scraper trickling its request byte by byte is cut
#: off then, like one that sends nothing).
CONNECTION_DEADLINE = 30.0
#: Reads of what a peer sent before it is answered 503 (see ``_ThreadedServer._busy``).
BUSY_DRAIN_READS = 4
#: The Prometheus text format (``generate_latest``) and its content type
#: (``text/plain; version=0.0.4``): what the library answers a scraper that asks for nothing
#: else. It is answered to every scraper (docs/protocol.md §15: the text exposition format).
_ENCODE, _CONTENT_TYPE = choose_encoder("")
#: The only path served.
PATH = "/metrics"


class _Handler(http.server.BaseHTTPRequestHandler):
    """``GET``/``HEAD /metrics``; anything else 404 or 405. Handler thread."""

    server: _ThreadedServer
    timeout = CLIENT_TIMEOUT
    protocol_version = "HTTP/1.0"
    server_version = "ramd"

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(CONNECTION_DEADLINE, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _expire(self) -> None:
        """Timer thread: end the connection's reads and writes (the handler then ends)."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self.send_error(404, f"only {PATH} is served")
            return
        try:
            body = _ENCODE(self.server.registry)
        except SnapshotUnavailable as e:
            self.send_error(503, str(e))
            return
        self.send_response(200)
        self.send_header("Content-Type", _CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def address_string(self) -> str:
        peer = self.client_address
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("scrape from %s: %s", self.address_string(), format % args)


class _ThreadedServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """An HTTP server on a socket bound elsewhere, a thread per request, at most
    :data:`MAX_SCRAPES` at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, registry: CollectorRegistry) -> None:
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.address_family = sock.family
        self.registry = registry
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape failed (socketserver's default prints to stderr): a scraper that went
        away or timed out is logged at debug, anything else as an error."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("scrape failed: %s", exc)
        else:
            log.error("scrape failed", exc_info=exc)

    def _busy(self, request: socket.socket) -> None:
        """Answer 503 without waiting for the request (a fresh socket's send buffer takes
        the answer at once), read what the peer already sent (closing a socket with unread
        input resets the connection, and the peer could lose the answer), then close."""
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(
                b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n"
            )
            request.shutdown(socket.SHUT_WR)
            for _ in range(BUSY_DRAIN_READS):
                if not request.recv(65536):
                    break
        request.close()


class MetricsServer:
    """The endpoint on one address: listening from :meth:`start` until :meth:`close`."""

    def __init__(self, address: MetricsAddress, registry: CollectorRegistry) -> None:
        self.address = address
        self._registry = registry
        self._bound: BoundSocket | None = None
        self._server: _ThreadedServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, socket_mode: int, socket_gid: int | None) -> str:
        """Listen and serve; where it listens (a port 0 resolved). ``OSError`` (or
        :class:`~ramd.transport.sockets.unixbind.AlreadyRunning`) when it cannot."""
        addr = self.address
        if addr.path is not None:
            self._bound = bind_unix(addr.path, socket_mode, socket_gid)
            sock = self._bound.sock
            where = str(addr)
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            if addr.host == "localhost":
                family = socket.AF_INET
            sock = socket.create_server((addr.host, addr.port), family=family)
            host, port = sock.getsockname()[:2]
            where = str(MetricsAddress(host=host, port=port))
        sock.setblocking(True)
        self._server = _ThreadedServer(sock, self._registry)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ramd-metrics", daemon=True
        )
        self._thread.start()
        return where

    def close(self) -> None:
        """Stop accepting, close the socket and remove its file (a Unix socket bound here).
        Handler threads still writing an answer end on their own (daemon threads)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._bound is not None:
            self._bound.remove()
            self._bound = None
