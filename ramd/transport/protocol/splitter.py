"""Split a byte stream into separate JSON texts, as QEMU's JSON lexer and streamer do.

The stream is a sequence of JSON texts with optional whitespace between them; there is no
framing and lines mean nothing. The splitter finds where each text ends without parsing it:

* outside strings it counts the opening ``{`` ``[`` and closing ``}`` ``]`` brackets; a
  top-level object or array ends when the count returns to zero (the bracket kinds are not
  matched: ``[1}`` is one text, and the caller's ``json.loads`` rejects it);
* inside a ``"`` string, brackets mean nothing and a backslash escapes the next byte;
* a top-level string ends at its closing quote; any other top-level token (a number, a
  literal, or garbage) ends at the next whitespace byte or at ``{ [ " } ]``. At the end of
  the data received so far such a token is incomplete (``12`` may become ``123``) and waits;
* a ``}`` or ``]`` at top level is a stray closer: one error item, and scanning continues
  after it;
* a control byte inside a string (JSON forbids them) makes its message one error item: a
  line break ends the message at once (most likely a missing closing quote: the next lines
  are requests of their own), any other is skipped over as if it were allowed and the
  message is delimited as usual (a raw byte in a string costs exactly that message, in a
  stream without newlines too, as ``qemu.qmp`` sends).

Speed: Python never steps through the bytes one at a time; C code jumps to the next byte that
matters. Three tiers:

1. Fast path: a whole object or array that is in the chunk, nested at most ``_FAST_DEPTH``
   deep and without long strings (typical requests) is matched by one regular expression and
   sliced out of the chunk; a chunk that is only that (and whitespace) is taken in one match.
2. Otherwise a regular expression skips plain bytes and short strings up to the next bracket,
   so Python does one step per bracket.
3. Long strings (a RAM block's base64 data) are skipped with ``bytes.find`` (memchr, many GB/s),
   falling back to a regular expression only if the string has backslash escapes; the control
   bytes JSON forbids in them: a run that pybase64's validating decoder accepts has none (one
   pass at several GB/s), any other is searched with one memchr per byte value.

The scan state (mode, depth, pending escape) is kept between calls, so each byte is scanned
once however the stream is chunked (the fast path may scan a message's first chunk twice).

Limits: a message longer than ``max_size`` bytes or nested deeper than ``max_depth`` gets one
:class:`SplitError`; the splitter then keeps scanning that message without storing it and
resumes normally after its end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import pybase64

__all__ = ["JsonSplitter", "SplitError"]

DEFAULT_MAX_SIZE: Final = 8 * 1024 * 1024
DEFAULT_MAX_DEPTH: Final = 1024

# Scan modes.
_IDLE: Final = 0  # between messages: skipping whitespace
_CONTAINER: Final = 1  # inside an object or array, outside strings
_STRING: Final = 2  # inside a string (a top-level one when depth == 0)
_BARE: Final = 3  # inside a top-level number, literal or garbage token

_OPENERS: Final = frozenset(b"{[")
_CLOSERS: Final = frozenset(b"}]")
_QUOTE: Final = ord('"')
_EQUALS: Final = ord("=")
_BACKSLASH: Final = ord("\\")


def _possessive_works() -> bool:
    """Whether this Python matches possessive repetitions right. CPython 3.11.0-3.11.3
    (Debian 12's 3.11.2) does not when one is followed by a failing alternative: a string
    of more than 256 bytes was skipped halfway and its message lost (the probe is that case,
    in small)."""
    m = re.match(rb'(?:[^"]++|"[^"]{0,2}+")*+(")?', b'x"bbb"')
    return m is not None and m.group(1) == b'"'


#: Possessive quantifiers where they work; atomic groups, alike but about half as fast,
#: where they do not.
_POSSESSIVE: Final = _possessive_works()


def _once(atom: bytes, quantifier: bytes) -> bytes:
    """``atom`` repeated as ``quantifier`` says, without backtracking into the repetition."""
    if _POSSESSIVE:
        return atom + quantifier + b"+"
    return b"(?>" + atom + quantifier + b")"


# First byte that is not JSON whitespace.
_NON_WS: Final = re.compile(rb"[^ \t\n\r]")
# The byte that ends a top-level number or literal.
_BARE_END: Final = re.compile(rb'[ \t\n\r\[\]{}"]')
# A byte JSON forbids inside a string (QEMU's lexer rejects it at once, so that a missing
# quote cannot swallow every later request).
_CONTROL: Final = re.compile(rb"[\x00-\x1f]")
_CONTROL_BYTES: Final = tuple(bytes((c,)) for c in range(0x20))
# A line break inside a string is most likely a missing closing quote: it ends the message at
# once, so that the requests on the next lines are not swallowed. Any other control byte makes
# its message bad, and the message is skipped to its end as if the byte were allowed (so a
# raw byte in a string costs exactly that message, also in a stream without newlines).
_LINE_BREAKS: Final = frozenset(b"\r\n")
# From this many bytes on, one memchr per control byte beats the regular expression (which
# steps through the bytes one at a time: about 100 MB/s here, against GB/s for memchr).
_MEMCHR_FROM: Final = 2048
# The rest of a string body: stops at the closing quote, at a lone final backslash or at the end.
_STRING_REST: Final = re.compile(
    _once(rb"(?:" + _once(rb'[^"\\]', b"+") + rb"|\\.)", b"*"), re.DOTALL
)

# Building blocks. A short string has no run of more than 256 unescaped bytes: the regular
# expressions leave longer strings to bytes.find. Every repetition is possessive (no
# backtracking, :func:`_once`), so every match attempt is linear in the bytes it looks at.
_PLAIN: Final = _once(rb'[^"\[\]{}]', b"+")  # bytes that are neither brackets nor quotes
# (a string with a control character is not short: the string scan reports it)
_BODY: Final = _once(rb'[^"\\\x00-\x1f]', b"{0,256}")
_SHORT_STRING: Final = rb'"' + _BODY + _once(rb"(?:\\[^\x00-\x1f]" + _BODY + rb")", b"*") + rb'"'
_SKIP: Final = _once(rb"(?:" + _PLAIN + rb"|" + _SHORT_STRING + rb")", b"*")

# Inside a container, from the current position past plain bytes and short strings; then group
# 1 is an opener, group 2 a closer, group 3 the quote of a string left to bytes.find (long, or
# unfinished in this chunk), or no group matched and the chunk is done.
_NEXT: Final = re.compile(_SKIP + rb'(?:([\[{])|([\]}])|("))?', re.DOTALL)


def _nested(levels: int) -> bytes:
    """Return a pattern for a whole object or array nested at most ``levels`` deep."""
    inner = _SKIP
    for _ in range(levels - 1):
        inner = _once(
            rb"(?:" + _PLAIN + rb"|" + _SHORT_STRING + rb"|[\[{]" + inner + rb"[\]}])", b"*"
        )
    return rb"[\[{]" + inner + rb"[\]}]"


# The fast path: a whole message in the chunk, nested at most _FAST_DEPTH deep, without long
# strings. A message it does not fit fails it and is scanned again by the bracket loop.
_FAST_DEPTH: Final = 4
_FAST_MESSAGE: Final = re.compile(_nested(_FAST_DEPTH), re.DOTALL)
# The fastest path: a chunk that is exactly one such message with whitespace around it (a
# client sending one request at a time), taken whole between messages.
_FAST_CHUNK: Final = re.compile(
    _once(rb"[ \t\n\r]", b"*") + rb"(" + _nested(_FAST_DEPTH) + rb")" + _once(rb"[ \t\n\r]", b"*"),
    re.DOTALL,
)


def _base64_only(data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` holds only bytes of the base64 alphabet and ``=``, hence no
    control byte: True is certain, False means "look". pybase64's validating decoder checks
    each byte at several GB/s (the decoded bytes are dropped); trailing ``=`` and the last
    bytes of an incomplete quad are left to the regular expression."""
    stop = end
    while stop > start and stop > end - 2 and data[stop - 1] == _EQUALS:
        stop -= 1
    whole = start + (stop - start) // 4 * 4
    if _CONTROL.search(data, whole, end) is not None:
        return False
    try:
        with memoryview(data) as view:
            pybase64.b64decode(view[start:whole], validate=True)
    except (ValueError, MemoryError):  # binascii.Error is one; no memory: look byte by byte
        return False
    return True


def _first_control(data: bytes, start: int, end: int) -> int:
    """Where the first control byte of ``data[start:end]`` is, or -1 (linear, no copy)."""
    if end - start < _MEMCHR_FROM:
        m = _CONTROL.search(data, start, end)
        return -1 if m is None else m.start()
    if _base64_only(data, start, end):  # the usual long string: no byte-by-byte search
        return -1
    first = -1
    for byte in _CONTROL_BYTES:
        i = data.find(byte, start, end)
        if i >= 0:
            first = end = i  # later bytes need only be looked for before it
    return first


def _first_line_break(data: bytes, start: int, end: int) -> int:
    """Where the first ``\\n`` or ``\\r`` of ``data[start:end]`` is, or -1 (two memchr)."""
    nl = data.find(b"\n", start, end)
    cr = data.find(b"\r", start, end if nl < 0 else nl)
    return nl if cr < 0 else cr


def long_string(text: bytes | bytearray, min_length: int) -> tuple[int, int] | None:
    """``(start, end)`` of the content of the first string of ``text`` (one JSON text from
    :meth:`JsonSplitter.feed`) that is at least ``min_length`` bytes long, if it has no
    backslash; None when there is no such string, or when a longer one before it or this one
    has a backslash (an escaped quote would make its end uncertain here). Linear: one step
    per bracket and long string before it."""
    pos, n = 0, len(text)
    while pos < n:
        m = _NEXT.match(text, pos)
        assert m is not None  # the pattern matches the empty string
        pos = m.end()
        group = m.lastindex
        if group == 3:
            end = text.find(b'"', pos)
            if end < 0 or text.find(b"\\", pos, end) >= 0:
                return None
            if end - pos >= min_length:
                return pos, end
            pos = end + 1
        elif group is None:
            return None
    return None


def _no_fast_path(data: bytes, pos: int) -> None:
    """Stand in for the fast path when ``max_depth`` is below its depth."""
    return None


@dataclass(frozen=True, slots=True)
class SplitError:
    """A place in the stream where no JSON text could be delimited.

    ``kind`` says which: ``"stray"`` (a closer outside any text), ``"control"`` (a control
    byte in a string), ``"size"`` or ``"depth"`` (a message over a limit, whose text was
    dropped), ``"memory"`` (no memory to store the message, dropped too); ``reason`` is
    human text for the response.
    """

    kind: str
    reason: str


def stray_error(closer: int) -> SplitError:
    return SplitError("stray", f"unexpected '{chr(closer)}'")


def control_error(byte: int) -> SplitError:
    return SplitError("control", f"invalid control character 0x{byte:02x} in string")


def size_error(limit: int) -> SplitError:
    return SplitError("size", f"message exceeds the size limit of {limit} bytes")


def memory_error() -> SplitError:
    return SplitError("memory", "no memory to hold this message")


def depth_error(limit: int) -> SplitError:
    return SplitError("depth", f"message nested deeper than {limit}")


class JsonSplitter:
    """Incremental splitter of one connection's byte stream into JSON texts.

    Invariants:

    * Bounded memory: the only data kept between calls is the incomplete message's bytes, at
      most ``max_size`` of them (see :meth:`pending`), plus a few integers. No input makes it
      hold more: the bytes of an oversized or overdeep message are dropped, not stored.
    * Out of memory: a message whose bytes cannot be stored (the process at its address-space
      or mapping limit) is one ``memory`` error and is skipped like an oversized one; the
      splitter never raises for it.
    * Resync: after an error the splitter always recovers. A stray closer costs that one byte.
      An oversized or overdeep message, or one with a control byte in a string, costs
      exactly that message (it is still delimited by bracket counting; a line break in a
      string ends it there), and the next text after it comes out intact. The first error
      of a message is its only one. Any byte sequence is
      accepted, invalid UTF-8 included; the splitter works on bytes and never raises on input.
    * Order: :meth:`feed` returns messages and errors in stream order, each exactly once,
      independently of how the stream is chunked (except which limit an over-limit message is
      reported against, if it breaks both).

    The splitter does not validate JSON: the caller parses each text and reports the failures
    (CPython's ``json`` recurses once per level: the daemon raises the recursion limit above
    ``max_depth``).

    Threads: not thread-safe. It is owned and used by one connection's reader task only.
    """

    __slots__ = ("_buf", "_depth", "_discarding", "_escape", "_max_depth", "_max_size", "_mode")

    def __init__(
        self, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH
    ) -> None:
        """Create a splitter for texts of at most ``max_size`` bytes and ``max_depth`` levels.

        A text of exactly ``max_size`` bytes, or with exactly ``max_depth`` levels of nested
        objects and arrays, is accepted. Both limits must be at least 1.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size}")
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, not {max_depth}")
        self._max_size = max_size
        self._max_depth = max_depth
        self._buf = bytearray()  # the incomplete message's bytes so far (empty while discarding)
        self._mode = _IDLE
        self._depth = 0  # open brackets of the current message
        self._escape = False  # in _STRING mode: the previous chunk ended with an escaping "\"
        self._discarding = False  # the current message was reported over a limit: don't store

    def pending(self) -> int:
        """Return the number of bytes buffered for an incomplete message (at most max_size).

        It is 0 between messages and while an over-limit message is being skipped.
        """
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """Whether a message has begun and not ended (its bytes so far were fed)."""
        return self._mode != _IDLE

    def feed(self, data: bytes) -> list[bytes | bytearray | SplitError]:
        """Scan the next chunk of the stream and return what it completes, in stream order.

        Each complete message is the raw bytes of one JSON text, without the whitespace
        around it (a ``bytearray``, now the caller's, when it spanned several chunks). A
        :class:`SplitError` stands for a stray closer or for a whole message over a limit.
        Bytes of a message still incomplete at the end of ``data`` are kept (up to
        ``max_size``) and completed by later calls; no byte is scanned again by a later call.
        """
        n = len(data)
        if n == 0:
            return []
        if self._mode == _IDLE and self._max_depth >= _FAST_DEPTH:  # nothing buffered
            whole = _FAST_CHUNK.fullmatch(data)
            if whole is not None and whole.end(1) - whole.start(1) <= self._max_size:
                try:
                    return [whole.group(1)]
                except MemoryError:
                    return [memory_error()]
        out: list[bytes | bytearray | SplitError] = []
        buf = self._buf
        max_size = self._max_size
        max_depth = self._max_depth
        fast = _FAST_MESSAGE.match if max_depth >= _FAST_DEPTH else _no_fast_path
        mode = self._mode
        depth = self._depth
        discarding = self._discarding
        escape = False
        pos = 0
        start = 0  # where the current message's bytes begin in data
        if mode == _STRING and self._escape:
            pos = 1  # the byte escaped by the backslash that ended the previous chunk
            if data[0] < 0x20:
                if not discarding:
                    over = len(buf) > max_size
                    out.append(size_error(max_size) if over else control_error(data[0]))
                    buf.clear()
                if data[0] in _LINE_BREAKS:
                    mode, depth, discarding = _IDLE, 0, False
                else:
                    discarding = True

        while pos < n:
            end = -1  # set to the end of the current message when it completes
            if mode == _IDLE:
                m = _NON_WS.search(data, pos)
                if m is None:
                    break
                start = m.start()
                c = data[start]
                pos = start + 1
                if c in _OPENERS:
                    mode = _CONTAINER
                    m = fast(data, start)
                    if m is None:
                        depth = 1
                        continue
                    pos = end = m.end()  # a whole message: completed below
                elif c == _QUOTE:
                    mode = _STRING
                    continue
                elif c in _CLOSERS:
                    out.append(stray_error(c))
                    continue
                else:
                    mode = _BARE
                    continue
            elif mode == _CONTAINER:
                while True:
                    m = _NEXT.match(data, pos)
                    assert m is not None  # the pattern matches the empty string
                    pos = m.end()
                    group = m.lastindex
                    if group == 1:
                        depth += 1
                        if depth > max_depth and not discarding:
                            out.append(depth_error(max_depth))
                            discarding = True
                            buf.clear()
                    elif group == 2:
                        depth -= 1
                        if depth == 0:
                            end = pos
                            break
                    else:
                        if group == 3:
                            mode = _STRING
                        break
                if end < 0:
                    continue
            elif mode == _STRING:
                e = data.find(b'"', pos)
                if e < 0:
                    e = n
                if data.find(b"\\", pos, e) >= 0:  # escapes: the quote at e may be escaped
                    m = _STRING_REST.match(data, pos)
                    assert m is not None  # the pattern matches the empty string
                    e = m.end()
                bad = _first_line_break(data, pos, e) if discarding else -1
                if not discarding and (bad := _first_control(data, pos, e)) >= 0:
                    # the message is bad: reported now, skipped to its end (or a line break)
                    over = len(buf) + bad - start > max_size
                    out.append(size_error(max_size) if over else control_error(data[bad]))
                    discarding = True
                    buf.clear()
                    if data[bad] not in _LINE_BREAKS:
                        bad = _first_line_break(data, bad + 1, e)
                if bad >= 0:  # a line break: the message ends here; resume after it
                    mode, depth, discarding = _IDLE, 0, False
                    pos = bad + 1
                    continue
                if e == n:
                    pos = n
                    continue
                if data[e] == _BACKSLASH:  # a lone backslash ending the chunk
                    escape = True
                    pos = n
                    continue
                pos = e + 1  # past the closing quote
                if depth > 0:
                    mode = _CONTAINER
                    continue
                end = pos
            else:  # _BARE
                m = _BARE_END.search(data, pos)
                if m is None:
                    pos = n
                    continue
                pos = end = m.start()

            # The current message is complete: it is data[start:end], after buf.
            mode = _IDLE
            if discarding:
                discarding = False  # its error was reported; resume normal operation
            elif len(buf) + end - start > max_size:
                out.append(size_error(max_size))
                buf.clear()
            else:
                try:
                    if buf:  # hand the buffer over (no copy of a large message)
                        buf += memoryview(data)[start:end]
                        out.append(buf)
                    else:
                        out.append(data[start:end])
                except MemoryError:
                    out.append(memory_error())
                self._buf = buf = bytearray()  # a new one follows (the old one freed)

        if mode != _IDLE and not discarding:  # keep the incomplete message, within the limit
            if len(buf) + n - start > max_size:
                out.append(size_error(max_size))
                discarding = True
                buf.clear()
            else:
                try:
                    buf += memoryview(data)[start:]
                except MemoryError:
                    out.append(memory_error())
                    discarding = True
                    self._buf = buf = bytearray()
        self._mode = mode
        self._depth = depth
        self._discarding = discarding
        self._escape = escape
        return out
