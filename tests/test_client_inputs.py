"""What the client library takes and how poll() hands it out, end to end over one real cluster (a
coordinator and a node, started once for the module): poll() serving partitions in turn.

Each test makes topics of its own, so they share the cluster in any order (and on either xdist worker).
"""

from __future__ import annotations

import time

import pytest

from bus import Admin, Consumer, Producer, TopicPartition
from nodes.cluster import LocalCluster


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    """One node: each fetch reply then carries every partition, so what a consumer holds at the start is exact."""
    with LocalCluster(str(tmp_path_factory.mktemp("client-inputs")), 1) as cluster:  # stopped, children reaped
        yield cluster.bootstrap


# -- fair polling ------------------------------------------------------------------------------------

TURNS_BACKLOG = [300, 900, 500, 700]  # records per partition of the "turns" topic, in batches of 37
TURNS_POLL_RECORDS = 100


def _served(records) -> list:
    """The partitions a poll's records came from, in order (each partition's records come in one run)."""
    order = []
    for r in records:
        if not order or order[-1] != r.partition:
            order.append(r.partition)
    assert len(order) == len(set(order)), f"a partition served twice in one poll: {order}"
    return order


def test_poll_serves_every_partition_with_data_in_turn(bootstrap):
    """A slow consumer of four partitions with backlog: each poll of 100 starts at the next partition, so all
    four are served within the first four polls and none with data is ever two polls behind another; every
    record comes once, in order, and the positions follow (a commit takes them). Then a seek while its
    partition is buffered, and a consumer whose fetches and buffer are too small to hold the backlog."""
    with Admin(bootstrap) as admin:
        admin.create_topic("turns", len(TURNS_BACKLOG), replication_factor=1)
    with Producer(bootstrap) as producer:
        for p, count in enumerate(TURNS_BACKLOG):
            for start in range(0, count, 37):  # several batches, so a poll decodes only a few of them
                producer.send_many("turns", [b"%d-%d" % (p, i) for i in range(start, min(count, start + 37))],
                                   partition=p)
                producer.flush(10)
    tps = [TopicPartition("turns", p) for p in range(len(TURNS_BACKLOG))]

    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign(tps)
        polls, got = [], {p: [] for p in range(len(TURNS_BACKLOG))}
        served = dict.fromkeys(got, 0)  # polls that returned records of each partition
        deadline_s = time.monotonic() + 30
        while sum(map(len, got.values())) < sum(TURNS_BACKLOG):
            assert time.monotonic() < deadline_s, f"{sum(map(len, got.values()))} records within 30 s"
            left = {p: TURNS_BACKLOG[p] - len(got[p]) for p in got}
            records = consumer.poll(timeout_ms=5_000, max_records=TURNS_POLL_RECORDS)
            consumer._check_invariants()
            polls.append(_served(records))
            # Everything is buffered from the first fetch on: a poll is full while records are left.
            assert len(records) == min(TURNS_POLL_RECORDS, sum(left.values())), (len(polls), len(records))
            for r in records:
                got[r.partition].append((r.offset, r.value))
            for p in polls[-1]:
                served[p] += 1
            with_data = [p for p in got if left[p]]
            counts = [served[p] for p in with_data]
            assert max(counts) - min(counts) <= 1, f"poll {len(polls)}: served {served}, left {left}: {polls}"
            for tp in tps:  # the positions, which commit() takes, follow exactly what was handed out
                assert consumer.position(tp) == len(got[tp.partition])
        assert {p for order in polls[:4] for p in order} == set(got), polls[:4]
        assert polls[:4] == [[0], [1], [2], [3]]
        for p, count in enumerate(TURNS_BACKLOG):
            assert got[p] == [(i, b"%d-%d" % (p, i)) for i in range(count)], f"partition {p}"

        # A seek while its partition is buffered drops what was buffered and goes on from the new offset.
        consumer.seek_to_beginning()
        again = {p: [] for p in got}
        sought = None
        deadline_s = time.monotonic() + 30
        while sum(map(len, again.values())) < sum(TURNS_BACKLOG) - (0 if sought is None else 450 - sought):
            assert time.monotonic() < deadline_s, again
            for r in consumer.poll(timeout_ms=5_000, max_records=TURNS_POLL_RECORDS):
                again[r.partition].append(r.offset)
            consumer._check_invariants()
            if sought is None and len(again[1]) == TURNS_POLL_RECORDS:
                sought = len(again[1])
                consumer.seek(tps[1], 450)
        assert consumer.poll(timeout_ms=100) == []
        assert again[1] == list(range(sought)) + list(range(450, TURNS_BACKLOG[1]))
        for p in (0, 2, 3):
            assert again[p] == list(range(TURNS_BACKLOG[p])), f"partition {p}"

    # Fetches too small for the backlog (two batches or so per partition, and a budget per request that
    # runs out after two partitions) and a buffer that holds little more: partitions run dry and come back
    # as fetches arrive. Any partition that has data is still served before another is served twice.
    with Consumer(bootstrap, auto_offset_reset="earliest", max_partition_fetch_bytes=600,
                  fetch_max_bytes=1_200, prefetch_bytes_max=2_000) as consumer:
        consumer.assign(tps)
        got = {p: [] for p in range(len(TURNS_BACKLOG))}
        waiting: dict = {}  # partition with data -> {partition: times served since its own last turn}
        deadline_s = time.monotonic() + 30
        while sum(map(len, got.values())) < sum(TURNS_BACKLOG):
            assert time.monotonic() < deadline_s, {p: len(v) for p, v in got.items()}
            with consumer._lock:
                for tp in consumer._ready:  # has data now, and keeps it until served
                    waiting.setdefault(tp[1], {})
            records = consumer.poll(timeout_ms=5_000, max_records=TURNS_POLL_RECORDS)
            consumer._check_invariants()
            for p in _served(records):
                for other, counts in waiting.items():
                    if other != p:
                        counts[p] = counts.get(p, 0) + 1
                        assert counts[p] <= 1, f"partition {p} served twice while {other} waited with data"
                # Waits again from the next look on: had it run out during this poll, what the poll served
                # after it was served while it had nothing (a poll goes on past a partition only if it ran out).
                waiting.pop(p, None)
            for r in records:
                got[r.partition].append(r.offset)
            with consumer._lock:
                waiting = {p: counts for p, counts in waiting.items() if ("turns", p) in consumer._ready}
        for p, count in enumerate(TURNS_BACKLOG):
            assert got[p] == list(range(count)), f"partition {p}"
