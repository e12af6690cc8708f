"""The record batch format (bus/batch.py): pack, stamp, verify, iterate, and the CRC catching every bit flip."""

from __future__ import annotations

import struct

import pytest

from bus import batch as bf
from bus.errors import CorruptRecord


TS = 1_700_000_000_000


def make_batch(count=3, producer_id=7, epoch=2, base_sequence=10, compression=None):
    """Records 0, 2, 4, ... carry timestamps of their own (TS, TS + 10, ...); 1, 3, ... take the append time."""
    flat = []
    for i in range(count):
        flat += [TS + 5 * i if i % 2 == 0 else None, b"k%d" % i if i % 2 == 0 else None, b"value-%d" % i,
                 [["h", b"x%d" % i]] if i == 1 else None]
    return bf.pack_batch(flat, count, producer_id, epoch, base_sequence, compression)


# The exhaustive bit-flip tests run over an uncompressed batch and a small compressed one of each codec: the
# CRC covers the stored (compressed) bytes, so no flip reaches a decompressor.
CODECS = pytest.mark.parametrize("compression", [None, "lz4", "zstd"])


def test_pack_then_verify_reads_every_header_field():
    buf = make_batch(3)
    header = bf.verify(buf)
    assert header.magic == bf.MAGIC and header.attributes == bf.APPEND_TIME
    assert header.base_offset == 0 and header.leader_epoch == -1
    assert header.record_count == 3 and header.next_offset == 3
    assert header.append_ts_ms == -1 and header.max_ts_ms == TS + 10  # the append time comes from the node
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (7, 2, 10)
    assert header.last_sequence == 12
    assert header.payload_len == len(buf) - bf.HEADER_BYTES
    assert bf.read_columns(buf[bf.HEADER_BYTES:], 3) == [[TS, None, TS + 10], [b"k0", None, b"k2"],
                                                         [b"value-0", b"value-1", b"value-2"],
                                                         [None, [["h", b"x1"]], None]]


def test_columns_no_record_has_are_left_out():
    buf = bf.pack_batch([None, None, b"a", None, None, None, b"b", None], 2)
    assert bf.read_columns(buf[bf.HEADER_BYTES:], 2) == [None, None, [b"a", b"b"], None]


@pytest.mark.parametrize("payload", [[None, None, [b"a"], None], 5, [None, None, [b"a", b"b"]],
                                     [[1], None, [b"a", b"b"], None], [None, None, None, None]])
def test_a_payload_that_is_not_the_columns_of_its_records_is_refused(payload):
    with pytest.raises(CorruptRecord, match="columns"):
        bf.read_columns(bf.msgpack.packb(payload), 2)


def test_stamp_sets_offset_epoch_and_append_time_and_keeps_a_valid_crc():
    buf = make_batch(4)
    stored, header = bf.stamp(buf, 1234, TS + 7, leader_epoch=9)
    assert header.base_offset == 1234 and header.leader_epoch == 9 and header.next_offset == 1238
    assert header.append_ts_ms == TS + 7 and header.max_ts_ms == TS + 10  # a record's own is newer
    assert bf.verify(stored) == header  # the returned header is exactly what is stored
    assert stored[bf.HEADER_BYTES:] == buf[bf.HEADER_BYTES:]  # payload untouched
    assert bytes(stored) != buf and bf.verify(buf).base_offset == 0  # the original is not modified
    # An append time later than every record's own is the batch's newest timestamp, when a record has it.
    assert bf.stamp(buf, 0, TS + 99)[1].max_ts_ms == TS + 99
    own_only = bf.pack_batch([TS, None, b"a", None, TS - 5, None, b"b", None], 2)
    assert bf.verify(own_only).attributes == 0
    assert bf.stamp(own_only, 0, TS + 99)[1][6:8] == (TS + 99, TS)  # append time kept, max its records'
    none_own = bf.pack_batch([None, None, b"a", None], 1)
    assert bf.verify(none_own).max_ts_ms == -1 and bf.stamp(none_own, 0, TS + 99)[1].max_ts_ms == TS + 99


