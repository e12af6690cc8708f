"""The record batch: the unit a producer packs, a node stores as one LMDB value, and a fetch returns.

Layout (big-endian; ``HEADER`` below), followed by the payload exactly as the producer packed it::

    crc              u32  CRC32C of (payload || header bytes after this field)
    magic            u8   batch format version, MAGIC
    attributes       u8   bit flags: APPEND_TIME (some records have no timestamp of their own); the rest
                          0 (room for compression codecs)
    base_offset      i64  offset of the first record; 0 from the producer, set by the node
    leader_epoch     i32  epoch of the owner that appended it; -1 until replication exists
    record_count     i32  number of records in the payload (> 0)
    append_ts_ms     i64  the node's clock when it appended the batch; -1 from the producer, set by the node
    max_ts_ms        i64  the largest timestamp in the batch (retention by age and the time index read this
                          alone): the largest of the records' own, raised by the node to the append time
                          when APPEND_TIME is set; -1 from a producer whose records have none
    producer_id      i64  idempotent producer id, -1 for none
    producer_epoch   i16  epoch of that producer id, -1 for none
    base_sequence    i32  per-partition sequence of the first record, -1 for none
    payload_len      u32  bytes of payload following the header

The payload is one msgpack array of four columns, ``[timestamps, keys, values, headers]``: ``values``
holds one bytes item per record; each of the others is nil when no record of the batch has one, else
an array with one item per record, nil for a record without (a key is bytes; headers a list of [name,
value] pairs). Columns keep packing and unpacking to one C call with no per-record containers, and the
usual batch (values only) is a single array: a third of the cost of four items per record, both ways.
A record's timestamp is None unless its producer gave one: it then has the batch's append time, as in
Kafka's LogAppendTime, Redis Streams and NATS JetStream. That keeps a clock read out of the producer's
per-record path, and makes a partition's default timestamps follow its offsets.

The CRC covers every byte except itself, so a flipped bit anywhere is caught; the node stamps
``base_offset``, ``leader_epoch`` and the timestamps and updates the CRC without a second pass over the
payload (CRC32C continues from the payload's CRC over the header tail).

Format 2 (``MAGIC``): format 1 had one flat array of four items per record, timestamps as deltas from a
producer-side first timestamp.
"""

from __future__ import annotations

import struct

import msgpack
from crc32c import crc32c

from .errors import CorruptRecord

MAGIC = 2
APPEND_TIME = 0x01  # attributes bit
HEADER = struct.Struct(">IBBqiiqqqhiI")
HEADER_BYTES = HEADER.size
_TAIL = struct.Struct(">BBqiiqqqhiI")  # HEADER without the crc, for computing it
_STAMPED_AT = 6  # byte position of base_offset within the header: the node writes from there ...
_STAMPED = struct.Struct(">qiiqq")  # ... base_offset, leader_epoch, record_count, append_ts_ms, max_ts_ms
assert HEADER_BYTES == 56

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


class BatchHeader(tuple):
    """The decoded header fields, in layout order (a tuple, so decoding costs one struct call)."""

    __slots__ = ()
    crc = property(lambda s: s[0])
    magic = property(lambda s: s[1])
    attributes = property(lambda s: s[2])
    base_offset = property(lambda s: s[3])
    leader_epoch = property(lambda s: s[4])
    record_count = property(lambda s: s[5])
    append_ts_ms = property(lambda s: s[6])
    max_ts_ms = property(lambda s: s[7])
    producer_id = property(lambda s: s[8])
    producer_epoch = property(lambda s: s[9])
    base_sequence = property(lambda s: s[10])
    payload_len = property(lambda s: s[11])

    @property
    def next_offset(self) -> int:
        return self[3] + self[5]

    @property
    def last_sequence(self) -> int:
        return self[10] + self[5] - 1


def pack_batch(flat_records: list, record_count: int,
               producer_id: int = -1, producer_epoch: int = -1, base_sequence: int = -1) -> bytes:
    """Pack ``record_count`` records, given flat (``flat_records``: timestamp_ms or None, key, value,
    headers, ... as a producer collects them) into one batch."""
    assert record_count > 0 and len(flat_records) == 4 * record_count
    # Slices and counts run in C: a few ns per record, against ~25 for packing a column.
    stamps = flat_records[0::4]
    without = stamps.count(None)
    if without == record_count:
        attributes, max_ts_ms, stamps = APPEND_TIME, -1, None
    elif without == 0:
        attributes, max_ts_ms = 0, max(stamps)
    else:
        attributes, max_ts_ms = APPEND_TIME, max(ts for ts in stamps if ts is not None)
    keys, headers = flat_records[1::4], flat_records[3::4]
    payload = _packb([stamps, None if keys.count(None) == record_count else keys, flat_records[2::4],
                      None if headers.count(None) == record_count else headers])
    tail = _TAIL.pack(MAGIC, attributes, 0, -1, record_count, -1, max_ts_ms,
                      producer_id, producer_epoch, base_sequence, len(payload))
    crc = crc32c(tail, crc32c(payload))
    return b"".join((struct.pack(">I", crc), tail, payload))


