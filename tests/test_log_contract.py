"""The storage contract of a partition log (store/log_contract.py): one test body per behaviour, run over
both stores, ``LogStore`` (LMDB under tmp_path) and ``MemoryLogStore``; the pure leader-epoch rules of
``PartitionLog``; and a property: random leader appends, new epochs, replication, truncation, retention
and restarts keep the two stores identical and their bookkeeping sound.
"""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bus import batch as bf
from bus.errors import CorruptRecord, OffsetOutOfRange, OutOfOrderSequence, StorageFull
from bus.kafka_batch import SEQUENCE_MAX
from store import LogStore, MemoryLogStore, PartitionLog
from store.memory_log import MemoryDisk
from store.partition_log import PRODUCER_BATCHES_KEPT
from tests.test_store import TS, batch, ok, records


class Clock:
    """The wall clock the stores stamp append times with: moved by the test alone."""

    def __init__(self, now_ms: int = TS):
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


class Stores:
    """Opens stores of one kind (``lmdb`` or ``memory``) by name, each restartable with its storage kept."""

    def __init__(self, kind: str, root: str, clock: Clock):
        self.kind, self.root, self.clock = kind, root, clock
        self.disks: dict[str, MemoryDisk] = {}

    def open(self, name: str = "node", follows: bool = False):
        if self.kind == "lmdb":
            return LogStore(f"{self.root}/{name}", clock_ms=self.clock, high_watermark_follows_append=follows)
        disk = self.disks.setdefault(name, MemoryDisk())
        return MemoryLogStore(disk, clock_ms=self.clock, high_watermark_follows_append=follows)

    def restart(self, store, name: str = "node"):
        """The store closed and opened again on the same storage."""
        store.close()
        return self.open(name, store.high_watermark_follows_append)


@pytest.fixture(params=["lmdb", "memory"])
def stores(request, tmp_path):
    return Stores(request.param, str(tmp_path), Clock())


def state(log: PartitionLog) -> tuple:
    """Everything a log's bookkeeping says."""
    log.check_invariants()
    return (log.start_offset, log.next_offset, log.size_bytes, log.high_watermark, log.epochs, log.producers)


def everything(store, log) -> bytes:
    data, next_offset = store.read(log, log.start_offset, 1 << 30)
    assert next_offset == log.next_offset
    return data


def headers(data: bytes) -> list:
    return [header for header, _ in bf.iter_batches(data)]


def replicate(leader, leader_log, follower, follower_log, bytes_max: int = 1 << 30) -> None:
    """The follower's side of replication, as a node runs it: truncate by epoch (KIP-279) until the
    truncation is complete, start again at the leader's log start if it is past this log's end, then
    fetch and append until the log ends where the leader's does."""
    # As the node (nodes/replica.py ``divergence``): a log without epochs has nothing to diverge (its
    # batches are from before replication, when each partition had one replica), so nothing is cut.
    complete = follower_log.latest_epoch() < 0
    while not complete:
        epoch, end_offset = leader_log.end_offset_for_epoch(follower_log.latest_epoch())
        offset, complete = follower_log.truncation_offset(epoch, end_offset)
        assert offset >= follower_log.high_watermark, "the truncation would cut committed records"
        follower.truncate_to(follower_log, offset)
    if follower_log.next_offset < leader_log.start_offset:
        follower.reset_to(follower_log, leader_log.start_offset)
    while follower_log.next_offset < leader_log.next_offset:
        data, _ = leader.read(leader_log, follower_log.next_offset, bytes_max)
        assert follower.append_replica(follower_log, data) == len(headers(data))


# -- the leader's append -----------------------------------------------------------------------------

def test_a_leader_append_is_stamped_with_the_latest_epoch(stores):
    store = stores.open()
    log = store.open_partition("1/0")
    ok(store.append([(log, batch(2))])[0])  # no epoch begun: a log of before replication
    store.begin_epoch(log, 3)
    results = store.append([(log, batch(1, pid=1, epoch=0, seq=0)), (log, batch(2))])
    assert [ok(r)[0] for r in results] == [2, 3]
    assert [(h.base_offset, h.leader_epoch) for h in headers(everything(store, log))] == [(0, -1), (2, 3), (3, 3)]
    assert log.epochs == [(3, 2)] and log.latest_epoch() == 3
    assert log.high_watermark == 0  # only the node moves it (this store does not follow appends)
    store.close()


