"""Producer and Consumer end to end over a real LocalCluster: ordering across processes, the long poll,
and bad input refused early with the right error."""

from __future__ import annotations

import statistics
import threading
import time

import msgpack
import psutil
import pytest

from bus import Admin, Consumer, Producer
from bus.errors import BufferFull, ConfigError, OffsetOutOfRange, RecordTooLarge, UnknownPartition, UnknownTopic
from bus.metadata import partition_for_key
from tests.conftest import wait_for
from tests.core_helpers import check_partition_offsets, finish, spawn_python

RECORDS = 100_000
PARTITIONS = 12
KEYS = 1_000

PRODUCER_CHILD = r"""
import sys, msgpack
from bus import Producer
bootstrap, topic, count, keys, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with Producer(bootstrap) as producer:
    send = producer.send
    futures = [send(topic, b"%d" % i, key=b"key-%d" % (i % keys)) for i in range(count)]
    producer.flush(60)
    acks = [(m.partition, m.offset) for m in (f.get(0) for f in futures)]
with open(out, "wb") as f:
    f.write(msgpack.packb(acks))
"""

CONSUMER_CHILD = r"""
import sys, time, msgpack
from bus import Consumer
bootstrap, topic, partitions, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
got = []
with Consumer(bootstrap, auto_offset_reset="latest") as consumer:
    consumer.assign([(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    print("assigned", flush=True)
    deadline = time.monotonic() + 60
    while len(got) < count and time.monotonic() < deadline:
        got += [(r.partition, r.offset, r.key, r.value) for r in consumer.poll(timeout_ms=500)]
    got += [(r.partition, r.offset, r.key, r.value) for r in consumer.poll(timeout_ms=200)]
with open(out, "wb") as f:
    f.write(msgpack.packb(got))
"""


