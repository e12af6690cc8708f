"""Batch compression (bus/batch.py, issue 15): the pure format -- round trips for each codec, stamping without
decompressing, unknown codecs and decompression bombs refused as CorruptRecord, the time index over compressed
batches -- and end to end over real processes: lz4 and zstd producers, a consumer reading every record back
exactly, and fewer bytes on the node's disk than uncompressed."""

from __future__ import annotations

import json
import os
import random
import struct
import time

import lz4.block
import pytest
import zstandard

from bus import Admin, Consumer, Producer
from bus import batch as bf
from bus.errors import CorruptRecord, RecordTooLarge
from store import LogStore
from store.log_contract import record_at_time, record_with_max_time
from tests.core_helpers import consume_all

TS = 1_700_000_000_000
COMPRESSED = pytest.mark.parametrize("compression", ["lz4", "zstd"])

WORDS = ("order shipped pending cancelled refund customer account region europe america asia priority "
         "standard express warehouse berlin lisbon oslo tokyo quantity price currency euro dollar yen item "
         "widget gadget sprocket gizmo blue green red large small medium note gift wrap review").split()


def json_value(rng: random.Random, i: int) -> bytes:
    """A JSON-like record of about 1 KB: repeated field names, a small vocabulary, some numbers."""
    doc = {"id": i, "user": f"user-{rng.randrange(5000):05d}", "email": f"u{rng.randrange(5000)}@example.com",
           "created_ms": TS + 37 * i, "status": rng.choice(WORDS[:4]), "amount": round(rng.uniform(1, 999), 2),
           "tags": rng.sample(WORDS, 4),
           "lines": [{"sku": f"SKU-{rng.randrange(900):04d}", "qty": rng.randrange(1, 9), "note": rng.choice(WORDS)}
                     for _ in range(6)]}
    doc["text"] = ""
    while True:
        raw = json.dumps(doc).encode()
        if len(raw) >= 1000:
            return raw
        doc["text"] += rng.choice(WORDS) + " "


def flat_records(count: int, rng: random.Random | None = None) -> list:
    """Records with keys, headers and own timestamps on some (the others take the append time); values are
    JSON-like, one of them empty (a value of no bytes is a record, not a tombstone)."""
    rng = rng or random.Random(15)
    flat = []
    for i in range(count):
        flat += [TS + 10 * i if i % 2 == 0 else None, b"key-%d" % (i % 7) if i % 3 else None,
                 b"" if i == 1 else json_value(rng, i), [("trace", b"%d" % i), ("src", b"")] if i % 4 == 0 else None]
    return flat


def columns_of(flat: list, count: int) -> list:
    """The columns read_columns gives for ``flat`` (headers come back as [name, value] lists)."""
    keys, headers = flat[1::4], flat[3::4]
    return [flat[0::4], keys, flat[2::4], [None if h is None else [list(p) for p in h] for h in headers]]


def with_crc(buf: bytearray) -> bytes:
    """``buf`` with its CRC32C made right again: the batch a producer with these bytes would have sent."""
    struct.pack_into(">I", buf, 0, bf.crc32c(bytes(buf[4:bf.HEADER_BYTES]), bf.crc32c(bytes(buf[bf.HEADER_BYTES:]))))
    return bytes(buf)


def with_payload(attributes: int, payload: bytes, record_count: int = 1) -> bytes:
    """A batch of ``payload`` as stored, its header naming ``attributes``, with a correct CRC."""
    tail = bf._TAIL.pack(bf.MAGIC, attributes, 0, -1, record_count, -1, TS, -1, -1, -1, len(payload))
    return with_crc(bytearray(b"\0\0\0\0" + tail + payload))


def payload_of(buf) -> memoryview:
    return memoryview(buf)[bf.HEADER_BYTES:]


# -- the format (pure) -----------------------------------------------------------------------------------