def test_by_default_a_leader_append_moves_the_high_watermark_to_the_log_end(stores):
    store = stores.open(follows=True)  # a node without followers: its leader is its whole in-sync set
    log = store.open_partition("1/0")
    ok(store.append([(log, batch(2)), (log, batch(3))])[0])
    assert log.high_watermark == 5
    data, _ = store.read(log, 0, 1 << 20)
    follower_log = store.open_partition("1/1")
    store.append_replica(follower_log, data)
    assert follower_log.high_watermark == 0  # a follower's comes from its leader
    store = stores.restart(store)
    assert store.open_partition("1/0").high_watermark == 5
    store.close()


def test_begin_epoch_is_recorded_once_never_goes_down_and_survives_a_restart(stores):
    store = stores.open()
    log = store.open_partition("1/0")
    store.begin_epoch(log, 1)
    store.begin_epoch(log, 1)  # the same epoch: nothing to record
    assert log.epochs == [(1, 0)]
    store.begin_epoch(log, 2)  # epoch 1 appended nothing: its entry gives way
    assert log.epochs == [(2, 0)]
    ok(store.append([(log, batch(4))])[0])
    store.begin_epoch(log, 5)
    assert log.epochs == [(2, 0), (5, 4)]
    with pytest.raises(AssertionError):
        store.begin_epoch(log, 4)
    store = stores.restart(store)
    log = store.open_partition("1/0")
    assert log.epochs == [(2, 0), (5, 4)]
    store.close()


# -- the follower's append ---------------------------------------------------------------------------

def _leader_log(store, name: str = "1/0") -> PartitionLog:
    """A leader's log over three epochs: two idempotent producers, one of them across a producer epoch,
    and batches of no producer."""
    log = store.open_partition(name)
    store.begin_epoch(log, 0)
    ok(store.append([(log, batch(2, pid=1, epoch=0, seq=0)), (log, batch(1))])[0])
    store.begin_epoch(log, 2)
    ok(store.append([(log, batch(3, pid=1, epoch=0, seq=2)), (log, batch(1, pid=2, epoch=0, seq=0))])[0])
    store.begin_epoch(log, 3)
    ok(store.append([(log, batch(2, pid=1, epoch=1, seq=0)), (log, batch(2, pid=2, epoch=0, seq=1))])[0])
    return log


def test_append_replica_stores_the_leader_s_batches_byte_for_byte(stores):
    leader, follower = stores.open("leader"), stores.open("follower")
    leader_log, follower_log = _leader_log(leader), follower.open_partition("1/0")
    one = len(leader.read(leader_log, 0, 1)[0])
    replicate(leader, leader_log, follower, follower_log, bytes_max=2 * one)  # a few batches per fetch
    assert everything(follower, follower_log) == everything(leader, leader_log)
    assert state(follower_log)[:3] == state(leader_log)[:3]
    assert follower_log.epochs == leader_log.epochs == [(0, 0), (2, 3), (3, 7)]
    assert follower_log.producers == leader_log.producers
    # After a failover the follower recognises the leader's retries as the leader would have.
    dup = ok(follower.append([(follower_log, batch(2, pid=2, epoch=0, seq=1))])[0])
    assert dup[0] == 9 and dup[2] is True
    follower = stores.restart(follower, "follower")
    follower_log = follower.open_partition("1/0")
    assert follower_log.epochs == leader_log.epochs and follower_log.producers == leader_log.producers
    leader.close()
    follower.close()


def test_append_replica_refuses_what_does_not_continue_the_log_and_writes_nothing(stores):
    leader, follower = stores.open("leader"), stores.open("follower")
    leader_log, follower_log = _leader_log(leader), follower.open_partition("1/0")
    first, _ = leader.read(leader_log, 0, 1)  # the batch at 0 (2 records)
    assert follower.append_replica(follower_log, first) == 1
    before, stored = state(follower_log), everything(follower, follower_log)
    third, _ = leader.read(leader_log, 3, 1 << 30, upto=6)  # the batch at 3 (3 records)
    second_and_third, _ = leader.read(leader_log, 2, 1 << 30, upto=6)
    second = second_and_third[:len(second_and_third) - len(third)]
    flipped = bytearray(second)
    flipped[-1] ^= 0x01
    for bad in (first,  # again: not at the log end
                third,  # a gap
                second + first,  # the first fits, the next does not follow it
                bytes(flipped),  # corrupt
                second[:-1]):  # cut short
        with pytest.raises(CorruptRecord):
            follower.append_replica(follower_log, bad)
        assert state(follower_log) == before and everything(follower, follower_log) == stored
    assert follower.append_replica(follower_log, b"") == 0
    assert follower.append_replica(follower_log, second_and_third) == 2
    leader.close()
    follower.close()


