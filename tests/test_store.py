"""The node's storage (store/): LMDB partition log, its pure bookkeeping, retention, growth, corruption.

Real LMDB environments under tmp_path; no sockets.
"""

from __future__ import annotations

import os
import struct

import lmdb
import pytest

from bus import batch as bf
from bus.errors import (CorruptRecord, NodeIdentityMismatch, OffsetOutOfRange, OutOfOrderSequence,
                        ProducerFenced, StorageFull)
from store import LogStore, MetaStore, PartitionLog
from store.partition_log import APPEND, DUPLICATE, PRODUCER_BATCHES_KEPT

TS = 1_700_000_000_000


def batch(count=1, ts=TS, pid=-1, epoch=-1, seq=-1, value_bytes=8, tag=b"v"):
    flat = []
    for i in range(count):
        flat += [ts, b"k%d" % i, (tag + b"-%d-" % i).ljust(value_bytes, b"."), None]
    return bf.pack_batch(flat, count, pid, epoch, seq)


def records(data: bytes) -> list:
    """[(offset, value), ...] of a read's stored batches."""
    out = []
    for header, payload in bf.iter_batches(data):
        values = bf.read_columns(payload, header.record_count)[2]
        out += [(header.base_offset + i, value) for i, value in enumerate(values)]
    return out


def ok(result):
    assert not isinstance(result, Exception), result
    return result


@pytest.fixture
def store(tmp_path):
    s = LogStore(str(tmp_path / "node"))
    yield s
    if s._lock_fd >= 0:
        s.close()


# -- append and read -------------------------------------------------------------------------------

def test_append_assigns_consecutive_offsets_and_read_returns_them(store):
    log = store.open_partition("1/0")
    results = store.append([(log, batch(3)), (log, batch(2)), (log, batch(1))])
    assert [ok(r)[0] for r in results] == [0, 3, 5]
    assert [ok(r)[2] for r in results] == [False] * 3
    assert (log.start_offset, log.next_offset) == (0, 6)
    data, next_offset = store.read(log, 0, 1 << 20)
    assert next_offset == 6
    assert [o for o, _ in records(data)] == list(range(6))


def test_read_starts_at_the_batch_holding_the_offset_and_respects_bytes_max(store):
    log = store.open_partition("1/0")
    for _ in range(5):
        ok(store.append([(log, batch(4, value_bytes=100))])[0])
    one = len(store.read(log, 0, 1)[0])  # at least one batch, even past bytes_max
    assert [o for o, _ in records(store.read(log, 0, 1)[0])] == [0, 1, 2, 3]
    data, next_offset = store.read(log, 6, 1)  # inside the second batch
    assert [o for o, _ in records(data)] == [4, 5, 6, 7] and next_offset == 8
    data, next_offset = store.read(log, 6, 2 * one)
    assert [o for o, _ in records(data)] == list(range(4, 12)) and next_offset == 12
    data, next_offset = store.read(log, 19, 1 << 20)  # the last record
    assert [o for o, _ in records(data)] == [16, 17, 18, 19] and next_offset == 20
    assert store.read(log, 20, 1 << 20) == (b"", 20)  # the log end: nothing yet


def test_read_outside_the_log_is_offset_out_of_range(store):
    log = store.open_partition("1/0")
    assert store.read(log, 0, 100) == (b"", 0)  # an empty log's end is 0
    ok(store.append([(log, batch(2))])[0])
    with pytest.raises(OffsetOutOfRange):
        store.read(log, 3, 100)
    with pytest.raises(OffsetOutOfRange):
        store.read(log, -1, 100)


def test_partitions_are_separate_logs(store):
    a, b = store.open_partition("1/0"), store.open_partition("1/1")
    assert store.open_partition("1/0") is a
    results = store.append([(a, batch(2, tag=b"a")), (b, batch(3, tag=b"b")), (a, batch(1, tag=b"a"))])
    assert [ok(r)[0] for r in results] == [0, 0, 2]
    assert [v[:1] for _, v in records(store.read(a, 0, 1 << 20)[0])] == [b"a"] * 3
    assert [v[:1] for _, v in records(store.read(b, 0, 1 << 20)[0])] == [b"b"] * 3


