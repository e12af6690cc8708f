"""What the client library takes and how poll() hands it out, end to end over one real cluster (a
coordinator and a node, started once for the module): send()'s checked inputs and tombstones, the
serializers, closed clients, poll() serving partitions in turn, pause() / resume(), and unsubscribe(). Inputs refused before any I/O are checked against a producer with no
cluster at all.

Each test makes topics of its own, so they share the cluster in any order (and on either xdist worker).
"""

from __future__ import annotations

import enum
import re
import threading
import time

import pytest

from bus import Admin, Consumer, Producer, TopicPartition
from bus.errors import ClosedError, ConfigError, InvalidRecord, SerializationError
from bus.serializers import json_deserializer, json_serializer, msgpack_deserializer, msgpack_serializer
from nodes.cluster import LocalCluster
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    """One node: each fetch reply then carries every partition, so what a consumer holds at the start is exact."""
    with LocalCluster(str(tmp_path_factory.mktemp("client-inputs")), 1) as cluster:  # stopped, children reaped
        yield cluster.bootstrap


# -- fair polling ------------------------------------------------------------------------------------


def _read(bootstrap: str, topic: str, partitions: int, count: int) -> list:
    """``count`` records of ``topic`` from the beginning, in partition and offset order."""
    got = []
    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([(topic, p) for p in range(partitions)])
        deadline_s = time.monotonic() + 20
        while len(got) < count:
            assert time.monotonic() < deadline_s, f"{len(got)} of {count} records within 20 s"
            got += consumer.poll(timeout_ms=1_000)
        assert consumer.poll(timeout_ms=100) == []
    return sorted(got, key=lambda r: (r.partition, r.offset))


# -- send()'s inputs ---------------------------------------------------------------------------------

@pytest.fixture
def offline_producer():
    """A producer with no cluster: whatever it refuses, it refused before any I/O."""
    producer = Producer("tcp://127.0.0.1:1", metadata_timeout_ms=100)
    yield producer
    assert not producer._open and producer._free_bytes == producer.buffer_bytes  # nothing was queued
    producer.close(5)


class Lane(enum.IntEnum):
    SECOND = 1


@pytest.mark.parametrize("args, kwargs, message", [
    (("t", "text"), {}, r"^value must be bytes, bytearray, memoryview or None \(a tombstone\), not str: encode it"
                        r" \(value.encode\(\)\) or pass value_serializer= to the Producer"),
    (("t", {"a": 1}), {}, r"^value must be .* not dict: serialize it \(json.dumps\(value\).encode\(\)"),
    (("t", 7), {}, "^value must be .* not int"),
    (("t", [b"a"]), {}, "^value must be .* not list"),
    (("t", b"v"), {"key": "k"}, r"^key must be bytes, bytearray, memoryview or None \(no key\), not str: encode it"),
    (("t", b"v"), {"key": 3}, "^key must be .* not int"),
    (("t", b"v"), {"headers": "h=v"}, "^headers must be a list of \\(str, bytes\\) pairs or a dict of str to bytes"),
    (("t", b"v"), {"headers": [("h", "v")]}, "^the value of header 'h' must be bytes, bytearray or memoryview, not str"),
    (("t", b"v"), {"headers": {"h": None}}, "^the value of header 'h' must be .* not NoneType"),
    (("t", b"v"), {"headers": [(b"h", b"v")]}, r"^the name of headers\[0\] must be str, not bytes: decode it"),
    (("t", b"v"), {"headers": [("h", b"v", b"w")]}, r"^headers\[0\] must be a \(name, value\) pair, not tuple"),
    (("t", b"v"), {"partition": True}, "^partition must be an int or None, not bool"),
    (("t", b"v"), {"partition": 1.0}, r"^partition must be an int or None, not float: pass int\(partition\)"),
    (("t", b"v"), {"partition": "0"}, "^partition must be an int or None, not str"),
    (("t", b"v"), {"timestamp_ms": 1.7e12}, r"^timestamp_ms must be an int \(milliseconds since the epoch\) or None, "
                                          r"not float: pass int\(timestamp_ms\)"),
    (("t", b"v"), {"timestamp_ms": False}, "^timestamp_ms must be .* not bool"),
    ((b"t", b"v"), {}, r"^topic must be str, not bytes: decode it \(topic.decode\(\)\)"),
    ((["t"], b"v"), {}, "^topic must be str, not list"),
    ((["t"], b"v"), {"key": b"k"}, "^topic must be str, not list"),
    ((None, b"v"), {"partition": 0}, "^topic must be str, not NoneType"),
])
def test_send_refuses_a_wrong_type_naming_the_argument_before_anything_is_queued(offline_producer, args, kwargs,
                                                                                message):
    with pytest.raises(InvalidRecord, match=message) as caught:
        offline_producer.send(*args, **kwargs)
    assert isinstance(caught.value, TypeError)