def test_append_replica_refuses_an_epoch_older_than_the_one_its_log_ends_in(stores):
    store = stores.open()
    old, new = store.open_partition("1/0"), store.open_partition("1/1")
    store.begin_epoch(old, 1)
    ok(store.append([(old, batch(1)), (old, batch(1))])[0])
    store.begin_epoch(new, 4)
    ok(store.append([(new, batch(1))])[0])
    follower = store.open_partition("1/2")
    store.append_replica(follower, store.read(new, 0, 1)[0])  # epoch 4 at 0
    with pytest.raises(CorruptRecord, match="truncate"):
        store.append_replica(follower, store.read(old, 1, 1)[0])  # epoch 1 at 1
    # An epoch begun here that appended nothing is no divergence: a batch of an older one takes its place.
    store.begin_epoch(follower, 6)
    other = store.open_partition("1/3")
    store.begin_epoch(other, 4)
    ok(store.append([(other, batch(1)), (other, batch(1))])[0])
    assert store.append_replica(follower, store.read(other, 1, 1)[0]) == 1
    assert follower.epochs == [(4, 0)]
    store.close()


def test_a_producer_s_sequences_wrap_past_2_31_as_kafka_s_do(stores):
    """A producer id and epoch go on at sequence 0 after 2**31 - 1, on the leader, its follower and after a
    restart: a batch spanning the wrap is appended, its retry is recognised, a gap after the wrap refused.
    (A producer starts at 0, so the window near the wrap arrives as a replica's batch: a leader's that a
    failover made this store's.)"""
    top = SEQUENCE_MAX
    store = stores.open()
    log = store.open_partition("1/0")
    near, _ = bf.stamp(bytearray(batch(3, pid=9, epoch=0, seq=top - 4)), 0, TS, 0)
    assert store.append_replica(log, near) == 1
    assert log.producers[9] == (0, ((top - 4, top - 2, 0),))
    store.begin_epoch(log, 1)
    across = batch(3, pid=9, epoch=0, seq=top - 1)  # top - 1, top, 0
    assert ok(store.append([(log, across)])[0])[0] == 3
    assert [h.last_sequence for h in headers(everything(store, log))] == [top - 2, 0]
    assert ok(store.append([(log, batch(2, pid=9, epoch=0, seq=1))])[0])[0] == 6
    assert ok(store.append([(log, across)])[0])[2] is True  # the retry of the batch across the wrap
    assert isinstance(store.append([(log, batch(1, pid=9, epoch=0, seq=5))])[0], OutOfOrderSequence)
    before = state(log)
    store = stores.restart(store)
    log = store.open_partition("1/0")
    assert state(log) == before
    dup = ok(store.append([(log, across)])[0])
    assert dup[0] == 3 and dup[2] is True
    assert ok(store.append([(log, batch(1, pid=9, epoch=0, seq=3))])[0])[0] == 8
    # A follower copying this log remembers the same window, wrapped.
    follower = stores.open("follower")
    follower_log = follower.open_partition("1/0")
    replicate(store, log, follower, follower_log)
    assert follower_log.producers == log.producers
    assert log.producers[9][1][-3:] == ((top - 1, 0, 3), (1, 2, 6), (3, 3, 8))
    store.close()
    follower.close()


# -- truncation --------------------------------------------------------------------------------------

