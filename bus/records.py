"""The value types users see: a consumed ``Record`` and the ``RecordMetadata`` of an acknowledged send."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeAlias, TypeVar

# What the formats read bytes from: a received frame's buffer, a slice of one, or bytes.
Buffer: TypeAlias = bytes | bytearray | memoryview

# The clients' type parameters, with defaults (PEP 696), so that a plain ``Consumer`` or ``Record`` in a user's
# annotation means the bytes ones and needs no parameters under mypy --strict. Python 3.11's TypeVar takes no
# default=: the checkers read typing_extensions' (its stubs ship with mypy and pyright, so the client gains
# no dependency), and at run time these are plain TypeVars, which is all Generic needs.
if TYPE_CHECKING:
    from typing_extensions import TypeVar as _TypeVar

    # A consumed record's key and value: bytes, or what the consumer's key_deserializer / value_deserializer
    # return.
    K = _TypeVar("K", default=bytes)
    V = _TypeVar("V", default=bytes)
    # What a producer's send() takes as key and value: bytes-like, or what its key_serializer /
    # value_serializer take.
    KeyIn = _TypeVar("KeyIn", default=Buffer)
    ValueIn = _TypeVar("ValueIn", default=Buffer)
else:
    K, V, KeyIn, ValueIn = TypeVar("K"), TypeVar("V"), TypeVar("KeyIn"), TypeVar("ValueIn")


class Record(NamedTuple, Generic[K, V]):
    """A consumed record. ``Record`` is ``Record[bytes, bytes]``; a consumer with deserializers returns
    ``Record[K, V]``, K and V what they return (never called for None: no key, a tombstone)."""

    topic: str
    partition: int
    offset: int
    key: K | None
    value: V | None  # None: a tombstone (sent as value=None), distinct from b""
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
# A consumer's key_deserializer= or value_deserializer=: bytes to the records' key or value (never given None).
Deserializer: TypeAlias = Callable[[bytes], _V]
# on_assign, on_revoke, on_lost: called with the partitions, sorted.
PartitionsCallback: TypeAlias = Callable[[list[TopicPartition]], object]
# on_commit and commit_async's callback: the offsets ({tp: (offset, metadata)}), and the error or None.
CommitCallback: TypeAlias = Callable[[dict[TopicPartition, tuple[int, str | None]], BaseException | None], object]
