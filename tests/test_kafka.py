"""Kafka's protocol on a real cluster (coordinator and node processes, LocalCluster(kafka_port=0)), driven by
real Kafka clients: kcat (librdkafka), confluent-kafka (librdkafka 2.x) and kafka-python 3.x, beside the
bus's own Producer and Consumer (docs/kafka.md). The Kafka producers run idempotent (InitProducerId, the
bus's producer ids and sequences) as their defaults or settings have them, but kcat's first test, which
shows a plain producer too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import shutil
import socket
import struct
import subprocess
import time

import pytest

from bus import Admin, Consumer, Producer
from nodes.cluster import LocalCluster
from nodes.controller import COORDINATOR_BROKER_ID
from nodes.kafka import codec
from tests.conftest import wait_for

confluent_kafka = pytest.importorskip("confluent_kafka")
kafka = pytest.importorskip("kafka")
from kafka.protocol.admin import DescribeConfigsRequest, DescribeConfigsResponse  # noqa: E402
from kafka.protocol.consumer import (FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,  # noqa: E402
                                     OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse)
from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse  # noqa
from kafka.protocol.producer import (InitProducerIdRequest, InitProducerIdResponse, ProduceRequest,  # noqa: E402
                                     ProduceResponse)
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder  # noqa: E402

from tests.test_kafka_parts import ABORTED_KIO  # noqa: E402

KCAT = shutil.which("kcat")
TOPICS = {"kcat-in": 2, "bus-out": 2, "confluent": 3, "raw": 1, "fuzz": 2, "acks0": 1, "kcat-query": 1}
CLIENT_S = 20  # a Kafka client command's timeout


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("kafka") / "cluster"), 2, kafka_port=0)
    try:
        cluster.start()
        with Admin(cluster.bootstrap) as admin:
            for name, partitions in TOPICS.items():
                admin.create_topic(name, partitions)
        # Every node's Kafka Metadata knows the topics and every broker (placement and addresses come with
        # heartbeats).
        for node_id in cluster.node_ports:
            wait_for(lambda: metadata_of(cluster.kafka_address(node_id)), 10, message=f"node {node_id} metadata")
        yield cluster
    finally:
        cluster.stop()


def metadata_of(address: str):
    answer = request(address, MetadataRequest[12](topics=None))
    # Both nodes and the coordinator (the group coordinator, a broker that leads nothing).
    ready = len(answer.brokers) == 3 and {t.name for t in answer.topics} >= set(TOPICS)
    return answer if ready else None


# -- a raw Kafka connection (kafka-python's message classes, our own socket) -------------------------------

def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    out = b""
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def recv_frame(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">i", recv_exactly(sock, 4))
    return recv_exactly(sock, length)


def request(address: str, message, correlation_id: int = 1, sock: socket.socket | None = None):
    """Send ``message`` (a versioned kafka-python request) and decode its response."""
    own = sock is None
    sock = sock or connect(address)
    try:
        message.with_header(correlation_id=correlation_id, client_id="test")
        sock.sendall(bytes(message.encode(header=True, framed=True)))
        data = recv_frame(sock)
        assert struct.unpack_from(">i", data)[0] == correlation_id
        response = {0: ProduceResponse, 1: FetchResponse, 2: ListOffsetsResponse, 3: MetadataResponse,
                    18: ApiVersionsResponse, 22: InitProducerIdResponse, 23: OffsetForLeaderEpochResponse,
                    32: DescribeConfigsResponse}[message.API_KEY][message.API_VERSION]
        flexible = response.flexible_version_q(message.API_VERSION) and response.API_KEY != 18
        return response.decode(data[4 + flexible:])
    finally:
        if own:
            sock.close()


def closed_by_peer(sock: socket.socket, timeout_s: float = 5) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def leader_address(cluster: LocalCluster, topic: str, partition: int) -> str:
    with Admin(cluster.bootstrap) as admin:
        leader = admin.list_topics()[topic]["partitions"][partition]["leader"]
    return cluster.kafka_address(leader)


def kcat(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([KCAT, *args], input=stdin, capture_output=True, text=True, timeout=CLIENT_S)


def read_bus(cluster: LocalCluster, topic: str, partitions: int, count: int) -> list:
    got = []
    with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([(topic, p) for p in range(partitions)])
        deadline_s = time.monotonic() + CLIENT_S
        while len(got) < count and time.monotonic() < deadline_s:
            got += consumer.poll(timeout_ms=200)
    return got


# -- kcat ------------------------------------------------------------------------------------------------

needs_kcat = pytest.mark.skipif(KCAT is None, reason="kcat not installed: apt-get install kcat")


@needs_kcat
def test_kcat_lists_every_topic_with_its_partitions_leaders_replicas_and_isr(kafka_cluster):
    listed = kcat("-b", kafka_cluster.kafka_bootstrap, "-L")
    assert listed.returncode == 0, listed.stderr
    with Admin(kafka_cluster.bootstrap) as admin:
        topics = admin.list_topics()
    out = listed.stdout
    assert " 3 brokers:" in out
    for node_id in kafka_cluster.node_ports:
        assert f"broker {node_id} at {kafka_cluster.kafka_address(node_id)}" in out
    assert f"broker {COORDINATOR_BROKER_ID} at {kafka_cluster.kafka_bootstrap}" in out
    for name, partitions in TOPICS.items():
        assert f'topic "{name}" with {partitions} partitions:' in out
        for index, state in enumerate(topics[name]["partitions"]):
            line = (f"partition {index}, leader {state['leader']}, replicas: {','.join(map(str, state['replicas']))}, "
                    f"isrs: {','.join(map(str, state['isr']))}")
            assert line in out, out


@needs_kcat
def test_kcat_produces_and_the_bus_consumer_reads_the_same_records_at_the_same_offsets(kafka_cluster):
    lines = "".join(f"key-{i}|value-{i}\n" for i in range(20))
    before_ms = int(time.time() * 1000)
    produced = kcat("-b", kafka_cluster.kafka_bootstrap, "-P", "-t", "kcat-in", "-p", "1", "-K", "|",
                    "-H", "source=kcat", "-H", "n=1", "-X", "enable.idempotence=false", "-X", "acks=all", stdin=lines)
    assert produced.returncode == 0, produced.stderr
    more = "".join(f"key-{i}|value-{i}\n" for i in range(20, 25))
    produced = kcat("-b", kafka_cluster.kafka_bootstrap, "-P", "-t", "kcat-in", "-p", "1", "-K", "|", "-z", "snappy",
                    "-H", "source=kcat", "-H", "n=1", "-X", "enable.idempotence=true", stdin=more)
    assert produced.returncode == 0, produced.stderr
    after_ms = int(time.time() * 1000)
    records = read_bus(kafka_cluster, "kcat-in", 2, 25)
    assert [(r.partition, r.offset, r.key, r.value) for r in records] == [
        (1, i, b"key-%d" % i, b"value-%d" % i) for i in range(25)]
    assert all([tuple(h) for h in r.headers] == [("source", b"kcat"), ("n", b"1")] for r in records)
    assert all(before_ms - 1000 <= r.timestamp_ms <= after_ms for r in records)
    # kcat reading them back sees the timestamps the bus consumer saw (the producer's, CreateTime)
    read = kcat("-b", kafka_cluster.kafka_bootstrap, "-C", "-t", "kcat-in", "-p", "1", "-e", "-f", "%o %k %T\\n")
    assert read.returncode == 0, read.stderr
    assert read.stdout.splitlines() == [f"{r.offset} {r.key.decode()} {r.timestamp_ms}" for r in records]


@needs_kcat
def test_kcat_queries_offsets_by_time_reads_from_an_offset_and_lists_a_topic_from_any_node(kafka_cluster):
    ts = 1_700_000_000_000
    acked = produce_bus(kafka_cluster, "kcat-query", 0, [(None, b"q%d" % i, None, ts + 100 * i) for i in range(10)])
    assert [m.offset for m in acked] == list(range(10))
    for timestamp, offset in ((ts + 250, 3), (ts, 0), (-2, 0), (-1, 10), (ts + 901, -1)):  # -1: none at or after it
        queried = kcat("-b", kafka_cluster.kafka_bootstrap, "-Q", "-t", f"kcat-query:0:{timestamp}")
        assert queried.returncode == 0, queried.stderr
        assert queried.stdout.strip() == f"kcat-query [0] offset {offset}", timestamp
    read = kcat("-b", kafka_cluster.kafka_bootstrap, "-C", "-t", "kcat-query", "-p", "0", "-o", "3", "-c", "4", "-e",
                "-f", "%o %s\\n")
    assert read.returncode == 0, read.stderr
    assert read.stdout.splitlines() == [f"{i} q{i}" for i in range(3, 7)]
    with Admin(kafka_cluster.bootstrap) as admin:
        state = admin.list_topics()["kcat-query"]["partitions"][0]
    for node_id in kafka_cluster.node_ports:  # bootstrapped from a node: the same brokers, the same leader
        listed = kcat("-b", kafka_cluster.kafka_address(node_id), "-L", "-t", "kcat-query")
        assert listed.returncode == 0, listed.stderr
        assert f"from broker {node_id}: " in listed.stdout and " 3 brokers:" in listed.stdout  # the nodes, the coordinator
        assert f"broker {COORDINATOR_BROKER_ID} at {kafka_cluster.kafka_bootstrap}" in listed.stdout
        assert (f"partition 0, leader {state['leader']}, replicas: {','.join(map(str, state['replicas']))}, "
                f"isrs: {','.join(map(str, state['isr']))}") in listed.stdout


def bus_records(count: int) -> list:
    """(key, value, headers, timestamp or None): some with a timestamp of their own, some without."""
    return [(b"k%d" % i if i % 3 else None, b"v%d" % i, [("i", b"%d" % i)] if i % 2 else None,
             1_700_000_000_000 + i if i % 4 == 0 else None) for i in range(count)]


def produce_bus(cluster, topic: str, partition: int, rows) -> list:
    with Producer(cluster.bootstrap, acks="all") as producer:
        futures = [producer.send(topic, value, key=key, headers=headers, partition=partition, timestamp_ms=ts)
                   for key, value, headers, ts in rows]
        producer.flush(CLIENT_S)
        return [f.get(0) for f in futures]


@needs_kcat
def test_the_bus_producer_writes_and_kcat_and_kafka_python_read_exactly_those(kafka_cluster):
    from kafka import KafkaConsumer, TopicPartition

    rows = bus_records(30)
    acked = produce_bus(kafka_cluster, "bus-out", 0, rows)
    assert [m.offset for m in acked] == list(range(30))
    expected = [(m.offset, key, value, headers or [], m.timestamp_ms) for m, (key, value, headers, _) in zip(acked, rows)]

    read = kcat("-b", kafka_cluster.kafka_bootstrap, "-C", "-t", "bus-out", "-p", "0", "-e", "-f", "%o|%k|%s|%T|%h\\n")
    assert read.returncode == 0, read.stderr
    assert read.stdout.splitlines() == [
        f"{o}|{(k or b'').decode()}|{v.decode()}|{ts}|{','.join(f'{n}={x.decode()}' for n, x in h)}"
        for o, k, v, h, ts in expected]

    consumer = KafkaConsumer(bootstrap_servers=kafka_cluster.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=2000, request_timeout_ms=10_000)
    try:
        tp = TopicPartition("bus-out", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = []
        deadline_s = time.monotonic() + CLIENT_S
        while len(got) < 30 and time.monotonic() < deadline_s:
            for batch in consumer.poll(timeout_ms=500).values():
                got += batch
        assert [(r.offset, r.key, r.value, list(r.headers), r.timestamp) for r in got] == expected
        assert consumer.end_offsets([tp]) == {tp: 30} and consumer.beginning_offsets([tp]) == {tp: 0}
        # offsets_for_times: the first record at or after the time; none after the last is None
        at = consumer.offsets_for_times({tp: expected[10][4]})[tp]
        assert at is not None and at.offset == min(o for o, *_, ts in expected if ts >= expected[10][4])
        assert consumer.offsets_for_times({tp: max(e[4] for e in expected) + 1})[tp] is None
        # From inside a batch (the node serves the whole batch; the client skips what is below its position)
        consumer.seek(tp, 17)
        again = []
        deadline_s = time.monotonic() + CLIENT_S
        while len(again) < 13 and time.monotonic() < deadline_s:
            for batch in consumer.poll(timeout_ms=500).values():
                again += batch
        assert [r.offset for r in again] == list(range(17, 30))
    finally:
        consumer.close()


class Deliveries:
    """confluent-kafka's on_delivery: each delivered record's key -> (partition, offset), and the errors."""

    def __init__(self):
        self.by_key, self.failed = {}, []

    def __call__(self, error, message) -> None:
        if error is not None:
            self.failed.append(error)
        else:
            self.by_key[message.key()] = (message.partition(), message.offset())


def test_confluent_kafka_produces_1000_keyed_records_idempotent_with_acks_all_and_reads_them_back(kafka_cluster):
    from confluent_kafka import OFFSET_BEGINNING, Consumer as KConsumer, Producer as KProducer, TopicPartition

    bootstrap = kafka_cluster.kafka_bootstrap
    producer = KProducer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                          "linger.ms": 5})
    deliveries = Deliveries()
    for i in range(1000):
        producer.produce("confluent", key=b"key-%d" % i, value=b"value-%d" % i, on_delivery=deliveries)
    assert producer.flush(CLIENT_S) == 0
    del producer
    delivered = deliveries.by_key
    assert deliveries.failed == [] and len(delivered) == 1000
    by_partition = {}
    for key, (partition, offset) in delivered.items():
        by_partition.setdefault(partition, []).append(offset)
    assert all(sorted(offsets) == list(range(len(offsets))) for offsets in by_partition.values())

    consumer = KConsumer({"bootstrap.servers": bootstrap, "group.id": "unused-by-assign",
                          "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    try:
        consumer.assign([TopicPartition("confluent", p, OFFSET_BEGINNING) for p in range(3)])
        got = {}
        deadline_s = time.monotonic() + CLIENT_S
        while len(got) < 1000 and time.monotonic() < deadline_s:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                assert message.error() is None, message.error()
                got[message.key()] = (message.partition(), message.offset(), message.value())
    finally:
        consumer.close()
    assert {k: (p, o) for k, (p, o, _) in got.items()} == delivered
    assert all(v == b"value-" + k[4:] for k, (_, _, v) in got.items())


def test_kafka_python_produces_compressed_batches_that_the_bus_consumer_reads(kafka_cluster):
    from kafka import KafkaProducer

    sent = {}  # offset -> (key, value)
    for codec_name in ("gzip", "lz4", "zstd"):
        # kafka-python's defaults otherwise: idempotent, acks=-1
        producer = KafkaProducer(bootstrap_servers=kafka_cluster.kafka_bootstrap, linger_ms=5,
                                 compression_type=codec_name, request_timeout_ms=10_000)
        try:
            rows = [(b"%s-%d" % (codec_name.encode(), i), b"compressed-%d" % i * 10) for i in range(20)]
            futures = [producer.send("raw", key=key, value=value, partition=0) for key, value in rows]
            producer.flush(CLIENT_S)
            sent.update((f.get(0).offset, row) for f, row in zip(futures, rows))
        finally:
            producer.close(5)
    got = read_bus(kafka_cluster, "raw", 1, max(sent) + 1)
    by_offset = {r.offset: (r.key, r.value) for r in got}
    assert {o: by_offset.get(o) for o in sent} == sent


# -- errors, and bad input --------------------------------------------------------------------------------

def produce_raw(address: str, topic: str, partition: int, records: bytes, acks: int = 1):
    message = ProduceRequest[9](acks=acks, timeout_ms=5000, topic_data=[ProduceRequest.TopicProduceData(
        name=topic, partition_data=[ProduceRequest.TopicProduceData.PartitionProduceData(index=partition,
                                                                                          records=records)])])
    return request(address, message).responses[0].partition_responses[0]


def one_batch(value: bytes = b"v") -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    builder.append(0, timestamp=1_700_000_000_000, key=None, value=value, headers=[])
    return bytes(builder.build())


def test_produce_errors_are_kafkas_codes(kafka_cluster):
    leader = leader_address(kafka_cluster, "raw", 0)
    other = next(kafka_cluster.kafka_address(n) for n in kafka_cluster.node_ports
                 if kafka_cluster.kafka_address(n) != leader)
    assert produce_raw(other, "raw", 0, one_batch()).error_code == 6  # NOT_LEADER_OR_FOLLOWER
    assert produce_raw(kafka_cluster.kafka_bootstrap, "raw", 0, one_batch()).error_code == 6  # the coordinator
    assert produce_raw(leader, "no-such-topic", 0, one_batch()).error_code == 3  # UNKNOWN_TOPIC_OR_PARTITION
    assert produce_raw(leader, "raw", 5, one_batch()).error_code == 3
    damaged = bytearray(one_batch())
    damaged[-1] ^= 1
    assert produce_raw(leader, "raw", 0, bytes(damaged)).error_code == 2  # CORRUPT_MESSAGE
    unknown_codec = bytearray(one_batch())
    struct.pack_into(">h", unknown_codec, 21, 5)
    from crc32c import crc32c

    struct.pack_into(">I", unknown_codec, 17, crc32c(bytes(unknown_codec[21:])))
    assert produce_raw(leader, "raw", 0, bytes(unknown_codec)).error_code == 76  # UNSUPPORTED_COMPRESSION_TYPE
    assert produce_raw(leader, "raw", 0, one_batch(b"x" * (17 << 20))).error_code == 10  # MESSAGE_TOO_LARGE
    ok = produce_raw(leader, "raw", 0, one_batch())
    assert ok.error_code == 0 and ok.base_offset >= 0


def test_fetch_past_the_end_is_offset_out_of_range_and_list_offsets_names_both_ends(kafka_cluster):
    leader = leader_address(kafka_cluster, "raw", 0)
    # acks=-1: answered once the high watermark (what "latest" names) passed it, on both replicas
    end = produce_raw(leader, "raw", 0, one_batch(), acks=-1).base_offset + 1
    fetch = FetchRequest[12](replica_id=-1, max_wait_ms=0, min_bytes=1, max_bytes=1 << 20, isolation_level=0,
                             topics=[FetchRequest.FetchTopic(topic="raw", partitions=[
                                 FetchRequest.FetchTopic.FetchPartition(partition=0, fetch_offset=end + 1000,
                                                                        partition_max_bytes=1 << 20)])])
    [part] = request(leader, fetch).responses[0].partitions
    assert part.error_code == 1  # OFFSET_OUT_OF_RANGE
    ends = []
    for spec in (-2, -1):
        message = ListOffsetsRequest[6](replica_id=-1, topics=[ListOffsetsRequest.ListOffsetsTopic(
            name="raw", partitions=[ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(partition_index=0,
                                                                                             timestamp=spec)])])
        [answer] = request(leader, message).topics[0].partitions
        assert answer.error_code == 0
        ends.append(answer.offset)
    assert ends == [0, end]


def test_a_long_poll_fetch_is_answered_when_a_record_arrives(kafka_cluster):
    leader = leader_address(kafka_cluster, "raw", 0)
    end = produce_raw(leader, "raw", 0, one_batch()).base_offset + 1
    sock = connect(leader)
    try:
        fetch = FetchRequest[12](replica_id=-1, max_wait_ms=10_000, min_bytes=1, max_bytes=1 << 20, isolation_level=0,
                                 topics=[FetchRequest.FetchTopic(topic="raw", partitions=[
                                     FetchRequest.FetchTopic.FetchPartition(partition=0, fetch_offset=end,
                                                                            partition_max_bytes=1 << 20)])])
        fetch.with_header(correlation_id=5, client_id="test")
        sock.sendall(bytes(fetch.encode(header=True, framed=True)))
        started_s = time.monotonic()
        assert not select.select([sock], [], [], 0.3)[0]  # parked: nothing to answer yet
        assert produce_raw(leader, "raw", 0, one_batch(b"late")).error_code == 0
        data = recv_frame(sock)
        assert time.monotonic() - started_s < 5
        [part] = FetchResponse[12].decode(data[5:]).responses[0].partitions
        assert [r.value for r in DefaultRecordBatch(bytes(part.records))] == [b"late"]
    finally:
        sock.close()


def test_malformed_frames_and_oversized_lengths_close_that_connection_and_the_node_serves_others(kafka_cluster):
    address = kafka_cluster.kafka_address(1)
    bystander = connect(address)
    try:
        assert request(address, ApiVersionsRequest[3](), sock=bystander).error_code == 0
        garbage_produce = struct.pack(">hhih", 0, 9, 1, -1) + b"\x00" + b"\xff" * 30
        for sent in (struct.pack(">i", 0x7FFFFFF0) + b"x" * 100,  # a 2 GiB length prefix
                     struct.pack(">i", 12) + struct.pack(">hhih", 3, 12, 1, 400) + b"xx",  # client id runs past
                     struct.pack(">i", len(garbage_produce)) + garbage_produce,  # a produce of garbage
                     struct.pack(">i", len(ABORTED_KIO)) + ABORTED_KIO):  # killed a node decoding with kio
            rogue = connect(address)
            rogue.sendall(sent)
            assert closed_by_peer(rogue), sent[:20]
            rogue.close()
        # the connection opened before is still served, and so are new ones
        assert request(address, ApiVersionsRequest[3](), correlation_id=2, sock=bystander).error_code == 0
        assert metadata_of(address) is not None
    finally:
        bystander.close()


def test_an_unknown_api_key_or_version_is_unsupported_version_and_the_connection_stays(kafka_cluster):
    address = kafka_cluster.kafka_address(2)
    sock = connect(address)
    try:
        for correlation_id, (key, version) in enumerate([(999, 0), (0, 99), (18, 99)], start=10):
            body = struct.pack(">hhih", key, version, correlation_id, -1)
            sock.sendall(struct.pack(">i", len(body)) + body)
            data = recv_frame(sock)
            answer = ApiVersionsResponse[0].decode(data[4:])
            assert struct.unpack_from(">i", data)[0] == correlation_id
            assert answer.error_code == 35 and {k.api_key for k in answer.api_keys} == set(codec.SUPPORTED)
        assert request(address, ApiVersionsRequest[3](), correlation_id=20, sock=sock).error_code == 0
    finally:
        sock.close()


def idempotent_batch(producer_id: int, epoch: int, sequence: int, values) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=producer_id,
                                        producer_epoch=epoch, base_sequence=sequence, batch_size=1 << 20)
    for offset, value in enumerate(values):
        builder.append(offset, timestamp=1_700_000_000_000, key=None, value=value, headers=[])
    return bytes(builder.build())


def test_init_producer_id_and_a_retried_idempotent_batch_is_written_once(kafka_cluster):
    leader = leader_address(kafka_cluster, "raw", 0)
    ids = [request(address, InitProducerIdRequest[version](transactional_id=None, transaction_timeout_ms=60_000))
           for address, version in ((leader, 4), (kafka_cluster.kafka_bootstrap, 0))]  # a node asks the coordinator
    assert [i.error_code for i in ids] == [0, 0] and ids[0].producer_id != ids[1].producer_id
    producer_id, epoch = ids[0].producer_id, ids[0].producer_epoch
    first = produce_raw(leader, "raw", 0, idempotent_batch(producer_id, epoch, 0, [b"a", b"b"]), acks=-1)
    again = produce_raw(leader, "raw", 0, idempotent_batch(producer_id, epoch, 0, [b"a", b"b"]), acks=-1)
    assert first.error_code == again.error_code == 0 and again.base_offset == first.base_offset
    gap = produce_raw(leader, "raw", 0, idempotent_batch(producer_id, epoch, 5, [b"c"]), acks=-1)
    assert gap.error_code == 45  # OUT_OF_ORDER_SEQUENCE_NUMBER
    follows = produce_raw(leader, "raw", 0, idempotent_batch(producer_id, epoch, 2, [b"c"]), acks=-1)
    assert follows.error_code == 0 and follows.base_offset == first.base_offset + 2
    transactional = request(leader, InitProducerIdRequest[4](transactional_id="tx", transaction_timeout_ms=60_000))
    assert transactional.error_code != 0  # no transactions yet


def hostile_request(rng: random.Random):
    """A well-framed request of a supported API and version whose values are what a rogue or broken client
    might send: extreme integers, unknown and odd topic names, empty and damaged record sets."""
    i32 = [0, 1, -1, -2, -3, 2**31 - 1, -2**31, 7]
    i64 = [0, 1, -1, -2, -3, 2**63 - 1, -2**63, 10**12]
    names = ["fuzz", "no-such-topic", "", "x" * 300, "t\x00", "\u00e9"]
    batch = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                      producer_epoch=-1, base_sequence=-1, batch_size=1 << 16)
    batch.append(0, timestamp=1, key=b"k", value=b"v", headers=[("h", b"x")])
    good = bytes(batch.build())
    pick = rng.choice
    kind = rng.randrange(7)
    if kind == 0:
        return ProduceRequest[rng.randint(3, 9)](
            acks=pick([1, -1, 2, -2, 32767]), timeout_ms=pick([0, 1, 1000, -1]), topic_data=[
                ProduceRequest.TopicProduceData(name=pick(names), partition_data=[
                    ProduceRequest.TopicProduceData.PartitionProduceData(
                        index=pick(i32), records=pick([good, b"", None, b"\0" * 70, good[:-3], good + good[:20]]))
                    for _ in range(rng.randint(0, 3))]) for _ in range(rng.randint(0, 2))])
    if kind == 1:
        return FetchRequest[rng.randint(4, 12)](
            replica_id=pick(i32), max_wait_ms=pick([0, 1, 50, -1]), min_bytes=pick(i32), max_bytes=pick(i32),
            isolation_level=pick([0, 1, 5]), topics=[FetchRequest.FetchTopic(topic=pick(names), partitions=[
                FetchRequest.FetchTopic.FetchPartition(partition=pick(i32), current_leader_epoch=pick(i32),
                                                       fetch_offset=pick(i64), partition_max_bytes=pick(i32))
                for _ in range(rng.randint(0, 3))]) for _ in range(rng.randint(0, 2))])
    if kind == 2:
        return ListOffsetsRequest[rng.randint(1, 8)](replica_id=pick(i32), topics=[ListOffsetsRequest.ListOffsetsTopic(
            name=pick(names), partitions=[ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(
                partition_index=pick(i32), current_leader_epoch=pick(i32), timestamp=pick(i64))
                for _ in range(rng.randint(0, 3))]) for _ in range(rng.randint(0, 2))])
    if kind == 3:
        return MetadataRequest[rng.randint(1, 12)](
            topics=pick([None, [], [MetadataRequest.MetadataRequestTopic(name=pick(names))]]))
    if kind == 5:
        return OffsetForLeaderEpochRequest[rng.randint(2, 4)](replica_id=pick(i32), topics=[
            OffsetForLeaderEpochRequest.OffsetForLeaderTopic(topic=pick(names), partitions=[
                OffsetForLeaderEpochRequest.OffsetForLeaderTopic.OffsetForLeaderPartition(
                    partition=pick(i32), current_leader_epoch=pick(i32), leader_epoch=pick(i32))
                for _ in range(rng.randint(0, 3))]) for _ in range(rng.randint(0, 2))])
    if kind == 6:
        return DescribeConfigsRequest[rng.randint(1, 4)](resources=[DescribeConfigsRequest.DescribeConfigsResource(
            resource_type=pick([0, 2, 4, 8, -1, 127]), resource_name=pick(names + ["1", "-1", "None"]),
            configuration_keys=pick([None, [], ["retention.ms", "x" * 300, ""]])) for _ in range(rng.randint(0, 3))],
            include_synonyms=pick([True, False]))
    return InitProducerIdRequest[rng.randint(0, 4)](transactional_id=pick([None, "tx"]),
                                                    transaction_timeout_ms=pick(i32))


def test_hostile_values_in_well_formed_requests_get_answers_and_every_server_keeps_serving(kafka_cluster):
    """A seeded fuzz of the handlers behind the decoder (every API but the topic admin ones): each request
    on a fresh connection gets its response (a long poll here waits at most 50 ms), no process dies, and a
    produce and fetch work after."""
    rng = random.Random(13)
    addresses = [kafka_cluster.kafka_address(1), kafka_cluster.kafka_bootstrap]
    for n in range(400):
        message = hostile_request(rng)
        address = addresses[n % 2]
        sock = connect(address)
        try:
            message.with_header(correlation_id=n, client_id="fuzz")
            sock.sendall(bytes(message.encode(header=True, framed=True)))
            data = recv_frame(sock)
            assert struct.unpack_from(">i", data)[0] == n, message
        finally:
            sock.close()
        assert kafka_cluster.nodes[1].poll() is None and kafka_cluster.coordinator.poll() is None, message
    leader = leader_address(kafka_cluster, "fuzz", 0)
    assert produce_raw(leader, "fuzz", 0, one_batch(b"after")).error_code == 0
    assert metadata_of(kafka_cluster.kafka_bootstrap) is not None


def test_an_idempotent_acks_all_kafka_producer_loses_and_duplicates_nothing_when_the_leader_is_killed(make_cluster):
    """librdkafka's producer (acks=all, idempotent) across a kill -9 of the partition's leader: its retries
    go to the new leader (NOT_LEADER_OR_FOLLOWER, a metadata refresh), and the bus's sequence check, kept
    by the follower too, lands every acknowledged record once, at the offset it was acknowledged with."""
    from confluent_kafka import Producer as KProducer

    cluster = make_cluster(2, kafka_port=0)
    with Admin(cluster.bootstrap) as admin:
        leader = admin.create_topic("failover", 1, replication_factor=2)["partitions"][0]["leader"]
    producer = KProducer({"bootstrap.servers": cluster.kafka_bootstrap, "acks": "all", "enable.idempotence": True,
                          "linger.ms": 5, "message.timeout.ms": 30_000})
    acked, failed = {}, []

    def on_delivery(error, message):
        if error is not None:
            failed.append(error)
        else:
            acked[message.value()] = message.offset()

    for i in range(3000):
        producer.produce("failover", value=b"%d" % i, partition=0, on_delivery=on_delivery)
        producer.poll(0)
        if i == 1000:
            # delivery reports arrive in poll()
            wait_for(lambda: producer.poll(0.05) is not None and acked, 10,
                     message="records acknowledged before the kill")
            cluster.kill_node(leader)
    assert producer.flush(40) == 0
    del producer
    assert failed == [] and len(acked) == 3000
    records = read_bus(cluster, "failover", 1, 3000)
    assert sorted(r.offset for r in records) == list(range(3000))  # no gap, no duplicate
    assert all(acked[r.value] == r.offset for r in records)


def test_topics_created_and_deleted_through_confluent_kafka_and_kafka_python_admin_clients(kafka_cluster):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    from kafka.admin import KafkaAdminClient, NewTopic as KafkaNewTopic

    admin = AdminClient({"bootstrap.servers": kafka_cluster.kafka_bootstrap})
    created = admin.create_topics([NewTopic("admin-a", num_partitions=3, replication_factor=2,
                                            config={"retention.ms": "60000"}), NewTopic("admin-b", 1)],
                                  request_timeout=10)
    assert [f.result(CLIENT_S) for f in created.values()] == [None, None]
    again = admin.create_topics([NewTopic("admin-a", 3)], request_timeout=10)["admin-a"]
    with pytest.raises(KafkaException) as exists:
        again.result(CLIENT_S)
    assert exists.value.args[0].code() == 36  # TOPIC_ALREADY_EXISTS
    with Admin(kafka_cluster.bootstrap) as bus_admin:
        topic = bus_admin.list_topics()["admin-a"]
        assert (len(topic["partitions"]), topic["replication_factor"], topic["retention_ms"]) == (3, 2, 60_000)
    assert admin.delete_topics(["admin-b"], request_timeout=10)["admin-b"].result(CLIENT_S) is None
    del admin

    client = KafkaAdminClient(bootstrap_servers=kafka_cluster.kafka_bootstrap, request_timeout_ms=10_000)
    try:
        answer = client.create_topics([KafkaNewTopic("admin-c", 2, 1)])
        assert [t["error_code"] for t in answer["topics"]] == [0]
        client.delete_topics(["admin-c"])
        with pytest.raises(kafka.errors.UnknownTopicOrPartitionError):
            client.delete_topics(["no-such-topic"])
    finally:
        client.close()
    with Admin(kafka_cluster.bootstrap) as bus_admin:
        names = set(bus_admin.list_topics())
    assert "admin-a" in names and not names & {"admin-b", "admin-c"}


def test_acks_0_gets_no_response_and_the_next_request_on_the_connection_is_answered(kafka_cluster):
    leader = leader_address(kafka_cluster, "acks0", 0)
    sock = connect(leader)
    try:
        for correlation_id, records in ((1, one_batch(b"fire-and-forget")), (2, b"garbage")):
            message = ProduceRequest[9](acks=0, timeout_ms=1000, topic_data=[ProduceRequest.TopicProduceData(
                name="acks0", partition_data=[ProduceRequest.TopicProduceData.PartitionProduceData(
                    index=0, records=records)])])
            message.with_header(correlation_id=correlation_id, client_id="test")
            sock.sendall(bytes(message.encode(header=True, framed=True)))
        assert request(leader, ApiVersionsRequest[3](), correlation_id=3, sock=sock).error_code == 0
    finally:
        sock.close()
    assert [r.value for r in read_bus(kafka_cluster, "acks0", 1, 1)] == [b"fire-and-forget"]


# -- leader epochs: OffsetForLeaderEpoch, Fetch's and ListOffsets' fencing, the epochs ListOffsets answers ------

def fetch_part(address: str, topic: str, offset: int, current_leader_epoch: int, last_fetched_epoch: int = -1,
               max_wait_ms: int = 0):
    message = FetchRequest[12](replica_id=-1, max_wait_ms=max_wait_ms, min_bytes=1, max_bytes=1 << 20,
                               isolation_level=0, topics=[FetchRequest.FetchTopic(topic=topic, partitions=[
                                   FetchRequest.FetchTopic.FetchPartition(
                                       partition=0, current_leader_epoch=current_leader_epoch, fetch_offset=offset,
                                       last_fetched_epoch=last_fetched_epoch, partition_max_bytes=1 << 20)])])
    return request(address, message).responses[0].partitions[0]


def diverging(part) -> tuple | None:
    """A Fetch answer's DivergingEpoch as (epoch, end offset), None when it has none (the default, -1/-1)."""
    found = part.diverging_epoch
    return None if found is None or (found.epoch, found.end_offset) == (-1, -1) else (found.epoch, found.end_offset)