def test_truncate_to_cuts_at_a_boundary_and_rebuilds_the_producer_state(stores):
    leader, expected_store = stores.open("leader"), stores.open("expected")
    log = leader.open_partition("1/0")
    leader.begin_epoch(log, 0)
    window = PRODUCER_BATCHES_KEPT
    # Producer 1: more batches than its window, then some after the cut (its window must take back the
    # older ones its lost newest batches pushed out). Producer 2: a producer epoch before the cut and
    # another after it. Producer 3: only after the cut (forgotten). Producer 4: a short window, partly cut.
    items = [(log, batch(1, pid=1, epoch=0, seq=s)) for s in range(window + 3)]
    items += [(log, batch(1, pid=2, epoch=0, seq=s)) for s in range(3)] + [(log, batch(2, pid=4, epoch=0, seq=0))]
    ok(leader.append(items)[0])
    cut = log.next_offset
    leader.begin_epoch(log, 1)
    items = [(log, batch(1, pid=1, epoch=0, seq=window + 3 + s)) for s in range(4)]
    items += [(log, batch(1, pid=2, epoch=1, seq=0)), (log, batch(1, pid=3, epoch=0, seq=0)), (log, batch(1)),
              (log, batch(1, pid=4, epoch=0, seq=2))]
    ok(leader.append(items)[0])
    leader.set_high_watermark(log, log.next_offset)
    assert log.producers[2][0] == 1 and 3 in log.producers
    with pytest.raises(ValueError):
        leader.truncate_to(log, log.next_offset + 1)
    with pytest.raises(ValueError):
        leader.truncate_to(log, cut - 1)  # inside the two-record batch of producer 4
    kept_bytes = leader.read(log, 0, 1 << 30, upto=cut)[0]

    leader.truncate_to(log, cut)
    expected = expected_store.open_partition("1/0")
    expected_store.append_replica(expected, kept_bytes)
    assert everything(leader, log) == kept_bytes
    assert log.producers == expected.producers
    assert sorted(log.producers) == [1, 2, 4] and log.producers[2][0] == 0
    assert len(log.producers[1][1]) == window
    assert state(log)[:3] == state(expected)[:3] and log.epochs == expected.epochs == [(0, 0)]
    assert log.high_watermark == cut
    # The producer state decides as before those batches: a kept batch's retry is a duplicate, a cut
    # batch is appended again.
    results = leader.append([(log, batch(1, pid=1, epoch=0, seq=window + 2)),
                             (log, batch(1, pid=1, epoch=0, seq=window + 3))])
    assert [ok(r)[2] for r in results] == [True, False]
    leader = stores.restart(leader, "leader")
    log = leader.open_partition("1/0")
    assert log.producers[2] == expected.producers[2] and 3 not in log.producers
    leader.truncate_to(log, log.next_offset)  # at the log end: nothing to cut
    leader.truncate_to(log, 0)
    assert state(log) == (0, 0, 0, 0, [], {})
    leader.close()
    expected_store.close()


def test_replication_by_epoch_converges_through_an_incomplete_truncation(stores):
    """KIP-279's case with three replicas x, y, z (one store, three logs): leadership alternates between x
    and y before either copies the other, so z, which copied x's epoch 2, must give up its tail to y in
    two rounds: y never had epoch 2, and z never had y's epoch 1. Then z loses its disk while y's log
    start moved on: it starts again at y's start."""
    store = stores.open()
    x, y, z = (store.open_partition(name) for name in ("x", "y", "z"))

    def lead(log, epoch, *values):
        store.begin_epoch(log, epoch)
        ok(store.append([(log, batch(1, tag=v)) for v in values])[0])

    lead(x, 0, b"m0")
    replicate(store, x, store, y)
    replicate(store, x, store, z)
    lead(y, 1, b"m1")  # nobody copies it yet
    lead(x, 2, b"m2")  # x never saw epoch 1
    replicate(store, x, store, z)
    lead(y, 3, b"m3")
    assert y.end_offset_for_epoch(z.latest_epoch()) == (1, 2)
    assert z.truncation_offset(1, 2) == (1, False)  # z never had epoch 1: cut at its end of epoch 0, ask again
    replicate(store, y, store, z)
    assert everything(store, z) == everything(store, y)
    assert [v[:2] for _, v in records(everything(store, z))] == [b"m0", b"m1", b"m3"]
    assert z.epochs == y.epochs == [(0, 0), (1, 1), (3, 2)]

    store.set_high_watermark(y, 3)
    assert store.apply_retention(y, TS, None, 0) == 3
    store.drop_partition("z")
    z = store.open_partition("z")
    replicate(store, y, store, z)
    lead(y, 4, b"m4")
    replicate(store, y, store, z)
    assert (z.start_offset, z.next_offset, z.epochs) == (3, 4, [(4, 3)])
    assert everything(store, z) == everything(store, y)
    store.close()