def test_a_batch_of_the_older_format_is_refused_by_name():
    buf = bytearray(make_batch(1))
    buf[4] = bf.MAGIC - 1
    struct.pack_into(">I", buf, 0, bf.crc32c(bytes(buf[4:bf.HEADER_BYTES]), bf.crc32c(bytes(buf[bf.HEADER_BYTES:]))))
    for check in (bf.verify, lambda b: bf.stamp(b, 0, TS)):
        with pytest.raises(CorruptRecord, match="older bus"):
            check(bytes(buf))


def test_stamp_refuses_bad_batches():
    buf = make_batch(2)
    with pytest.raises(CorruptRecord):
        bf.stamp(buf[:20], 0, TS)  # shorter than a header
    with pytest.raises(CorruptRecord):
        bf.stamp(buf + b"x", 0, TS)  # trailing bytes
    with pytest.raises(CorruptRecord):
        bf.stamp(buf[:-1], 0, TS)  # truncated payload
    wrong_magic = bytearray(buf)
    wrong_magic[4] = 99
    with pytest.raises(CorruptRecord):
        bf.stamp(bytes(wrong_magic), 0, TS)
    flipped = bytearray(buf)
    flipped[-1] ^= 1
    with pytest.raises(CorruptRecord):
        bf.stamp(bytes(flipped), 0, TS)


def test_zero_record_count_is_refused_even_with_a_correct_crc():
    buf = bytearray(make_batch(1))
    struct.pack_into(">i", buf, 18, 0)  # record_count
    crc = bf.crc32c(bytes(buf[4:bf.HEADER_BYTES]), bf.crc32c(bytes(buf[bf.HEADER_BYTES:])))
    struct.pack_into(">I", buf, 0, crc)
    with pytest.raises(CorruptRecord):
        bf.verify(bytes(buf))
    with pytest.raises(CorruptRecord):
        bf.stamp(bytes(buf), 0, TS)


def test_iter_batches_walks_a_concatenation():
    stored = [bf.stamp(make_batch(n, base_sequence=s), base, TS)[0] for n, s, base in ((2, 0, 0), (3, 2, 2), (1, 5, 5))]
    got = list(bf.iter_batches(b"".join(stored)))
    assert [h.base_offset for h, _ in got] == [0, 2, 5]
    assert [h.record_count for h, _ in got] == [2, 3, 1]
    assert [len(bf.read_columns(p, h.record_count)[2]) for h, p in got] == [2, 3, 1]
    assert list(bf.iter_batches(b"")) == []
    with pytest.raises(CorruptRecord):
        list(bf.iter_batches(b"".join(stored)[:-3]))  # a truncated last batch
    # crc_checked (batches a store has just verified): the same walk without the CRC pass; lengths still
    # checked, a payload bit's flip not looked for.
    data = b"".join(stored)
    assert [h for h, _ in bf.iter_batches(data, crc_checked=True)] == [h for h, _ in got]
    flipped = bytearray(data)
    flipped[bf.HEADER_BYTES] ^= 1
    assert len(list(bf.iter_batches(flipped, crc_checked=True))) == 3
    with pytest.raises(CorruptRecord):
        list(bf.iter_batches(data[:-3], crc_checked=True))


@CODECS
def test_every_single_bit_flip_of_a_stored_batch_is_detected(compression):
    stored, _ = bf.stamp(make_batch(2, compression=compression), 42, TS)
    stored = bytes(stored)
    assert bf.verify(stored).base_offset == 42
    assert bf.verify(stored).attributes & bf.CODEC_MASK == bf.CODECS[compression] << bf.CODEC_SHIFT
    flipped = bytearray(stored)
    for bit in range(len(stored) * 8):
        byte, mask = bit // 8, 1 << (bit % 8)
        flipped[byte] ^= mask
        with pytest.raises(CorruptRecord):
            bf.verify(flipped)
        with pytest.raises(CorruptRecord):
            list(bf.iter_batches(flipped))
        flipped[byte] ^= mask
    assert bytes(flipped) == stored


@CODECS
def test_every_single_bit_flip_of_a_produced_batch_is_refused_by_stamp(compression):
    buf = make_batch(2, compression=compression)
    flipped = bytearray(buf)
    for bit in range(len(buf) * 8):
        byte, mask = bit // 8, 1 << (bit % 8)
        flipped[byte] ^= mask
        with pytest.raises(CorruptRecord):
            bf.stamp(bytes(flipped), 0, TS)
        flipped[byte] ^= mask
