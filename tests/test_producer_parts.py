"""The clients' parts that need no cluster: the lazy futures of send_many(), the GIL switch-interval
holder, the background I/O thread's hold on its sockets, and the order poll() serves partitions in."""

from __future__ import annotations

import logging
import random
import sys
import threading
from collections import OrderedDict

import pytest
import zmq

from bus import Consumer, Producer, TopicPartition, gil
from bus.background import BackgroundIO
from bus.batch import pack_batch, read_header, stamp
from bus.clock import LOOP_WAIT_MS_MAX
from bus.errors import CorruptRecord
from bus.kafka_batch import SEQUENCE_MAX
from bus.producer import FutureList, ProducerBatch, RecordFuture
from bus.rotation import take_draining, take_in_turn
from bus.sender import PartitionQueue
from tests.conftest import wait_for


def _batch(partition: int, count: int) -> ProducerBatch:
    batch = ProducerBatch("t", partition, 0.0, 60.0)
    batch.flat = [None, None, b"v", None] * count
    batch.count = count
    return batch


def test_future_list_is_the_sequence_of_its_runs():
    a, b = _batch(0, 10), _batch(1, 5)
    futures = FutureList([(a, 7, 3), (b, 0, 5)])  # a's records 7..9, then b's 0..4
    expected = [(a, 7), (a, 8), (a, 9), (b, 0), (b, 1), (b, 2), (b, 3), (b, 4)]
    assert len(futures) == 8
    assert [tuple(f) for f in futures] == expected
    assert [tuple(futures[i]) for i in range(8)] == expected
    assert tuple(futures[-1]) == (b, 4) and tuple(futures[-8]) == (a, 7)
    assert [tuple(f) for f in futures[2:6:2]] == [(a, 9), (b, 1)]
    assert all(type(f) is RecordFuture for f in futures)
    with pytest.raises(IndexError):
        futures[8]
    with pytest.raises(IndexError):
        futures[-9]
    joined = [RecordFuture((a, 0))] + futures
    assert len(joined) == 9 and isinstance(joined, list)
    assert futures == list(futures) and futures != list(futures)[:-1]
    assert FutureList([]) == [] and len(FutureList([])) == 0
    singles = FutureList.of([RecordFuture((a, 3)), RecordFuture((b, 1))])
    assert [tuple(f) for f in singles] == [(a, 3), (b, 1)] and tuple(singles[-1]) == (b, 1)


def test_future_list_futures_complete_with_their_batch():
    a, b = _batch(0, 4), _batch(3, 2)
    futures = FutureList([(a, 2, 2), (b, 0, 2)])
    a.flat[4 * 3] = 555  # record 3 of a was sent with a timestamp of its own
    assert not any(f.done() for f in futures)
    a.complete(100, None, 1_000)
    b.complete(7, None, 2_000)
    got = [f.get(0) for f in futures]
    assert [(m.partition, m.offset) for m in got] == [(0, 102), (0, 103), (3, 7), (3, 8)]
    assert [m.timestamp_ms for m in got] == [1_000, 555, 2_000, 2_000]  # the append time, unless its own


@pytest.fixture
def default_interval():
    found = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(found)


def test_gil_interval_is_lowered_while_held_and_restored_by_the_last_release(default_interval):
    gil.acquire()
    gil.acquire()
    assert sys.getswitchinterval() == gil.SWITCH_INTERVAL_S
    gil.release()
    assert sys.getswitchinterval() == gil.SWITCH_INTERVAL_S  # one holder left
    gil.release()
    assert sys.getswitchinterval() == 0.005


def test_gil_interval_never_raised_and_a_later_setting_is_kept(default_interval):
    sys.setswitchinterval(0.0001)  # the user's own, lower than ours: left alone
    gil.acquire()
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    gil.release()
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    sys.setswitchinterval(0.005)
    gil.acquire()
    sys.setswitchinterval(0.002)  # changed while held: not ours to undo
    gil.release()
    assert sys.getswitchinterval() == pytest.approx(0.002)


class _MetadataOnly(BackgroundIO):
    """Asks for metadata every turn from a coordinator that never answers."""

    def _step(self, wait_ms: int) -> None:
        self._refresh_metadata()
        self._poll(wait_ms)