@COMPRESSED
def test_each_codec_round_trips_keys_headers_timestamps_and_values(compression):
    flat = flat_records(40)
    plain, packed = bf.pack_batch(flat, 40, 7, 2, 10), bf.pack_batch(flat, 40, 7, 2, 10, compression)
    header, plain_header = bf.verify(packed), bf.verify(plain)
    assert header.attributes == bf.APPEND_TIME | bf.CODECS[compression] << bf.CODEC_SHIFT
    # Everything a node reads is in the header, as it would be uncompressed.
    assert header[3:11] == plain_header[3:11] and header.max_ts_ms == TS + 10 * 38
    assert header.payload_len == len(packed) - bf.HEADER_BYTES < plain_header.payload_len / 2
    assert struct.unpack_from(">I", packed, bf.HEADER_BYTES)[0] == plain_header.payload_len  # uncompressed_len
    assert bf.read_columns(payload_of(packed), 40, header.attributes) == columns_of(flat, 40)
    assert bf.decompress(payload_of(packed), header.attributes) == bytes(payload_of(plain))
    # A batch of values alone (send_many's), and a single record.
    values = [None, None, b"v" * 300, None] * 5
    alone = bf.pack_batch(values, 5, compression=compression)
    assert bf.verify(alone).attributes == bf.APPEND_TIME | bf.CODECS[compression] << bf.CODEC_SHIFT
    assert bf.read_columns(payload_of(alone), 5, bf.verify(alone).attributes) == [None, None, [b"v" * 300] * 5, None]
    one = bf.pack_batch([TS, b"k", b"", [("h", b"x")]], 1, compression=compression)
    assert bf.read_columns(payload_of(one), 1, bf.verify(one).attributes) == [[TS], [b"k"], [b""], [[["h", b"x"]]]]


@COMPRESSED
def test_stamp_keeps_a_compressed_payload_byte_for_byte(compression):
    buf = bf.pack_batch(flat_records(12), 12, 7, 2, 10, compression)
    stored, header = bf.stamp(buf, 1234, TS + 7, leader_epoch=9)
    assert bytes(stored[bf.HEADER_BYTES:]) == buf[bf.HEADER_BYTES:]  # the node never touches the payload
    assert bf.verify(stored) == header and header.attributes == bf.verify(buf).attributes
    assert (header.base_offset, header.leader_epoch, header.append_ts_ms) == (1234, 9, TS + 7)
    assert header.max_ts_ms == TS + 100  # a record's own timestamp is newer than the append time here
    assert bf.stamp(buf, 0, TS + 10**6)[1].max_ts_ms == TS + 10**6  # ... and the append time, when newer
    assert bf.read_columns(payload_of(stored), 12, header.attributes) == columns_of(flat_records(12), 12)
    # In place, as the node stamps its received frame.
    frame = bytearray(buf)
    stamped, _ = bf.stamp(frame, 5, TS)
    assert bytes(stamped[bf.HEADER_BYTES:]) == buf[bf.HEADER_BYTES:] and bf.verify(frame).base_offset == 5


@pytest.mark.parametrize("attributes", [codec << bf.CODEC_SHIFT for codec in range(bf.CODEC_KAFKA + 1, 8)]
                         + [0x10, 0x80, 0x10 | bf.CODEC_LZ4 << bf.CODEC_SHIFT])
def test_an_unknown_codec_or_flag_is_corrupt_record_everywhere(attributes):
    buf = bytearray(bf.pack_batch(flat_records(3), 3, compression="lz4"))
    buf[5] = attributes  # the attributes byte, with a CRC to match: only the format check can refuse it
    buf = with_crc(buf)
    for check in (bf.verify, lambda b: bf.stamp(b, 0, TS), lambda b: list(bf.iter_batches(b)),
                  lambda b: bf.read_columns(payload_of(b), 3, attributes)):
        with pytest.raises(CorruptRecord, match="unknown codec or flag"):
            check(buf)


def test_a_payload_claiming_more_than_the_bound_is_refused_before_decompressing():
    # A real bomb: 17 MiB of zeros is a few KB of lz4 and a few hundred bytes of zstd.
    zeros = bytes(bf.UNCOMPRESSED_BYTES_MAX + (1 << 20))
    for codec, body in ((bf.CODEC_LZ4, lz4.block.compress(zeros, store_size=False)),
                        (bf.CODEC_ZSTD, zstandard.ZstdCompressor().compress(zeros))):
        assert len(body) < 100_000
        attributes = codec << bf.CODEC_SHIFT
        bomb = with_payload(attributes, struct.pack(">I", len(zeros)) + body)
        bf.verify(bomb)  # sound as bytes: the CRC matches what was sent
        with pytest.raises(CorruptRecord, match="decompression bomb"):
            bf.stamp(bomb, 0, TS)  # the node refuses to store it
        with pytest.raises(CorruptRecord, match="decompression bomb"):
            bf.read_columns(payload_of(bomb), 1, attributes)  # and a reader to decompress it
        # A small claim over the same body: the decompressor is held to the claim.
        liar = with_payload(attributes, struct.pack(">I", 1000) + body)
        bf.stamp(liar, 0, TS)  # within the bound: the node cannot tell without decompressing
        with pytest.raises(CorruptRecord):
            bf.read_columns(payload_of(liar), 1, attributes)


