"""The pure parts of the Kafka listener (nodes/kafka/): the framing, the record batch conversion both ways,
and the message codec (kafka-python's message classes, driven by nodes/kafka/codec.py). Kafka-python's
own record batch builder and reader are the independent side for the conversion; the codec's requests are
built and its responses read by kafka-python's message classes, so those tests check the adapter (header
versions, field names, defaults, the unsupported answer), not the library against itself."""

from __future__ import annotations

import gzip
import struct

import pytest
from crc32c import crc32c
from kafka.protocol.admin import DescribeConfigsRequest, DescribeConfigsResponse
from kafka.protocol.consumer import (FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
                                     OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse)
from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse
from kafka.protocol.producer import ProduceRequest, ProduceResponse
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from bus import batch as bus_batch
from bus import kafka_batch as kafka_format
from bus.errors import CorruptRecord
from nodes.kafka import codec, configs, records
from nodes.kafka.framing import FrameReader, FrameTooLarge, frame


def kafka_batch(rows, compression: int = 0, transactional: bool = False) -> bytes:
    """rows: (timestamp ms, key, value, headers) each, built by kafka-python."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=compression, is_transactional=transactional,
                                        producer_id=7 if transactional else -1, producer_epoch=0 if transactional else -1,
                                        base_sequence=0 if transactional else -1, batch_size=1 << 22)
    for offset, (ts, key, value, headers) in enumerate(rows):
        builder.append(offset, timestamp=ts, key=key, value=value, headers=headers)
    return bytes(builder.build())


ROWS = [(1_700_000_000_000 + 7 * i, None if i == 0 else b"key-%d" % i, b"value-%d" % i,
         [("h", b"x"), ("n", None)] if i % 2 else []) for i in range(5)]


# -- framing ------------------------------------------------------------------------------------------

def test_frames_are_cut_from_any_split_of_the_stream():
    stream = frame(b"one") + frame(b"") + frame(b"three" * 100)
    for step in (1, 3, 7, len(stream)):
        reader = FrameReader(1024)
        got = []
        for at in range(0, len(stream), step):
            got += reader.feed(stream[at:at + step])
        assert got == [b"one", b"", b"three" * 100]
        assert reader.buffered_bytes == 0


@pytest.mark.parametrize("length", [1025, 2**31 - 1, -1, -(2**31)])
def test_a_length_prefix_past_the_limit_is_refused_before_its_frame_is_buffered(length):
    reader = FrameReader(1024)
    assert reader.feed(frame(b"ok")) == [b"ok"]
    with pytest.raises(FrameTooLarge):
        reader.feed(struct.pack(">i", length) + b"x" * 10)
    assert reader.buffered_bytes <= 14  # what was read: nothing sized by the prefix


# -- record batches -------------------------------------------------------------------------------------

def stored(bus_bytes: bytes, base_offset: int, append_ts_ms: int = 1_800_000_000_000, epoch: int = 3) -> bytes:
    out, _ = bus_batch.stamp(bytearray(bus_bytes), base_offset, append_ts_ms, epoch)
    return bytes(out)


def without_offsets(kafka_bytes) -> bytes:
    """Kafka batches with baseOffset and partitionLeaderEpoch zeroed: the fields a broker sets."""
    out, at = bytearray(kafka_bytes), 0
    while at < len(out):
        length = struct.unpack_from(">i", out, at + 8)[0]
        struct.pack_into(">q", out, at, 0)
        struct.pack_into(">i", out, at + 12, 0)
        at += 12 + length
    return bytes(out)


@pytest.mark.parametrize("compression", [0, 1, 3, 4], ids=["none", "gzip", "lz4", "zstd"])
def test_a_kafka_batch_is_stored_as_sent_served_untouched_and_read_by_the_bus(compression):
    sent = kafka_batch(ROWS, compression)
    wrapped = bus_batch.wrap_kafka(sent)
    header = bus_batch.verify(wrapped)
    assert bus_batch.holds_kafka(header.attributes) and header.record_count == len(ROWS)
    assert header.max_ts_ms == max(r[0] for r in ROWS) and not header.attributes & bus_batch.APPEND_TIME
    assert bytes(wrapped[bus_batch.HEADER_BYTES:]) == sent  # the payload is the producer's bytes
    stamps, keys, values, headers = bus_batch.read_columns(wrapped[bus_batch.HEADER_BYTES:], len(ROWS),
                                                           header.attributes)
    assert stamps == [r[0] for r in ROWS] and values == [r[2] for r in ROWS]
    assert keys == [r[1] for r in ROWS]
    assert headers == [r[3] or None for r in ROWS]
    served = records.as_kafka(stored(wrapped, 100))
    assert without_offsets(served) == without_offsets(sent)  # untouched but for the broker's two fields
    back = DefaultRecordBatch(served)
    assert back.validate_crc() and back.base_offset == 100
    assert back.leader_epoch == 3  # the partition leader epoch the node stamped
    assert back.timestamp_type == 0  # CreateTime
    assert [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in back] == [
        (100 + i, ts, key, value, headers) for i, (ts, key, value, headers) in enumerate(ROWS)]


def test_a_bus_batch_survives_kafka_with_offsets_keys_headers_and_timestamps():
    flat = [x for ts, key, value, headers in ROWS for x in (ts, key, value, headers or None)]
    back = DefaultRecordBatch(records.as_kafka(stored(bus_batch.pack_batch(flat, len(ROWS)), 100)))
    assert back.validate_crc() and back.base_offset == 100 and back.leader_epoch == 3
    assert [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in back] == [
        (100 + i, ts, key, value, headers) for i, (ts, key, value, headers) in enumerate(ROWS)]


def test_several_kafka_batches_in_one_produce_take_consecutive_offsets():
    sent = idempotent(10, 3) + idempotent(13, 2)
    served = records.as_kafka(stored(bus_batch.wrap_kafka(sent), 40, epoch=6))
    assert without_offsets(served) == without_offsets(sent)
    first = DefaultRecordBatch(served)
    second = DefaultRecordBatch(served[12 + struct.unpack_from(">i", served, 8)[0]:])
    assert (first.base_offset, second.base_offset, first.leader_epoch, second.leader_epoch) == (40, 43, 6, 6)
    assert [r.offset for r in second] == [43, 44]


def test_a_kafka_batch_without_timestamps_takes_the_append_time_and_log_append_time_is_refused():
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    builder.append(0, timestamp=None, key=None, value=b"a", headers=[])
    sent = bytearray(builder.build())
    struct.pack_into(">qq", sent, 27, -1, -1)  # NO_TIMESTAMP, as a client without timestamps sends
    struct.pack_into(">I", sent, 17, crc32c(bytes(sent[21:])))
    header = bus_batch.verify(stored(bus_batch.wrap_kafka(bytes(sent)), 0, append_ts_ms=1_800_000_000_555))
    assert header.attributes & bus_batch.APPEND_TIME and header.max_ts_ms == 1_800_000_000_555
    with pytest.raises(kafka_format.UnsupportedBatch, match="LogAppendTime"):
        bus_batch.wrap_kafka(with_attributes(kafka_batch(ROWS), kafka_format.LOG_APPEND_TIME))


def test_a_kafka_format_batch_that_does_not_hold_its_claimed_records_is_refused_on_stamping():
    """A rogue bus client sending a batch of the Kafka format over the bus's wire: its CRC holds, its layout
    does not; the node refuses it as CORRUPT_RECORD and writes nothing."""
    wrapped = bus_batch.wrap_kafka(kafka_batch(ROWS))
    for damage in ("count", "magic"):
        bad = bytearray(wrapped)
        if damage == "count":
            struct.pack_into(">i", bad, 18, len(ROWS) + 1)  # the bus header's record_count
        else:
            bad[bus_batch.HEADER_BYTES + 16] = 1
        struct.pack_into(">I", bad, 0, crc32c(bytes(bad[4:bus_batch.HEADER_BYTES]),
                                              crc32c(bytes(bad[bus_batch.HEADER_BYTES:]))))
        before = bytes(bad)
        with pytest.raises(CorruptRecord):
            bus_batch.stamp(bad, 0, 1, 1)
        assert bytes(bad) == before


def test_bus_records_without_timestamps_are_log_append_time_in_kafka():
    bus_bytes = bus_batch.pack_batch([None, b"k", b"a", None, None, None, b"b", [("h", b"v")]], 2)
    data = stored(bus_bytes, 5, append_ts_ms=1_800_000_000_123) + stored(bus_bytes, 7, append_ts_ms=1_800_000_000_999)
    out = records.as_kafka(data, skip_below=7)  # the first batch ends at 7: left out
    back = DefaultRecordBatch(out)
    assert back.validate_crc() and back.timestamp_type == 1 and back.max_timestamp == 1_800_000_000_999
    assert [(r.offset, r.key, r.value, r.headers) for r in back] == [(7, b"k", b"a", []), (8, None, b"b", [("h", b"v")])]
    assert len(out) == len(bytes(out))  # one batch: nothing after it
    assert records.as_kafka(data, skip_below=6)[:8] == struct.pack(">q", 5)


def with_attributes(data: bytes, attributes: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(">h", out, 21, attributes)
    struct.pack_into(">I", out, 17, crc32c(bytes(out[21:])))
    return bytes(out)


def test_an_unknown_codec_and_transactional_and_control_batches_are_refused_by_name():
    plain = kafka_batch(ROWS)
    with pytest.raises(kafka_format.UnsupportedCompression, match="not known"):
        kafka_format.decode_batch(memoryview(with_attributes(plain, 5)))
    for flag in (kafka_format.TRANSACTIONAL, kafka_format.CONTROL):
        with pytest.raises(kafka_format.UnsupportedBatch):
            kafka_format.decode_batch(memoryview(with_attributes(plain, flag)))


def test_every_flipped_bit_after_the_length_is_refused_and_nothing_else_escapes():
    data = kafka_batch(ROWS[:2])
    for at in range(len(data)):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[at] ^= 1 << bit
            try:
                [view] = kafka_format.split_batches(bytes(damaged))
                kafka_format.decode_batch(view)
            except CorruptRecord:
                continue
            # Only the fields outside the CRC that the conversion does not take may change unnoticed:
            # the base offset (the node gives its own) and the partition leader epoch (the node stamps its own).
            assert at < 8 or 12 <= at < 16, f"a flip of bit {bit} of byte {at} went unnoticed"


def test_a_batch_decompressing_past_the_bound_is_refused(monkeypatch):
    monkeypatch.setattr(kafka_format, "UNCOMPRESSED_BYTES_MAX", 1 << 16)
    rows = [(1, None, b"\0" * 40_000, [])] * 2
    for codec_id in (1, 3, 4):
        [view] = kafka_format.split_batches(kafka_batch(rows, codec_id))
        with pytest.raises(CorruptRecord, match="past|above"):
            kafka_format.decode_batch(view)
    # gzip truncated: refused, not read as fewer records
    body = gzip.compress(b"x" * 1000)[:-8]
    with pytest.raises(CorruptRecord):
        kafka_format._decompress(kafka_format.CODEC_GZIP, body)


def test_lengths_and_counts_that_do_not_hold_are_refused():
    data = bytearray(kafka_batch(ROWS))
    with pytest.raises(CorruptRecord):
        kafka_format.split_batches(bytes(data[:-1]))  # shorter than its batchLength says
    with pytest.raises(CorruptRecord):
        kafka_format.split_batches(bytes(data[:30]))
    struct.pack_into(">i", data, 57, 6)  # record count one more than there are records
    struct.pack_into(">I", data, 17, crc32c(bytes(data[21:])))
    with pytest.raises(CorruptRecord):
        kafka_format.decode_batch(memoryview(bytes(data)))


# -- messages -------------------------------------------------------------------------------------------

def request_bytes(message, correlation_id: int = 11) -> bytes:
    message.with_header(correlation_id=correlation_id, client_id="test")
    return bytes(message.encode(header=True))


def produce_request(version: int):
    return ProduceRequest[version](acks=-1, timeout_ms=1500, topic_data=[ProduceRequest.TopicProduceData(
        name="t", partition_data=[ProduceRequest.TopicProduceData.PartitionProduceData(
            index=2, records=kafka_batch(ROWS))])])


@pytest.mark.parametrize("version", [3, 9])
def test_produce_requests_decode_at_the_lowest_and_highest_versions(version):
    header, body = codec.decode_request(request_bytes(produce_request(version)))
    assert header == codec.RequestHeader(codec.PRODUCE, version, 11, "test")
    assert body.acks == -1 and body.timeout_ms == 1500
    [topic] = body.topic_data
    assert topic.name == "t" and topic.partition_data[0].index == 2
    assert bytes(topic.partition_data[0].records) == kafka_batch(ROWS)


@pytest.mark.parametrize("version", [4, 12])
def test_fetch_requests_decode(version):
    message = FetchRequest[version](replica_id=-1, max_wait_ms=500, min_bytes=1, max_bytes=1 << 20, isolation_level=0,
                                    topics=[FetchRequest.FetchTopic(topic="t", partitions=[
                                        FetchRequest.FetchTopic.FetchPartition(partition=1, fetch_offset=42,
                                                                               partition_max_bytes=1 << 16)])])
    _, body = codec.decode_request(request_bytes(message))
    [part] = body.topics[0].partitions
    assert body.max_wait_ms == 500 and (part.partition, part.fetch_offset) == (1, 42)


# A 79-byte Fetch v12 whose nested array lengths are garbage: kio 0.6.5's native decoder (measured as the
# codec first) tries to allocate 238 GB for it and aborts the process (SIGABRT), so one frame from anyone
# would kill a node. The decoder here must refuse it as Malformed, allocating nothing by the claimed length.
ABORTED_KIO = bytes.fromhex(
    "0001000c0000000b0004746573740065737400ffffffff0000000500000001000000090000000000ffffffff6e02740200000000"
    "ffffffff2e00000000000001ffffffffffffffff68ffffff00000009000001")


def test_the_frame_that_aborted_kio_is_malformed():
    with pytest.raises(codec.Malformed):
        codec.decode_request(ABORTED_KIO)


def test_every_truncation_of_a_request_is_malformed_not_a_crash():
    data = request_bytes(produce_request(9))
    for cut in range(len(data) - 1, 0, -37):
        with pytest.raises(codec.Malformed):
            codec.decode_request(data[:cut])


@pytest.mark.parametrize("key, version", [(codec.PRODUCE, 2), (codec.PRODUCE, 11), (codec.FETCH, 13), (999, 0),
                                          (codec.API_VERSIONS, 4)])
def test_a_key_or_version_not_implemented_is_answered_unsupported_with_the_ranges(key, version):
    data = struct.pack(">hhih", key, version, 77, -1) + b"\0" * 8
    with pytest.raises(codec.Unsupported) as refused:
        codec.decode_request(data)
    response = codec.unsupported_response(refused.value)
    assert struct.unpack_from(">ii", response) == (len(response) - 4, 77)
    answer = ApiVersionsResponse[0].decode(response[8:])
    assert answer.error_code == codec.UNSUPPORTED_VERSION
    assert {k.api_key: (k.min_version, k.max_version) for k in answer.api_keys} == {
        key: (low, high) for key, (_, _, low, high) in codec.SUPPORTED.items()}


def response_body(header: codec.RequestHeader, values: dict, cls):
    data = codec.encode_response(header, values)
    assert struct.unpack_from(">ii", data) == (len(data) - 4, header.correlation_id)
    flexible = cls[header.api_version].flexible_version_q(header.api_version) and header.api_key != codec.API_VERSIONS
    return cls[header.api_version].decode(data[8 + flexible:])


@pytest.mark.parametrize("version", [0, 3])
def test_api_versions_answers_what_is_implemented(version):
    _, body = codec.decode_request(request_bytes(ApiVersionsRequest[version]()))
    answer = response_body(codec.RequestHeader(codec.API_VERSIONS, version, 5, None), codec.api_versions_values(),
                           ApiVersionsResponse)
    assert answer.error_code == 0 and len(answer.api_keys) == len(codec.SUPPORTED)


@pytest.mark.parametrize("version", [1, 12])
def test_metadata_responses_encode(version):
    codec.decode_request(request_bytes(MetadataRequest[version](topics=None)))
    values = {"brokers": [{"node_id": 1, "host": "h", "port": 9093}], "cluster_id": "c", "controller_id": -1,
              "topics": [{"error_code": 0, "name": "t", "partitions": [
                  {"error_code": 0, "partition_index": 0, "leader_id": 1, "leader_epoch": 4, "replica_nodes": [1, 2],
                   "isr_nodes": [1], "offline_replicas": [2]}]}]}
    answer = response_body(codec.RequestHeader(codec.METADATA, version, 9, None), values, MetadataResponse)
    assert [(b.node_id, b.host, b.port) for b in answer.brokers] == [(1, "h", 9093)]
    [partition] = answer.topics[0].partitions
    assert (partition.leader_id, list(partition.replica_nodes), list(partition.isr_nodes)) == (1, [1, 2], [1])


@pytest.mark.parametrize("version", [3, 9])
def test_produce_responses_encode(version):
    values = {"responses": [{"name": "t", "partition_responses": [
        {"index": 2, "error_code": codec.NOT_LEADER_OR_FOLLOWER, "base_offset": -1, "error_message": "no"}]}]}
    answer = response_body(codec.RequestHeader(codec.PRODUCE, version, 9, None), values, ProduceResponse)
    [part] = answer.responses[0].partition_responses
    assert (part.index, part.error_code, part.base_offset) == (2, 6, -1)


@pytest.mark.parametrize("version", [4, 12])
def test_fetch_responses_encode_with_records(version):
    data = kafka_batch(ROWS)
    values = {"responses": [{"topic": "t", "partitions": [
        {"partition_index": 1, "error_code": 0, "high_watermark": 5, "last_stable_offset": 5, "log_start_offset": 0,
         "records": data}]}]}
    answer = response_body(codec.RequestHeader(codec.FETCH, version, 9, None), values, FetchResponse)
    [part] = answer.responses[0].partitions
    assert part.high_watermark == 5 and bytes(part.records) == data


def list_offsets_request(version: int, timestamp: int = -2):
    return ListOffsetsRequest[version](replica_id=-1, topics=[ListOffsetsRequest.ListOffsetsTopic(
        name="t", partitions=[ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(
            partition_index=0, current_leader_epoch=3, timestamp=timestamp)])])


@pytest.mark.parametrize("version", [1, 6, 7, 8])
def test_list_offsets_requests_and_responses(version):
    _, body = codec.decode_request(request_bytes(list_offsets_request(version, -3)))
    assert body.topics[0].partitions[0].timestamp == -3
    values = {"topics": [{"name": "t", "partitions": [{"partition_index": 0, "error_code": 0, "timestamp": 1234,
                                                        "offset": 17, "leader_epoch": 2}]}]}
    answer = response_body(codec.RequestHeader(codec.LIST_OFFSETS, version, 9, None), values, ListOffsetsResponse)
    [part] = answer.topics[0].partitions
    assert (part.offset, part.timestamp) == (17, 1234)
    assert part.leader_epoch == (2 if version >= 4 else -1)  # a field of v4 and up


def offset_for_leader_epoch_request(version: int):
    return OffsetForLeaderEpochRequest[version](replica_id=-1, topics=[OffsetForLeaderEpochRequest.OffsetForLeaderTopic(
        topic="t", partitions=[OffsetForLeaderEpochRequest.OffsetForLeaderTopic.OffsetForLeaderPartition(
            partition=1, current_leader_epoch=4, leader_epoch=2)])])


@pytest.mark.parametrize("version", [2, 3, 4])
def test_offset_for_leader_epoch_requests_and_responses(version):
    _, body = codec.decode_request(request_bytes(offset_for_leader_epoch_request(version)))
    [part] = body.topics[0].partitions
    assert (body.topics[0].topic, part.partition, part.current_leader_epoch, part.leader_epoch) == ("t", 1, 4, 2)
    values = {"topics": [{"topic": "t", "partitions": [{"partition": 1, "error_code": codec.FENCED_LEADER_EPOCH,
                                                         "leader_epoch": 2, "end_offset": 40}]}]}
    answer = response_body(codec.RequestHeader(codec.OFFSET_FOR_LEADER_EPOCH, version, 9, None), values,
                           OffsetForLeaderEpochResponse)
    [part] = answer.topics[0].partitions
    assert (part.partition, part.error_code, part.leader_epoch, part.end_offset) == (1, 74, 2, 40)


def describe_configs_request(version: int, resource_type: int = configs.TOPIC, name: str = "t", keys=None):
    return DescribeConfigsRequest[version](resources=[DescribeConfigsRequest.DescribeConfigsResource(
        resource_type=resource_type, resource_name=name, configuration_keys=keys)], include_synonyms=True)


@pytest.mark.parametrize("version", [1, 3, 4])
def test_describe_configs_requests_and_responses(version):
    _, body = codec.decode_request(request_bytes(describe_configs_request(version, keys=["retention.ms"])))
    [resource] = body.resources
    assert (resource.resource_type, resource.resource_name, list(resource.configuration_keys)) == (
        2, "t", ["retention.ms"])
    topics = {"t": {"id": 1, "replication_factor": 1, "min_insync_replicas": 1, "retention_ms": 60_000,
                    "retention_bytes": None, "partitions": []}}
    row = configs.describe(resource.resource_type, resource.resource_name, resource.configuration_keys, topics,
                           1, body.include_synonyms)
    answer = response_body(codec.RequestHeader(codec.DESCRIBE_CONFIGS, version, 9, None),
                           {"results": [row]}, DescribeConfigsResponse)
    [result] = answer.results
    [config] = result.configs
    assert (result.error_code, config.name, config.value, config.read_only, config.config_source) == (
        0, "retention.ms", "60000", True, configs.DYNAMIC_TOPIC_CONFIG)
    assert [(s.name, s.value) for s in config.synonyms] == [("retention.ms", "60000")]


def test_describe_configs_tells_a_topic_s_settings_and_the_bus_s_defaults():
    topics = {"t": {"id": 1, "replication_factor": 3, "min_insync_replicas": 2, "retention_ms": None,
                    "retention_bytes": 1 << 30, "partitions": []},
              "u": {"id": 2, "replication_factor": 3, "min_insync_replicas": 3, "retention_ms": 5,
                    "retention_bytes": None, "partitions": []}}

    def values(name, keys=None):
        row = configs.describe(configs.TOPIC, name, keys, topics, 1, False)
        assert row["error_code"] == 0
        return {c["name"]: (c["value"], c["config_source"]) for c in row["configs"]}

    default, topic = configs.DEFAULT_CONFIG, configs.DYNAMIC_TOPIC_CONFIG
    assert values("t") == {"retention.ms": ("-1", default), "retention.bytes": (str(1 << 30), topic),
                           "min.insync.replicas": ("2", default),  # three replicas: 2 is the default
                           "cleanup.policy": ("delete", default), "compression.type": ("producer", default),
                           "max.message.bytes": (str(16 << 20), default),
                           "message.timestamp.type": ("CreateTime", default)}
    assert values("u", ["min.insync.replicas", "retention.ms", "no.such.config"]) == {
        "min.insync.replicas": ("3", topic), "retention.ms": ("5", topic)}  # an unknown name is left out
    assert configs.describe(configs.TOPIC, "nope", None, topics, 1, False)["error_code"] == 3
    broker = configs.describe(configs.BROKER, "1", ["message.max.bytes"], topics, 1, False)
    assert [(c["name"], c["value"]) for c in broker["configs"]] == [("message.max.bytes", str(16 << 20))]
    assert configs.describe(configs.BROKER, "", None, topics, None, False)["configs"]  # the defaults, anywhere
    for name, broker_id in (("2", 1), ("None", None), ("1", None)):
        assert configs.describe(configs.BROKER, name, None, topics, broker_id, False)["error_code"] == 42
    assert configs.describe(8, "1", None, topics, 1, False)["error_code"] == 42  # BROKER_LOGGER: not here


def test_bus_error_codes_map_to_kafka_codes():
    assert codec.kafka_code(None) == 0
    assert codec.kafka_code("NOT_LEADER") == 6 and codec.kafka_code("UNKNOWN_TOPIC") == 3
    assert codec.kafka_code("NOT_ENOUGH_REPLICAS") == 19 and codec.kafka_code("CORRUPT_RECORD") == 2
    assert codec.kafka_code("RECORD_TOO_LARGE") == 10 and codec.kafka_code("OFFSET_OUT_OF_RANGE") == 1
    assert codec.kafka_code("SOMETHING_NEW") == codec.UNKNOWN_SERVER_ERROR


def idempotent(sequence: int, count: int, producer_id: int = 42, epoch: int = 3) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=producer_id,
                                        producer_epoch=epoch, base_sequence=sequence, batch_size=1 << 20)
    for offset in range(count):
        builder.append(offset, timestamp=5, key=None, value=b"s%d" % (sequence + offset), headers=[])
    return bytes(builder.build())


def test_the_idempotent_producers_id_epoch_and_sequence_become_the_bus_batchs():
    header = bus_batch.verify(bus_batch.wrap_kafka(idempotent(10, 3) + idempotent(13, 2)))
    assert header.record_count == 5
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (42, 3, 10)
    for parts in (idempotent(10, 3) + idempotent(14, 1), idempotent(0, 1) + idempotent(1, 1, producer_id=43),
                  idempotent(0, 1) + kafka_batch(ROWS)):
        with pytest.raises(CorruptRecord, match="consecutive"):
            bus_batch.wrap_kafka(parts)
    header = bus_batch.verify(bus_batch.wrap_kafka(kafka_batch(ROWS)))
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (-1, -1, -1)
    # Sequences wrap past 2**31 - 1 to 0, as a Kafka producer numbers them: batches across it are consecutive.
    top = kafka_format.SEQUENCE_MAX
    header = bus_batch.verify(bus_batch.wrap_kafka(idempotent(top - 1, 3) + idempotent(1, 2)))
    assert (header.base_sequence, header.record_count, header.last_sequence) == (top - 1, 5, 2)


# -- the decoder against mutated input (hypothesis): it refuses, it never crashes ----------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALID_REQUESTS = [
    request_bytes(produce_request(3)), request_bytes(produce_request(9)),
    request_bytes(MetadataRequest[1](topics=[MetadataRequest.MetadataRequestTopic(name="t")])),
    request_bytes(MetadataRequest[12](topics=None)), request_bytes(ApiVersionsRequest[3]()),
    request_bytes(FetchRequest[12](replica_id=-1, max_wait_ms=5, min_bytes=1, max_bytes=9, isolation_level=0, topics=[
        FetchRequest.FetchTopic(topic="t", partitions=[FetchRequest.FetchTopic.FetchPartition(
            partition=0, fetch_offset=1, partition_max_bytes=9)])])),
    request_bytes(ListOffsetsRequest[6](replica_id=-1, topics=[ListOffsetsRequest.ListOffsetsTopic(
        name="t", partitions=[ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(partition_index=0,
                                                                                       timestamp=-1)])])),
    request_bytes(list_offsets_request(8, -3)),
    request_bytes(offset_for_leader_epoch_request(2)), request_bytes(offset_for_leader_epoch_request(4)),
    request_bytes(describe_configs_request(1, keys=["retention.ms", "cleanup.policy"])),
    request_bytes(describe_configs_request(4, configs.BROKER, "1")),
]


@settings(max_examples=int(__import__("os").environ.get("KAFKA_FUZZ_EXAMPLES", 400)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_REQUESTS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(0, 10_000), st.binary(max_size=8))
def test_a_mutated_request_decodes_or_is_refused_as_malformed_or_unsupported(data, flips, cut, tail):
    damaged = bytearray(data)
    for at, value in flips:
        damaged[at % len(damaged)] = value
    damaged = bytes(damaged[:max(1, len(damaged) - cut % 20)]) + tail
    try:
        codec.decode_request(damaged)
    except (codec.Malformed, codec.Unsupported):
        pass


@settings(max_examples=int(__import__("os").environ.get("KAFKA_FUZZ_EXAMPLES", 300)), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_a_mutated_record_batch_converts_or_is_corrupt_record(flips):
    damaged = bytearray(kafka_batch(ROWS))
    for at, value in flips:
        damaged[at % len(damaged)] = value
    # The CRC would catch almost every flip: recompute it, so the parser behind it is what is tested.
    struct.pack_into(">I", damaged, 17, crc32c(bytes(damaged[21:])))
    try:
        bus_batch.wrap_kafka(bytes(damaged))
    except CorruptRecord:
        pass


def test_lengths_and_deltas_at_every_varint_boundary_convert_both_ways():
    """The conversion reads one- and two-byte varints inline: values, keys and timestamp deltas on each side
    of 64 and 8,192 (where a zigzag varint grows a byte), negative deltas, empty and null fields."""
    sizes = [0, 1, 62, 63, 64, 65, 8190, 8191, 8192, 8193, 70_000]
    rows = []
    for i, size in enumerate(sizes):
        headers = [("h" * (size % 100), b"x" * size)] if i % 2 else []
        rows.append((1_700_000_000_000 + [0, -1, 63, 64, -65, 8191, 8192, -8193, 10**9, 1, 2][i],
                     None if i % 3 == 0 else b"k" * size, b"v" * size, headers))
    rows.append((1_700_000_000_000, b"", None, [("n", None)]))  # an empty key, a null value (a tombstone)
    wrapped = bus_batch.wrap_kafka(kafka_batch(rows))
    stamps, keys, values, headers = bus_batch.read_columns(wrapped[bus_batch.HEADER_BYTES:], len(rows),
                                                           bus_batch.verify(wrapped).attributes)
    assert list(zip(stamps, keys, values, headers)) == [(ts, k, v, h or None) for ts, k, v, h in rows]
    flat = [x for ts, key, value, headers in rows for x in (ts, key, value, headers or None)]
    back = DefaultRecordBatch(records.as_kafka(stored(bus_batch.pack_batch(flat, len(rows)), 0)))
    assert back.validate_crc()
    assert [(r.timestamp, r.key, r.value, r.headers) for r in back] == [
        (ts, key, value, headers) for ts, key, value, headers in rows]


def snappy_batch(compressed: bytes) -> bytes:
    """ROWS' batch with its records replaced by ``compressed`` and the codec set to snappy (kafka-python
    cannot build one without python-snappy)."""
    plain = kafka_batch(ROWS)
    out = bytearray(plain[:kafka_format.HEADER_BYTES]) + compressed
    struct.pack_into(">i", out, 8, len(out) - 12)
    struct.pack_into(">h", out, 21, kafka_format.CODEC_SNAPPY)
    struct.pack_into(">I", out, 17, crc32c(bytes(out[21:])))
    return bytes(out)


def test_snappy_raw_and_xerial_framed_batches_convert_and_a_claim_past_the_bound_is_refused(monkeypatch):
    import cramjam

    body = kafka_batch(ROWS)[kafka_format.HEADER_BYTES:]
    raw = bytes(cramjam.snappy.compress_raw(body))
    blocks = [bytes(cramjam.snappy.compress_raw(part)) for part in (body[:100], body[100:])]
    xerial = b"\x82SNAPPY\x00" + struct.pack(">ii", 1, 1) + b"".join(struct.pack(">i", len(b)) + b for b in blocks)
    for compressed in (raw, xerial):
        decoded = kafka_format.decode_batch(memoryview(snappy_batch(compressed)))
        assert decoded.flat[2::4] == [r[2] for r in ROWS] and decoded.flat[0::4] == [r[0] for r in ROWS]
    for damaged in (xerial[:-3], xerial[:20], raw[:-2], b"\xff\xff\xff\xff\x7f" + raw[1:]):
        with pytest.raises(CorruptRecord):
            kafka_format.decode_batch(memoryview(snappy_batch(damaged)))
    monkeypatch.setattr(kafka_format, "UNCOMPRESSED_BYTES_MAX", 64)  # the claim is checked before decompressing
    with pytest.raises(CorruptRecord, match="claims"):
        kafka_format.decode_batch(memoryview(snappy_batch(raw)))


def test_the_time_index_and_a_replica_read_a_kafka_producers_stored_batch_like_any_other():
    from store.log_contract import record_at_time, record_with_max_time

    stored_batch = stored(bus_batch.wrap_kafka(kafka_batch(ROWS)), 20)
    assert record_at_time([stored_batch], ROWS[2][0], 25) == (22, ROWS[2][0])  # ROWS' timestamps rise by 7 ms
    assert record_at_time([stored_batch], ROWS[-1][0] + 1, 25) == (25, -1)
    assert record_with_max_time([stored_batch], 25) == (24, ROWS[-1][0])  # ListOffsets' -3
    header = bus_batch.verify(stored_batch)  # what a follower checks before appending the leader's bytes
    assert (header.base_offset, header.next_offset, header.leader_epoch) == (20, 25, 3)


def test_a_produced_batch_is_refused_unless_its_records_frame_it_and_a_reader_checks_their_fields():
    """On produce the node walks each record's framing (length, timestamp delta, offset delta) without
    decoding its fields; a bus reader decodes them and refuses what does not hold. Each damage below comes
    with a CRC to match, as a rogue client would send it."""
    def damaged(edit) -> bytes:
        out = bytearray(kafka_batch([(1_700_000_000_000, b"k", b"v" * 70, [])] * 3))
        edit(out)
        struct.pack_into(">I", out, 17, crc32c(bytes(out[21:])))
        return bytes(out)

    first = kafka_format.HEADER_BYTES  # the first record's length varint
    _, after_length = kafka_format._read_varint(kafka_batch([(1_700_000_000_000, b"k", b"v" * 70, [])]), first)
    offset_delta_at = after_length + 2  # after the record's attributes and its one-byte timestamp delta
    for edit in (lambda b: b.__setitem__(offset_delta_at, 2 << 1),  # offset delta 2 for the first record
                 lambda b: b.__setitem__(first, b[first] + 2)):  # a record length past its own fields
        with pytest.raises(CorruptRecord):
            bus_batch.wrap_kafka(damaged(edit))
    key_length_at = offset_delta_at + 1
    bad_key = damaged(lambda b: b.__setitem__(key_length_at, 5 << 1))  # a key longer than its record holds
    wrapped = bus_batch.wrap_kafka(bad_key)  # framing holds: stored as sent, as the bus stores its own batches
    with pytest.raises(CorruptRecord):
        bus_batch.read_columns(wrapped[bus_batch.HEADER_BYTES:], 3, bus_batch.verify(wrapped).attributes)
