"""Kafka's framing: every request and response is a 4-byte big-endian length, then that many bytes. Pure:
``FrameReader.feed(bytes)`` returns the whole frames received so far; nothing here touches a socket.

The length is checked against ``frame_bytes_max`` as soon as its 4 bytes are in, before any buffer for the
frame exists, so a rogue client's length prefix (say 2 GiB) cannot make a server allocate it: ``feed``
raises ``FrameTooLarge`` and the shell closes the connection. A negative length is ``FrameTooLarge`` too.
What a connection buffers is bounded by one frame plus one read.
"""

from __future__ import annotations

import struct

_LENGTH = struct.Struct(">i")
FRAME_BYTES_MAX_DEFAULT = 100 << 20  # Kafka's socket.request.max.bytes: 100 MiB


class FrameTooLarge(ValueError):
    """A length prefix past the limit (or negative): the connection is closed, nothing allocated."""


class FrameReader:
    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT):
        assert frame_bytes_max > 0
        self.frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()  # received bytes not yet a whole frame: at most one frame and a read

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data) -> list[bytes]:
        """Append ``data``; return every whole frame now complete (without length prefixes), in order."""
        self._buffer += data
        frames = []
        at = 0
        buffer = self._buffer
        while len(buffer) - at >= 4:
            length = _LENGTH.unpack_from(buffer, at)[0]
            if length < 0 or length > self.frame_bytes_max:
                raise FrameTooLarge(f"frame length {length} is outside 0..{self.frame_bytes_max}")
            if len(buffer) - at - 4 < length:
                break
            frames.append(bytes(buffer[at + 4:at + 4 + length]))
            at += 4 + length
        if at:
            del buffer[:at]
        return frames


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload
