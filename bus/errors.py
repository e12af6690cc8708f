"""The bus's typed errors, shared by the client library, the nodes and the wire format.

Every error says which of three things happened to the request that raised it (STYLE.md, "Errors"):
- ``definite``: the request was not applied; retrying or giving up are both safe.
- ``indeterminate``: it may have been applied (a timeout after sending, a lost reply); the idempotent
  producer resolves these by retrying with the same sequence number.
- ``fenced``: a newer epoch exists; this client (or member) must stop acting on its old view.

Two more class attributes say what a client does next, decided here once for every caller:
- ``retriable``: sending the same request again may succeed (the producer retries it; the group member
  retries a join or heartbeat on a fresh socket).
- ``refresh_metadata``: the client's view of the cluster is stale (the partition moved, the topic is new or
  gone); fetch the metadata again before the next request for that partition.
A new error is one class here with its two attributes; no list of codes elsewhere needs to change.

On the wire an error is ``[code, message]``; ``error_for(code, message)`` turns it back into the class
below, so a code added on the server but unknown to an older client still surfaces as a ``BusError``;
``error_class(code)`` answers the same for a per-partition result that carries only a code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

DEFINITE = "definite"
INDETERMINATE = "indeterminate"
FENCED = "fenced"


class BusError(Exception):
    """Base of every error the bus raises. ``code`` is the wire code; ``outcome`` says what happened."""

    code = "UNKNOWN_ERROR"
    outcome = DEFINITE
    retriable = False  # the same request may succeed if sent again
    refresh_metadata = False  # the client's metadata is stale: refresh it before sending again
    request_id: Any = None  # a server's refusal of a request: its id, when the request got as far as naming one

    def __init__(self, message: str = "", *, code: str | None = None):
        super().__init__(message or self.__class__.__name__)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(BusError, ValueError):
    """A client or server was constructed with arguments that cannot work, or a call was given a value out of
    its range (a negative ``timestamp_ms``); caught before any I/O. A send() argument of the wrong type is
    InvalidRecord."""

    code = "INVALID_CONFIG"


class InvalidRequest(BusError):
    """The peer sent something malformed: bad frames, bad msgpack, unknown op, wrong version."""

    code = "INVALID_REQUEST"


class UnsupportedVersion(InvalidRequest):
    code = "UNSUPPORTED_VERSION"


class UnknownTopic(BusError):
    """The node or coordinator does not know the topic (not yet created there, or deleted)."""

    code = "UNKNOWN_TOPIC"
    retriable = True
    refresh_metadata = True


class UnknownPartition(BusError):
    code = "UNKNOWN_PARTITION"
    retriable = True
    refresh_metadata = True


class TopicExists(BusError):
    code = "TOPIC_EXISTS"


class RecordTooLarge(BusError):
    code = "RECORD_TOO_LARGE"


class OffsetOutOfRange(BusError):
    code = "OFFSET_OUT_OF_RANGE"


class CorruptRecord(BusError):
    """A stored or received batch failed its CRC32C check; it is never served as data."""

    code = "CORRUPT_RECORD"


class StorageFull(BusError):
    """The node could not store the batch (LMDB map at its maximum, or the disk is full). Nothing was written."""

    code = "STORAGE_FULL"


class NoNodesAvailable(BusError):
    code = "NO_NODES_AVAILABLE"
    retriable = True


class NotLeader(BusError):
    """The node is not the partition's leader (leadership moved, or the client's metadata is stale)."""

    code = "NOT_LEADER"
    retriable = True
    refresh_metadata = True


class FencedLeaderEpoch(BusError):
    """The request named a leader epoch older than the partition's: a newer leader was elected since."""

    code = "FENCED_LEADER_EPOCH"
    retriable = True
    refresh_metadata = True


class UnknownLeaderEpoch(BusError):
    """The request named a leader epoch newer than the node knows: the node has not heard of it yet."""

    code = "UNKNOWN_LEADER_EPOCH"
    retriable = True


class NotEnoughReplicas(BusError):
    """acks="all" and the partition's in-sync replicas are fewer than its min_insync_replicas; nothing was
    written."""

    code = "NOT_ENOUGH_REPLICAS"
    retriable = True  # the in-sync set may grow back; the producer retries until its delivery timeout


class NotCommitted(BusError):
    """The leader appended the batch but lost its leadership before the batch was committed: the new
    leader may or may not hold it (the idempotent producer's retry is recognised if it does)."""

    code = "NOT_COMMITTED"
    outcome = INDETERMINATE
    retriable = True
    refresh_metadata = True


class OffsetNotAvailable(BusError):
    """A new leader cannot answer for its log end yet (its high watermark is still catching up)."""

    code = "OFFSET_NOT_AVAILABLE"
    retriable = True


class InvalidUpdateVersion(BusError):
    """An ISR change named a partition epoch that is not the current one (compare-and-set lost)."""

    code = "INVALID_UPDATE_VERSION"


class IneligibleReplica(BusError):
    """An ISR change or election named a replica that may not join: not alive, or not the incarnation
    that caught up (it restarted, maybe with an empty disk)."""

    code = "INELIGIBLE_REPLICA"