@pytest.mark.parametrize("args, message", [
    (("t", [b"a", "b"]), r"^values\[1\] must be bytes, bytearray, memoryview or None \(a tombstone\), not str"),
    (("t", [b"a", {"b": 1}]), r"^values\[1\] must be .* not dict"),
    (("t", b"abc"), r"^values must be a list \(or other iterable\) of values, not bytes: for one record, call send"),
    (("t", [b"a", b"b"], [b"k", "k"]), r"^keys\[1\] must be bytes, bytearray, memoryview or None \(no key\), not str"),
    ((b"t", [b"a"]), "^topic must be str, not bytes"),
    (("t", [b"a"], None, False), "^partition must be an int or None, not bool"),
])
def test_send_many_refuses_a_wrong_type_before_any_value_is_queued(offline_producer, args, message):
    with pytest.raises(InvalidRecord, match=message):
        offline_producer.send_many(*args)


def test_send_refuses_out_of_range_values_and_mismatched_keys(offline_producer):
    with pytest.raises(ConfigError, match="timestamp_ms must be from 0"):
        offline_producer.send("t", b"v", timestamp_ms=-1)
    with pytest.raises(ConfigError, match="3 values and 2 keys"):
        offline_producer.send_many("t", [b"a", b"b", b"c"], keys=[b"k", b"k"])


def test_tombstones_bytes_likes_and_headers_round_trip(bootstrap):
    """value=None is a tombstone, read back as None and never confused with b""; a bytearray or memoryview is
    sent as the bytes it held when send() returned; headers given as a dict come back as their pairs; an
    int-like partition or timestamp is its int. What was refused left nothing in the log."""
    with Admin(bootstrap) as admin:
        admin.create_topic("inputs", 2, replication_factor=1)
    mutable = bytearray(b"before")
    wide = memoryview(bytes(range(8))).cast("I")  # two 4-byte items: sent as its 8 bytes
    with Producer(bootstrap) as producer:
        with pytest.raises(InvalidRecord):
            producer.send("inputs", "text", partition=0)
        with pytest.raises(InvalidRecord):
            producer.send_many("inputs", [b"fine", "text"], partition=0)
        sent = [
            producer.send("inputs", None, key=b"gone", partition=0),
            producer.send("inputs", b"", key=b"empty", partition=0),
            producer.send("inputs", mutable, key=bytearray(b"ba"), partition=0),
            producer.send("inputs", wide, key=memoryview(b"mv"), partition=0, headers={"h": b"1", "i": bytearray(b"2")}),
            producer.send("inputs", b"stamped", partition=Lane.SECOND, timestamp_ms=Lane.SECOND),
            *producer.send_many("inputs", [None, b"", b"x"], partition=1),
            *producer.send_many("inputs", [b"k1", bytearray(b"k2")], keys=[b"a", None], partition=1),
        ]
        mutable[:] = b"after!"  # changed after send(): what was sent is what send() saw
        acked = [future.get(10) for future in sent]
    assert [(m.partition, m.offset) for m in acked] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
                                                        (1, 3), (1, 4), (1, 5)]
    assert acked[4].timestamp_ms == 1
    got = [(r.partition, r.key, r.value, r.headers) for r in _read(bootstrap, "inputs", 2, len(sent))]
    assert got == [
        (0, b"gone", None, None), (0, b"empty", b"", None), (0, b"ba", b"before", None),
        (0, b"mv", bytes(range(8)), [("h", b"1"), ("i", b"2")]),
        (1, None, b"stamped", None), (1, None, None, None), (1, None, b"", None), (1, None, b"x", None),
        (1, b"a", b"k1", None), (1, None, b"k2", None),
    ]