def test_reset_to_empties_the_log_and_starts_it_at_an_offset(stores):
    store = stores.open()
    log = _leader_log(store)
    store.set_high_watermark(log, 5)
    store.reset_to(log, 50)
    assert state(log) == (50, 50, 0, 50, [], {})
    assert store.read(log, 50, 100) == (b"", 50)
    with pytest.raises(OffsetOutOfRange):
        store.read(log, 0, 100)
    leader_log = store.open_partition("1/1")
    store.reset_to(leader_log, 50)
    store.begin_epoch(leader_log, 7)
    ok(store.append([(leader_log, batch(2, pid=1, epoch=0, seq=0))])[0])
    assert store.append_replica(log, store.read(leader_log, 50, 100)[0]) == 1
    store = stores.restart(store)
    log = store.open_partition("1/0")
    assert state(log) == (50, 52, leader_log.size_bytes, 50, [(7, 50)], {1: (0, ((0, 1, 50),))})
    store.close()


# -- reads up to a bound -----------------------------------------------------------------------------

def test_read_stops_at_the_bound_and_out_of_range_is_the_log_s_own(stores):
    store = stores.open()
    log = store.open_partition("1/0")
    store.begin_epoch(log, 0)
    flat = [TS, None, b"a", None, TS + 10, None, b"b", None]
    ok(store.append([(log, bf.pack_batch(flat, 2)), (log, batch(2, ts=TS + 20)), (log, batch(2, ts=TS + 30))])[0])
    store.set_high_watermark(log, 4)
    data, next_offset = store.read(log, 0, 1 << 20, upto=log.high_watermark)
    assert [o for o, _ in records(data)] == [0, 1, 2, 3] and next_offset == 4
    assert store.read(log, 4, 1 << 20, upto=4) == (b"", 4)  # between the high watermark and the end
    assert store.read(log, 6, 1 << 20, upto=4) == (b"", 6)  # the log end: empty too
    assert store.read(log, 2, 1 << 20, upto=3) == (b"", 2)  # a batch is served whole or not at all
    with pytest.raises(OffsetOutOfRange):
        store.read(log, 7, 1 << 20, upto=4)
    assert [o for o, _ in records(store.read(log, 4, 1 << 20)[0])] == [4, 5]  # a follower reads to the end
    assert store.record_for_time(log, TS + 5, upto=4) == (1, TS + 10)
    assert store.record_for_time(log, TS + 25, upto=4) == (4, -1)  # at 4, above the bound: the bound
    assert store.record_for_time(log, TS + 25) == (4, TS + 30)
    assert store.record_for_time(log, TS + 31) == (6, -1)
    # The largest timestamp below the bound: the first record of the batch at 2 (both have TS + 20)
    assert store.record_with_max_time(log, upto=4) == (2, TS + 20)
    assert store.record_with_max_time(log) == (4, TS + 30)
    assert store.record_with_max_time(log, upto=0) == (-1, -1)
    store.close()


# -- retention ---------------------------------------------------------------------------------------

def test_retention_never_moves_the_log_start_above_the_high_watermark(stores):
    store = stores.open()
    log = store.open_partition("1/0")
    store.begin_epoch(log, 2)
    ok(store.append([(log, batch(2, ts=TS - 9_000)) for _ in range(5)])[0])
    store.set_high_watermark(log, 4)
    assert store.apply_retention(log, TS, 1_000, None) == 2  # all old; only the committed ones go
    assert (log.start_offset, log.next_offset) == (4, 10)
    assert log.epochs == [(2, 4)]  # the epoch in force at the new start moves up to it
    assert store.apply_retention(log, TS, None, 1) == 0
    store.set_high_watermark(log, 9)  # inside the last batch: it stays
    one = log.size_bytes // 3
    assert store.apply_retention(log, TS, None, 1) == 2
    assert (log.start_offset, log.size_bytes) == (8, one) and log.epochs == [(2, 8)]
    store = stores.restart(store)
    log = store.open_partition("1/0")
    assert (log.start_offset, log.next_offset, log.high_watermark, log.epochs) == (8, 10, 9, [(2, 8)])
    store.close()


# -- restarts ----------------------------------------------------------------------------------------