def epoch_end(address: str, topic: str, current_leader_epoch: int, leader_epoch: int, version: int = 4):
    message = OffsetForLeaderEpochRequest[version](replica_id=-1, topics=[
        OffsetForLeaderEpochRequest.OffsetForLeaderTopic(topic=topic, partitions=[
            OffsetForLeaderEpochRequest.OffsetForLeaderTopic.OffsetForLeaderPartition(
                partition=0, current_leader_epoch=current_leader_epoch, leader_epoch=leader_epoch)])])
    part = request(address, message).topics[0].partitions[0]
    return part.error_code, part.leader_epoch, part.end_offset


def list_offset(address: str, topic: str, timestamp: int, version: int = 8, current_leader_epoch: int = -1):
    message = ListOffsetsRequest[version](replica_id=-1, topics=[ListOffsetsRequest.ListOffsetsTopic(
        name=topic, partitions=[ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(
            partition_index=0, current_leader_epoch=current_leader_epoch, timestamp=timestamp)])])
    part = request(address, message).topics[0].partitions[0]
    return part.error_code, part.offset, part.timestamp, part.leader_epoch


TS = 1_700_000_000_000


def test_leader_epochs_after_a_failover_fence_fetches_end_where_kafka_says_and_clients_read_across(make_cluster,
                                                                                                    caplog):
    """Five records in epoch 0, the leader killed, three in epoch 1 on the new leader. OffsetForLeaderEpoch
    answers each epoch's end from the leader-epoch checkpoint; a Fetch or ListOffsets with an older epoch is
    FENCED_LEADER_EPOCH, with a newer one UNKNOWN_LEADER_EPOCH; ListOffsets names the epoch that appended the
    offset it answers. A confluent-kafka and a kafka-python consumer reading across the failover validate
    their positions with OffsetForLeaderEpoch (both do so after a leader change when the broker has it,
    KIP-320) and read all eight, once each."""
    from confluent_kafka import Consumer as KConsumer, TopicPartition
    from kafka import KafkaConsumer, TopicPartition as KTopicPartition

    cluster = make_cluster(2, kafka_port=0)
    with Admin(cluster.bootstrap) as admin:
        first = admin.create_topic("epochs", 1, replication_factor=2)["partitions"][0]["leader"]
    with Producer(cluster.bootstrap, acks="all") as producer:
        for i in range(5):
            producer.send("epochs", b"v%d" % i, partition=0, timestamp_ms=TS + 10 * i)
        producer.flush(CLIENT_S)
    logs = []
    consumer = KConsumer({"bootstrap.servers": cluster.kafka_bootstrap, "group.id": "unused-by-assign",
                          "enable.auto.commit": False, "fetch.wait.max.ms": 100,
                          "topic.metadata.refresh.interval.ms": 500,
                          "debug": "protocol", "logger": _Collect(logs)})
    other = KafkaConsumer(bootstrap_servers=cluster.kafka_bootstrap, enable_auto_commit=False,
                          request_timeout_ms=10_000, metadata_max_age_ms=500)
    got, other_got = [], []

    def read(count: int) -> None:
        deadline_s = time.monotonic() + CLIENT_S
        while (len(got) < count or len(other_got) < count) and time.monotonic() < deadline_s:
            got.extend(m for m in consumer.consume(num_messages=10, timeout=0.1) if m.error() is None)
            for batch in other.poll(timeout_ms=100).values():
                other_got.extend(batch)

    caplog.set_level(logging.DEBUG, logger="kafka.consumer.fetcher")
    try:
        consumer.assign([TopicPartition("epochs", 0, 0)])
        other.assign([KTopicPartition("epochs", 0)])
        other.seek(KTopicPartition("epochs", 0), 0)
        read(5)
        cluster.kill_node(first)

        def new_leader():
            with Admin(cluster.bootstrap) as admin:
                state = admin.list_topics()["epochs"]["partitions"][0]
            return state if state["leader"] != first and state["leader_epoch"] == 1 else None

        state = wait_for(new_leader, CLIENT_S, message="a new leader in epoch 1")
        leader = cluster.kafka_address(state["leader"])
        # the leader answers once its high watermark has reached its epoch's start (KIP-207)
        wait_for(lambda: list_offset(leader, "epochs", -1)[0] == 0, CLIENT_S, message="the new leader's offsets")
        with Producer(cluster.bootstrap, acks=1) as producer:
            for i in range(5, 8):
                producer.send("epochs", b"v%d" % i, partition=0, timestamp_ms=TS + 10 * i)
            producer.flush(CLIENT_S)
        read(8)
    finally:
        consumer.close()
        other.close()
    assert [(m.offset(), m.value()) for m in got] == [(i, b"v%d" % i) for i in range(8)]
    assert [(r.offset, r.value) for r in other_got] == [(i, b"v%d" % i) for i in range(8)]
    # librdkafka 2.x asks v2; an answer it could not read would be logged as a failed validation, and a
    # truncation it believed in would have reset the position (a record read twice or skipped above)
    assert any("Received OffsetForLeaderEpochResponse" in line for line in logs), "librdkafka validated nothing"
    assert "Sending OffsetForLeaderEpochRequest" in caplog.text, "kafka-python validated nothing"
    # no error answered (its warnings and errors)
    assert "OffsetForLeaderEpoch for" not in caplog.text and "from OffsetForLeaderEpoch" not in caplog.text

    assert epoch_end(leader, "epochs", 1, 0) == (0, 0, 5)  # epoch 0 ends where epoch 1 starts
    assert epoch_end(leader, "epochs", 1, 1, version=2) == (0, 1, 8)  # the latest: the log end
    assert epoch_end(leader, "epochs", -1, 1) == (0, 1, 8)  # no current epoch given: not fenced
    assert epoch_end(leader, "epochs", 1, 7) == (0, -1, -1)  # newer than any here: undefined
    assert epoch_end(leader, "epochs", 0, 0)[0] == 74  # FENCED_LEADER_EPOCH
    assert epoch_end(leader, "epochs", 2, 0)[0] == 75  # UNKNOWN_LEADER_EPOCH
    assert epoch_end(cluster.kafka_bootstrap, "epochs", 1, 0)[0] == 6  # the coordinator leads nothing
    assert epoch_end(leader, "no-such-topic", 1, 0)[0] == 3

    fenced = fetch_part(leader, "epochs", 0, 0)
    assert fenced.error_code == 74  # FENCED_LEADER_EPOCH, with where the leader is now (KIP-951)
    assert (fenced.current_leader.leader_id, fenced.current_leader.leader_epoch) == (state["leader"], 1)
    assert fetch_part(leader, "epochs", 0, 2).error_code == 75
    fetched = fetch_part(leader, "epochs", 0, 1)
    assert fetched.error_code == 0 and fetched.high_watermark == 8
    # each batch carries the epoch of the leader that appended it (what a consumer asks OffsetForLeaderEpoch of)
    epochs = _batch_epochs(bytes(fetched.records))
    assert epochs and all(epoch == (0 if base_offset < 5 else 1) for base_offset, epoch in epochs), epochs
    # Fetch v12's divergence check (lastFetchedEpoch): a reader that last read epoch 0 and asks from past
    # where epoch 0 ends here read a log that diverged: it is told epoch 0 ends at 5, with no records, at once
    # (a long poll too); asking from 5 (or, having read epoch 1, from its end) is an ordinary fetch.
    assert epochs and all(epoch == (0 if base_offset < 5 else 1) for base_offset, epoch in epochs), epochs
    started = time.monotonic()
    past = fetch_part(leader, "epochs", 7, 1, last_fetched_epoch=0, max_wait_ms=5_000)
    assert (past.error_code, diverging(past), bytes(past.records), past.high_watermark) == (0, (0, 5), b"", 8)
    assert time.monotonic() - started < 4
    at_end = fetch_part(leader, "epochs", 5, 1, last_fetched_epoch=0)
    assert at_end.error_code == 0 and diverging(at_end) is None
    assert _batch_epochs(bytes(at_end.records))[0][0] == 5
    assert diverging(fetch_part(leader, "epochs", 8, 1, last_fetched_epoch=1)) is None
    # An epoch unknown here (OffsetForLeaderEpoch's -1/-1, which is also the field's default): no divergence
    unknown = fetch_part(leader, "epochs", 3, 1, last_fetched_epoch=7)
    assert diverging(unknown) is None and _batch_epochs(bytes(unknown.records))
    assert fetch_part(leader, "epochs", 7, 0, last_fetched_epoch=0).error_code == 74  # fenced before anything
    assert list_offset(leader, "epochs", -1, current_leader_epoch=0)[0] == 74
    assert list_offset(leader, "epochs", -2, current_leader_epoch=2)[0] == 75

    # ListOffsets v8: (error, offset, timestamp, leader epoch of the offset)
    assert list_offset(leader, "epochs", -2) == (0, 0, -1, 0)  # earliest
    assert list_offset(leader, "epochs", -4) == (0, 0, -1, 0)  # earliest local: the whole log is local
    assert list_offset(leader, "epochs", -1) == (0, 8, -1, 1)  # latest: the current epoch
    assert list_offset(leader, "epochs", -3) == (0, 7, TS + 70, 1)  # the largest timestamp (v7+)
    assert list_offset(leader, "epochs", TS + 25) == (0, 3, TS + 30, 0)
    assert list_offset(leader, "epochs", TS + 41) == (0, 5, TS + 50, 1)
    assert list_offset(leader, "epochs", TS + 71) == (0, -1, -1, -1)  # none at or after it
    assert list_offset(leader, "epochs", TS + 25, version=1)[:3] == (0, 3, TS + 30)
    # Produce v10 to a server that does not lead the partition (the coordinator leads none): NOT_LEADER_OR_FOLLOWER
    # with the leader's id and epoch, and the answer's node endpoints say where it listens.
    message = ProduceRequest[10](acks=1, timeout_ms=5000, topic_data=[ProduceRequest.TopicProduceData(
        name="epochs", partition_data=[ProduceRequest.TopicProduceData.PartitionProduceData(
            index=0, records=one_batch())])])
    answer = request(cluster.kafka_bootstrap, message)
    (part,) = answer.responses[0].partition_responses
    assert part.error_code == 6 and (part.current_leader.leader_id, part.current_leader.leader_epoch) == (
        state["leader"], 1)
    assert [(n.node_id, f"{n.host}:{n.port}") for n in answer.node_endpoints] == [(state["leader"], leader)]
    assert produce_raw(leader, "epochs", 0, one_batch()).error_code == 0  # the leader takes it (a ninth record)