# -- serializers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [{"id": 7, "tags": ["a", "é"], "ok": True, "none": None}, [1, 2.5, "x"], "text", 0])
def test_the_ready_serializers_round_trip(obj):
    assert json_deserializer(json_serializer(obj)) == obj
    assert json_serializer({"a": [1, "é"]}) == b'{"a":[1,"\\u00e9"]}'  # compact, ASCII
    assert msgpack_deserializer(msgpack_serializer(obj)) == obj
    assert msgpack_deserializer(msgpack_serializer({1: b"\x00", "s": "str"})) == {1: b"\x00", "s": "str"}


def test_a_serializer_that_fails_or_returns_no_bytes_queues_nothing():
    def broken(obj):
        raise ValueError(f"cannot take {obj!r}")

    producer = Producer("tcp://127.0.0.1:1", value_serializer=broken, key_serializer=json_serializer)
    try:
        with pytest.raises(SerializationError, match=r"^value_serializer raised ValueError for the value: "
                                                     r"cannot take 1; nothing was sent") as caught:
            producer.send("t", 1)
        assert caught.value.argument == "value" and isinstance(caught.value.__cause__, ValueError)
        with pytest.raises(SerializationError, match=r"^key_serializer raised TypeError for the key") as caught:
            producer.send("t", None, key={1, 2})  # the tombstone is not serialized; the key is, and fails
        assert caught.value.argument == "key"
        with pytest.raises(SerializationError, match=r"for values\[1\]"):
            producer.send_many("t", [None, 2])
        assert not producer._open and producer._free_bytes == producer.buffer_bytes
    finally:
        producer.close(5)
    producer = Producer("tcp://127.0.0.1:1", value_serializer=str)
    try:
        with pytest.raises(InvalidRecord, match="^value_serializer returned str for the value: it must return bytes"):
            producer.send("t", 1)
    finally:
        producer.close(5)


def test_serializers_and_deserializers_end_to_end(bootstrap):
    """A JSON producer (keys by str.encode) and a JSON consumer (keys by bytes.decode): objects in, objects
    out, tombstones as None; msgpack keeps bytes apart from str. A value its deserializer refuses comes after
    the records before it, then poll() raises, positioned at it, until a seek moves past it."""
    with Admin(bootstrap) as admin:
        admin.create_topic("json", 1, replication_factor=1)
        admin.create_topic("packed", 1, replication_factor=1)
    with Producer(bootstrap, value_serializer=json_serializer, key_serializer=str.encode) as producer:
        futures = [producer.send("json", {"n": 1}, key="a", partition=0),
                   producer.send("json", None, key="a", partition=0),
                   *producer.send_many("json", [[2], "three"], keys=["b", None], partition=0)]
        with pytest.raises(SerializationError):
            producer.send_many("json", [{"n": 4}, {5}], partition=0)  # nothing of it is sent
        [f.get(10) for f in futures]
    with Producer(bootstrap, value_serializer=msgpack_serializer) as producer:
        producer.send("packed", {"raw": b"\xff", "text": "\xff"}).get(10)
        producer.send_many("packed", [[1, b"2"]])[0].get(10)
    with Producer(bootstrap) as producer:  # no serializer: these go as they are, one of them not JSON
        producer.send_many("json", [b"5", b"{not json", b"7"], partition=0)[-1].get(10)

    with Consumer(bootstrap, auto_offset_reset="earliest", value_deserializer=msgpack_deserializer) as consumer:
        consumer.assign([("packed", 0)])
        got = []
        deadline_s = time.monotonic() + 20
        while len(got) < 2:
            assert time.monotonic() < deadline_s, got
            got += [r.value for r in consumer.poll(timeout_ms=1_000)]
        assert got == [{"raw": b"\xff", "text": "\xff"}, [1, b"2"]]

    tp = TopicPartition("json", 0)
    with Consumer(bootstrap, auto_offset_reset="earliest", value_deserializer=json_deserializer,
                  key_deserializer=bytes.decode) as consumer:
        consumer.assign([tp])
        got = []
        deadline_s = time.monotonic() + 20
        while len(got) < 5:
            assert time.monotonic() < deadline_s, got
            got += [(r.offset, r.key, r.value) for r in consumer.poll(timeout_ms=1_000)]
        assert got == [(0, "a", {"n": 1}), (1, "a", None), (2, "b", [2]), (3, None, "three"), (4, None, 5)]
        assert consumer.position(tp) == 5  # at the record that failed, which was not handed out
        for _ in range(2):  # raised by the next poll, and again by every poll that reaches it
            with pytest.raises(SerializationError, match=r"^value_deserializer raised JSONDecodeError for the "
                                                         r"record at json/0 offset 5: .* to skip it") as caught:
                consumer.poll(timeout_ms=5_000)
            error = caught.value
            assert (error.argument, error.topic, error.partition, error.offset) == ("value", "json", 0, 5)
            assert consumer.position(tp) == 5
        consumer.seek(tp, error.offset + 1)
        assert [(r.offset, r.value) for r in consumer.poll(timeout_ms=5_000)] == [(6, 7)]
        consumer._check_invariants()



