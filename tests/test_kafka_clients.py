"""The issue's client runs (issue 13), one cluster for the module: for each of confluent-kafka, kafka-python
and aiokafka, a topic created through that client's admin API, 10,000 keyed records produced with
idempotence on, read back by assign() from the beginning with every key, value, header, timestamp and
offset checked, and read again by the bus's Consumer, which must see exactly the same records at the same
offsets. The other way: 10,000 records the bus's Producer wrote, read by each Kafka client exactly.
"""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from bus import Admin, Producer
from nodes.cluster import LocalCluster
from tests.conftest import wait_for
from tests.test_kafka import CLIENT_S, Deliveries, fetch_part, leader_address, read_bus

RECORDS = 10_000
PARTITIONS = 3
TS = 1_700_000_000_000


@pytest.fixture(scope="module")
def clients_cluster(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("kafka-clients") / "cluster"), 2, kafka_port=0)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def rows(client: str) -> list:
    """(key, value, headers, timestamp) of each record a client sends: keyed, two headers, its own time."""
    return [(b"%s-%d" % (client.encode(), i), b"value-%d-" % i + b"x" * (i % 50),
             [("i", b"%d" % i), ("client", client.encode())], TS + i) for i in range(RECORDS)]


def check_read(read: list, sent: list, delivered: dict) -> None:
    """``read``: (partition, offset, key, value, headers, timestamp) as a consumer saw them; ``sent``: the rows;
    ``delivered``: key -> (partition, offset) as the producer was told. Every record once, exactly as sent, at
    the offset it was acknowledged with; each partition's offsets 0, 1, 2, ... in order."""
    assert len(read) == len(sent) == len(delivered)
    by_key = {row[2]: row for row in read}
    assert len(by_key) == len(read)  # nothing twice
    for key, value, headers, timestamp in sent:
        partition, offset = delivered[key]
        assert by_key[key] == (partition, offset, key, value, headers, timestamp)
    for p in range(PARTITIONS):
        assert [r[1] for r in read if r[0] == p] == list(range(sum(1 for r in read if r[0] == p)))


def bus_view(cluster: LocalCluster, topic: str) -> list:
    """What the bus's Consumer reads of ``topic``, as the Kafka rows, in (partition, offset) order."""
    return sort_rows([(r.partition, r.offset, r.key, r.value, [tuple(h) for h in r.headers or ()], r.timestamp_ms)
                      for r in read_bus(cluster, topic, PARTITIONS, RECORDS)])


def producer_ids(cluster: LocalCluster, topic: str) -> set:
    """The producer ids of partition 0's batches as a Kafka reader is served them (the bus keeps a Kafka
    batch's producer id, epoch and sequence): one id >= 0 when an idempotent producer wrote them."""
    data = bytes(fetch_part(leader_address(cluster, topic, 0), topic, 0, -1).records)
    ids, at = set(), 0
    while at < len(data):
        (length,) = struct.unpack_from(">i", data, at + 8)
        ids.add(struct.unpack_from(">q", data, at + 43)[0])  # after base offset .. max timestamp
        at += 12 + length
    return ids


def sort_rows(read: list) -> list:
    return sorted(read, key=lambda r: (r[0], r[1]))


# -- each Kafka client: its admin API, its idempotent producer, its consumer by assign ----------------------

def confluent_read(bootstrap: str, topic: str, count: int) -> list:
    from confluent_kafka import OFFSET_BEGINNING, Consumer as KConsumer, TopicPartition

    consumer = KConsumer({"bootstrap.servers": bootstrap, "group.id": "unused-by-assign",
                          "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    got = []
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        deadline_s = time.monotonic() + CLIENT_S
        while len(got) < count and time.monotonic() < deadline_s:
            for m in consumer.consume(num_messages=10_000, timeout=0.2):
                assert m.error() is None, m.error()
                got.append((m.partition(), m.offset(), m.key(), m.value(), list(m.headers() or ()),
                            m.timestamp()[1]))
    finally:
        consumer.close()
    return got


def test_confluent_kafka_creates_produces_10000_idempotent_and_reads_them_back_as_the_bus_does(clients_cluster):
    from confluent_kafka import Producer as KProducer
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap, topic = clients_cluster.kafka_bootstrap, "tenk-confluent"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    assert admin.create_topics([NewTopic(topic, PARTITIONS, 2)], request_timeout=10)[topic].result(CLIENT_S) is None
    del admin
    sent = rows("confluent")
    producer = KProducer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    deliveries = Deliveries()
    for key, value, headers, timestamp in sent:
        producer.produce(topic, key=key, value=value, headers=headers, timestamp=timestamp, on_delivery=deliveries)
        producer.poll(0)
    assert producer.flush(CLIENT_S) == 0
    del producer
    assert deliveries.failed == []
    read = confluent_read(bootstrap, topic, RECORDS)
    check_read(read, sent, deliveries.by_key)
    assert bus_view(clients_cluster, topic) == sort_rows(read)
    [producer_id] = producer_ids(clients_cluster, topic)
    assert producer_id >= 0


def kafka_python_read(bootstrap: str, topic: str, count: int) -> list:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000)
    got = []
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        deadline_s = time.monotonic() + CLIENT_S
        while len(got) < count and time.monotonic() < deadline_s:
            for batch in consumer.poll(timeout_ms=200, max_records=10_000).values():
                got += [(r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp) for r in batch]
    finally:
        consumer.close()
    return got


def test_kafka_python_creates_produces_10000_idempotent_and_reads_them_back_as_the_bus_does(clients_cluster):
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    bootstrap, topic = clients_cluster.kafka_bootstrap, "tenk-kafka-python"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        assert [t["error_code"] for t in admin.create_topics([NewTopic(topic, PARTITIONS, 2)])["topics"]] == [0]
    finally:
        admin.close()
    sent = rows("kafka-python")
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5,
                             request_timeout_ms=10_000)
    try:
        futures = [producer.send(topic, key=key, value=value, headers=headers, timestamp_ms=timestamp)
                   for key, value, headers, timestamp in sent]
        producer.flush(CLIENT_S)
        delivered = {key: (f.get(0).partition, f.get(0).offset) for (key, *_), f in zip(sent, futures)}
    finally:
        producer.close(5)
    read = kafka_python_read(bootstrap, topic, RECORDS)
    check_read(read, sent, delivered)
    assert bus_view(clients_cluster, topic) == sort_rows(read)
    [producer_id] = producer_ids(clients_cluster, topic)
    assert producer_id >= 0