def test_a_corrupt_produced_batch_fails_alone(store):
    log = store.open_partition("1/0")
    bad = bytearray(batch(2))
    bad[-2] ^= 0x10
    results = store.append([(log, batch(1)), (log, bytes(bad)), (log, batch(1))])
    assert isinstance(results[1], CorruptRecord)
    assert [results[0][0], results[2][0]] == [0, 1]
    assert log.next_offset == 2


def test_restart_restores_offsets_size_and_producer_state(tmp_path):
    path = str(tmp_path / "node")
    store = LogStore(path)
    log = store.open_partition("3/1")
    ok(store.append([(log, batch(3, pid=5, epoch=0, seq=0))])[0])
    second = ok(store.append([(log, batch(2, pid=5, epoch=0, seq=3))])[0])
    size = log.size_bytes
    store.close()

    store = LogStore(path)
    log = store.open_partition("3/1")
    assert (log.start_offset, log.next_offset, log.size_bytes) == (0, 5, size)
    assert log.producers == {5: (0, ((0, 2, 0), (3, 4, 3)))}
    dup = ok(store.append([(log, batch(2, pid=5, epoch=0, seq=3))])[0])  # a retry after the restart
    assert dup == (3, second[1], True)  # the original's offset and append time
    assert ok(store.append([(log, batch(1, pid=5, epoch=0, seq=5))])[0])[0] == 5
    assert [o for o, _ in records(store.read(log, 0, 1 << 20)[0])] == list(range(6))
    store.close()


def test_a_data_directory_is_held_by_one_store_and_one_identity(tmp_path):
    path = str(tmp_path / "node")
    store = LogStore(path)
    store.claim_identity("node-1")
    with pytest.raises(NodeIdentityMismatch, match="in use by another process"):
        LogStore(path)
    with pytest.raises(NodeIdentityMismatch):
        MetaStore(path)
    store.close()
    store = LogStore(path)
    store.claim_identity("node-1")
    with pytest.raises(NodeIdentityMismatch, match="belongs to node-1"):
        store.claim_identity("node-2")
    store.close()


def test_drop_partition_forgets_its_log_and_producers(store):
    log = store.open_partition("1/0")
    ok(store.append([(log, batch(2, pid=9, epoch=0, seq=0))])[0])
    store.drop_partition("1/0")
    log = store.open_partition("1/0")
    assert (log.start_offset, log.next_offset, log.size_bytes, log.producers) == (0, 0, 0, {})


def test_record_for_time_and_with_max_time(store):
    log = store.open_partition("1/0")
    flat = [TS, None, b"a", None, TS + 10, None, b"b", None, TS + 20, None, b"c", None]
    ok(store.append([(log, bf.pack_batch(flat, 3))])[0])
    ok(store.append([(log, batch(1, ts=TS + 100))])[0])
    assert store.record_for_time(log, 0)[0] == 0
    assert store.record_for_time(log, TS + 5)[0] == 1
    assert store.record_for_time(log, TS + 20)[0] == 2
    assert store.record_for_time(log, TS + 21)[0] == 3
    # Records without a timestamp of their own have their batch's append time (now, well after TS + 100).
    _, append_ts_ms, _ = ok(store.append([(log, bf.pack_batch([None, None, b"d", None], 1))])[0])
    assert append_ts_ms > TS + 100
    assert store.record_for_time(log, TS + 101)[0] == 4
    assert store.record_for_time(log, append_ts_ms)[0] == 4
    assert store.record_for_time(log, append_ts_ms + 1)[0] == 5
    assert store.record_for_time(log, TS + 5) == (1, TS + 10) and store.record_for_time(log, TS + 101) == (
        4, append_ts_ms)
    assert store.record_with_max_time(log) == (4, append_ts_ms)  # the append time counts as the record's