# -- closed clients ----------------------------------------------------------------------------------

def test_every_call_on_a_closed_client_is_a_closed_error(bootstrap):
    with Admin(bootstrap) as admin:
        admin.create_topic("closing", 2, replication_factor=1)
    producer = Producer(bootstrap)
    before = producer.send("closing", b"before close", partition=0)
    producer.close()
    assert before.get(0).offset == 0  # close() flushed it
    for call in (lambda: producer.send("closing", b"v"), lambda: producer.send("closing", b"v", key=b"k"),
                 lambda: producer.send("closing", b"v", partition=1), lambda: producer.send("never-seen", b"v"),
                 lambda: producer.send_many("closing", [b"v"]), lambda: producer.send_many("never-seen", [b"v"]),
                 lambda: producer.send_many("closing", [b"v", b"w"], keys=[b"k", None])):
        with pytest.raises(ClosedError, match="on a closed Producer"):
            call()
    producer.close()  # again: nothing left to do
    with Admin(bootstrap) as admin:
        assert [p["end_offset"] for p in admin.describe_topic("closing")["partitions"]] == [1, 0]

    tp = TopicPartition("closing", 0)
    for consumer in (Consumer(bootstrap, group="closing", topics=["closing"]), Consumer(bootstrap)):
        consumer.close()
        for name, call in (("poll()", consumer.poll), ("commit()", consumer.commit),
                           ("commit_async()", consumer.commit_async), ("committed()", lambda: consumer.committed(tp)),
                           ("seek()", lambda: consumer.seek(tp, 0)), ("seek()", consumer.seek_to_end),
                           ("position()", lambda: consumer.position(tp)), ("assignment()", consumer.assignment),
                           ("end_offsets()", lambda: consumer.end_offsets([tp])),
                           ("offsets_for_times()", lambda: consumer.offsets_for_times({tp: 0})),
                           ("pause()", lambda: consumer.pause([tp])), ("resume()", lambda: consumer.resume([tp])),
                           ("paused()", consumer.paused), ("subscription()", consumer.subscription),
                           ("unsubscribe()", consumer.unsubscribe), ("subscribe()", lambda: consumer.subscribe(["a"])),
                           ("partitions_for_topic()", lambda: consumer.partitions_for_topic("closing"))):
            with pytest.raises(ClosedError, match=rf"^{re.escape(name)} on a closed Consumer"):
                call()
        with pytest.raises(ClosedError, match=r"^assign\(\) on a closed Consumer"):
            consumer.assign([tp])
        assert list(consumer) == []  # iterating a closed consumer just ends
        consumer.close()

    admin = Admin(bootstrap)
    admin.close()
    for name, call in (("create_topic()", lambda: admin.create_topic("never", 1)),
                       ("delete_topic()", lambda: admin.delete_topic("closing")), ("list_topics()", admin.list_topics),
                       ("nodes()", admin.nodes), ("describe_topic()", lambda: admin.describe_topic("closing")),
                       ("elect_unclean()", lambda: admin.elect_unclean("closing")),
                       ("list_groups()", admin.list_groups),
                       ("describe_group()", lambda: admin.describe_group("closing")),
                       ("reset_offsets()", lambda: admin.reset_offsets("closing", "closing", "earliest")),
                       ("delete_group()", lambda: admin.delete_group("closing")),
                       ("group_offsets()", lambda: admin.group_offsets("closing"))):
        with pytest.raises(ClosedError, match=rf"^{re.escape(name)} on a closed Admin"):
            call()
    admin.close()  # again: nothing left to do