def test_100k_keyed_records_from_one_process_read_in_order_by_another(cluster, tmp_path):
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("orders", PARTITIONS)
    acks_path, got_path = tmp_path / "acks", tmp_path / "got"
    consumer = spawn_python(CONSUMER_CHILD, cluster.bootstrap, "orders", PARTITIONS, RECORDS, got_path)
    producer = spawn_python(PRODUCER_CHILD, cluster.bootstrap, "orders", RECORDS, KEYS, acks_path)
    try:
        finish(producer, 90)
        finish(consumer, 90)
    finally:
        for proc in (producer, consumer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    acks = msgpack.unpackb(acks_path.read_bytes())
    got = msgpack.unpackb(got_path.read_bytes())

    assert len(acks) == RECORDS and len(got) == RECORDS
    by_partition: dict[int, list] = {}
    key_partition: dict[bytes, int] = {}
    last_value_of_key: dict[bytes, int] = {}
    at: dict[tuple, int] = {}
    for partition, offset, key, value in got:
        by_partition.setdefault(partition, []).append(offset)
        assert key_partition.setdefault(key, partition) == partition, f"key {key!r} on two partitions"
        value = int(value)
        assert value > last_value_of_key.get(key, -1), f"key {key!r} out of send order"
        last_value_of_key[key] = value
        at[(partition, offset)] = value
    assert sorted(by_partition) == list(range(PARTITIONS))
    for partition, offsets in by_partition.items():
        assert offsets == list(range(len(offsets))), f"partition {partition}: offsets not consecutive from 0"
    assert len(key_partition) == KEYS
    for key, partition in key_partition.items():
        assert partition == partition_for_key(key, PARTITIONS)
    # Every acknowledged record is exactly where its acknowledgement said.
    for value, (partition, offset) in enumerate(acks):
        assert at[(partition, offset)] == value
    with Admin(cluster.bootstrap) as admin:
        ends = [p["end_offset"] for p in admin.describe_topic("orders")["partitions"]]
    assert ends == [len(by_partition[p]) for p in range(PARTITIONS)]


# -- the long poll -----------------------------------------------------------------------------------

IDLE_CONSUMER_CHILD = r"""
import sys
from bus import Consumer
consumer = Consumer(sys.argv[1], auto_offset_reset="latest")
consumer.assign([(sys.argv[2], 0), (sys.argv[2], 1)])
consumer.position((sys.argv[2], 0)), consumer.position((sys.argv[2], 1))
assert consumer.poll(timeout_ms=100) == []
print("ready", flush=True)
while True:
    assert consumer.poll(timeout_ms=1000) == []
"""


def test_an_idle_consumer_neither_spins_nor_lags(cluster):
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("idle", 2)
        admin.create_topic("quiet", 1)
    child = spawn_python(IDLE_CONSUMER_CHILD, cluster.bootstrap, "idle")
    try:
        assert child.stdout.readline() == b"ready\n"
        process = psutil.Process(child.pid)
        before_s, start_s = sum(process.cpu_times()[:2]), time.monotonic()
        # Meanwhile: a consumer in this process gets each new record within 50 ms of its acknowledgement.
        latencies_s = []
        with Producer(cluster.bootstrap, linger_ms=0) as producer, \
                Consumer(cluster.bootstrap, auto_offset_reset="latest") as consumer:
            consumer.assign([("quiet", 0)])
            consumer.position(("quiet", 0))
            for i in range(20):
                producer.send("quiet", b"r%d" % i, partition=0).get(10)
                acked_s = time.monotonic()
                got = consumer.poll(timeout_ms=2000)
                latencies_s.append(time.monotonic() - acked_s)
                assert [r.value for r in got] == [b"r%d" % i]
        wait_for(lambda: time.monotonic() - start_s >= 2.0, 5, message="2 s of measurement")
        cpu_s = sum(process.cpu_times()[:2]) - before_s
        elapsed_s = time.monotonic() - start_s
        assert child.poll() is None, child.stderr.read().decode(errors="replace")
    finally:
        child.kill()
        child.wait()
    assert cpu_s / elapsed_s < 0.05, f"idle consumer used {100 * cpu_s / elapsed_s:.1f} % of a core"
    assert statistics.median(latencies_s) < 0.050, f"median delivery {statistics.median(latencies_s) * 1000:.1f} ms"


def test_poll_takes_its_fetch_replies_itself_and_the_fetcher_prefetches_while_it_is_away(cluster):
    """poll() with nothing buffered waits on the fetcher's sockets itself (a thread hop less per record); the
    fetcher thread takes its loop back once poll() has been away LENT_HOLD_MS, and prefetches meanwhile."""
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("lent", 1)
    with Producer(cluster.bootstrap, linger_ms=0) as producer, Consumer(cluster.bootstrap) as consumer:
        consumer.assign([("lent", 0)])
        consumer.position(("lent", 0))
        fetcher = consumer._fetcher

        def produce() -> None:  # each record once poll() waits in the fetcher's loop
            for i in range(20):
                wait_for(lambda: fetcher._lent, 10, 0.001, "poll() waiting in the fetcher's loop")
                producer.send("lent", b"r%d" % i, partition=0).get(10)

        writer = threading.Thread(target=produce, daemon=True)
        writer.start()
        got = []
        while len(got) < 20:
            got += [r.value for r in consumer.poll(timeout_ms=5000)]
        writer.join(10)
        assert got == [b"r%d" % i for i in range(20)]
        assert fetcher.lent_steps >= 20, fetcher.lent_steps
        assert consumer.metrics()["buffered_bytes"] == 0
        wait_for(lambda: not fetcher.held(), 5, 0.005, "the loop back with the fetcher thread")
        for i in range(20, 25):
            producer.send("lent", b"r%d" % i, partition=0)
        producer.flush(10)
        steps = fetcher.lent_steps
        wait_for(lambda: consumer.metrics()["buffered_bytes"] > 0, 10, 0.005, "records prefetched without poll()")
        assert fetcher.lent_steps == steps  # fetched by the fetcher thread
        got = []
        while len(got) < 5:
            got += [r.value for r in consumer.poll(timeout_ms=5000)]
        assert got == [b"r%d" % i for i in range(20, 25)]


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_records_are_refused_before_anything_is_sent(cluster):
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("small", 2)
    with Producer(cluster.bootstrap, max_record_bytes=1_000) as producer:
        with pytest.raises(RecordTooLarge):
            producer.send("small", b"x" * 2_000)
        with pytest.raises(RecordTooLarge):
            producer.send("small", b"x" * 10, key=b"k" * 990)
        with pytest.raises(RecordTooLarge):
            producer.send("small", b"x", headers=[("h", b"y" * 1_000)])
        with pytest.raises(UnknownTopic, match="bus topic create"):
            producer.send("no-such-topic", b"x")
        with pytest.raises(UnknownPartition):
            producer.send("small", b"x", partition=2)
        producer.send("small", b"fits", partition=1).get(10)
    with Producer(cluster.bootstrap, buffer_bytes=1_000, batch_bytes=500, max_block_ms=60_000) as producer:
        started_s = time.monotonic()
        with pytest.raises(RecordTooLarge, match="buffer_bytes"):  # could never fit: refused at once
            producer.send("small", b"x" * 2_000)
        assert time.monotonic() - started_s < 1
    with Admin(cluster.bootstrap) as admin:
        assert [p["end_offset"] for p in admin.describe_topic("small")["partitions"]] == [0, 1]
        with pytest.raises(UnknownTopic):
            admin.describe_topic("no-such-topic")
    with Consumer(cluster.bootstrap) as consumer:
        with pytest.raises(UnknownTopic):
            consumer.assign([("no-such-topic", 0)])
        with pytest.raises(ConfigError):
            consumer.assign([("small", 5)])


@pytest.mark.parametrize("kwargs", [
    {"acks": 2}, {"linger_ms": -1}, {"linger_ms": "fast"}, {"batch_bytes": 0}, {"buffer_bytes": 10, "batch_bytes": 100},
    {"max_block_ms": -5}, {"request_timeout_ms": 0}, {"delivery_timeout_ms": 10, "request_timeout_ms": 100},
    {"max_in_flight_per_node": 0}, {"acks": 0}, {"max_record_bytes": 0.5}, {"bootstrap": "not-an-address"},
    {"bootstrap": "tcp://127.0.0.1"}, {"compression": "gzip"}, {"compression": "LZ4"},
    {"compression": "zstd", "batch_bytes": 16 << 20, "buffer_bytes": 64 << 20},  # batches no reader could take
    {"value_serializer": "json"}, {"key_serializer": b"utf-8"},
])
def test_absurd_producer_arguments_are_config_errors(kwargs):
    kwargs = {"bootstrap": "tcp://127.0.0.1:1", **kwargs}
    with pytest.raises(ConfigError):
        Producer(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"auto_offset_reset": "sometimes"}, {"fetch_max_wait_ms": -1}, {"fetch_max_bytes": 0},
    {"max_partition_fetch_bytes": 0}, {"prefetch_bytes_max": "lots"}, {"request_timeout_ms": 0},
    {"topics": ["t"]}, {"session_timeout_ms": 100}, {"bootstrap": "127.0.0.1:7400"}, {"value_deserializer": "json"},
    {"key_deserializer": 1},
])
def test_absurd_consumer_arguments_are_config_errors(kwargs):
    kwargs = {"bootstrap": "tcp://127.0.0.1:1", **kwargs}
    with pytest.raises(ConfigError):
        Consumer(**kwargs)


