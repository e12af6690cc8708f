"""The value types users see: a consumed ``Record`` and the ``RecordMetadata`` of an acknowledged send."""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

# What the formats read bytes from: a received frame's buffer, a slice of one, or bytes.
Buffer: TypeAlias = bytes | bytearray | memoryview


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone (sent as value=None), distinct from b""
    headers: list[tuple[str, bytes | None]] | None  # [(str, bytes)], as sent (a dict of headers comes back as its pairs)
    timestamp_ms: int  # the producer's, if send() was given one; else the time its node appended it


class RecordMetadata(NamedTuple):
    topic: str
    partition: int
    offset: int  # -1 with acks=0: nothing was acknowledged
    timestamp_ms: int  # as Record's; -1 with acks=0 when send() was given none


class TopicPartition(NamedTuple):
    topic: str
    partition: int
