"""Kafka's request and response messages, through kafka-python 3's ``kafka.protocol`` (message types
generated from Kafka's own JSON schemas; docs/kafka.md says why this one). Pure: a request frame's bytes
in, a decoded header and body out; a response's fields (plain dicts, ints and strings) in, its frame's
bytes out. No sockets.

What is implemented is exactly ``SUPPORTED``, the table ApiVersions advertises: per API key (the
schema's request and response classes, lowest version, highest version). A request for any other key or
version is refused by ``decode_request`` with ``Unsupported``, whose answer (``unsupported_response``) is
ApiVersions v0's shape: correlation id, UNSUPPORTED_VERSION and the supported ranges, which is what a Kafka
broker answers to an ApiVersions it does not speak, and what a client that sent something else at least
reads as an error. A frame that does not decode is ``Malformed`` (the listener closes the connection).

Responses are built by ``build(cls, values)`` from nested dicts: a field not given takes its schema
default, so one dict of fields serves every version of an API, and a version encodes only its own fields.
"""

from __future__ import annotations

import struct
import typing
from functools import cache

from kafka.protocol.admin import (CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
                                  DescribeConfigsRequest, DescribeConfigsResponse, DescribeGroupsRequest,
                                  DescribeGroupsResponse, ListGroupsRequest, ListGroupsResponse)
from kafka.protocol.api_message import ApiMessage
from kafka.protocol.consumer import (FetchRequest, FetchResponse, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
                                     JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListOffsetsRequest,
                                     ListOffsetsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
                                     OffsetFetchResponse, OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse,
                                     SyncGroupRequest, SyncGroupResponse)
from kafka.protocol.metadata import (ApiVersionsRequest, ApiVersionsResponse, FindCoordinatorRequest,
                                     FindCoordinatorResponse, MetadataRequest, MetadataResponse)
from kafka.protocol.producer import InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse

from . import schemas


class ConsumerGroupHeartbeatRequest(ApiMessage, load_json=schemas):
    """KIP-848's heartbeat (``schemas/``: kafka-python 3 has no schema for it)."""


class ConsumerGroupHeartbeatResponse(ApiMessage, load_json=schemas):
    pass


class ConsumerGroupDescribeRequest(ApiMessage, load_json=schemas):
    """KIP-848's describe (``schemas/``, as the heartbeat's): AdminClient.describe_consumer_groups asks it
    first, and DescribeGroups only where it is refused."""


class ConsumerGroupDescribeResponse(ApiMessage, load_json=schemas):
    pass


PRODUCE, FETCH, LIST_OFFSETS, METADATA, API_VERSIONS, CREATE_TOPICS, DELETE_TOPICS, INIT_PRODUCER_ID = (
    0, 1, 2, 3, 18, 19, 20, 22)
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP, HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, DESCRIBE_GROUPS, \
    LIST_GROUPS = 8, 9, 10, 11, 12, 13, 14, 15, 16