class _Collect:
    """A librdkafka logger (confluent-kafka's "logger" setting) that keeps each line's message."""

    def __init__(self, lines: list):
        self.lines = lines

    def log(self, level, message, *args):
        self.lines.append(message % args if args else message)


def _batch_epochs(data: bytes) -> list:
    """(base offset, partition leader epoch) of each Kafka batch in ``data``."""
    out, at = [], 0
    while at < len(data):
        base_offset, length, epoch = struct.unpack_from(">qii", data, at)
        out.append((base_offset, epoch))
        at += 12 + length
    return out


# -- DescribeConfigs ---------------------------------------------------------------------------------------

def test_describe_configs_through_each_client_s_admin_tells_the_topic_s_settings(kafka_cluster):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource, ResourceType
    from kafka.admin import ConfigResource as KConfigResource, ConfigResourceType, KafkaAdminClient

    with Admin(kafka_cluster.bootstrap) as bus_admin:
        bus_admin.create_topic("described", 2, replication_factor=2, min_insync_replicas=2, retention_ms=60_000)
    wait_for(lambda: all("described" in {t.name for t in request(kafka_cluster.kafka_address(n),
                                                                    MetadataRequest[12](topics=None)).topics}
                         for n in kafka_cluster.node_ports), 10, message="every node knows the topic")
    admin = AdminClient({"bootstrap.servers": kafka_cluster.kafka_bootstrap})
    topic = ConfigResource(ResourceType.TOPIC, "described")
    entries = admin.describe_configs([topic], request_timeout=10)[topic].result(CLIENT_S)
    assert {name: (e.value, e.source) for name, e in entries.items()} == {
        "retention.ms": ("60000", ConfigSource.DYNAMIC_TOPIC_CONFIG.value),
        "retention.bytes": ("-1", ConfigSource.DEFAULT_CONFIG.value),  # the bus keeps everything by default
        "min.insync.replicas": ("2", ConfigSource.DYNAMIC_TOPIC_CONFIG.value),
        "cleanup.policy": ("delete", ConfigSource.DEFAULT_CONFIG.value),
        "compression.type": ("producer", ConfigSource.DEFAULT_CONFIG.value),
        "max.message.bytes": (str(16 << 20), ConfigSource.DEFAULT_CONFIG.value),
        "message.timestamp.type": ("CreateTime", ConfigSource.DEFAULT_CONFIG.value)}
    assert all(e.is_read_only and not e.is_sensitive for e in entries.values())
    broker = ConfigResource(ResourceType.BROKER, "2")  # asked of node 2 itself
    entries = admin.describe_configs([broker], request_timeout=10)[broker].result(CLIENT_S)
    assert entries["message.max.bytes"].value == str(16 << 20)
    assert entries["auto.create.topics.enable"].value == "false"
    missing = ConfigResource(ResourceType.TOPIC, "no-such-topic")
    with pytest.raises(KafkaException) as unknown:
        admin.describe_configs([missing], request_timeout=10)[missing].result(CLIENT_S)
    assert unknown.value.args[0].code() == 3  # UNKNOWN_TOPIC_OR_PARTITION
    del admin

    client = KafkaAdminClient(bootstrap_servers=kafka_cluster.kafka_bootstrap, request_timeout_ms=10_000)
    try:
        # its default filter: only what differs from the defaults
        modified = client.describe_configs([KConfigResource(ConfigResourceType.TOPIC, "described")])
        assert {name: c["value"] for name, c in modified["topic"]["described"].items()} == {
            "retention.ms": "60000", "min.insync.replicas": "2"}
        every = client.describe_configs([KConfigResource(ConfigResourceType.TOPIC, "described",
                                                         configs={"retention.bytes": None, "cleanup.policy": None})],
                                        config_filter="all", include_synonyms=True)
        assert {name: c["value"] for name, c in every["topic"]["described"].items()} == {
            "retention.bytes": "-1", "cleanup.policy": "delete"}
        brokers = client.describe_configs([KConfigResource(ConfigResourceType.BROKER, "1")], config_filter="all")
        assert brokers["broker"]["1"]["message.max.bytes"]["value"] == str(16 << 20)
    finally:
        client.close()
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource as AConfigResource, ConfigResourceType as AType

    async def aiokafka_describe():
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_cluster.kafka_bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            return await admin.describe_configs([AConfigResource(AType.TOPIC, "described",
                                                                 {"retention.ms": None, "max.message.bytes": None})])
        finally:
            await admin.close()

    [response] = asyncio.run(aiokafka_describe())
    # aiokafka asks v2 and hands back its tuples: (error, message, type, name, [(name, value, ...), ...])
    [(error_code, _, _, name, entries)] = response.resources
    assert (error_code, name) == (0, "described")
    assert sorted((config, value) for config, value, *_ in entries) == [
        ("max.message.bytes", str(16 << 20)), ("retention.ms", "60000")]
    # asked directly: the coordinator answers topics too, and for a broker only itself (the coordinator is
    # broker COORDINATOR_BROKER_ID): another is INVALID_REQUEST
    for address, itself in ((kafka_cluster.kafka_bootstrap, COORDINATOR_BROKER_ID), (kafka_cluster.kafka_address(1), 1)):
        answer = request(address, DescribeConfigsRequest[4](resources=[
            DescribeConfigsRequest.DescribeConfigsResource(resource_type=2, resource_name="described",
                                                           configuration_keys=["retention.ms"]),
            DescribeConfigsRequest.DescribeConfigsResource(resource_type=4, resource_name="2",
                                                           configuration_keys=None),
            DescribeConfigsRequest.DescribeConfigsResource(resource_type=4, resource_name=str(itself),
                                                           configuration_keys=["message.max.bytes"])],
            include_synonyms=False))
        assert [(r.error_code, [(c.name, c.value) for c in r.configs]) for r in answer.results] == [
            (0, [("retention.ms", "60000")]), (42, []), (0, [("message.max.bytes", str(16 << 20))])]