def test_background_thread_closes_the_coordinator_it_replaced():
    context = zmq.Context()
    thread = _MetadataOnly(context, name="bus-test-background", bootstrap="inproc://bus-test-nobody",
                           metadata_timeout_ms=20, retry_backoff_s=0.0, log=logging.getLogger("bus.test"))
    thread.start()
    first = wait_for(lambda: thread.coordinator, message="the thread's first coordinator")
    wait_for(lambda: thread.coordinator is not first, message="a coordinator reset after a failed refresh")
    thread.stop()
    assert thread.metadata is None
    # context.term() waits for every socket of the context: one left open would hang close() for ever.
    terminated = threading.Thread(target=context.term, daemon=True)
    terminated.start()
    terminated.join(5.0)
    assert not terminated.is_alive(), "a socket of the background thread was left open"


# -- poll()'s rotation (bus/rotation.py) ---------------------------------------------------------------

class _Buffers:
    """Partitions' buffered items as the consumer holds them, for ``take_in_turn``; items may arrive while a
    take runs (as the fetcher hands over chunks while poll() decodes), and every take is recorded."""

    def __init__(self, rng: random.Random, keys: int):
        self.rng = rng
        self.ready: OrderedDict = OrderedDict()
        self.buffered = {k: [] for k in range(keys)}
        self.sent = {k: 0 for k in range(keys)}
        self.served: list = []  # (key, items) in the order taken

    def arrive(self, key: int, count: int) -> None:
        self.buffered[key] += range(self.sent[key], self.sent[key] + count)
        self.sent[key] += count
        if count and key not in self.ready:
            self.ready[key] = None

    def take(self, key, n: int):
        if self.rng.random() < 0.3:  # data arriving mid-take (while the consumer decodes), for any key
            self.arrive(self.rng.randrange(len(self.buffered)), self.rng.randrange(1, 50))
        items, self.buffered[key] = self.buffered[key][:n], self.buffered[key][n:]
        self.served.append((key, items))
        return len(items), bool(self.buffered[key])


def _counted():
    """Three keys with 250, 40 and 1,000 items, and a take that records what each call took."""
    ready = OrderedDict.fromkeys("abc")
    left = {"a": 250, "b": 40, "c": 1000}
    served = []

    def take(key, n):
        k = min(n, left[key])
        left[key] -= k
        served.append((key, k))
        return k, left[key] > 0

    return ready, left, served, take


def test_take_in_turn_serves_the_keys_with_data_in_turn_and_fills_each_take():
    ready, left, served, take = _counted()

    for _ in range(6):
        assert take_in_turn(ready, 100, take) == 100  # never short while anything is buffered
    # a; then b runs out and the same poll goes on to c; a again; c; a's last 50 and c's; c ...
    assert served == [("a", 100), ("b", 40), ("c", 60), ("a", 100), ("c", 100), ("a", 50), ("c", 50), ("c", 100)]
    assert list(ready) == ["c"] and left == {"a": 0, "b": 0, "c": 690}
    assert take_in_turn(ready, 0, take) == 0 and take_in_turn(OrderedDict(), 10, take) == 0


def test_take_draining_the_bench_baseline_drains_each_key_before_the_next():
    ready, left, served, take = _counted()

    for _ in range(4):
        assert take_draining(ready, 100, take) == 100
    # a to its end (over three polls), then b, then c: the order before fair polling
    assert served == [("a", 100), ("a", 100), ("a", 50), ("b", 40), ("c", 10), ("c", 100)]
    assert list(ready) == ["c"] and left == {"a": 0, "b": 0, "c": 890}