@pytest.mark.parametrize("how", ["poll", "iterate"])
def test_closing_a_consumer_wakes_a_poll_waiting_in_another_thread(bootstrap, how):
    """A poll() waiting for records when another thread closes the consumer raises ClosedError at once (not
    at its timeout); a loop over the consumer just ends."""
    with Admin(bootstrap) as admin:
        admin.create_topic(f"quiet-{how}", 1, replication_factor=1)
    consumer = Consumer(bootstrap)
    consumer.assign([(f"quiet-{how}", 0)])
    consumer.position((f"quiet-{how}", 0))
    outcome: list = []

    def read():
        try:
            outcome.append(consumer.poll(timeout_ms=60_000) if how == "poll" else list(consumer))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Waiting in the fetcher's loop, which poll() runs while its buffer is empty (Consumer._wait_for_data).
    wait_for(lambda: consumer._fetcher._lent, 10, 0.005, "poll() waiting for records")
    started_s = time.monotonic()
    consumer.close()
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - started_s < 5
    if how == "poll":
        assert isinstance(outcome[0], ClosedError) and "poll() on a closed Consumer" in str(outcome[0])
    else:
        assert outcome == [[]]


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


# -- pause and resume --------------------------------------------------------------------------------

def two_partitions_of(bootstrap: str, topic: str, per_partition: int) -> None:
    """A topic of two partitions holding the values b"0", b"1", ... ``per_partition`` in each."""
    with Admin(bootstrap) as admin:
        admin.create_topic(topic, 2, replication_factor=1)
    with Producer(bootstrap) as producer:
        for p in (0, 1):
            producer.send_many(topic, [b"%d" % i for i in range(per_partition)], partition=p)
        producer.flush(10)


def test_a_paused_partition_is_neither_served_nor_fetched_and_resumes_from_its_position(bootstrap):
    """Paused with records buffered: poll() serves only the other partition, the paused one is left out of
    the fetches (its new records stay on the node), its position and buffer stay; resumed, it goes on from
    its position, every record once and in order."""
    two_partitions_of(bootstrap, "pausing", 10)
    tps = [TopicPartition("pausing", p) for p in (0, 1)]
    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign(tps)
        first = wait_for(lambda: consumer.poll(timeout_ms=1_000, max_records=4), 10, message="a first poll")
        held = TopicPartition("pausing", first[0].partition)
        other = tps[1 - held.partition]
        assert [r.offset for r in first] == [0, 1, 2, 3] and {r.partition for r in first} == {held.partition}
        consumer.pause([held])
        consumer.pause([held])  # again: nothing changes
        assert consumer.paused() == {held}
        consumer._check_invariants()
        with consumer._lock:
            assert consumer._states[held].has_data()  # its buffer stays
        got = []
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=200)) or len(got) >= 10, 10, message="the other one")
        assert [(r.partition, r.offset) for r in got] == [(other.partition, i) for i in range(10)]
        assert consumer.position(held) == 4 and consumer.position(other) == 10
        assert held not in consumer._fetchable() and other in consumer._fetchable()
        with Producer(bootstrap) as producer:
            producer.send_many("pausing", [b"%d" % i for i in range(10, 15)], partition=held.partition)
            producer.flush(10)
        assert consumer.poll(timeout_ms=300) == []
        consumer._check_invariants()
        with consumer._lock:
            assert consumer._states[held].fetch_offset == 10  # the new records were not fetched
        with pytest.raises(ConfigError, match="not assigned"):
            consumer.pause([("pausing", 7)])
        with pytest.raises(ConfigError, match="list of"):
            consumer.pause(("pausing", 0))

        consumer.resume([held])
        consumer.resume([other])  # not paused: nothing changes
        assert consumer.paused() == set()
        again = []
        wait_for(lambda: again.extend(consumer.poll(timeout_ms=200)) or len(again) >= 11, 10, message="resumed")
        assert [(r.partition, r.offset) for r in again] == [(held.partition, i) for i in range(4, 15)]
        consumer._check_invariants()

        consumer.pause(tps)
        consumer.assign([other])  # a partition that leaves the assignment is no longer paused
        assert consumer.paused() == {other}


