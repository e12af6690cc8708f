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

import msgpack

from .errors import BusError, InvalidRequest, UnsupportedVersion

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


def encode_request(op: str, request_id: int, args, bulk=()) -> list:
    return [_packb([VERSION, op, request_id, args]), *bulk]


def encode_reply(request_id, result=None, bulk=(), error: BusError | None = None) -> list:
    err = None if error is None else [error.code, error.message]
    return [_packb([VERSION, request_id, err, result]), *bulk]


def decode_request(frames: list) -> tuple[str, object, object, list]:
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
        exc = UnsupportedVersion(f"protocol version {version!r} not supported; this server speaks {VERSION}")
        exc.request_id = request_id
        raise exc
    if not isinstance(op, str):
        exc = InvalidRequest("op must be a string")
        exc.request_id = request_id
        raise exc
    return op, request_id, args, frames[1:]


def decode_reply(frames: list) -> tuple[object, list | None, object, list]:
    """Split a reply into (request_id, error, result, bulk). error is None or [code, message]."""
    version, request_id, error, result = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    if version != VERSION:
        raise UnsupportedVersion(f"server answered with protocol version {version!r}")
    return request_id, error, result, frames[1:]