def test_the_high_watermark_is_checkpointed_and_restored_within_the_log(stores):
    store = stores.open()
    log = _leader_log(store)
    store.set_high_watermark(log, 3)
    store.flush_due(0)  # checkpoints
    store.set_high_watermark(log, 7)
    store.flush_due(1)  # not yet due
    if stores.kind == "memory":  # a crash: what was not checkpointed is lost
        crashed = MemoryLogStore(stores.disks["node"], clock_ms=stores.clock, high_watermark_follows_append=False)
        assert crashed.open_partition("1/0").high_watermark == 3
    store.flush_due(1_000)
    store = stores.restart(store)
    assert store.open_partition("1/0").high_watermark == 7
    store.close()
    store = stores.open()
    log = store.open_partition("1/0")
    store.set_high_watermark(log, 9)
    store.close()  # a clean stop writes it
    store = stores.open()
    log = store.open_partition("1/0")
    assert log.high_watermark == 9 and log.epochs == [(0, 0), (2, 3), (3, 7)]
    # A stored high watermark past the log end (a checkpoint older than a truncation) is clamped;
    # none stored at all (a log written before high watermarks were kept): every batch was acknowledged.
    store.put_meta(b"p:1/0", [log.start_offset, log.size_bytes, 1_000])
    store = stores.restart(store)
    assert store.open_partition("1/0").high_watermark == 11
    store.close()
    store = stores.open()
    store.put_meta(b"p:1/0", [0, log.size_bytes])
    store = stores.restart(store)
    assert store.open_partition("1/0").high_watermark == 11
    store.close()


def test_drop_partition_forgets_its_epochs_and_high_watermark(stores):
    store = stores.open()
    log = _leader_log(store)
    store.set_high_watermark(log, 5)
    store.drop_partition("1/0")
    store = stores.restart(store)
    assert state(store.open_partition("1/0")) == (0, 0, 0, 0, [], {})
    store.close()


def test_a_full_store_fails_a_replica_append_whole_and_keeps_the_bookkeeping(tmp_path):
    leader = LogStore(str(tmp_path / "leader"))
    leader_log = leader.open_partition("1/0")
    leader.begin_epoch(leader_log, 0)
    for s in range(40):
        ok(leader.append([(leader_log, batch(1, value_bytes=30_000, pid=1, epoch=0, seq=s))])[0])
    follower = LogStore(str(tmp_path / "follower"), map_size_bytes=256 << 10, map_size_max_bytes=512 << 10,
                        high_watermark_follows_append=False)
    log = follower.open_partition("1/0")
    with pytest.raises(StorageFull):
        while True:
            follower.append_replica(log, leader.read(leader_log, log.next_offset, 1)[0])
    kept = state(log)
    with pytest.raises(StorageFull):
        follower.append_replica(log, leader.read(leader_log, log.next_offset, 1 << 30)[0])
    assert state(log) == kept and everything(follower, log) == leader.read(leader_log, 0, 1 << 30, upto=kept[1])[0]
    follower.close()
    leader.close()


# -- the leader-epoch rules (pure) -----------------------------------------------------------------

def _log(epochs, start=0, end=100, high_watermark=None) -> PartitionLog:
    return PartitionLog("1/0", None, start, end, 1 if end > start else 0, None, epochs,
                        start if high_watermark is None else high_watermark)


def test_end_offset_for_epoch_has_kafka_s_answers():
    log = _log([(1, 0), (3, 40), (6, 70)])
    assert log.end_offset_for_epoch(6) == (6, 100)  # the latest: the log end
    assert log.end_offset_for_epoch(3) == (3, 70)  # an older one: where the next starts
    assert log.end_offset_for_epoch(4) == (3, 70)  # one it never had: the one before, to the next's start
    assert log.end_offset_for_epoch(0) == (0, 0)  # below every entry: the epoch asked, at the first start
    assert log.end_offset_for_epoch(7) == (-1, -1)  # above every entry
    assert log.end_offset_for_epoch(-1) == (-1, -1)
    assert _log([]).end_offset_for_epoch(0) == (-1, -1)
    assert _log([]).latest_epoch() == -1 and log.latest_epoch() == 6


def test_epoch_for_offset_has_kafka_s_answers():
    log = _log([(1, 10), (3, 40), (6, 70)])
    assert [log.epoch_for_offset(o) for o in (9, 10, 39, 40, 69, 70, 100, 10**9)] == [-1, 1, 1, 3, 3, 6, 6, 6]
    assert _log([]).epoch_for_offset(0) == -1


