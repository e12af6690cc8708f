"""The cluster under faults and over time: kill -9 of a node and of the coordinator, and retention.

Real processes, sockets and LMDB directories; LocalCluster.kill_node / restart_node / restart_coordinator.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from bus import Admin, Consumer, Producer
from bus.batch import pack_batch
from bus.errors import InvalidRequest, OffsetOutOfRange, StorageFull, UnknownTopic
from store import LogStore
from tests.conftest import wait_for
from tests.core_helpers import check_partition_offsets, consume_all


def end_offsets(bootstrap, topic) -> list:
    with Admin(bootstrap) as admin:
        return [p["end_offset"] for p in admin.describe_topic(topic)["partitions"]]


# -- kill -9 of a partition-owner node ------------------------------------------------------------

def test_acknowledged_records_survive_kill_9_and_offsets_continue(cluster):
    with Admin(cluster.bootstrap) as admin:
        # One replica each: what is proved here is the owner's own disk (replication: test_replication.py).
        owners = [p["leader"] for p in admin.create_topic("durable", 3, replication_factor=1)["partitions"]]
    victim = owners[1]
    with Producer(cluster.bootstrap) as producer:
        futures = [producer.send("durable", b"before-%d" % i, partition=i % 3) for i in range(3_000)]
        producer.flush(30)
        acked = [f.get(0) for f in futures]
    cluster.kill_node(victim)  # right after the acknowledgements: no clean shutdown
    cluster.restart_node(victim)
    # The restarted node answers once the coordinator's placement reaches it (a heartbeat at most); until
    # then its partition's end offset is unknown (None), never anything but 1,000.
    wait_for(lambda: None not in end_offsets(cluster.bootstrap, "durable"), 10, message="the restarted node serving")
    assert end_offsets(cluster.bootstrap, "durable") == [1_000, 1_000, 1_000]

    with Producer(cluster.bootstrap) as producer:
        futures = [producer.send("durable", b"after-%d" % i, partition=i % 3) for i in range(300)]
        producer.flush(30)
        after = [f.get(0) for f in futures]
    # Offsets continue exactly where they stopped, on the restarted node as on the others.
    for partition in range(3):
        assert sorted(m.offset for m in after if m.partition == partition) == list(range(1_000, 1_100))

    records = consume_all(cluster.bootstrap, "durable", 3, 3_300)
    assert check_partition_offsets(records) == {0: 1_100, 1: 1_100, 2: 1_100}
    values = [r.value for r in records]
    assert len(values) == len(set(values)) == 3_300  # each exactly once
    at = {(r.partition, r.offset): r.value for r in records}
    for i, metadata in enumerate(acked):
        assert at[(metadata.partition, metadata.offset)] == b"before-%d" % i


def test_a_producer_sending_across_kill_9_and_restart_loses_and_duplicates_nothing(cluster):
    """A producer keeps sending and a consumer keeps reading while a node is killed and restarted."""
    with Admin(cluster.bootstrap) as admin:
        owners = [p["leader"] for p in admin.create_topic("steady", 6, replication_factor=1)["partitions"]]
    victim = owners[0]
    total, futures, sent, stop = 30_000, [], threading.Event(), threading.Event()
    producer = Producer(cluster.bootstrap, request_timeout_ms=2_000, linger_ms=5)
    consumer = Consumer(cluster.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100)
    consumer.assign([("steady", p) for p in range(6)])
    received = []

    def send_steadily():
        for i in range(total):
            futures.append(producer.send("steady", b"%d" % i, key=b"k%d" % (i % 60)))
            if i % 500 == 499:
                time.sleep(0.01)  # spread the load over the kill and the restart
        sent.set()

    def consume():
        while not stop.is_set():
            received.extend(consumer.poll(timeout_ms=100))

    threads = [threading.Thread(target=send_steadily), threading.Thread(target=consume)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(futures) > 3_000 and futures[2_000].done(), 10, message="first acknowledgements")
        cluster.kill_node(victim)
        sent_at_kill = len(futures)
        cluster.restart_node(victim)
        assert len(futures) > sent_at_kill  # it kept sending while the node was down
        threads[0].join(60)
        assert sent.is_set()
        producer.flush(60)
        acked = [f.get(0) for f in futures]  # every future succeeds: the producer retried through it
        wait_for(lambda: len(received) >= total, 30, message="the consumer reading everything")
    finally:
        stop.set()
        sent.wait(60)
        for thread in threads:
            thread.join(60)
        producer.close(10)
        consumer.close()
    records = sorted(received, key=lambda r: (r.partition, r.offset))
    assert len(records) == total
    check_partition_offsets(records)
    values = sorted(int(r.value) for r in records)
    assert values == list(range(total))  # nothing lost, nothing duplicated
    at = {(r.partition, r.offset): int(r.value) for r in records}
    assert all(at[(m.partition, m.offset)] == i for i, m in enumerate(acked))
    last_of_key: dict = {}
    for record in records:  # per key, in send order
        assert int(record.value) > last_of_key.get(record.key, -1)
        last_of_key[record.key] = int(record.value)


def test_a_dead_node_holds_up_only_its_own_partitions(cluster):
    with Admin(cluster.bootstrap) as admin:
        owners = [p["leader"] for p in admin.create_topic("partial", 3, replication_factor=1)["partitions"]]
    with Producer(cluster.bootstrap) as producer:
        for f in [producer.send("partial", b"%d" % i, partition=i % 3) for i in range(300)]:
            f.get(10)
    victim = owners[2]
    cluster.kill_node(victim)
    got = []
    consumer = Consumer(cluster.bootstrap, auto_offset_reset="earliest")  # request_timeout_ms: 30 s
    try:
        consumer.assign([("partial", p) for p in range(3)])
        # Positions and records of the live nodes' partitions come at once, not after a timeout.
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=100)) or len(got) >= 200, 5, message="live partitions")
        assert {r.partition for r in got} == {0, 1}
        cluster.restart_node(victim)
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=100)) or len(got) >= 300, 10, message="the rest")
    finally:
        started_s = time.monotonic()
        consumer.close()
        assert time.monotonic() - started_s < 2
    check_partition_offsets(sorted(got, key=lambda r: (r.partition, r.offset)))
    assert len(got) == 300


# -- kill -9 of the coordinator ---------------------------------------------------------------------

def test_coordinator_restart_keeps_topics_and_running_clients_carry_on(cluster):
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("meta-a", 4)
        admin.create_topic("meta-b", 2, retention_ms=3_600_000)
        before = admin.list_topics()

    received, stop = [], threading.Event()
    consumer = Consumer(cluster.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100)
    consumer.assign([("meta-a", p) for p in range(4)])
    producer = Producer(cluster.bootstrap)

    def consume():
        while not stop.is_set():
            received.extend(consumer.poll(timeout_ms=100))

    reader = threading.Thread(target=consume)
    reader.start()
    try:
        first = [producer.send("meta-a", b"a-%d" % i, key=b"%d" % i) for i in range(200)]
        producer.flush(10)
        wait_for(lambda: len(received) >= 200, 10, message="records before the restart")

        cluster.kill_coordinator()
        # With the coordinator down, nodes keep serving the placement they have.
        during = [producer.send("meta-a", b"b-%d" % i, key=b"%d" % i) for i in range(200)]
        producer.flush(10)
        wait_for(lambda: len(received) >= 400, 10, message="records while the coordinator is down")
        cluster.restart_coordinator()

        with Admin(cluster.bootstrap) as admin:
            assert admin.list_topics() == before  # topics, ids, placement and retention all survived
            assert admin.create_topic("meta-c", 1)["id"] == max(t["id"] for t in before.values()) + 1
            assert all(n["alive"] for n in admin.nodes().values())
        after = [producer.send("meta-a", b"c-%d" % i, key=b"%d" % i) for i in range(200)]
        producer.flush(10)
        wait_for(lambda: len(received) >= 600, 10, message="records after the restart")
        assert all(f.get(0).offset >= 0 for f in first + during + after)
    finally:
        stop.set()
        reader.join(10)
        consumer.close()
        producer.close(10)
    assert sorted(r.value for r in received) == sorted(
        [b"a-%d" % i for i in range(200)] + [b"b-%d" % i for i in range(200)] + [b"c-%d" % i for i in range(200)])
    check_partition_offsets(sorted(received, key=lambda r: (r.partition, r.offset)))


def test_a_new_producer_and_consumer_work_after_a_coordinator_restart(cluster):
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("later", 2)
    cluster.restart_coordinator()
    with Producer(cluster.bootstrap) as producer:
        for f in [producer.send("later", b"x%d" % i, partition=i % 2) for i in range(100)]:
            f.get(10)
    assert len(consume_all(cluster.bootstrap, "later", 2, 100)) == 100


# -- retention ------------------------------------------------------------------------------------

@pytest.fixture
def fast_retention_cluster(make_cluster):
    return make_cluster(2, node_args=("--retention-check-interval-ms", "50"))


def test_retention_by_age_drops_old_batches_and_fetches_below_start_are_out_of_range(fast_retention_cluster):
    cluster = fast_retention_cluster
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("aging", 1, retention_ms=60_000)
    now_ms = time.time_ns() // 1_000_000
    with Producer(cluster.bootstrap) as producer:
        for i in range(10):  # ten old batches, ten minutes in the past
            producer.send("aging", b"old-%d" % i, timestamp_ms=now_ms - 600_000).get(10)
        for i in range(5):
            producer.send("aging", b"new-%d" % i).get(10)

    def start_offset():
        with Admin(cluster.bootstrap) as admin:
            return admin.describe_topic("aging")["partitions"][0]["start_offset"]

    wait_for(lambda: start_offset() == 10, 10, message="old batches dropped")
    assert end_offsets(cluster.bootstrap, "aging") == [15]

    with Consumer(cluster.bootstrap, auto_offset_reset="none") as consumer:
        consumer.assign([("aging", 0)])
        consumer.seek(("aging", 0), 3)
        with pytest.raises(OffsetOutOfRange):
            wait_for(lambda: consumer.poll(timeout_ms=200), 5, message="an error from poll")
        consumer.seek(("aging", 0), 10)
        got = wait_for(lambda: consumer.poll(timeout_ms=200), 5, message="retained records")
        assert [r.value for r in got] == [b"new-%d" % i for i in range(5)]
        assert consumer.beginning_offsets([("aging", 0)]) == {("aging", 0): 10}

    with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([("aging", 0)])
        consumer.seek(("aging", 0), 0)  # below the start: jumps to the new start
        got = wait_for(lambda: consumer.poll(timeout_ms=200), 5, message="records after the reset")
        assert [r.offset for r in got] == list(range(10, 15))


def test_retention_by_size_keeps_each_partition_near_its_limit(fast_retention_cluster):
    cluster = fast_retention_cluster
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("bounded", 2, retention_bytes=20_000)
    with Producer(cluster.bootstrap, linger_ms=0) as producer:
        for i in range(100):  # 100 batches of ~1 KB per partition
            producer.send("bounded", b"%04d" % i + b"." * 1_000, partition=0).get(10)
            producer.send("bounded", b"%04d" % i + b"." * 1_000, partition=1).get(10)

    def starts():
        with Admin(cluster.bootstrap) as admin:
            return [p["start_offset"] for p in admin.describe_topic("bounded")["partitions"]]

    # Every stored batch has the same size; retention keeps the fewest whole batches that reach 20 KB.
    batch_bytes = len(pack_batch([None, None, b"0000" + b"." * 1_000, None], 1, 1, 0, 0))
    kept = -(-20_000 // batch_bytes)
    wait_for(lambda: starts() == [100 - kept] * 2, 30, message=f"partitions cut to their last {kept} batches")
    records = consume_all(cluster.bootstrap, "bounded", 2, 2 * kept)
    for partition in range(2):
        assert [int(r.value[:4]) for r in records if r.partition == partition] == list(range(100 - kept, 100))


# -- retries of a request whose reply was lost --------------------------------------------------------

def test_resending_many_batches_of_one_partition_is_deduplicated(cluster):
    """Requests time out while the node is stopped, so each is resent while the node still holds the
    earlier copies: the node sees the same batches two or three times, and writes each once."""
    with Admin(cluster.bootstrap) as admin:
        owner = admin.create_topic("resent", 1, replication_factor=1)["partitions"][0]["leader"]
    producer = Producer(cluster.bootstrap, linger_ms=0, batch_bytes=64, request_timeout_ms=300,
                        max_in_flight_per_node=1, retry_backoff_ms=10)
    try:
        producer.send("resent", b"warm-up").get(10)
        cluster.pause_node(owner)
        try:
            first = producer.send("resent", b"first")
            wait_for(lambda: first._batch.attempts >= 1, 5, message="the first request out")
            rest = [producer.send("resent", b"record-%02d" % i) for i in range(20)]  # 20 batches queue up
            wait_for(lambda: first._batch.attempts >= 3, 5, message="two resends")
        finally:
            cluster.resume_node(owner)
        producer.flush(20)
        offsets = [f.get(0).offset for f in [first] + rest]
    finally:
        producer.close(10)
    assert offsets == list(range(1, 22))
    records = consume_all(cluster.bootstrap, "resent", 1, 22)
    assert [r.value for r in records] == [b"warm-up", b"first"] + [b"record-%02d" % i for i in range(20)]


# -- topics come and go ---------------------------------------------------------------------------

def test_a_deleted_topic_loses_its_data_and_a_recreated_one_starts_empty(cluster):
    with Admin(cluster.bootstrap) as admin:
        first_id = admin.create_topic("phoenix", 3)["id"]
        with Producer(cluster.bootstrap) as producer:
            for f in [producer.send("phoenix", b"old-%d" % i, partition=i % 3) for i in range(30)]:
                f.get(10)
        admin.delete_topic("phoenix")
        assert "phoenix" not in admin.list_topics()
        with pytest.raises(UnknownTopic):
            admin.describe_topic("phoenix")
        assert admin.create_topic("phoenix", 2)["id"] > first_id
        wait_for(lambda: [p["end_offset"] for p in admin.describe_topic("phoenix")["partitions"]] == [0, 0], 10,
                 message="empty logs for the re-created topic")
    with Producer(cluster.bootstrap) as producer:
        assert producer.send("phoenix", b"new", partition=1).get(10).offset == 0
    records = consume_all(cluster.bootstrap, "phoenix", 2, 1)
    assert [r.value for r in records] == [b"new"]


def test_a_node_holds_more_than_a_thousand_partitions_and_capacity_is_enforced(make_cluster):
    cluster = make_cluster(1)
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("wide", 1_100)
        with pytest.raises(InvalidRequest, match="over its maximum"):
            admin.create_topic("too-wide", 10_000)
        assert "too-wide" not in admin.list_topics()
    with Producer(cluster.bootstrap) as producer:
        assert producer.send("wide", b"far", partition=1_099).get(20).offset == 0
    assert cluster.nodes[1].poll() is None


# -- a full node --------------------------------------------------------------------------------------

def test_a_full_node_refuses_writes_with_storage_full_and_keeps_serving_reads(make_cluster):
    cluster = make_cluster(1, node_args=("--map-size-max", str(2 << 20)))
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("filling", 1)
    stored, value = [], b"x" * 50_000
    with Producer(cluster.bootstrap, linger_ms=0) as producer:
        for i in range(100):
            try:
                stored.append(producer.send("filling", b"%03d" % i + value).get(10).offset)
            except StorageFull:
                break
        else:
            raise AssertionError("2 MiB never filled up")
        assert stored == list(range(len(stored))) and len(stored) >= 10
        with pytest.raises(StorageFull):  # still full: refused again, definitely not written
            producer.send("filling", b"more" + value).get(10)
    records = consume_all(cluster.bootstrap, "filling", 1, len(stored))
    assert [int(r.value[:3]) for r in records] == list(range(len(stored)))
    assert cluster.nodes[1].poll() is None


def test_a_coordinator_that_lost_its_data_cannot_make_nodes_drop_theirs(make_cluster):
    cluster = make_cluster(1)
    with Admin(cluster.bootstrap) as admin:
        topic_id = admin.create_topic("precious", 1)["id"]
    with Producer(cluster.bootstrap) as producer:
        for f in [producer.send("precious", b"%d" % i) for i in range(10)]:
            f.get(10)
    cluster.kill_coordinator()
    shutil.rmtree(os.path.join(cluster.data_dir, "coordinator"))
    cluster.start_coordinator()  # a new, empty cluster: it knows no topics
    node = cluster.nodes[1]
    wait_for(lambda: node.poll() is not None, 10, message="the node refusing the strange coordinator")
    assert node.returncode == 1
    assert "belongs to cluster" in cluster.log_tail("node-1")
    store = LogStore(os.path.join(cluster.data_dir, "node-1"))
    try:
        assert store.open_partition(f"{topic_id}/0").next_offset == 10  # its log is untouched
    finally:
        store.close()


def test_node_keeps_freed_memory_on_glibc():
    """The node tunes glibc's malloc (nodes/node.py, keep_freed_memory); a value glibc refuses must not
    slip by silently. Run in a child: the setting is per process."""
    import subprocess
    import sys

    code = "from nodes.node import keep_freed_memory; import sys; sys.exit(0 if keep_freed_memory() else 3)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