def test_a_group_members_paused_partition_revoked_in_a_rebalance_is_no_longer_paused(bootstrap):
    two_partitions_of(bootstrap, "pausing-group", 5)
    options = dict(group="pausers", topics=["pausing-group"], auto_offset_reset="earliest", session_timeout_ms=3_000,
                   heartbeat_interval_ms=100, enable_auto_commit=False)
    revoked = []
    first = Consumer(bootstrap, on_revoke=revoked.extend, **options)
    second = None
    try:
        wait_for(lambda: consumer_polled(first) and len(first.assignment()) == 2, 10, message="both partitions")
        first.seek_to_beginning()
        first.pause(first.assignment())
        assert first.poll(timeout_ms=300) == []
        second = Consumer(bootstrap, **options)
        got = []
        wait_for(lambda: got.extend(second.poll(timeout_ms=50)) or (consumer_polled(first) and len(got) >= 5), 15,
                 message="the second member reading its partition")
        assert len(first.assignment()) == 1 and revoked == list(second.assignment())
        assert first.paused() == first.assignment()  # the one kept stays paused; the revoked one is not
        kept = next(iter(first.assignment()))
        assert first.position(kept) == 0 and first.poll(timeout_ms=100) == []
        first.resume([kept])
        mine = []
        wait_for(lambda: mine.extend(first.poll(timeout_ms=100)) or len(mine) >= 5, 10, message="resumed")
        assert [(r.partition, r.offset) for r in mine] == [(kept.partition, i) for i in range(5)]
    finally:
        first.close()
        if second is not None:
            second.close()


def consumer_polled(consumer) -> bool:
    consumer.poll(timeout_ms=50)
    return True


# -- subscription, unsubscribe, partitions_for_topic ----------------------------------------------------