@COMPRESSED
def test_a_payload_not_matching_its_claim_or_with_trailing_bytes_is_corrupt(compression):
    good = bf.pack_batch(flat_records(5), 5, compression=compression)
    attributes = bf.verify(good).attributes
    claimed = struct.unpack_from(">I", good, bf.HEADER_BYTES)[0]
    body = bytes(good[bf.HEADER_BYTES + 4:])
    for payload in (struct.pack(">I", claimed + 1) + body, struct.pack(">I", claimed - 1) + body,
                    struct.pack(">I", claimed) + body + b"\0", struct.pack(">I", claimed) + body[:-1],
                    struct.pack(">I", claimed) + body + body, b"", b"\0\0\0", struct.pack(">I", 0)):
        with pytest.raises(CorruptRecord):
            bf.read_columns(payload, 5, attributes)


@COMPRESSED
def test_garbage_behind_a_codec_is_corrupt_record_never_a_crash(compression):
    attributes = bf.CODECS[compression] << bf.CODEC_SHIFT
    rng = random.Random(1515)
    good = bytes(payload_of(bf.pack_batch(flat_records(5), 5, compression=compression)))
    for _ in range(300):
        if rng.random() < 0.5:
            payload = struct.pack(">I", rng.randrange(1 << 16)) + rng.randbytes(rng.randrange(64))
        else:  # a real payload with a few bytes changed (what a CRC-valid but buggy producer might send)
            payload = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                payload[rng.randrange(4, len(payload))] = rng.randrange(256)
        try:
            bf.read_columns(bytes(payload), 5, attributes)
        except CorruptRecord:
            pass


def test_an_uncompressed_payload_that_is_not_msgpack_is_corrupt_record():
    for payload in (b"\xc1", b"\x94\xc0\xc0\x91\xc4\x01a\xc0junk", b""):
        with pytest.raises(CorruptRecord):
            bf.read_columns(payload, 1)


def test_a_payload_above_the_bound_is_never_packed_compressed():
    flat = [None, None, bytes(bf.UNCOMPRESSED_BYTES_MAX), None]
    with pytest.raises(RecordTooLarge, match="UNCOMPRESSED_BYTES_MAX"):
        bf.pack_batch(flat, 1, compression="zstd")
    assert bf.verify(bf.pack_batch(flat, 1)).payload_len > bf.UNCOMPRESSED_BYTES_MAX  # the node's own limit decides


@COMPRESSED
def test_the_time_index_reads_timestamps_inside_compressed_batches(compression):
    # Three stored batches: own timestamps TS..TS+40 step 10 at offsets 0..4, then append-time records, then
    # own timestamps again. record_at_time (store/log_contract.py) decompresses the one batch it must.
    own = [x for i in range(5) for x in (TS + 10 * i, None, b"a%d" % i, None)]
    later = [x for i in range(3) for x in (TS + 100 + i, None, b"c%d" % i, None)]
    stored = [bytes(bf.stamp(bf.pack_batch(own, 5, compression=compression), 0, TS + 50)[0]),
              bytes(bf.stamp(bf.pack_batch([None, None, b"b", None] * 2, 2, compression=compression), 5, TS + 60)[0]),
              bytes(bf.stamp(bf.pack_batch(later, 3, compression=compression), 7, TS + 70)[0])]
    expected = {TS - 1: 0, TS: 0, TS + 1: 1, TS + 40: 4, TS + 41: 5, TS + 60: 5, TS + 61: 7, TS + 101: 8,
                TS + 102: 9, TS + 103: 10}
    for timestamp_ms, offset in expected.items():
        assert record_at_time(iter(stored), timestamp_ms, 10)[0] == offset, timestamp_ms
    assert record_at_time(iter(stored), TS + 41, 10) == (5, TS + 60)  # append-time records: the append time
    assert record_with_max_time(iter(stored), 10) == (9, TS + 102)
    assert record_with_max_time(iter(stored), 7) == (5, TS + 60)


# -- end to end over real processes ----------------------------------------------------------------------

KEYED, BARE = 1500, 600  # records per topic by send() (keys, some headers and timestamps) and by send_many()


