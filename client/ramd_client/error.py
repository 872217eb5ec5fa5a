"""The exceptions of ``ramd_client``: one root, one class per way a call can fail.

Every exception this package raises on purpose derives from :class:`RamdClientError`, so a
caller can catch "anything the client reports" with one clause and still tell the cases
apart::

    Exception
     +-- RamdClientError
          +-- RamdError          the daemon refused a command (error_class, desc, code)
          +-- ConnectError       no connection could be made (path, errno)
          +-- ConnectionLost     the connection ended while a call or a stream needed it
          +-- CallTimeout        a call got no answer within the client's timeout
          +-- ProtocolError      the peer sent something that is not ramd's JSON-RPC
          +-- EventOverflow      an event consumer fell behind its bounded queue

Programming errors (a wrong argument type caught before anything is sent) stay the usual
``TypeError``/``ValueError``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CLASS_OF_CODE",
    "CallTimeout",
    "ConnectError",
    "ConnectionLost",
    "EventOverflow",
    "ProtocolError",
    "RamdClientError",
    "RamdError",
]


class RamdClientError(Exception):
    """The root of every exception raised by this package."""


#: The QMP error class reported for each JSON-RPC protocol error code: the class the QMP
#: dialect of the daemon gives for the same failure. Command failures (-32000) carry their
#: own class in ``data.class``; any other code maps to ``GenericError``.
CLASS_OF_CODE: dict[int, str] = {
    -32700: "GenericError",  # parse error
    -32600: "GenericError",  # invalid request
    -32601: "CommandNotFound",  # method not found
    -32602: "GenericError",  # invalid params: QMP says "Parameter 'x' is missing" etc.
    -32603: "GenericError",  # internal error
}


class RamdError(RamdClientError):
    """The daemon refused a command.

    ``error_class`` is the QMP error class (``GenericError``, ``DeviceNotFound``,
    ``CommandNotFound``, ...), ``desc`` the daemon's message verbatim, ``code`` the JSON-RPC
    error code and ``data`` its ``data`` member (None when absent).

    Argument errors (-32602: missing, unexpected or mistyped arguments) are reported with
    ``error_class`` ``"GenericError"``, as the QMP dialect reports them; test ``code`` (or
    :attr:`invalid_params`) to tell them from a refusal of valid arguments. An unknown
    method (-32601) is ``"CommandNotFound"``.
    """

    def __init__(self, error_class: str, desc: str, code: int = -32000, data: Any = None):
        super().__init__(error_class, desc, code, data)
        self.error_class = error_class
        self.desc = desc
        self.code = code
        self.data = data

    @property
    def invalid_params(self) -> bool:
        """True when the arguments failed validation (JSON-RPC -32602)."""
        return self.code == -32602

    def __str__(self) -> str:
        return f"{self.error_class}: {self.desc}"


class ConnectError(RamdClientError):
    """The connection to the daemon could not be made (no daemon, wrong socket, lost at once).

    A daemon that answers and then closes (past ``max-connections``, or a peer it does not
    allow) is a refusal, raised as :class:`RamdError` with its class and message.

    ``path`` is the socket path tried; ``errno`` the OS error number when the OS refused
    (``ENOENT``: no socket there, ``ECONNREFUSED``: nobody listening, ``EACCES``), else None.
    """

    def __init__(self, path: str, reason: str, errno: int | None = None) -> None:
        super().__init__(path, reason, errno)
        self.path = path
        self.reason = reason
        self.errno = errno

    def __str__(self) -> str:
        return f"cannot connect to ramd at {self.path}: {self.reason}"


class ConnectionLost(RamdClientError):
    """The connection ended before a call was answered (or while a stream was open).

    Raised for every call still in flight when the daemon goes away, for calls made after
    that, and by event streams once their queued events are consumed. Whether a command in
    flight took effect is unknown: the daemon finishes a command it has started.
    """

    def __init__(self, reason: str = "connection to ramd lost") -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class CallTimeout(RamdClientError, TimeoutError):
    """A call got no answer within ``timeout`` seconds (the client's ``timeout``).

    The call is forgotten, not recalled: the daemon may still run it, and its late answer is
    dropped. The connection stays open. Also a :class:`TimeoutError`.
    """

    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(method, timeout)
        self.method = method
        self.timeout = timeout

    def __str__(self) -> str:
        return f"{self.method}: no answer from ramd within {self.timeout:g} s"


class ProtocolError(RamdClientError):
    """The peer broke the protocol: a message that is not ramd's JSON-RPC 2.0.

    The connection is closed when this happens; calls in flight get :class:`ConnectionLost`.
    """


class EventOverflow(RamdClientError):
    """An event stream's consumer fell behind: its queue held ``limit`` events and more came.

    The stream stops at once (no event is silently skipped): the events after
    ``last_seq`` (the last one queued) were dropped. Recover the state with
    :func:`ramd_client.resync`, or consume faster / with a larger ``max_queue``.
    """

    def __init__(self, limit: int, last_seq: int | None) -> None:
        super().__init__(limit, last_seq)
        self.limit = limit
        self.last_seq = last_seq

    def __str__(self) -> str:
        after = "" if self.last_seq is None else f" after seq {self.last_seq}"
        return (
            f"event consumer fell behind: {self.limit} events were queued, "
            f"later events{after} were dropped; resync to recover the state"
        )