@pytest.mark.parametrize("sync", ["interval", "none"])
def test_other_sync_modes_store_the_same(tmp_path, sync):
    store = LogStore(str(tmp_path / "node"), sync=sync)
    log = store.open_partition("1/0")
    ok(store.append([(log, batch(2))])[0])
    store.sync()
    store.close()
    store = LogStore(str(tmp_path / "node"), sync=sync)
    assert store.open_partition("1/0").next_offset == 2
    store.close()
    with pytest.raises(ValueError):
        LogStore(str(tmp_path / "other"), sync="sometimes")


# -- retention ---------------------------------------------------------------------------------------

def test_retention_by_age_drops_whole_old_batches_and_survives_restart(tmp_path):
    path = str(tmp_path / "node")
    store = LogStore(path)
    log = store.open_partition("1/0")
    for age_ms in (5_000, 4_000, 3_000, 100, 50):
        ok(store.append([(log, batch(2, ts=TS - age_ms))])[0])
    assert store.apply_retention(log, TS, None, None) == 0
    assert store.apply_retention(log, TS, 10_000, None) == 0
    assert store.apply_retention(log, TS, 1_000, None) == 3
    assert (log.start_offset, log.next_offset) == (6, 10)
    with pytest.raises(OffsetOutOfRange):
        store.read(log, 5, 1 << 20)
    assert [o for o, _ in records(store.read(log, 6, 1 << 20)[0])] == [6, 7, 8, 9]
    size = log.size_bytes
    store.close()

    store = LogStore(path)
    log = store.open_partition("1/0")
    assert (log.start_offset, log.next_offset, log.size_bytes) == (6, 10, size)
    assert store.apply_retention(log, TS + 10_000, 1_000, None) == 2  # everything is old now
    assert (log.start_offset, log.next_offset, log.size_bytes) == (10, 10, 0)
    assert store.read(log, 10, 100) == (b"", 10)
    store.close()

    store = LogStore(path)  # an emptied log keeps its offsets: new records continue from 10
    log = store.open_partition("1/0")
    assert (log.start_offset, log.next_offset) == (10, 10)
    assert ok(store.append([(log, batch(1))])[0])[0] == 10
    assert [o for o, _ in records(store.read(log, 10, 100)[0])] == [10]
    store.close()


def test_retention_by_size_keeps_the_log_just_above_the_limit(store):
    log = store.open_partition("1/0")
    for _ in range(10):
        ok(store.append([(log, batch(1, value_bytes=200))])[0])
    one = log.size_bytes // 10
    assert store.apply_retention(log, TS, None, 100 * one) == 0
    assert store.apply_retention(log, TS, None, int(3.5 * one)) == 6
    assert (log.start_offset, log.next_offset, log.size_bytes) == (6, 10, 4 * one)
    assert [o for o, _ in records(store.read(log, 6, 1 << 20)[0])] == [6, 7, 8, 9]


# -- the LMDB map ------------------------------------------------------------------------------------

def test_the_map_grows_from_a_tiny_size(tmp_path):
    store = LogStore(str(tmp_path / "node"), map_size_bytes=64 << 10)
    log = store.open_partition("1/0")
    for i in range(40):
        assert ok(store.append([(log, batch(1, value_bytes=20_000))])[0])[0] == i
    assert store.env.info()["map_size"] > 64 << 10
    assert [o for o, _ in records(store.read(log, 0, 1 << 30)[0])] == list(range(40))
    store.close()


