"""The fault suite: real processes under kill -9, SIGSTOP, a lossy network, full disks and flipped bits.

Each run records a History of every send, every record read during the run and every high watermark
observed (tests/harness/workload.py) while the nemesis injects a seeded fault schedule
(tests/harness/nemesis.py), then drains every partition, compares every replica's log below the high
watermark and checks it all (tests/harness/checker.py). The harness proves it has teeth: with each sabotage
switch on (tests/harness/sabotage.py) the same kind of run must report the anomaly the switch causes. A
failing run leaves its history (JSON lines) in the test's tmp_path and prints the checker's table;
``python scripts/chaos.py --seed S ...`` replays a schedule by seed.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess

import pytest

from bus import Admin, Consumer, Producer, wire
from bus import batch as batch_format
from bus.errors import CorruptRecord, StorageFull
from store import LogStore
from tests.conftest import wait_for
from tests.harness import History, check
from tests.harness.nemesis import LEADER_KINDS, plan
from tests.harness.runner import RunConfig, describe_topic, record_replicas, run
from tests.harness.topology import peer_of
from tests.harness.workload import wait_in_sync

ZERO = {"lost", "unseen", "duplicates", "inconsistent_offsets", "reordered", "drain_gaps", "failed_but_present"}


def _run(tmp_path, **options):
    config = RunConfig(history_path=str(tmp_path / "history.jsonl"), **options)
    result = run(config, str(tmp_path))
    print(result.summary())  # shown by pytest when the test fails
    return result


def _assert_clean(result):
    assert result.report.drain_checked
    assert result.report.ok, result.summary()
    assert all(result.report.counts[name] == 0 for name in ZERO)
    c = result.config
    assert len(result.faults) == (c.kills + c.pauses + c.coordinator_kills + c.cuts + c.stalls + c.kill_leaders
                                  + c.wipes + c.isolations + c.cascades), "every planned fault must have happened"
    assert result.in_sync, "every ISR must be full again after the heal"
    assert result.replicas_compared == c.partitions


# -- the main run ------------------------------------------------------------------------------------

def test_idempotent_producer_under_kills_and_pauses(tmp_path):
    """200,000 records, 12 partitions, 3 nodes; kill -9 a node 5 times and SIGSTOP one 3 times."""
    result = _run(tmp_path, records=200_000, partitions=12, nodes=3, producers=4, kills=5, pauses=3, seed=1)
    _assert_clean(result)
    # Pauses outlast the request timeout and kills cut replies off, so producers retried; with the
    # delivery timeout far away, every send was still acknowledged, exactly once.
    assert result.outcomes == {"ok": 200_000, "fail": 0, "unknown": 0}
    assert result.drained == 200_000


def test_lossy_network_coordinator_kills_and_zombie_producers(tmp_path):
    """Proxies drop, duplicate and delay messages, cut a node off, and stall one past the delivery timeout
    (its old requests land after the producer gave up on them); the coordinator is killed; zombie
    producers of an older epoch are fenced."""
    result = _run(tmp_path, records=40_000, kills=1, pauses=1, coordinator_kills=2, cuts=1, stalls=2,
                  stall_hold_s=(3.5, 5.0), delivery_timeout_ms=3_000, proxy=True, drop=0.01, duplicate=0.02,
                  delay=0.05, zombies=10, seed=2)
    _assert_clean(result)
    assert result.outcomes["unknown"] > 0  # the stalls outlasted the delivery timeout
    fenced = [e for e in result.history.events()
              if e.process.startswith("zombie-") and e.type == "fail" and e.extra.get("error") == "PRODUCER_FENCED"]
    assert len(fenced) == 10
    assert sum(stats["dropped"] for stats in result.proxy_stats.values()) > 0
    assert sum(stats["duplicated"] for stats in result.proxy_stats.values()) > 0


def test_replicated_log_under_leader_kills_a_wipe_pauses_an_isolation_and_a_cascade(tmp_path):
    """Replication factor 3, min_insync_replicas 2, acks="all" (the producer's default): leaders killed -9,
    a node's disk wiped, nodes paused, a leader cut off from the coordinator and the other nodes while its
    clients still reach it, and KIP-101's double failover. Nothing acknowledged is lost, nothing read during
    the run is later missing, no high watermark goes back, and the replicas agree byte for byte."""
    result = _run(tmp_path, records=60_000, rate=6_000, replication_factor=3, min_insync_replicas=2, kills=0,
                  kill_leaders=2, wipes=1, pauses=2, isolations=1, cascades=1, seed=11)
    _assert_clean(result)
    assert result.outcomes["ok"] == 60_000 and result.drained == 60_000
    assert result.reads > 10_000 and result.hw_observed > 100  # the run was watched as it went
    wiped = [e for e in result.history.events() if e.f == "nemesis" and e.extra.get("action") == "wipe"]
    assert len(wiped) == 1
    isolated = [e for e in result.history.events() if e.f == "nemesis" and e.type == "invoke"
                and e.extra.get("action") in ("isolate", "kill_leader", "cascade")]
    assert all(e.extra.get("node") in (1, 2, 3) for e in isolated)  # each found the partition's leader


def test_the_schedule_aims_leader_faults_at_partitions_and_keeps_older_seeds_as_they_were():
    assert plan(5, [1, 2, 3], kills=3, pauses=2) == plan(5, [1, 2, 3], kills=3, pauses=2, partitions=12)
    faults = plan(5, [1, 2, 3], kill_leaders=3, wipes=2, isolations=2, cascades=1, partitions=12)
    assert faults == plan(5, [1, 2, 3], kill_leaders=3, wipes=2, isolations=2, cascades=1, partitions=12)
    assert sorted(f.kind for f in faults) == ["cascade", "isolate", "isolate", "kill_leader", "kill_leader",
                                              "kill_leader", "wipe", "wipe"]
    assert all(0 <= f.partition < 12 and f.node_id is None for f in faults if f.kind in LEADER_KINDS)
    assert all(f.node_id in (1, 2, 3) for f in faults if f.kind == "wipe")
    assert [f.at_fraction for f in faults] == sorted(f.at_fraction for f in faults)
    with pytest.raises(ValueError):
        plan(5, [1, 2, 3], isolations=1)  # no partition count to aim at


def test_a_front_proxy_tells_a_follower_from_a_client_by_its_first_message():
    fetch = wire.encode_request(wire.REPLICA_FETCH, 1, {"replica_id": 3, "incarnation": "x", "parts": []})
    assert peer_of(fetch) == 3
    assert peer_of(wire.encode_request(wire.PRODUCE, 1, {"acks": "all", "parts": []}, [b"batch"])) is None
    assert peer_of([b"\xc1 not msgpack"]) is None


def test_replica_divergence_is_found_in_the_stopped_data_directories(make_cluster):
    """The end-of-run comparison reads each node's LMDB directory: a follower whose log holds another batch
    below the high watermark (written there behind the node's back) is one replica_divergence, located."""
    cluster = make_cluster(3)
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("copies", 2)
    with Producer(cluster.bootstrap, linger_ms=0) as producer:
        for i in range(20):
            producer.send("copies", b"%d" % i, partition=i % 2).get(10)
    described = {"id": None, "partitions": wait_in_sync(cluster.bootstrap, "copies", 30)}
    assert described["partitions"] is not None
    described["id"] = describe_topic(cluster.bootstrap, "copies")["id"]
    cluster.stop()
    state = described["partitions"][1]
    follower = next(n for n in state["replicas"] if n != state["leader"])
    store = LogStore(os.path.join(cluster.data_dir, f"node-{follower}"))
    try:
        plog = store.open_partition(f"{described['id']}/1")
        assert plog.next_offset == 10
        data, _ = store.read(plog, 5, 1 << 20)  # the batches at 5..9, one record each
        header = batch_format.read_header(data)
        after = bytes(data[batch_format.HEADER_BYTES + header.payload_len:])
        # Offset 5 onwards again, with another record at 5 (same leader epoch) and the same batches after it.
        store.truncate_to(plog, 5)
        forged, _ = batch_format.stamp(batch_format.pack_batch([None, None, b"X", None], 1), 5,
                                       header.append_ts_ms, header.leader_epoch)
        store.append_replica(plog, bytes(forged) + after)
        assert plog.next_offset == 10
    finally:
        store.close()
    history = History()
    assert record_replicas(history, cluster.data_dir, "copies", described) == 2
    report = check(history)
    assert report.counts["replica_divergence"] == 1, report.table()
    assert "copies/1 below 10" in report.examples["replica_divergence"][0]
    assert "(differs from 5)" in report.examples["replica_divergence"][0]


# -- the harness has teeth ---------------------------------------------------------------------------

SABOTAGE_RUNS = [  # (switch, the run that must catch it, the anomalies it must report)
    # Acknowledged but written 500 ms later: a kill -9 loses what was acknowledged. One replica, so the
    # node's own disk is all there is (with followers, the records would survive on them).
    ("ack_before_sync", dict(records=40_000, kills=2, pauses=0, delivery_timeout_ms=5_000, replication_factor=1),
     ("lost", "unseen")),
    # Retries written again: requests duplicated by the network and resent after pauses land twice.
    ("skip_dedup", dict(records=30_000, kills=0, pauses=1, proxy=True, duplicate=0.03), ("duplicates",)),
    # A zombie's late request lands on its newer incarnation's state.
    ("skip_epoch_check", dict(records=5_000, kills=0, pauses=0, zombies=10),
     ("duplicates", "lost", "inconsistent_offsets")),
    # Replication. An isolated leader, whose clients still reach it for a session timeout: answered alone
    # (after its own sync, or counting itself alone as the ISR), what it acknowledged is lost when it
    # rejoins and truncates; read past its high watermark, what it served was never committed.
    ("ack_all_on_leader_fsync", dict(records=20_000, rate=4_000, kills=0, pauses=0, isolations=1), ("lost",)),
    ("shrink_isr_without_controller", dict(records=20_000, rate=4_000, kills=0, pauses=0, isolations=1),
     ("lost", "hw_regressions")),
    ("read_past_hw", dict(records=20_000, rate=4_000, kills=0, pauses=0, isolations=1), ("phantom_reads",)),
    # KIP-101: the follower that cut its log at its (lagging) high watermark when the successor took over is
    # elected next, before it could fetch what it cut. Its producers then meet sequence gaps until their
    # delivery timeout, kept short.
    ("truncate_to_hw_on_rejoin", dict(records=40_000, rate=5_000, kills=0, pauses=0, cascades=2,
                                      delivery_timeout_ms=8_000), ("lost",)),
]
# Sabotage whose damage needs a race the nemesis cannot aim at, and the runs (seeds 3, 4, ...) within which it
# must show. truncate_to_hw_on_rejoin loses only what the leader acknowledged after its last answer to the
# follower, and only if the acknowledgement left before the kill -9: often a record or two per partition,
# sometimes none. Its run missed it once in seven on a loaded machine, and once in a CI run with four cascades
# (its logs: the followers cut 1-24 records each at their high watermarks, none of them acknowledged).
RACE_RUNS_MAX = {"truncate_to_hw_on_rejoin": 3}


def test_every_sabotage_switch_has_a_run_that_catches_it():
    from tests.harness.sabotage import SWITCHES

    # skip_member_epoch_check is the group run's (tests/test_faults_groups.py).
    assert {run[0] for run in SABOTAGE_RUNS} | {"skip_member_epoch_check"} == set(SWITCHES)


@pytest.mark.parametrize("switch, options, anomalies", SABOTAGE_RUNS)
def test_each_sabotage_is_caught(tmp_path, switch, options, anomalies):
    for attempt in range(RACE_RUNS_MAX.get(switch, 1)):
        run_dir = tmp_path / f"run-{attempt}"
        run_dir.mkdir()
        result = _run(run_dir, sabotage=switch, seed=3 + attempt, **options)
        if all(result.report.counts[name] > 0 for name in anomalies):
            return
    for name in anomalies:
        assert result.report.counts[name] > 0, f"{switch} went unnoticed as {name}:\n{result.summary()}"


# -- full storage ----------------------------------------------------------------------------------

def _fill_until_storage_full(producer, history, topic, value_bytes=8_000, max_records=20_000):
    """Send until a send fails with StorageFull; every send recorded. Returns the StorageFull errors seen."""
    full = []
    index = 0
    while not full and index < max_records:
        futures = []
        for _ in range(50):
            value = b"%08d" % index + os.urandom(value_bytes)
            futures.append((history.invoke("producer", "send", topic=topic, partition=0, value=value),
                            producer.send(topic, value, partition=0)))
            index += 1
        producer.flush(30)
        for op_id, future in futures:
            error = future.exception(0)
            if error is None:
                history.ok(op_id, offset=future.get(0).offset)
            else:
                assert isinstance(error, StorageFull), repr(error)
                assert error.outcome == "definite"
                history.fail(op_id, error=error.code)
                full.append(error)
    return full


def _send_recorded(producer, history, topic, value):
    op_id = history.invoke("producer", "send", topic=topic, partition=0, value=value)
    try:
        metadata = producer.send(topic, value, partition=0).get(10)
    except StorageFull as exc:
        history.fail(op_id, error=exc.code)
        return False
    history.ok(op_id, offset=metadata.offset)
    return True


def _drain_one(bootstrap, topic):
    with Consumer(bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100) as consumer:
        consumer.assign([(topic, 0)])
        end = consumer.end_offsets([(topic, 0)])[(topic, 0)]
        records = []
        while len(records) < end:
            records += [(r.topic, r.partition, r.offset, r.value) for r in consumer.poll(500)]
        return records


def test_disk_full_fails_definitely_keeps_what_was_acknowledged_and_recovers(tmp_path, make_cluster):
    """A node's data directory on a small tmpfs: StorageFull for what was not stored, everything
    acknowledged still served, and producing resumes once space is freed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    cluster_dir = tmp_path / "cluster-0"
    node_dir = cluster_dir / "node-1"
    node_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(node_dir)], check=True)
    try:
        # Most of the disk is taken by something else; freeing it is what "the operator frees space" means.
        with open(node_dir / "ballast", "wb") as f:
            f.write(b"\0" * (12 << 20))
        cluster = make_cluster(1)
        assert cluster.data_dir == str(cluster_dir)
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic("full", 1)
        history = History()
        with Producer(cluster.bootstrap, batch_bytes=64 << 10, request_timeout_ms=5_000) as producer:
            assert _fill_until_storage_full(producer, history, "full")
            os.remove(node_dir / "ballast")
            wait_for(lambda: _send_recorded(producer, history, "full", b"room again"), 20,
                     message="producing after space was freed")
        report = check(history, _drain_one(cluster.bootstrap, "full"))
        assert report.ok, report.table()  # nothing acknowledged lost; nothing that failed was stored
        cluster.stop()
    finally:
        subprocess.run(["umount", "-l", str(node_dir)], check=False)


def test_map_full_fails_definitely_keeps_what_was_acknowledged_and_recovers(make_cluster):
    """A node at its --map-size-max: StorageFull, earlier data served, and producing resumes once
    another topic's data is deleted (its pages are reused)."""
    cluster = make_cluster(1, node_args=("--map-size-max", str(8 << 20)))
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("ballast", 1)
        admin.create_topic("full", 1)
        history = History()
        with Producer(cluster.bootstrap, batch_bytes=64 << 10, request_timeout_ms=5_000) as producer:
            for _ in range(300):
                producer.send("ballast", os.urandom(8_000), partition=0)
            producer.flush(30)
            assert _fill_until_storage_full(producer, history, "full")
            admin.delete_topic("ballast")
            wait_for(lambda: _send_recorded(producer, history, "full", b"room again"), 20,
                     message="producing after another topic was deleted")
    report = check(history, _drain_one(cluster.bootstrap, "full"))
    assert report.ok, report.table()


# -- flipped bits ----------------------------------------------------------------------------------

def _flip(path: str, marker: bytes, bit: int = 0, offset_in_marker: int = 0) -> int:
    """Flip one bit at ``marker`` (every copy LMDB holds: only the live one matters). Returns copies."""
    with open(path, "r+b") as f:
        content = bytearray(f.read())
        copies, at = 0, content.find(marker)
        while at >= 0:
            content[at + offset_in_marker] ^= 1 << bit
            copies += 1
            at = content.find(marker, at + 1)
        f.seek(0)
        f.write(content)
    return copies


def test_a_flipped_bit_on_a_stopped_node_is_a_corrupt_record_never_wrong_data(make_cluster):
    cluster = make_cluster(1)
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("bits", 1)
    marker = b"THE-BATCH-THAT-WILL-ROT-"
    with Producer(cluster.bootstrap, linger_ms=0) as producer:
        for value in (b"before-1", b"before-2", marker + b"x" * 20_000, b"after-1"):
            producer.send("bits", value, partition=0).get(10)  # one batch each
    cluster.kill_node(1, signal.SIGTERM)
    assert _flip(os.path.join(cluster.data_dir, "node-1", "data.mdb"), marker, bit=3, offset_in_marker=5) >= 1
    cluster.restart_node(1)

    with Consumer(cluster.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100) as consumer:
        consumer.assign([("bits", 0)])
        seen = []
        with pytest.raises(CorruptRecord):
            for _ in range(50):
                seen += [(r.offset, r.value) for r in consumer.poll(200)]
        assert seen == [(0, b"before-1"), (1, b"before-2")]  # the good batches before it, then the error
        with pytest.raises(CorruptRecord):  # and again: never skipped, never served
            for _ in range(50):
                assert not consumer.poll(200)
        consumer.seek(("bits", 0), 3)  # the batch after it is intact
        after = []
        wait_for(lambda: after.extend(consumer.poll(200)) or after, 10)
        assert [(r.offset, r.value) for r in after] == [(3, b"after-1")]


def test_one_flipped_bit_anywhere_in_a_stored_batch_is_caught(tmp_path):
    """Every bit of a stored batch, one at a time, flipped in data.mdb itself: CorruptRecord, never data."""
    path = str(tmp_path / "node")
    store = LogStore(path)
    log = store.open_partition("1/0")
    flat = [1_700_000_000_000, b"key", b"payload-" + bytes(range(40)), [["h", b"v"]], None, None, b"second record",
            None]
    stored = store.append([(log, batch_format.pack_batch(flat, 2, producer_id=7, producer_epoch=0,
                                                         base_sequence=0))])
    assert stored[0][0] == 0
    with store.env.begin(db=log.db) as txn:
        value = bytes(txn.get(struct.pack(">Q", 0)))
    store.close()

    data_path = os.path.join(path, "data.mdb")
    with open(data_path, "rb") as f:
        pristine = f.read()
    at = pristine.find(value)
    assert at >= 0 and pristine.find(value, at + 1) < 0, "the batch must sit once in the file"
    for index in range(len(value)):
        for bit in range(8):
            corrupt = bytearray(pristine)
            corrupt[at + index] ^= 1 << bit
            with open(data_path, "wb") as f:
                f.write(corrupt)
            store = LogStore(path)
            try:
                # Opening the partition checks the last batch (its header says where the log ends);
                # reading checks every batch it serves.
                with pytest.raises(CorruptRecord):
                    store.read(store.open_partition("1/0"), 0, 1 << 20)
            finally:
                store.close()