def test_subscription_unsubscribe_and_partitions_for_topic(bootstrap):
    """unsubscribe() gives a member's partitions back (on_revoke, auto-commit, the group left at once) and
    drops every position; the consumer is then one without a group. partitions_for_topic() is None for an
    unknown topic."""
    with Admin(bootstrap) as admin:
        admin.create_topic("subs", 3, replication_factor=1)
    with Producer(bootstrap) as producer:
        for p in range(3):
            producer.send_many("subs", [b"%d" % i for i in range(4)], partition=p)
        producer.flush(10)
    tps = {TopicPartition("subs", p) for p in range(3)}

    with Consumer(bootstrap) as consumer:
        assert consumer.subscription() == set()
        assert consumer.partitions_for_topic("subs") == {0, 1, 2}
        assert consumer.partitions_for_topic("no-such-topic") is None
        with pytest.raises(ConfigError, match="topic name"):
            consumer.partitions_for_topic(("subs", 0))
        consumer.assign(sorted(tps))
        consumer.unsubscribe()  # an assign() consumer: the assignment is cleared
        assert consumer.assignment() == set() and consumer.poll(timeout_ms=50) == []

    with Consumer(bootstrap, topics=re.compile(r"subs\..*"), group="subs-pattern") as consumer:
        assert consumer.subscription() == r"subs\..*"

    revoked = []
    consumer = Consumer(bootstrap, topics=["subs"], group="subscribers", auto_offset_reset="earliest",
                        heartbeat_interval_ms=100, on_revoke=revoked.extend)
    try:
        assert consumer.subscription() == {"subs"}
        got = []
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=100)) or len(got) >= 12, 10, message="every record")
        assert consumer.assignment() == tps
        consumer.unsubscribe()
        assert sorted(revoked) == sorted(tps)
        assert consumer.assignment() == set() and consumer.subscription() == set()
        with Admin(bootstrap) as admin:
            described = admin.describe_group("subscribers")
        assert described["state"] == "empty"  # left at once, not after its session
        assert {(p["partition"], p["committed"]) for p in described["partitions"]} == {(0, 4), (1, 4), (2, 4)}
        with pytest.raises(ConfigError, match="left group 'subscribers' by unsubscribe"):
            consumer.commit()
        consumer.unsubscribe()  # again: nothing to give back
        consumer.assign([("subs", 1)])  # now a consumer without a group
        consumer.seek(("subs", 1), 2)
        again = []
        wait_for(lambda: again.extend(consumer.poll(timeout_ms=100)) or len(again) >= 2, 10, message="by assign()")
        assert [(r.partition, r.offset) for r in again] == [(1, 2), (1, 3)]
    finally:
        consumer.close()


def test_subscribe_replaces_the_subscription(bootstrap):
    """subscribe() gives back the partitions of the old subscription (committed, on_revoke) and joins with the
    new one; after unsubscribe() it joins again, the committed offsets kept."""
    with Admin(bootstrap) as admin:
        for topic in ("resub-a", "resub-b"):
            admin.create_topic(topic, 1, replication_factor=1)
    with Producer(bootstrap) as producer:
        for topic in ("resub-a", "resub-b"):
            producer.send_many(topic, [b"%d" % i for i in range(3)], partition=0)
        producer.flush(10)
    events = []
    consumer = Consumer(bootstrap, topics=["resub-a"], group="resubscribers", auto_offset_reset="earliest",
                        heartbeat_interval_ms=100, on_assign=lambda ps: events.append(("assign", sorted(ps))),
                        on_revoke=lambda ps: events.append(("revoke", sorted(ps))))

    def read(count):
        got = []
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=100)) or len(got) >= count, 10, message=f"{count}")
        assert consumer.poll(timeout_ms=100) == []
        return [(r.topic, r.offset) for r in got]

    try:
        assert read(3) == [("resub-a", i) for i in range(3)]
        with pytest.raises(ConfigError, match="exactly one of"):
            consumer.subscribe()  # refused before anything is given back
        assert consumer.assignment() == {("resub-a", 0)}
        consumer.subscribe(["resub-b"])
        assert consumer.subscription() == {"resub-b"}
        assert read(3) == [("resub-b", i) for i in range(3)]
        assert consumer.assignment() == {("resub-b", 0)}
        consumer.unsubscribe()
        consumer.subscribe(pattern=r"resub-[ab]")
        assert consumer.subscription() == r"resub-[ab]"
        wait_for(lambda: consumer.poll(timeout_ms=50) == [] and len(consumer.assignment()) == 2, 10,
                 message="both topics, nothing read again")
        assert events == [("assign", [("resub-a", 0)]), ("revoke", [("resub-a", 0)]),
                          ("assign", [("resub-b", 0)]), ("revoke", [("resub-b", 0)]),
                          ("assign", [("resub-a", 0), ("resub-b", 0)])]
        consumer.unsubscribe()
        consumer.assign([("resub-a", 0)])
        with pytest.raises(ConfigError, match="unsubscribe\\(\\) first"):
            consumer.subscribe(["resub-a"])
    finally:
        consumer.close()
    with Consumer(bootstrap) as consumer, pytest.raises(ConfigError, match="needs a group"):
        consumer.subscribe(["resub-a"])