def test_a_consumer_without_a_position_and_no_reset_says_so(cluster):
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("positionless", 1)
    with Consumer(cluster.bootstrap, auto_offset_reset="none") as consumer:
        consumer.assign([("positionless", 0)])
        with pytest.raises(OffsetOutOfRange, match="seek"):
            consumer.poll(timeout_ms=2_000)
        consumer.seek(("positionless", 0), 0)
        assert consumer.poll(timeout_ms=100) == []


def test_buffer_full_after_max_block_ms_when_the_node_is_stopped(cluster):
    with Admin(cluster.bootstrap) as admin:
        owner = admin.create_topic("stuck", 1, replication_factor=1)["partitions"][0]["leader"]
    producer = Producer(cluster.bootstrap, buffer_bytes=4_096, batch_bytes=1_024, max_block_ms=300, linger_ms=0)
    try:
        producer.send("stuck", b"warm-up").get(10)  # metadata and producer id in place
        cluster.pause_node(owner)
        futures, value = [], b"v" * 500
        with pytest.raises(BufferFull):
            for _ in range(100):
                started_s = time.monotonic()
                futures.append(producer.send("stuck", value))
        blocked_s = time.monotonic() - started_s
        assert 0.25 <= blocked_s < 2.0, blocked_s
        assert 4 <= len(futures) < 10 and not any(f.done() for f in futures)
    finally:
        cluster.resume_node(owner)
    try:
        offsets = [f.get(10).offset for f in futures]
        assert offsets == list(range(1, len(futures) + 1))  # every accepted record, the refused one not
    finally:
        producer.close(10)
    with Admin(cluster.bootstrap) as admin:
        assert admin.describe_topic("stuck")["partitions"][0]["end_offset"] == len(futures) + 1