def _check_magic(header: BatchHeader) -> None:
    if header[1] != MAGIC:
        older = " (a batch of an older bus: this version reads format 2 only)" if 0 < header[1] < MAGIC else ""
        raise CorruptRecord(f"batch magic {header[1]} is not {MAGIC}{older}")


def read_header(buf, at: int = 0) -> BatchHeader:
    if len(buf) - at < HEADER_BYTES:
        raise CorruptRecord(f"batch of {len(buf) - at} bytes is shorter than its {HEADER_BYTES}-byte header")
    return BatchHeader(HEADER.unpack_from(buf, at))


def verify(buf, at: int = 0) -> BatchHeader:
    """Check one batch starting at ``at`` of ``buf``: magic, length and CRC. Returns its header."""
    header = read_header(buf, at)
    _check_magic(header)
    end = at + HEADER_BYTES + header[11]
    if end > len(buf):
        raise CorruptRecord(f"batch payload_len {header[11]} runs past the {len(buf) - at} bytes given")
    view = memoryview(buf)
    if crc32c(view[at + 4:at + HEADER_BYTES], crc32c(view[at + HEADER_BYTES:end])) != header[0]:
        raise CorruptRecord(f"CRC32C mismatch in batch at base offset {header[3]}")
    if header[5] <= 0:
        raise CorruptRecord(f"batch claims {header[5]} records")
    return header


def stamp(buf, base_offset: int, append_ts_ms: int,
          leader_epoch: int = -1) -> tuple[bytearray | memoryview, BatchHeader]:
    """Verify a batch as a producer sent it and give it ``base_offset`` and its append time (for storing).

    ``buf`` must hold exactly one batch. A writable ``buf`` (the node's received frame) is stamped in place
    and returned, saving a copy of every batch; a read-only one is copied first. One pass over the
    payload: its CRC is computed once, checked against the producer's, then continued over the re-stamped
    header tail. Nothing is written unless the batch is valid.
    """
    header = read_header(buf)
    _check_magic(header)
    if HEADER_BYTES + header[11] != len(buf):
        raise CorruptRecord(f"batch payload_len {header[11]} does not match its {len(buf)} bytes")
    if header[5] <= 0:
        raise CorruptRecord(f"batch claims {header[5]} records")
    view = memoryview(buf)
    payload_crc = crc32c(view[HEADER_BYTES:])
    if crc32c(view[4:HEADER_BYTES], payload_crc) != header[0]:
        raise CorruptRecord("CRC32C mismatch in produced batch")
    out = bytearray(buf) if view.readonly else view
    max_ts_ms = max(header[7], append_ts_ms) if header[2] & APPEND_TIME else header[7]
    _STAMPED.pack_into(out, _STAMPED_AT, base_offset, leader_epoch, header[5], append_ts_ms, max_ts_ms)
    crc = crc32c(memoryview(out)[4:HEADER_BYTES], payload_crc)
    struct.pack_into(">I", out, 0, crc)
    return out, BatchHeader((crc, header[1], header[2], base_offset, leader_epoch, header[5], append_ts_ms,
                             max_ts_ms) + header[8:])


def iter_batches(buf):
    """Yield (header, payload memoryview) for each batch in a concatenation of stored batches (verified)."""
    view = memoryview(buf)
    at, end = 0, len(buf)
    while at < end:
        header = verify(view, at)
        start = at + HEADER_BYTES
        at = start + header[11]
        yield header, view[start:at]


def read_columns(payload, record_count: int) -> list:
    """The columns of a payload, ``[timestamps, keys, values, headers]``, each checked to hold
    ``record_count`` items; a column but ``values`` is None when no record has one."""
    columns = msgpack.unpackb(payload, raw=False, use_list=True)
    if (type(columns) is not list or len(columns) != 4 or type(columns[2]) is not list
            or any(c is not None and (type(c) is not list or len(c) != record_count) for c in columns)):
        raise CorruptRecord(f"payload is not the four columns of {record_count} records")
    return columns