@pytest.mark.parametrize("seed", range(20))
def test_take_in_turn_never_leaves_a_key_with_data_more_than_one_turn_behind(seed):
    """Random arrivals and takes of random sizes: every item once and in order, no take short while items
    are buffered, and a key with data never sees another served twice before its own turn."""
    rng = random.Random(seed)
    buffers = _Buffers(rng, keys=rng.randrange(1, 9))
    got = {k: [] for k in buffers.buffered}
    waiting: dict = {}  # key with data -> {other key: times served since this one's last turn, or its data came}
    for _ in range(300):
        for _ in range(rng.randrange(3)):
            buffers.arrive(rng.randrange(len(got)), rng.randrange(0, 300))
        for key in buffers.ready:
            waiting.setdefault(key, {})
        before = sum(map(len, buffers.buffered.values()))
        want = rng.randrange(1, 200)
        start = len(buffers.served)
        taken = take_in_turn(buffers.ready, want, buffers.take)
        assert taken == min(want, before) or taken > before  # short only when everything was taken
        for key, items in buffers.served[start:]:
            got[key] += items
            for other, counts in waiting.items():
                if other != key:
                    counts[key] = counts.get(key, 0) + 1
                    assert counts[key] <= 1, f"{key} served twice while {other} waited with data"
            waiting.pop(key, None)  # waits again from the next look on (a take goes past a key only if it ran out)
        waiting = {key: counts for key, counts in waiting.items() if key in buffers.ready}
        assert set(buffers.ready) == {k for k, items in buffers.buffered.items() if items}
    for key, items in got.items():
        assert items == list(range(len(items))) and len(items) + len(buffers.buffered[key]) == buffers.sent[key]


def _stored(base_offset: int, values: list) -> bytes:
    """A batch of ``values`` as a node stores and serves it."""
    flat = [field for value in values for field in (None, None, value, None)]
    return bytes(stamp(pack_batch(flat, len(values)), base_offset, 1_000)[0])


def test_a_corrupt_batch_comes_after_the_records_before_it_and_is_fetched_again():
    """The consumer's buffer, fed as its fetcher feeds it (no cluster: the fetcher finds no coordinator)."""
    consumer = Consumer("tcp://127.0.0.1:1", request_timeout_ms=100)
    try:
        tp = TopicPartition("t", 0)
        consumer._set_assignment([tp], {tp: 0})
        bad = bytearray(_stored(2, [b"c", b"d"]))
        bad[-1] ^= 0x01
        consumer._fetched([(tp, 0, 0, _stored(0, [b"a", b"b"]) + bytes(bad), 4, 4)])
        assert [r.value for r in consumer.poll(timeout_ms=0)] == [b"a", b"b"]  # the records before it first
        consumer._check_invariants()
        with pytest.raises(CorruptRecord, match="CRC32C"):
            consumer.poll(timeout_ms=0)
        assert consumer.position(tp) == 2 and consumer._chunk_bytes == 0
        state = consumer._states[tp]
        assert state.fetch_offset == 2 and not state.has_data()  # fetched again from the corrupt batch on
        consumer._fetched([(tp, 0, 2, _stored(2, [b"c", b"d"]), 4, 4)])  # an answer to the old fetch: dropped
        assert consumer.poll(timeout_ms=0) == []
        consumer._fetched([(tp, state.epoch, 2, _stored(2, [b"c", b"d"]), 4, 4)])
        assert [(r.offset, r.value) for r in consumer.poll(timeout_ms=0)] == [(2, b"c"), (3, b"d")]
        consumer._check_invariants()
    finally:
        consumer.close()


def test_the_sender_counts_sequences_without_bound_and_wraps_them_on_the_wire():
    """A partition's queue orders its batches by an unbounded count; a batch's header carries it wrapped at
    2**31 as Kafka's (and the node's check, store/partition_log.py) do, so a producer goes on past 2**31 - 1
    records per partition instead of failing to pack its header."""
    producer = Producer("tcp://127.0.0.1:1", linger_ms=0)  # no node is asked: the batches are only packed
    try:
        queue = PartitionQueue(producer_id=7, producer_epoch=0)
        queue.next_sequence = SEQUENCE_MAX - 1
        headers, sequences = [], []
        for _ in range(2):
            batch = ProducerBatch("t", 0, 0.0, 100.0)
            batch.flat, batch.count = [None, None, b"v", None] * 3, 3
            producer._sender._number(queue, batch)
            headers.append(read_header(batch.payload))
            sequences.append(batch.sequence)
        assert sequences == [SEQUENCE_MAX - 1, SEQUENCE_MAX + 2]
        assert [(h.base_sequence, h.last_sequence) for h in headers] == [(SEQUENCE_MAX - 1, 0), (1, 3)]
        assert queue.next_sequence == SEQUENCE_MAX + 5
    finally:
        producer.close(1)
