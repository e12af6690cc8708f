"""Kafka message codecs measured side by side: kio and kafka-python 3's kafka.protocol (the one
nodes/kafka/ uses; docs/kafka.md says why). Each case is one message a node decodes or encodes on its hot
path, the same bytes for both (the two encodings are checked equal). Prints microseconds per message, the
best of 5 runs.

    pip install kio && python scripts/kafka_codec_bench.py
"""

from __future__ import annotations

import io
import timeit
import uuid

from kafka.protocol.consumer import FetchRequest as KPFetchRequest, FetchResponse as KPFetch
from kafka.protocol.metadata import MetadataResponse as KPMetadata
from kafka.protocol.producer import ProduceRequest as KPProduce
from kafka.record.default_records import DefaultRecordBatchBuilder
import datetime
import importlib
import typing
import dataclasses

from kio.schema.errors import ErrorCode
from kio.serial import entity_reader, entity_writer

from nodes.kafka import codec

PARTITIONS = 10


def records(count: int = 100, value_bytes: int = 100) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 22)
    for i in range(count):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=b"k%d" % i, value=b"v" * value_bytes, headers=[])
    return bytes(builder.build())


def main() -> None:
    batch = records()
    cases = []

    produce = KPProduce[9](acks=-1, timeout_ms=30_000, topic_data=[KPProduce.TopicProduceData(name="t", partition_data=[
        KPProduce.TopicProduceData.PartitionProduceData(index=p, records=batch) for p in range(PARTITIONS)])])
    produce_bytes = bytes(produce.encode())
    read_produce = entity_reader(kio_class("produce", 9, "request"))
    cases.append(("decode Produce v9, 10 partitions x 100 records", lambda: read_produce(produce_bytes, 0),
                  lambda: KPProduce[9].decode(produce_bytes)))

    fetch_request = KPFetchRequest[12](replica_id=-1, max_wait_ms=500, min_bytes=1, max_bytes=1 << 20, topics=[
        KPFetchRequest.FetchTopic(topic="t", partitions=[KPFetchRequest.FetchTopic.FetchPartition(
            partition=p, fetch_offset=1000, partition_max_bytes=1 << 20) for p in range(PARTITIONS)])])
    fetch_request_bytes = bytes(fetch_request.encode())
    read_fetch = entity_reader(kio_class("fetch", 12, "request"))
    cases.append(("decode Fetch v12, 10 partitions", lambda: read_fetch(fetch_request_bytes, 0),
                  lambda: KPFetchRequest[12].decode(fetch_request_bytes)))

    fetch_values = {"throttle_time": 0, "error_code": 0, "session_id": 0, "responses": [{"topic": "t", "partitions": [
        {"partition_index": p, "error_code": 0, "high_watermark": 1000, "last_stable_offset": 1000,
         "log_start_offset": 0, "aborted_transactions": None, "preferred_read_replica": -1, "records": batch}
        for p in range(PARTITIONS)]}]}
    fetch_cls = kio_class("fetch", 12, "response")
    kp_fetch = lambda: KPFetch[12](throttle_time_ms=0, error_code=0, session_id=0, responses=[KPFetch.FetchableTopicResponse(
        topic="t", partitions=[KPFetch.FetchableTopicResponse.PartitionData(
            partition_index=p, error_code=0, high_watermark=1000, last_stable_offset=1000, log_start_offset=0,
            aborted_transactions=None, preferred_read_replica=-1, records=batch) for p in range(PARTITIONS)])])
    kp_fetch_values = {**fetch_values, "throttle_time_ms": 0}
    cases.append(("build+encode Fetch v12 response, 10 x 11 KB", lambda: encode(fetch_cls, fetch_values),
                  lambda: codec.build(KPFetch[12], kp_fetch_values).encode()))

    metadata_values = {"throttle_time": 0, "brokers": [{"node_id": n, "host": "127.0.0.1", "port": 9092 + n} for n in (1, 2, 3)],
                       "cluster_id": "c", "controller_id": -1, "topics": [
                           {"error_code": 0, "name": f"topic-{t}", "topic_id": uuid.UUID(int=t + 1), "partitions": [
                               {"error_code": 0, "partition_index": p, "leader_id": 1 + p % 3, "leader_epoch": 0,
                                "replica_nodes": [1, 2, 3], "isr_nodes": [1, 2, 3]} for p in range(10)]}
                           for t in range(10)]}
    metadata_cls = kio_class("metadata", 12, "response")
    kp_metadata = lambda: KPMetadata[12](throttle_time_ms=0, brokers=[  # noqa: E731
        KPMetadata.MetadataResponseBroker(node_id=n, host="127.0.0.1", port=9092 + n) for n in (1, 2, 3)],
                                 cluster_id="c", controller_id=-1, topics=[KPMetadata.MetadataResponseTopic(
                                     error_code=0, name=f"topic-{t}", topic_id=uuid.UUID(int=t + 1), partitions=[
                                         KPMetadata.MetadataResponseTopic.MetadataResponsePartition(
                                             error_code=0, partition_index=p, leader_id=1 + p % 3, leader_epoch=0,
                                             replica_nodes=[1, 2, 3], isr_nodes=[1, 2, 3], offline_replicas=[])
                                         for p in range(10)]) for t in range(10)])
    kp_metadata_values = {**metadata_values, "throttle_time_ms": 0}
    cases.append(("build+encode Metadata v12 response, 10 topics x 10", lambda: encode(metadata_cls, metadata_values),
                  lambda: codec.build(KPMetadata[12], kp_metadata_values).encode()))

    assert encode(fetch_cls, fetch_values) == bytes(kp_fetch().encode()) == bytes(
        codec.build(KPFetch[12], kp_fetch_values).encode())
    assert encode(metadata_cls, metadata_values) == bytes(kp_metadata().encode()) == bytes(
        codec.build(KPMetadata[12], kp_metadata_values).encode())
    print(f"{'case':50s} {'kio us':>9s} {'kafka-python us':>16s}")
    for name, kio_fn, kp_fn in cases:
        kio_us, kp_us = (min(timeit.repeat(fn, number=500, repeat=5)) / 500 * 1e6 for fn in (kio_fn, kp_fn))
        print(f"{name:50s} {kio_us:9.1f} {kp_us:16.1f}")