def test_truncation_offset_covers_each_branch():
    # KIP-279's case: the follower appended in epoch 2, which the leader never had; the leader answers
    # for 2 with its epoch 1, ending at 50 where its epoch 3 starts.
    follower = _log([(1, 0), (2, 60)], end=80)
    assert follower.truncation_offset(1, 50) == (50, True)  # both had epoch 1: the smaller end
    assert follower.truncation_offset(1, 70) == (60, True)  # the follower's epoch 1 ended first
    assert follower.truncation_offset(2, 120) == (80, True)  # the leader has more: keep the whole log
    # The follower never had epoch 5 (it jumps from 2 to 6): cut at its end of epoch 2, then ask again.
    follower = _log([(2, 0), (6, 30)], end=80)
    assert follower.truncation_offset(5, 60) == (30, False)
    assert follower.truncation_offset(5, 10) == (30, False)  # the next round decides below 30
    # Undefined here (no epochs, or only newer ones): keep at most the leader's end, never below the high
    # watermark (committed: the leader has it too).
    assert _log([], start=10, end=80).truncation_offset(3, 40) == (40, True)
    assert _log([], start=10, end=80).truncation_offset(-1, -1) == (10, True)
    unknown = _log([], start=10, end=80, high_watermark=30)
    assert unknown.truncation_offset(-1, -1) == (30, True) and unknown.truncation_offset(3, 20) == (30, True)
    assert _log([(4, 10)], start=10, end=80).truncation_offset(7, 200) == (80, True)
    # Below every epoch here, Kafka's answer is the epoch asked, ending where this log's first one starts.
    assert _log([(4, 10)], start=10, end=80).truncation_offset(2, 200) == (10, True)


def test_check_invariants_finds_broken_bookkeeping():
    _log([(1, 0), (3, 40)]).check_invariants()
    for broken in (_log([(3, 0), (1, 40)]), _log([(1, 40), (3, 40)]), _log([(1, 120)]),
                   _log([], end=10, high_watermark=11)):
        with pytest.raises(AssertionError):
            broken.check_invariants()


# -- the two stores agree ----------------------------------------------------------------------------

_OPS = {
    "produce": st.tuples(st.just("produce"), st.integers(0, 3), st.integers(1, 3), st.booleans()),
    "epoch": st.tuples(st.just("epoch")),
    "replicate": st.tuples(st.just("replicate"), st.integers(1, 3)),
    "commit": st.tuples(st.just("commit"), st.floats(0, 1)),
    "fail_over": st.tuples(st.just("fail_over")),
    "retention": st.tuples(st.just("retention"), st.integers(0, 600)),
    "lose_disk": st.tuples(st.just("lose_disk")),
    "restart": st.tuples(st.just("restart")),
}
# Produces the most, so that there is a log to replicate, cut and retain.
OPS = st.lists(st.sampled_from(["produce"] * 6 + ["replicate", "commit"] * 2 + sorted(set(_OPS) - {"produce"}))
               .flatmap(_OPS.get), min_size=10, max_size=50)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
# Found by hypothesis: retention empties the leader's log, the follower loses its disk and is rebuilt from
# what is left (no producer state), becomes leader and takes the producer's retry of sequence 0 as new; the
# old leader, now following, remembered the retained batch and copied the new one onto its window.
@example(ops=[("replicate", 1), ("produce", 1, 1, False), ("replicate", 1), ("commit", 0.0), ("retention", 0),
              ("lose_disk",), ("replicate", 1), ("fail_over",), ("produce", 1, 1, True), ("replicate", 1)])
