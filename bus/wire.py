"""The wire format: how a request and its reply are laid out in ZeroMQ frames. No sockets here.

A request, as a client's DEALER sends it (a ROUTER sees routing frames in front)::

    frame 0   msgpack [version, op, request_id, args]     the header: small, always decoded
    frame 1.. bulk frames (record batches), never re-encoded

A reply::

    frame 0   msgpack [version, request_id, error, result]   error is None or [code, message]
    frame 1.. bulk frames

``request_id`` is chosen by the client and echoed back, so every request is retryable by id and a late
reply to an abandoned request is recognised and dropped. ``docs/protocol.md`` lists every op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import msgpack

from .errors import BusError, InvalidRequest, UnsupportedVersion

# A message frame: bytes, or a zmq.Frame (a buffer) as received with copy=False; the formats do not import zmq.
Frame: TypeAlias = Any

# 2: produce results carry the append time; batches are format 2 (bus/batch.py).
# 3: replication: partitions in metadata are {leader, leader_epoch, replicas, isr, partition_epoch}; produce,
#    fetch and list-offsets name the leader epoch they believe in; replica_fetch, alter_partition, elect_leaders.
VERSION = 3
# The header frame is small by construction; anything bigger is a rogue client, refused before decoding.
HEADER_BYTES_MAX = 1 << 20

# The idempotent producer's contract with a node: the node remembers each producer's last this-many
# batches per partition (a resend of any of them is recognised as a retry), and the producer keeps at most
# this many of a partition's batches in flight. Kafka uses 5; with 1 MiB batches that left the node idle a
# third of the time waiting for the next window (docs/benchmarks.md). Each remembered batch costs a few
# integers per producer.
IDEMPOTENCE_WINDOW_BATCHES = 16

# Ops served by a partition-owner node.
PRODUCE = "produce"
FETCH = "fetch"
LIST_OFFSETS = "list_offsets"
EPOCH_END_OFFSETS = "epoch_end_offsets"  # where a leader epoch ends (Kafka's OffsetForLeaderEpoch)
REPLICA_FETCH = "replica_fetch"  # a follower's fetch from its leader
# Ops served by the coordinator.
METADATA = "metadata"
CREATE_TOPIC = "create_topic"
DELETE_TOPIC = "delete_topic"
NODE_HEARTBEAT = "node_heartbeat"
INIT_PRODUCER_ID = "init_producer_id"
ALTER_PARTITION = "alter_partition"  # a leader's ISR change (compare-and-set on the partition epoch)
ELECT_LEADERS = "elect_leaders"  # an operator's unclean election
GROUP_JOIN = "group_join"
GROUP_HEARTBEAT = "group_heartbeat"
GROUP_LEAVE = "group_leave"
OFFSET_COMMIT = "offset_commit"
OFFSET_FETCH = "offset_fetch"
GROUP_LIST = "group_list"
GROUP_DESCRIBE = "group_describe"
GROUP_RESET_OFFSETS = "group_reset_offsets"
GROUP_DELETE = "group_delete"
# Served by both: a liveness probe.
PING = "ping"

_packb = msgpack.Packer(use_bin_type=True).pack


def encode_request(op: str, request_id: int, args: Any, bulk: Sequence[Frame] = ()) -> list[Frame]:
    return [_packb([VERSION, op, request_id, args]), *bulk]


def encode_reply(request_id: Any, result: Any = None, bulk: Sequence[Frame] = (),
                 error: BusError | None = None) -> list[Frame]:
    err = None if error is None else [error.code, error.message]
    return [_packb([VERSION, request_id, err, result]), *bulk]


def decode_request(frames: Sequence[Frame]) -> tuple[str, Any, Any, list[Frame]]:
    """Split a request into (op, request_id, args, bulk frames).

    Raises InvalidRequest (with ``request_id`` set on the exception when it could be read) for anything
    that is not a well-formed request, so the server can answer the rogue client and keep serving.
    """
    if not frames:
        raise InvalidRequest("empty message")
    header = frames[0]
    if len(header) > HEADER_BYTES_MAX:
        raise InvalidRequest(f"header frame of {len(header)} bytes exceeds {HEADER_BYTES_MAX}")
    try:
        decoded = msgpack.unpackb(header, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise InvalidRequest(f"header is not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(decoded, list) or len(decoded) != 4:
        raise InvalidRequest("header must be a msgpack array [version, op, request_id, args]")
    version, op, request_id, args = decoded
    if version != VERSION:
        refused: BusError = UnsupportedVersion(f"protocol version {version!r} not supported; this server speaks "
                                               f"{VERSION}")
        refused.request_id = request_id
        raise refused
    if not isinstance(op, str):
        refused = InvalidRequest("op must be a string")
        refused.request_id = request_id
        raise refused
    return op, request_id, args, list(frames[1:])


def decode_reply(frames: Sequence[Frame]) -> tuple[Any, list[Any] | None, Any, list[Frame]]:
    """Split a reply into (request_id, error, result, bulk). error is None or [code, message]."""
    version, request_id, error, result = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    if version != VERSION:
        raise UnsupportedVersion(f"server answered with protocol version {version!r}")
    return request_id, error, result, list(frames[1:])