CONSUMER_GROUP_HEARTBEAT, CONSUMER_GROUP_DESCRIBE = 68, 69
OFFSET_FOR_LEADER_EPOCH, DESCRIBE_CONFIGS = 23, 32
# api key -> (request class, response class, lowest version, highest version): what ApiVersions
# advertises, and all that is implemented. The lowest: Produce 3 and Fetch 4 are the first with record
# batches of magic 2; the highest: Fetch 12 is the last that names topics (13 uses topic ids: so not 16,
# whose answers tell the current leader's endpoint; 12's tell its id and epoch), the others
# what today's clients (librdkafka 2.x, kafka-python 3.x) use without features not implemented here.
SUPPORTED = {
    PRODUCE: (ProduceRequest, ProduceResponse, 3, 10),  # 10: the current leader with NOT_LEADER (KIP-951)
    FETCH: (FetchRequest, FetchResponse, 4, 12),
    # 7: -3, the record with the largest timestamp; 8: -4, the local log start (9 and up: tiered storage)
    LIST_OFFSETS: (ListOffsetsRequest, ListOffsetsResponse, 1, 8),
    METADATA: (MetadataRequest, MetadataResponse, 1, 12),
    API_VERSIONS: (ApiVersionsRequest, ApiVersionsResponse, 0, 3),
    CREATE_TOPICS: (CreateTopicsRequest, CreateTopicsResponse, 2, 7),  # answered by the coordinator
    DELETE_TOPICS: (DeleteTopicsRequest, DeleteTopicsResponse, 1, 5),  # by name (6 names topics by id)
    INIT_PRODUCER_ID: (InitProducerIdRequest, InitProducerIdResponse, 0, 4),  # idempotence; no transactions
    # The group APIs (nodes/kafka/group_apis.py), on the coordinator; a node points at it. OffsetCommit 9 is
    # the first a KIP-848 member may commit with (its member epoch); OffsetFetch 8+ batch groups;
    # FindCoordinator 5+ are transactions'.
    OFFSET_COMMIT: (OffsetCommitRequest, OffsetCommitResponse, 2, 9),
    OFFSET_FETCH: (OffsetFetchRequest, OffsetFetchResponse, 1, 7),
    FIND_COORDINATOR: (FindCoordinatorRequest, FindCoordinatorResponse, 0, 4),
    JOIN_GROUP: (JoinGroupRequest, JoinGroupResponse, 0, 9),
    HEARTBEAT: (HeartbeatRequest, HeartbeatResponse, 0, 4),
    LEAVE_GROUP: (LeaveGroupRequest, LeaveGroupResponse, 0, 5),
    SYNC_GROUP: (SyncGroupRequest, SyncGroupResponse, 0, 5),
    DESCRIBE_GROUPS: (DescribeGroupsRequest, DescribeGroupsResponse, 0, 5),
    LIST_GROUPS: (ListGroupsRequest, ListGroupsResponse, 0, 4),
    CONSUMER_GROUP_HEARTBEAT: (ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse, 0, 1),
    CONSUMER_GROUP_DESCRIBE: (ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse, 0, 1),
    # The schema's whole range (Kafka 4 dropped 0 and 1); consumers' truncation check after a leader change
    OFFSET_FOR_LEADER_EPOCH: (OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, 2, 4),
    DESCRIBE_CONFIGS: (DescribeConfigsRequest, DescribeConfigsResponse, 1, 4),  # topics and brokers (configs.py)
}

# Kafka's error codes used here (org.apache.kafka.common.protocol.Errors).
NONE = 0
OFFSET_OUT_OF_RANGE = 1
CORRUPT_MESSAGE = 2
UNKNOWN_TOPIC_OR_PARTITION = 3
NOT_LEADER_OR_FOLLOWER = 6
REQUEST_TIMED_OUT = 7
COORDINATOR_NOT_AVAILABLE = 15
MESSAGE_TOO_LARGE = 10
NOT_ENOUGH_REPLICAS = 19
NOT_ENOUGH_REPLICAS_AFTER_APPEND = 20
TOPIC_ALREADY_EXISTS = 36
INVALID_PARTITIONS = 37
INVALID_REPLICATION_FACTOR = 38
INVALID_CONFIG = 40
UNSUPPORTED_VERSION = 35
INVALID_REQUEST = 42
OUT_OF_ORDER_SEQUENCE_NUMBER = 45
KAFKA_STORAGE_ERROR = 56
FENCED_LEADER_EPOCH = 74
UNKNOWN_LEADER_EPOCH = 75
UNSUPPORTED_COMPRESSION_TYPE = 76
OFFSET_NOT_AVAILABLE = 78
INVALID_RECORD = 87
TRANSACTIONAL_ID_NOT_FOUND = 105
UNKNOWN_SERVER_ERROR = -1
# The group APIs' (nodes/kafka/classic_group.py, group_apis.py).
OFFSET_METADATA_TOO_LARGE = 12
NOT_COORDINATOR = 16
ILLEGAL_GENERATION = 22
INCONSISTENT_GROUP_PROTOCOL = 23
INVALID_GROUP_ID = 24
UNKNOWN_MEMBER_ID = 25
INVALID_SESSION_TIMEOUT = 26
REBALANCE_IN_PROGRESS = 27
INVALID_COMMIT_OFFSET_SIZE = 28
GROUP_ID_NOT_FOUND = 69
GROUP_MAX_SIZE_REACHED = 81
MEMBER_ID_REQUIRED = 79
FENCED_INSTANCE_ID = 82
FENCED_MEMBER_EPOCH = 110
UNSUPPORTED_ASSIGNOR = 112
STALE_MEMBER_EPOCH = 113