def test_random_histories_keep_both_stores_identical_and_sound(ops):
    """Two replicas of a partition, logs "a" and "b", in an LMDB store and in a memory store driven alike.
    The leader appends for a few producers (retries included), begins epochs, commits up to what the
    follower fetched, and applies retention; leadership moves to the follower (which keeps its tail: the
    old leader's may diverge); the follower replicates by the protocol, or loses its disk; both restart.
    After every step both stores hold the same bytes and bookkeeping, and that bookkeeping is sound."""
    with tempfile.TemporaryDirectory() as root:
        clock = Clock()
        kinds = [Stores("lmdb", root, clock), Stores("memory", root, clock)]
        nodes = [kind.open() for kind in kinds]
        producers = {pid: [0, 0, None] for pid in (1, 2, 3)}  # pid -> [producer epoch, next sequence, last batch]
        # The controller's view: who leads, its epoch, how far the follower fetched from this leader,
        # and whether it is in sync (caught up since it last lost its disk or its leader).
        roles = {"leader": "a", "follower": "b", "epoch": 0, "fetched": 0, "in_sync": True}

        def each(fn):
            """``fn(store, leader log, follower log)`` on both stores: the same outcome from each."""
            outcomes = []
            for store in nodes:
                outcomes.append(fn(store, store.open_partition(roles["leader"]),
                                   store.open_partition(roles["follower"])))
            same = [(type(o), str(o)) if isinstance(o, Exception) else o for o in outcomes]
            assert same[0] == same[1], outcomes
            return outcomes[0]

        # A leader begins its epoch before it appends (nodes/node.py, on becoming leader).
        each(lambda s, leader, follower: s.begin_epoch(leader, roles["epoch"]))
        for op in ops:
            clock.now_ms += 100
            if op[0] == "produce":
                _, pid, count, retry = op
                if pid == 0:
                    buf = batch(count)
                elif retry and producers[pid][2] is not None:
                    buf = producers[pid][2]
                else:
                    epoch, seq, _ = producers[pid]
                    buf = batch(count, pid=pid, epoch=epoch, seq=seq)
                result = each(lambda s, leader, follower: s.append([(leader, buf)])[0])
                if pid and isinstance(result, Exception):  # a sequence lost with a tail: a new producer epoch
                    producers[pid] = [producers[pid][0] + 1, 0, None]
                elif pid and buf is not producers[pid][2]:
                    producers[pid][1:] = [producers[pid][1] + count, buf]
            elif op[0] == "epoch":  # the leader re-elected
                roles["epoch"] += 1
                each(lambda s, leader, follower: s.begin_epoch(leader, roles["epoch"]))
            elif op[0] == "replicate":
                def fetch(s, leader, follower):
                    replicate(s, leader, s, follower, bytes_max=op[1] * 300)
                    s.set_high_watermark(follower, max(follower.high_watermark,
                                                       min(leader.high_watermark, follower.next_offset)))
                    return follower.next_offset
                roles["fetched"], roles["in_sync"] = each(fetch), True
            elif op[0] == "commit":  # the high watermark: at most what the follower fetched, at a boundary
                def commit(s, leader, follower):
                    ends = [h.next_offset for h in headers(everything(s, leader))
                            if leader.high_watermark < h.next_offset <= roles["fetched"]]
                    if ends:
                        s.set_high_watermark(leader, ends[int(op[1] * (len(ends) - 1))])
                each(commit)
            elif op[0] == "fail_over":  # the leader is gone: the follower, in sync, leads a new epoch
                if roles["in_sync"]:  # (no unclean election: a replica out of sync may lack committed records)
                    roles["leader"], roles["follower"] = roles["follower"], roles["leader"]
                    roles["epoch"] += 1
                    roles.update(fetched=0, in_sync=False)  # the old leader has fetched nothing yet
                    each(lambda s, leader, follower: s.begin_epoch(leader, roles["epoch"]))
            elif op[0] == "retention":
                each(lambda s, leader, follower: (s.apply_retention(leader, clock.now_ms, None, op[1]),
                                                  s.apply_retention(follower, clock.now_ms, None, op[1])))
            elif op[0] == "lose_disk":  # the follower comes back empty (KIP-903)
                each(lambda s, leader, follower: s.drop_partition(follower.name))
                roles.update(fetched=0, in_sync=False)
            else:
                nodes = [kind.restart(store) for kind, store in zip(kinds, nodes)]
            each(lambda s, leader, follower: (state(leader), state(follower), everything(s, leader),
                                              everything(s, follower)))
        each(lambda s, leader, follower: replicate(s, leader, s, follower))
        for store in nodes:  # the follower caught up holds the leader's log, byte for byte
            leader, follower = store.open_partition(roles["leader"]), store.open_partition(roles["follower"])
            both_from = max(leader.start_offset, follower.start_offset)  # each applied retention to its own
            assert store.read(follower, both_from, 1 << 30)[0] == store.read(leader, both_from, 1 << 30)[0]
            assert follower.next_offset == leader.next_offset
            store.close()