def kio_class(name: str, version: int, kind: str):
    module = importlib.import_module(f"kio.schema.{name}.v{version}.{kind}")
    return getattr(module, "".join(p.capitalize() for p in name.split("_")) + kind.capitalize())


def kio_build(cls, values: dict):
    """A kio entity from nested dicts, each field not given at its default or its type's zero (what the
    first version of nodes/kafka/codec.py did over kio)."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        hint = field.type
        if isinstance(hint, typing.types.UnionType):
            hint = [a for a in hint.__args__ if a is not type(None)][0]
        kind = field.metadata.get("kafka_type")
        if field.name in values:
            value = values[field.name]
            if value is None:
                pass
            elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
                value = tuple(kio_build(typing.get_args(hint)[0], v) for v in value)
            elif kind == "error_code":
                value = ErrorCode(value)
            elif kind == "timedelta_i32":
                value = datetime.timedelta(milliseconds=value)
            elif typing.get_origin(hint) is tuple:
                value = tuple(value)
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        elif dataclasses.is_dataclass(hint):
            value = kio_build(hint, {})
        elif kind == "timedelta_i32":
            value = datetime.timedelta(0)
        elif kind == "error_code":
            value = ErrorCode.none
        else:
            value = 0
        kwargs[field.name] = value
    return cls(**kwargs)


def encode(cls, values) -> bytes:
    buffer = io.BytesIO()
    entity_writer(cls)(buffer, kio_build(cls, values))
    return buffer.getvalue()


if __name__ == "__main__":
    main()