# The bus's error codes (bus/errors.py) as Kafka's: what a Kafka client must do with each is what a bus
# client does (refresh metadata and retry, give up, or resolve an indeterminate outcome).
FROM_BUS = {
    "NOT_LEADER": NOT_LEADER_OR_FOLLOWER,
    "UNKNOWN_TOPIC": UNKNOWN_TOPIC_OR_PARTITION,
    "UNKNOWN_PARTITION": UNKNOWN_TOPIC_OR_PARTITION,
    "NOT_ENOUGH_REPLICAS": NOT_ENOUGH_REPLICAS,
    "CORRUPT_RECORD": CORRUPT_MESSAGE,
    "RECORD_TOO_LARGE": MESSAGE_TOO_LARGE,
    "OFFSET_OUT_OF_RANGE": OFFSET_OUT_OF_RANGE,
    "FENCED_LEADER_EPOCH": FENCED_LEADER_EPOCH,
    "UNKNOWN_LEADER_EPOCH": UNKNOWN_LEADER_EPOCH,
    "OFFSET_NOT_AVAILABLE": OFFSET_NOT_AVAILABLE,
    "TIMEOUT": REQUEST_TIMED_OUT,
    # Indeterminate (the batch may be kept): Kafka's word for a produce whose replication did not complete.
    "NOT_COMMITTED": NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    "STORAGE_FULL": KAFKA_STORAGE_ERROR,
    "OUT_OF_ORDER_SEQUENCE": OUT_OF_ORDER_SEQUENCE_NUMBER,
    "PRODUCER_FENCED": 47,  # INVALID_PRODUCER_EPOCH: a newer epoch of the producer id exists
    "NODE_UNAVAILABLE": COORDINATOR_NOT_AVAILABLE,
    "INVALID_REQUEST": INVALID_REQUEST,
    "UNSUPPORTED_VERSION": UNSUPPORTED_VERSION,
    "UNSUPPORTED_COMPRESSION_TYPE": UNSUPPORTED_COMPRESSION_TYPE,
    "TOPIC_EXISTS": TOPIC_ALREADY_EXISTS,
    "INVALID_CONFIG": INVALID_CONFIG,
    "NO_NODES_AVAILABLE": INVALID_REPLICATION_FACTOR,  # fewer live nodes than the replicas asked for
}


def kafka_code(bus_code: str | None) -> int:
    return NONE if bus_code is None else FROM_BUS.get(bus_code, UNKNOWN_SERVER_ERROR)


class Malformed(ValueError):
    """A frame that is not a Kafka request at all: the connection is closed."""


class Unsupported(Exception):
    """A well-framed request for an API key or version not in SUPPORTED: answered, the connection kept."""

    def __init__(self, api_key: int, api_version: int, correlation_id: int):
        super().__init__(f"api key {api_key} version {api_version} is not supported")
        self.api_key, self.api_version, self.correlation_id = api_key, api_version, correlation_id


class RequestHeader(typing.NamedTuple):
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None


@cache
def message_class(api_key: int, version: int, kind: str):
    """The class of a request or response (``kind``) of ``api_key`` at ``version``."""
    request, response, _, _ = SUPPORTED[api_key]
    return (request if kind == "request" else response)[version]


# What a body's decoder raises on bytes that are not that message (found by fuzzing it,
# tests/test_kafka_parts.py): struct.error on a short buffer, IndexError past the end, ValueError and
# UnicodeDecodeError on bad lengths and strings; the others on values no field takes. It allocates nothing
# by a length it read before reading that many items, so a hostile array length fails on the buffer's end.
DECODE_ERRORS = (struct.error, IndexError, ValueError, UnicodeDecodeError, KeyError, TypeError, OverflowError,
                  MemoryError)


_HEADER = struct.Struct(">hhih")


