"""SPDK's JSON-RPC framing as a sans-I/O codec: a byte stream of concatenated JSON values in, one
decoded value at a time out; responses out as compact JSON plus a newline.

SPDK parses each complete top-level value, keeps the remainder and skips whitespace; there is no
length prefix and no required separator.  Malformed JSON is fatal for the connection (a -32700
reply, then close).  So is nesting deeper than SPDK's parser allows (SPDK_JSON_MAX_NESTING_DEPTH):
it is refused while scanning, before Python's recursive decoder could run out of stack.
"""

from __future__ import annotations

import json
from typing import Any

MAX_BUFFERED = 256 * 1024          # SPDK's receive buffer: a larger request cannot be parsed
MAX_DEPTH = 64                     # SPDK_JSON_MAX_NESTING_DEPTH (lib/json)
_WS = b" \t\r\n"
_DELIMITERS = b" \t\r\n{}[]\","


class FramingError(Exception):
    """The stream is not JSON (or a value is too large); the connection must close."""


class JsonStreamDecoder:
    """Feed bytes; ``next_value()`` returns each complete top-level JSON value in turn."""

    def __init__(self, max_buffered: int = MAX_BUFFERED) -> None:
        self._buf = bytearray()
        self._max = max_buffered

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_value(self) -> tuple[bool, Any]:
        """(True, value) for the next complete value, (False, None) if more bytes are needed.
        Raises FramingError for malformed JSON or a value larger than the buffer limit."""
        start = 0
        while start < len(self._buf) and self._buf[start] in _WS:
            start += 1
        if start:
            del self._buf[:start]
        if not self._buf:
            return False, None
        end = self._value_end()
        if end is None:
            if len(self._buf) > self._max:
                raise FramingError("request larger than %d bytes" % self._max)
            return False, None
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        try:
            return True, json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FramingError(str(exc)) from None

    def _value_end(self) -> int | None:
        """Index just past the first top-level value, or None if it is not complete yet."""
        buf = self._buf
        first = buf[0]
        if first in b"{[":
            depth = 0
            in_string = escaped = False
            for i in range(len(buf)):
                c = buf[i]
                if in_string:
                    if escaped:
                        escaped = False
                    elif c == 0x5C:          # backslash
                        escaped = True
                    elif c == 0x22:
                        in_string = False
                elif c == 0x22:
                    in_string = True
                elif c in b"{[":
                    depth += 1
                    if depth > MAX_DEPTH:
                        raise FramingError("JSON nested deeper than %d levels" % MAX_DEPTH)
                elif c in b"}]":
                    depth -= 1
                    if depth == 0:
                        return i + 1
            return None
        if first == 0x22:
            escaped = False
            for i in range(1, len(buf)):
                c = buf[i]
                if escaped:
                    escaped = False
                elif c == 0x5C:
                    escaped = True
                elif c == 0x22:
                    return i + 1
            return None
        if first in b"}]":
            raise FramingError("unexpected %r" % chr(first))
        # A bare number or literal ends at a delimiter; at the end of the buffer it may go on.
        for i in range(len(buf)):
            if buf[i] in _DELIMITERS:
                return i
        return None


def decode_document(data: bytes) -> Any:
    """One whole JSON document (an HTTP body), with the stream's limits on nesting; FramingError
    for anything else (malformed, nested too deep, trailing bytes)."""
    decoder = JsonStreamDecoder(max_buffered=len(data) + 1)
    decoder.feed(data + b" ")        # a bare number at the very end is complete
    complete, value = decoder.next_value()
    if not complete:
        raise FramingError("incomplete JSON document")
    if decoder.next_value()[0] or decoder.buffered:
        raise FramingError("extra data after the JSON document")
    return value


def encode_response(message: dict | list) -> bytes:
    """Compact JSON (no whitespace, non-ASCII escaped, '/' not escaped) and a newline."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
