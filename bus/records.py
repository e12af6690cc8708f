"""The value types users see: a consumed ``Record`` and the ``RecordMetadata`` of an acknowledged send."""

from __future__ import annotations

from typing import NamedTuple


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list | None
    timestamp_ms: int  # the producer's, if send() was given one; else the time its node appended it


class RecordMetadata(NamedTuple):
    topic: str
    partition: int
    offset: int  # -1 with acks=0: nothing was acknowledged
    timestamp_ms: int  # as Record's; -1 with acks=0 when send() was given none


class TopicPartition(NamedTuple):
    topic: str
    partition: int