def _read_uvarint(buf, at: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if at >= len(buf):
            raise Malformed("tagged fields run past the frame")
        byte = buf[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, at
        shift += 7
        if shift > 28:
            raise Malformed("unsigned varint longer than 5 bytes")


def decode_request(frame) -> tuple[RequestHeader, object]:
    """A request frame (without its length prefix) as (header, request message). ``Malformed`` for a
    frame that cannot be read; ``Unsupported`` for a key or version not implemented."""
    view = memoryview(frame)
    if len(view) < _HEADER.size:
        raise Malformed(f"a {len(view)}-byte frame is shorter than a request header")
    api_key, api_version, correlation_id, client_id_len = _HEADER.unpack_from(view)
    at = _HEADER.size
    client_id = None
    if client_id_len >= 0:
        if at + client_id_len > len(view):
            raise Malformed("client id runs past the frame")
        client_id = bytes(view[at:at + client_id_len]).decode(errors="replace")
        at += client_id_len
    elif client_id_len != -1:
        raise Malformed(f"client id length {client_id_len}")
    header = RequestHeader(api_key, api_version, correlation_id, client_id)
    supported = SUPPORTED.get(api_key)
    if supported is None or not supported[2] <= api_version <= supported[3]:
        raise Unsupported(api_key, api_version, correlation_id)
    cls = message_class(api_key, api_version, "request")
    if cls.flexible_version_q(api_version):  # request header v2: tagged fields after the client id
        count, at = _read_uvarint(view, at)
        for _ in range(count):
            _, at = _read_uvarint(view, at)
            size, at = _read_uvarint(view, at)
            at += size
        if at > len(view):
            raise Malformed("tagged fields run past the frame")
    try:
        body = cls.decode(view[at:])
    except DECODE_ERRORS as exc:
        raise Malformed(f"{cls.__name__} does not decode: {exc.__class__.__name__}: {exc}") from None
    return header, body


def encode_response(header: RequestHeader, values: dict) -> bytearray:
    """The response frame (length prefix included) answering ``header``, built from ``values``.

    The response header is v1 (tagged fields) for flexible versions, except ApiVersions', always v0 (so a
    client that does not yet know what the broker speaks can read it): kafka-python's classes say which.
    The frame is encoded whole, in one buffer, copied out once: a Fetch answer is megabytes, and each
    further copy of it (a prefix joined on, a bytes() of it) cost the node more than the encoding, as each
    is a fresh allocation of that size (1.2 ms for a 1 MB answer with three copies, 0.12 ms with one)."""
    message = build(message_class(header.api_key, header.api_version, "response"), values)
    message.with_header(correlation_id=header.correlation_id)
    return message.encode(header=True, framed=True)


def api_versions_values(error_code: int = NONE) -> dict:
    return {"error_code": error_code, "throttle_time_ms": 0,
            "api_keys": [{"api_key": key, "min_version": low, "max_version": high}
                         for key, (_, _, low, high) in sorted(SUPPORTED.items())]}


def unsupported_response(exc: Unsupported) -> bytes:
    """The answer to a request of a key or version not implemented: ApiVersions v0's shape (correlation
    id, UNSUPPORTED_VERSION, the supported ranges), as a Kafka broker answers an ApiVersions it does not
    speak."""
    return encode_response(RequestHeader(API_VERSIONS, 0, exc.correlation_id, None),
                           api_versions_values(UNSUPPORTED_VERSION))


# -- building messages from dicts ---------------------------------------------------------------------

def build(cls, values: dict):
    """An instance of the message or nested struct class ``cls`` from ``values`` (nested dicts and lists for
    nested structs); fields not in ``values`` take their schema default, keys ``cls`` has no field for
    are ignored."""
    fields = cls._struct.fields
    kwargs = {}
    for name, value in values.items():
        field = fields.get(name)
        if field is None:
            continue
        if value is not None and field.is_struct_array():
            value = [build(field.data_class, item) if isinstance(item, dict) else item for item in value]
        elif value is not None and field.is_struct():
            value = build(field.data_class, value) if isinstance(value, dict) else value
        kwargs[name] = value
    return cls(**kwargs)