def test_lz4_and_zstd_producers_round_trip_every_record_and_store_fewer_bytes(make_cluster):
    cluster = make_cluster(1)
    rng = random.Random(15)
    base_ts = int(time.time() * 1000) - 3_600_000  # own timestamps an hour old: below every append time
    keyed = [(b"key-%d" % (i % 40), json_value(rng, i), [("trace", b"%d" % i), ("n", b"")] if i % 3 == 0 else None,
              base_ts + i if i % 2 == 0 else None) for i in range(KEYED)]
    bare = [json_value(rng, KEYED + i) for i in range(BARE)]
    topic_ids, stored_bytes = {}, {}
    with Admin(cluster.bootstrap) as admin:
        for compression in (None, "lz4", "zstd"):
            topic_ids[compression] = admin.create_topic(f"json-{compression}", 2, replication_factor=1)["id"]
    for compression in (None, "lz4", "zstd"):
        topic = f"json-{compression}"
        with Producer(cluster.bootstrap, compression=compression, linger_ms=5, batch_bytes=256 << 10) as producer:
            futures = [producer.send(topic, value, key=key, headers=headers, timestamp_ms=ts)
                       for key, value, headers, ts in keyed]
            many = producer.send_many(topic, bare, partition=1)
            producer.flush(60)
            acked = [f.get(0) for f in futures] + [f.get(0) for f in many]
        sent = [(key, value, headers) for key, value, headers, _ in keyed] + [(None, value, None) for value in bare]
        expected = {(m.partition, m.offset): (key, value, headers, m.timestamp_ms)
                    for m, (key, value, headers) in zip(acked, sent)}
        assert len(expected) == KEYED + BARE
        records = consume_all(cluster.bootstrap, topic, 2, KEYED + BARE)
        got = {(r.partition, r.offset): (r.key, r.value, r.headers, r.timestamp_ms) for r in records}
        assert len(records) == len(got) == KEYED + BARE and got == expected, compression
        # offsets_for_times: the node reads timestamps inside compressed batches (store/log_contract.py).
        by_partition = {p: sorted((o, ts) for (q, o), (_, _, _, ts) in got.items() if q == p) for p in (0, 1)}
        targets = [base_ts, base_ts + 1, base_ts + KEYED // 2, base_ts + KEYED - 2, base_ts + KEYED - 1,
                   base_ts + 10 * 3_600_000]
        with Consumer(cluster.bootstrap) as consumer:
            for partition, pairs in by_partition.items():
                for target in targets:
                    want = next((o for o, ts in pairs if ts >= target), len(pairs))
                    answer = consumer.offsets_for_times({(topic, partition): target})
                    assert answer[(topic, partition)] == want, (compression, partition, target)
    cluster.stop()
    # The node's store, read as it is on disk: every batch as the producer packed it, its codec in the header.
    store = LogStore(os.path.join(cluster.data_dir, "node-1"))
    try:
        for compression, topic_id in topic_ids.items():
            total = 0
            for partition in (0, 1):
                log = store.open_partition(f"{topic_id}/{partition}")
                data, _ = store.read(log, log.start_offset, 1 << 30)
                assert len(data) == log.size_bytes and log.next_offset > 0
                headers = [header for header, _ in bf.iter_batches(data)]
                assert {h.attributes & bf.CODEC_MASK for h in headers} == {bf.CODECS[compression] << bf.CODEC_SHIFT}
                total += len(data)
            stored_bytes[compression] = total
    finally:
        store.close()
    raw_bytes = sum(len(value) for _, value, _, _ in keyed) + sum(map(len, bare))
    assert stored_bytes[None] > raw_bytes  # uncompressed: the records and their framing
    assert stored_bytes["lz4"] < stored_bytes[None] / 2, stored_bytes
    assert stored_bytes["zstd"] < stored_bytes["lz4"], stored_bytes


def test_a_batch_too_large_to_compress_fails_alone_and_takes_no_sequence(make_cluster, monkeypatch):
    """The sender's refusal (bus/sender.py, _enqueue): a compressed payload above the bound fails its batch
    with RecordTooLarge, definitely, before it is sent; the next batch of the partition is written at the
    offset the failed one would have had (no sequence was taken, so the node sees no gap)."""
    cluster = make_cluster(1)
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("bounded", 1, replication_factor=1)
    # The bound as pack_batch reads it (the Producer's construction-time check keeps its own import).
    monkeypatch.setattr(bf, "UNCOMPRESSED_BYTES_MAX", 4096)
    with Producer(cluster.bootstrap, compression="lz4") as producer:
        first = producer.send("bounded", b"small", partition=0).get(30)
        with pytest.raises(RecordTooLarge) as refused:
            producer.send("bounded", b"x" * 5000, partition=0).get(30)
        assert refused.value.outcome == "definite"
        after = producer.send("bounded", b"after", partition=0).get(30)
    assert (first.offset, after.offset) == (0, 1)
    records = consume_all(cluster.bootstrap, "bounded", 1, 2)
    assert [r.value for r in records] == [b"small", b"after"]
