"""The value types users see: a consumed ``Record`` and the ``RecordMetadata`` of an acknowledged send."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, TypeAlias, TypeVar

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


_V = TypeVar("_V")

# What the clients take as partitions: (topic, partition) pairs (TopicPartitions among them).
Partitions: TypeAlias = Iterable[tuple[str, int]]
# What they take as a value per partition, keyed by TopicPartitions or by plain (topic, partition) pairs (a
# Mapping's key type is invariant: one of tuple[str, int] keys would refuse a dict of TopicPartition keys).
PartitionMap: TypeAlias = Mapping[TopicPartition, _V] | Mapping[tuple[str, int], _V]
# The offsets a commit is given: {tp: offset} or {tp: (offset, metadata or None)}.
CommitOffsets: TypeAlias = PartitionMap[int | tuple[int, str | None]]
# A consumer's key_deserializer= or value_deserializer=: bytes to any object (never given None).
Deserializer: TypeAlias = Callable[[bytes], object]
# on_assign, on_revoke, on_lost: called with the partitions, sorted.
PartitionsCallback: TypeAlias = Callable[[list[TopicPartition]], object]
# on_commit and commit_async's callback: the offsets ({tp: (offset, metadata)}), and the error or None.
CommitCallback: TypeAlias = Callable[[dict[TopicPartition, tuple[int, str | None]], BaseException | None], object]