async def aiokafka_read_async(bootstrap: str, topic: str, count: int) -> list:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000)
    await consumer.start()
    got = []
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline_s = time.monotonic() + CLIENT_S
        while len(got) < count and time.monotonic() < deadline_s:
            for batch in (await consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                got += [(r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp) for r in batch]
    finally:
        await consumer.stop()
    return got


def aiokafka_read(bootstrap: str, topic: str, count: int) -> list:
    return asyncio.run(aiokafka_read_async(bootstrap, topic, count))


def test_aiokafka_creates_produces_10000_idempotent_and_reads_them_back_as_the_bus_does(clients_cluster):
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap, topic = clients_cluster.kafka_bootstrap, "tenk-aiokafka"
    sent = rows("aiokafka")

    async def create_and_produce() -> dict:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            answer = await admin.create_topics([NewTopic(topic, PARTITIONS, 2)])
            assert [error_code for _, error_code, *_ in answer.topic_errors] == [0]
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5,
                                    request_timeout_ms=10_000)
        await producer.start()
        try:
            futures = [await producer.send(topic, key=key, value=value, headers=headers, timestamp_ms=timestamp)
                       for key, value, headers, timestamp in sent]
            acked = await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return {key: (m.partition, m.offset) for (key, *_), m in zip(sent, acked)}

    delivered = asyncio.run(create_and_produce())
    read = aiokafka_read(bootstrap, topic, RECORDS)
    check_read(read, sent, delivered)
    assert bus_view(clients_cluster, topic) == sort_rows(read)
    [producer_id] = producer_ids(clients_cluster, topic)
    assert producer_id >= 0


# -- the bus's Producer writes, each Kafka client reads ----------------------------------------------------

@pytest.mark.parametrize("reader", [confluent_read, kafka_python_read, aiokafka_read],
                         ids=["confluent-kafka", "kafka-python", "aiokafka"])
def test_every_kafka_client_reads_exactly_what_the_bus_producer_wrote(clients_cluster, reader, written_by_bus):
    topic, expected = written_by_bus
    assert sort_rows(reader(clients_cluster.kafka_bootstrap, topic, RECORDS)) == expected


@pytest.fixture(scope="module")
def written_by_bus(clients_cluster):
    """10,000 records from the bus's Producer (keys and headers on some, timestamps of their own on some:
    the others get the node's append time), as a Kafka reader must see them, in (partition, offset) order."""
    topic = "tenk-bus"
    with Admin(clients_cluster.bootstrap) as admin:
        admin.create_topic(topic, PARTITIONS, replication_factor=2)
    wait_for(lambda: all(topic in n for n in kafka_topics(clients_cluster)), 10, message="the nodes know the topic")
    sent = [(b"k%d" % i if i % 3 else None, b"v%d" % i, [("i", b"%d" % i)] if i % 2 else None,
             TS + i if i % 4 == 0 else None) for i in range(RECORDS)]
    with Producer(clients_cluster.bootstrap, acks="all") as producer:
        futures = [producer.send(topic, value, key=key, headers=headers, partition=i % PARTITIONS, timestamp_ms=ts)
                   for i, (key, value, headers, ts) in enumerate(sent)]
        producer.flush(CLIENT_S)
        acked = [f.get(0) for f in futures]
    expected = sort_rows([(m.partition, m.offset, key, value, headers or [], m.timestamp_ms)
                          for m, (key, value, headers, _) in zip(acked, sent)])
    return topic, expected


def kafka_topics(cluster: LocalCluster) -> list:
    """The topics each node's Kafka Metadata names."""
    from tests.test_kafka import request
    from kafka.protocol.metadata import MetadataRequest

    return [{t.name for t in request(cluster.kafka_address(n), MetadataRequest[12](topics=None)).topics}
            for n in cluster.node_ports]
