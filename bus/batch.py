"""The record batch: the unit a producer packs, a node stores as one LMDB value, and a fetch returns.

Layout (big-endian; ``HEADER`` below), followed by the payload exactly as the producer packed it::

    crc              u32  CRC32C of (payload || header bytes after this field)
    magic            u8   batch format version, MAGIC
    attributes       u8   bit flags; 0 for now (room for compression codecs)
    base_offset      i64  offset of the first record; 0 from the producer, set by the node
    leader_epoch     i32  epoch of the owner that appended it; -1 until replication exists
    record_count     i32  number of records in the payload (> 0)
    first_ts_ms      i64  timestamp of the first record
    max_ts_ms        i64  largest timestamp in the batch (retention by age reads this alone)
    producer_id      i64  idempotent producer id, -1 for none
    producer_epoch   i16  epoch of that producer id, -1 for none
    base_sequence    i32  per-partition sequence of the first record, -1 for none
    payload_len      u32  bytes of payload following the header

The payload is one msgpack array, flat, four items per record: ``ts_delta_ms, key, value, headers``
(key None or bytes; headers None or a list of [name, value] pairs). Flat keeps packing and unpacking to
one C call with no per-record containers.

The CRC covers every byte except itself, so a flipped bit anywhere is caught; the node re-stamps
``base_offset`` and ``leader_epoch`` and updates the CRC without a second pass over the payload
(CRC32C continues from the payload's CRC over the header tail).
"""

from __future__ import annotations

import struct

import msgpack
from crc32c import crc32c

from .errors import CorruptRecord

MAGIC = 1
HEADER = struct.Struct(">IBBqiiqqqhiI")
HEADER_BYTES = HEADER.size
_TAIL = struct.Struct(">BBqiiqqqhiI")  # HEADER without the crc, for computing it
_BASE_OFFSET_AT = 6  # byte position of base_offset within the header
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
    first_ts_ms = property(lambda s: s[6])
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


def pack_batch(flat_records: list, record_count: int, first_ts_ms: int, max_ts_ms: int,
               producer_id: int = -1, producer_epoch: int = -1, base_sequence: int = -1) -> bytes:
    """Pack ``record_count`` records (``flat_records``: ts_delta, key, value, headers, ...) into one batch."""
    assert record_count > 0 and len(flat_records) == 4 * record_count
    payload = _packb(flat_records)
    tail = _TAIL.pack(MAGIC, 0, 0, -1, record_count, first_ts_ms, max_ts_ms,
                      producer_id, producer_epoch, base_sequence, len(payload))
    crc = crc32c(tail, crc32c(payload))
    return b"".join((struct.pack(">I", crc), tail, payload))


def read_header(buf, at: int = 0) -> BatchHeader:
    if len(buf) - at < HEADER_BYTES:
        raise CorruptRecord(f"batch of {len(buf) - at} bytes is shorter than its {HEADER_BYTES}-byte header")
    return BatchHeader(HEADER.unpack_from(buf, at))


def verify(buf, at: int = 0) -> BatchHeader:
    """Check one batch starting at ``at`` of ``buf``: magic, length and CRC. Returns its header."""
    header = read_header(buf, at)
    if header[1] != MAGIC:
        raise CorruptRecord(f"batch magic {header[1]} is not {MAGIC}")
    end = at + HEADER_BYTES + header[11]
    if end > len(buf):
        raise CorruptRecord(f"batch payload_len {header[11]} runs past the {len(buf) - at} bytes given")
    view = memoryview(buf)
    if crc32c(view[at + 4:at + HEADER_BYTES], crc32c(view[at + HEADER_BYTES:end])) != header[0]:
        raise CorruptRecord(f"CRC32C mismatch in batch at base offset {header[3]}")
    if header[5] <= 0:
        raise CorruptRecord(f"batch claims {header[5]} records")
    return header


def stamp(buf, base_offset: int, leader_epoch: int = -1) -> tuple[bytearray | memoryview, BatchHeader]:
    """Verify a batch as a producer sent it and give it ``base_offset`` (for storing).

    ``buf`` must hold exactly one batch. A writable ``buf`` (the node's received frame) is stamped in place
    and returned, saving a copy of every batch; a read-only one is copied first. One pass over the
    payload: its CRC is computed once, checked against the producer's, then continued over the re-stamped
    header tail. Nothing is written unless the batch is valid.
    """
    header = read_header(buf)
    if header[1] != MAGIC:
        raise CorruptRecord(f"batch magic {header[1]} is not {MAGIC}")
    if HEADER_BYTES + header[11] != len(buf):
        raise CorruptRecord(f"batch payload_len {header[11]} does not match its {len(buf)} bytes")
    if header[5] <= 0:
        raise CorruptRecord(f"batch claims {header[5]} records")
    view = memoryview(buf)
    payload_crc = crc32c(view[HEADER_BYTES:])
    if crc32c(view[4:HEADER_BYTES], payload_crc) != header[0]:
        raise CorruptRecord("CRC32C mismatch in produced batch")
    out = bytearray(buf) if view.readonly else view
    struct.pack_into(">qi", out, _BASE_OFFSET_AT, base_offset, leader_epoch)
    crc = crc32c(memoryview(out)[4:HEADER_BYTES], payload_crc)
    struct.pack_into(">I", out, 0, crc)
    return out, BatchHeader((crc, header[1], header[2], base_offset, leader_epoch) + header[5:])


def iter_batches(buf):
    """Yield (header, payload memoryview) for each batch in a concatenation of stored batches (verified)."""
    view = memoryview(buf)
    at, end = 0, len(buf)
    while at < end:
        header = verify(view, at)
        start = at + HEADER_BYTES
        at = start + header[11]
        yield header, view[start:at]


def unpack_payload(payload) -> list:
    """The flat record list of a payload: ts_delta, key, value, headers, ..."""
    return msgpack.unpackb(payload, raw=False, use_list=True)