def test_a_map_at_its_maximum_fails_with_storage_full_and_keeps_earlier_data(tmp_path):
    store = LogStore(str(tmp_path / "node"), map_size_bytes=256 << 10, map_size_max_bytes=512 << 10)
    log = store.open_partition("1/0")
    stored = 0
    while True:
        results = store.append([(log, batch(1, value_bytes=30_000, pid=1, epoch=0, seq=stored))])
        if isinstance(results[0], StorageFull):
            break
        assert ok(results[0])[0] == stored
        stored += 1
        assert stored < 100, "the map never filled up"
    assert stored >= 5
    # Nothing of the failed append stuck: not in memory, not on disk.
    assert log.next_offset == stored and log.producers[1][1][-1][1] == stored - 1
    group = store.append([(log, batch(1, value_bytes=30_000, pid=1, epoch=0, seq=stored))] * 3)
    assert all(isinstance(r, StorageFull) for r in group)
    assert [o for o, _ in records(store.read(log, 0, 1 << 30)[0])] == list(range(stored))
    path = store.path
    store.close()
    store = LogStore(path, map_size_bytes=256 << 10, map_size_max_bytes=4 << 20)  # more room after a restart
    log = store.open_partition("1/0")
    assert log.next_offset == stored
    assert ok(store.append([(log, batch(1, value_bytes=30_000, pid=1, epoch=0, seq=stored))])[0])[0] == stored
    store.close()


# -- corruption on disk ----------------------------------------------------------------------------

def test_a_flipped_byte_in_data_mdb_is_detected_on_read(tmp_path):
    path = str(tmp_path / "node")
    store = LogStore(path)
    log = store.open_partition("1/0")
    ok(store.append([(log, batch(1, tag=b"first-batch"))])[0])
    ok(store.append([(log, batch(1, tag=b"UNIQUE-MARKER-0123456789"))])[0])
    ok(store.append([(log, batch(1, tag=b"third-batch"))])[0])
    store.close()

    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        content = bytearray(f.read())
        at = content.find(b"UNIQUE-MARKER")
        assert at > 0
        while at >= 0:  # every copy LMDB may hold
            content[at + 7] ^= 0x01
            at = content.find(b"UNIQUE-MARKER", at + 1)
        f.seek(0)
        f.write(content)

    store = LogStore(path)
    log = store.open_partition("1/0")
    assert [o for o, _ in records(store.read(log, 0, 1)[0])] == [0]  # the batch before is fine
    with pytest.raises(CorruptRecord):
        store.read(log, 1, 1 << 20)
    data, next_offset = store.read(log, 0, 1 << 20)  # the good batch before it, then stop
    assert [o for o, _ in records(data)] == [0] and next_offset == 1
    assert [o for o, _ in records(store.read(log, 2, 1 << 20)[0])] == [2]
    store.close()


def _raw_put(path, name, offset, value):
    env = lmdb.open(path, max_dbs=8)
    db = env.open_db(b"t:" + name.encode())
    with env.begin(write=True) as txn:
        txn.put(struct.pack(">Q", offset), value, db=db)
    env.close()


def test_a_corrupt_value_put_straight_into_lmdb_is_detected_on_read(tmp_path):
    path = str(tmp_path / "node")
    store = LogStore(path)
    log = store.open_partition("1/0")
    for _ in range(3):
        ok(store.append([(log, batch(2))])[0])
    stored = bytearray(store.read(log, 2, 1)[0])
    store.close()

    stored[bf.HEADER_BYTES + 3] ^= 0x80
    _raw_put(path, "1/0", 2, bytes(stored))
    store = LogStore(path)
    log = store.open_partition("1/0")
    with pytest.raises(CorruptRecord, match="CRC"):
        store.read(log, 2, 1 << 20)
    store.close()

    # A valid batch under the wrong key: its own base offset disagrees with where it is stored.
    good, _ = bf.stamp(batch(2), 4, TS)
    _raw_put(path, "1/0", 2, bytes(good))
    store = LogStore(path)
    log = store.open_partition("1/0")
    with pytest.raises(CorruptRecord, match="base offset"):
        store.read(log, 2, 1 << 20)
    store.close()


# -- idempotence rules (pure, then through the store) -------------------------------------------