class NodeUnavailable(BusError):
    """No answer from a node or the coordinator; a request sent to it may or may not have been applied."""

    code = "NODE_UNAVAILABLE"
    outcome = INDETERMINATE
    retriable = True
    refresh_metadata = True  # the node may be down for good: its partitions' leadership moves elsewhere


class Timeout(BusError):
    """A deadline passed (request, delivery, or a full buffer). Sent requests are indeterminate."""

    code = "TIMEOUT"
    outcome = INDETERMINATE
    retriable = True
    refresh_metadata = True  # a node that does not answer may have lost its leadership


class BufferFull(Timeout):
    """``send()`` waited ``max_block_ms`` for room in the producer's buffer; the record was not sent."""

    code = "BUFFER_FULL"
    outcome = DEFINITE
    refresh_metadata = False
    retriable = False  # the producer's own back-pressure, raised to send()'s caller: how long to wait is theirs


class OutOfOrderSequence(BusError):
    """A produce batch skipped a sequence number; earlier batches of the producer are still in flight."""

    code = "OUT_OF_ORDER_SEQUENCE"
    retriable = True


class ProducerFenced(BusError):
    code = "PRODUCER_FENCED"
    outcome = FENCED


class UnknownMemberId(BusError):
    code = "UNKNOWN_MEMBER_ID"
    outcome = FENCED


class FencedMemberEpoch(BusError):
    code = "FENCED_MEMBER_EPOCH"
    outcome = FENCED


class NotAssigned(BusError):
    code = "NOT_ASSIGNED"


class UnknownGroup(BusError):
    code = "UNKNOWN_GROUP"


class GroupNotEmpty(BusError):
    """Resetting offsets or deleting a group needs it empty; the message lists its live members."""

    code = "GROUP_NOT_EMPTY"


class GroupFull(BusError):
    """The group already has the maximum number of members; nothing was joined."""

    code = "GROUP_FULL"


class InconsistentAssignor(BusError):
    """A join named another assignor than the one the group's live members use."""

    code = "INCONSISTENT_ASSIGNOR"


class InconsistentGroupProtocol(BusError):
    """The group name is in use by members of the other protocol (the bus's, or Kafka's classic one)."""

    code = "INCONSISTENT_GROUP_PROTOCOL"


class NodeIdentityMismatch(BusError):
    """A node was started on a data directory that belongs to another node, or that another process holds."""

    code = "NODE_IDENTITY_MISMATCH"


class ClosedError(BusError):
    """The client was closed: a ``send()``, ``poll()``, ``commit()`` or any other call on a closed Producer,
    Consumer or Admin (a ``poll()`` or ``position()`` waiting when another thread closes it too), or a
    record still in the producer's buffer when it closed. A call refused this way did nothing (definite); a
    record that was already sent when its producer closed may have been written (its error's outcome then
    says indeterminate). Never retriable: the client must be made again."""

    code = "CLOSED"


class ForkedError(BusError):
    """A client used in a process forked (``os.fork()``, multiprocessing's "fork" start method) from the one
    that made it: its background threads did not survive the fork and its sockets belong to the parent, so
    the call would hang. Nothing was done (definite). Make the client in the child instead; for one consumer
    per process, ``bus.run_consumers(n, target)`` starts each child with "spawn"."""

    code = "FORKED"


class InvalidRecord(BusError, TypeError):
    """``send()`` or ``send_many()`` was given an argument of the wrong type: a value or key that is not bytes
    (or bytearray / memoryview; a value may be None, a tombstone), headers that are not (str, bytes) pairs, a
    topic that is not a str, a partition or timestamp that is not an int, or a serializer that returned
    something other than bytes. Raised before anything of the call is queued (definite). A TypeError too, as Python's own calls raise for a wrong type; the message names
    the argument and says what to pass."""

    code = "INVALID_RECORD"


class SerializationError(BusError):
    """A serializer (``Producer(key_serializer=, value_serializer=)``) or deserializer
    (``Consumer(key_deserializer=, value_deserializer=)``) raised; its exception is ``__cause__``.

    ``argument`` is "key" or "value". From ``send()``: nothing of the call was queued (definite). From
    ``poll()``: ``topic``, ``partition`` and ``offset`` name the record, and its partition's position stays
    at it (records before it in the same poll are returned first, and the next poll raises), so a poll raises
    each time it reaches the record until ``seek()`` moves past it, as Kafka's RecordDeserializationException.
    Not retriable as it stands: the same bytes fail the same way."""

    code = "SERIALIZATION_FAILED"

    def __init__(self, message: str = "", *, code: str | None = None, argument: str | None = None,
                 topic: str | None = None, partition: int | None = None, offset: int | None = None):
        super().__init__(message, code=code)
        self.argument, self.topic, self.partition, self.offset = argument, topic, partition, offset


def _all_subclasses(cls: type[BusError]) -> Iterator[type[BusError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


_BY_CODE: dict[str, type[BusError]] = {}
for _cls in _all_subclasses(BusError):
    _BY_CODE.setdefault(_cls.code, _cls)


def error_class(code: str) -> type[BusError]:
    """The class of a wire error code; BusError for a code this client does not know (not retriable)."""
    return _BY_CODE.get(code, BusError)


def error_for(code: str, message: str = "") -> BusError:
    """The typed exception for a wire error code (unknown codes become a plain BusError with that code)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return BusError(message, code=code)
    return cls(message)