def test_poll_leaves_the_garbage_collector_as_it_found_it(cluster):
    """poll() pauses the collector and ages its records (bus/consumer.py, _decode): the program's own
    settings, and objects it froze, must come out unchanged; records must be exact, timestamps included."""
    import gc

    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("gc", 1)
    stamps = [1_700_000_000_000 + i // 3 for i in range(3_000)]  # a few records per ms
    with Producer(cluster.bootstrap) as producer:
        for i, ts in enumerate(stamps):
            producer.send("gc", b"%d" % i, partition=0, timestamp_ms=ts)
        producer.flush()
        # One batch mixing the two kinds: records with their own timestamps and one with the append time.
        producer.send("gc", b"near", partition=0, timestamp_ms=stamps[-1])
        appended = producer.send("gc", b"appended", partition=0)
        producer.send("gc", b"far", partition=0, timestamp_ms=stamps[-1] + 10**9)
        append_ts_ms = appended.get(10).timestamp_ms
        assert abs(append_ts_ms - time.time() * 1000) < 60_000
    kept = [object() for _ in range(10)]
    gc.freeze()  # as a pre-fork server does
    frozen = gc.get_freeze_count()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
                consumer.assign([("gc", 0)])
                got = []
                deadline = time.monotonic() + 30
                while len(got) < len(stamps) + 3 and time.monotonic() < deadline:
                    got += consumer.poll(timeout_ms=200)
            assert gc.isenabled() is enabled and gc.get_freeze_count() == frozen
            assert [r.timestamp_ms for r in got] == stamps + [stamps[-1], append_ts_ms, stamps[-1] + 10**9]
            assert [r.value for r in got[:3]] == [b"0", b"1", b"2"] and got[-1].value == b"far"
    finally:
        gc.enable()
        gc.unfreeze()
    assert kept


def test_poll_does_not_promote_the_programs_young_garbage(cluster):
    """Aging records to the oldest generation (bus/consumer.py, _decode) must not carry the program's
    young garbage cycles along, where only a full collection would find them."""
    import gc
    import weakref

    class Cycle:
        pass

    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("young", 1)
    with Producer(cluster.bootstrap) as producer:
        for i in range(2_000):
            producer.send("young", b"%d" % i, partition=0)
    with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([("young", 0)])
        assert wait_for(lambda: consumer.position(("young", 0)) == 0, 10)
        assert wait_for(lambda: consumer._chunk_bytes, 10)  # fetched, not decoded yet
        gc.collect()
        cycle = Cycle()
        cycle.me = cycle
        dead = weakref.ref(cycle)
        del cycle
        assert dead() is not None  # garbage, young, not yet collected
        got = consumer.poll(timeout_ms=5_000)
        assert got and dead() is None