def test_partition_log_idempotence_rules():
    log = PartitionLog("1/0")
    assert log.check_sequence(-1, -1, -1, 5) == (APPEND, None)  # not idempotent: always appended
    assert log.check_sequence(3, 0, 0, 2) == (APPEND, None)
    log.record_append(3, 0, 0, 2, 100)
    assert log.check_sequence(3, 0, 0, 2) == (DUPLICATE, 0)  # a retry: the original offset
    with pytest.raises(OutOfOrderSequence):
        log.check_sequence(3, 0, 3, 1)  # a gap (expects 2)
    with pytest.raises(OutOfOrderSequence):
        log.check_sequence(3, 0, 1, 1)  # overlapping but not a stored batch
    assert log.check_sequence(3, 0, 2, 3) == (APPEND, None)
    log.record_append(3, 0, 2, 3, 100)
    assert log.check_sequence(3, 0, 2, 3) == (DUPLICATE, 2)
    assert log.check_sequence(3, 0, 0, 2) == (DUPLICATE, 0)
    with pytest.raises(OutOfOrderSequence):
        log.check_sequence(3, 1, 5, 1)  # a new epoch starts at 0
    assert log.check_sequence(3, 1, 0, 1) == (APPEND, None)
    token = log.record_append(3, 1, 0, 1, 50)
    with pytest.raises(ProducerFenced):
        log.check_sequence(3, 0, 5, 1)  # the older epoch is fenced
    assert (log.next_offset, log.size_bytes) == (6, 250)
    log.undo(token)
    assert (log.next_offset, log.size_bytes) == (5, 200)
    assert log.producers[3] == (0, ((0, 1, 0), (2, 4, 2)))
    # Only the last PRODUCER_BATCHES_KEPT batches are remembered.
    appended = PRODUCER_BATCHES_KEPT + 5
    for i in range(appended):
        log.record_append(4, 0, i, 1, 10)
    oldest_kept = appended - PRODUCER_BATCHES_KEPT
    assert log.check_sequence(4, 0, oldest_kept, 1) == (DUPLICATE, 5 + oldest_kept)
    with pytest.raises(OutOfOrderSequence):
        log.check_sequence(4, 0, oldest_kept - 1, 1)


def test_idempotent_appends_through_the_store(store):
    log = store.open_partition("1/0")
    first = ok(store.append([(log, batch(2, pid=1, epoch=0, seq=0))])[0])
    # The same batch twice in one transaction (a retry racing its original) is written once.
    results = store.append([(log, batch(3, pid=1, epoch=0, seq=2)), (log, batch(3, pid=1, epoch=0, seq=2))])
    assert [ok(r)[0] for r in results] == [2, 2] and [r[2] for r in results] == [False, True]
    assert results[0][1] == results[1][1]  # one append time per transaction
    dup = ok(store.append([(log, batch(2, pid=1, epoch=0, seq=0))])[0])
    assert dup == (0, first[1], True)
    assert isinstance(store.append([(log, batch(1, pid=1, epoch=0, seq=9))])[0], OutOfOrderSequence)
    ok(store.append([(log, batch(1, pid=1, epoch=1, seq=0))])[0])
    assert isinstance(store.append([(log, batch(1, pid=1, epoch=0, seq=5))])[0], ProducerFenced)
    assert log.next_offset == 6
    assert [o for o, _ in records(store.read(log, 0, 1 << 20)[0])] == list(range(6))


# -- the coordinator's store ---------------------------------------------------------------------

def test_meta_store_persists_applied_records_and_grows(tmp_path):
    from store.meta_store import DELETE, PUT

    path = str(tmp_path / "coordinator")
    meta = MetaStore(path, map_size_bytes=64 << 10)
    meta.apply([(PUT, b"topic:a", {"id": 1}), (PUT, b"topic:b", {"id": 2}), (PUT, b"other", 1)])
    meta.apply([(PUT, b"big:%d" % i, b"x" * 10_000) for i in range(30)])  # past the tiny map
    meta.apply([(DELETE, b"topic:a")])
    meta.close()
    meta = MetaStore(path)
    assert meta.items(b"topic:") == [(b"topic:b", {"id": 2})]
    assert meta.get(b"other") == 1 and meta.get(b"missing", "d") == "d"
    assert len(meta.items(b"big:")) == 30
    meta.close()
