"""The record batch: the unit a producer packs, a node stores as one LMDB value, and a fetch returns.

Layout (big-endian; ``HEADER`` below), followed by the payload exactly as the producer packed it::

    crc              u32  CRC32C of (payload || header bytes after this field)
    magic            u8   batch format version, MAGIC
    attributes       u8   bit 0 APPEND_TIME: some records have no timestamp of their own; bits 1-3 the
                          payload's codec (CODEC_MASK: 0 none, 1 lz4, 2 zstd, 3 Kafka batches as a Kafka
                          producer sent them, below); bits 4-7 0. Any other
                          value is refused (CorruptRecord), never guessed at
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
    payload_len      u32  bytes of payload following the header (as stored: compressed, when it is)

The payload is one msgpack array of four columns, ``[timestamps, keys, values, headers]``: ``values``
holds one bytes item per record; each of the others is nil when no record of the batch has one, else
an array with one item per record, nil for a record without (a key is bytes; headers a list of [name,
value] pairs). Columns keep packing and unpacking to one C call with no per-record containers, and the
usual batch (values only) is a single array: a third of the cost of four items per record, both ways.
A record's timestamp is None unless its producer gave one: it then has the batch's append time, as in
Kafka's LogAppendTime, Redis Streams and NATS JetStream. That keeps a clock read out of the producer's
per-record path, and makes a partition's default timestamps follow its offsets.

Compression (``pack_batch(..., compression="lz4" | "zstd")``, as Kafka's): the payload as a whole, the
four columns packed, is compressed once per batch, and then stored as::

    uncompressed_len u32  bytes of the msgpack payload once decompressed (<= UNCOMPRESSED_BYTES_MAX)
    body                  the codec's output: an LZ4 block (no frame) or one zstd frame, nothing after it

Everything a node reads stays in the header (record count, sequences, ``max_ts_ms`` for retention and the
time index), so a node stores a compressed batch exactly as it stores any other and never decompresses
one; only a consumer does (``read_columns``), and the node's offset-for-time lookup, for the one batch
it looks inside. ``uncompressed_len`` is ours rather than the codec's so that the bound is checked, for
either codec, before any decompressor runs or any buffer is allocated: a small batch claiming a huge
payload (a decompression bomb, or a bug) is refused, by the node when it is produced (``stamp``) and by
a reader, as CorruptRecord.

An LZ4 block rather than Kafka's LZ4 frame: the frame's checksums would be a second pass over what the
CRC32C already covers, its blocks and streaming buy nothing for one bounded buffer compressed in one call,
and a block decompresses in one call into a buffer of exactly the claimed (bounded) size; it also saves
the frame's 15-23 bytes per batch. zstd keeps its standard frame (one call either way), which records its
content size: that must equal ``uncompressed_len``, so its decompressor never allocates past the bound.

The CRC covers every byte as stored except itself (the compressed bytes, when compressed), so a flipped
bit anywhere is caught before a decompressor sees it; the node stamps ``base_offset``, ``leader_epoch``
and the timestamps and updates the CRC without a second pass over the payload (CRC32C continues from the
payload's CRC over the header tail).

Kafka batches (``CODEC_KAFKA``, written by ``wrap_kafka`` for the node's Kafka listener): the payload is one
Kafka RecordBatch or more (bus/kafka_batch.py) exactly as a Kafka producer sent them, and this header says of
them what a node reads of any batch (record count, the largest timestamp, the idempotent producer's id,
epoch and first sequence), so the node's logic is the same for both formats. ``stamp`` also writes each
Kafka batch's baseOffset and partitionLeaderEpoch (outside Kafka's own CRC, as a Kafka broker does), so a
Kafka consumer is served the stored payload as it is; a bus reader converts it (``read_columns``).

Format 2 (``MAGIC``): format 1 had one flat array of four items per record, timestamps as deltas from a
producer-side first timestamp.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any, cast

import lz4.block
import msgpack
import zstandard
from crc32c import crc32c

import bus.kafka_batch as kafka_batch  # absolute: tests/test_layout.py reads "from . import" as the whole package
from .errors import CorruptRecord, RecordTooLarge
from .records import Buffer

MAGIC = 2
APPEND_TIME = 0x01  # attributes bit
CODEC_MASK, CODEC_SHIFT = 0x0E, 1  # attributes bits 1-3: the payload's codec
CODEC_NONE, CODEC_LZ4, CODEC_ZSTD = 0, 1, 2
# Not a compression but the payload's other format: Kafka record batches as a Kafka producer sent them
# (bus/kafka_batch.py; written by the node's Kafka listener only, through ``wrap_kafka``).
CODEC_KAFKA = 3
CODECS = {None: CODEC_NONE, "lz4": CODEC_LZ4, "zstd": CODEC_ZSTD}  # compression= names -> codec numbers
_CODEC_NAMES = {**{number: name or "none" for name, number in CODECS.items()}, CODEC_KAFKA: "kafka"}
_KAFKA_ATTRIBUTE = CODEC_KAFKA << CODEC_SHIFT


def holds_kafka(attributes: int) -> bool:
    """Whether a batch whose header has ``attributes`` holds Kafka batches (CODEC_KAFKA)."""
    return attributes & CODEC_MASK == _KAFKA_ATTRIBUTE
_ATTRIBUTES_KNOWN = APPEND_TIME | CODEC_MASK
# The largest batch a node stores (nodes/node.py refuses a larger one with RECORD_TOO_LARGE; Kafka clients
# are told it as max.message.bytes); producers default to 1 MiB.
BATCH_BYTES_MAX = 16 << 20
# The largest payload a compressed batch may hold once decompressed: the largest batch a node stores at all
# (BATCH_BYTES_MAX), so a reader's memory for one batch is bounded alike with or
# without compression, and a producer's batch (1 MiB by default) has room to spare. A claim above it is a
# decompression bomb or a bug; it is refused before any decompressor runs.
UNCOMPRESSED_BYTES_MAX = 16 << 20
assert UNCOMPRESSED_BYTES_MAX == kafka_batch.UNCOMPRESSED_BYTES_MAX
ZSTD_LEVEL = 3  # zstd's own default (and Kafka's): most of the ratio of higher levels at several times the speed
_UNCOMPRESSED_LEN = struct.Struct(">I")
HEADER = struct.Struct(">IBBqiiqqqhiI")
HEADER_BYTES = HEADER.size
_TAIL = struct.Struct(">BBqiiqqqhiI")  # HEADER without the crc, for computing it
_STAMPED_AT = 6  # byte position of base_offset within the header: the node writes from there ...
_STAMPED = struct.Struct(">qiiqq")  # ... base_offset, leader_epoch, record_count, append_ts_ms, max_ts_ms
assert HEADER_BYTES == 56

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
# zstd (de)compression contexts cost ~20 us to make, ten times a small batch's compression, and must not be
# used by two threads at once (a producer's sender and a consumer's poll() may share a process): one each
# per thread. LZ4 block calls keep no state.
_zstd = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    try:
        return cast(zstandard.ZstdCompressor, _zstd.compressor)
    except AttributeError:
        # The frame records its content size (checked against uncompressed_len on reading); no checksum of
        # its own: the batch's CRC32C already covers every stored byte.
        _zstd.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                                    write_checksum=False)
        return cast(zstandard.ZstdCompressor, _zstd.compressor)


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    try:
        return cast(zstandard.ZstdDecompressor, _zstd.decompressor)
    except AttributeError:
        _zstd.decompressor = zstandard.ZstdDecompressor()
        return cast(zstandard.ZstdDecompressor, _zstd.decompressor)


class BatchHeader(tuple[int, ...]):
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
        """The sequence of the batch's last record (wrapped: sequence_after); -1 without a producer."""
        return -1 if self[10] < 0 else kafka_batch.sequence_after(self[10], self[5] - 1)


def pack_batch(flat_records: list[Any], record_count: int, producer_id: int = -1, producer_epoch: int = -1,
               base_sequence: int = -1, compression: str | None = None) -> bytes:
    """Pack ``record_count`` records, given flat (``flat_records``: timestamp_ms or None, key, value,
    headers, ... as a producer collects them) into one batch, its payload compressed with ``compression``
    (a name in CODECS). Raises RecordTooLarge for a compressed payload above UNCOMPRESSED_BYTES_MAX (no
    reader would take it)."""
    assert record_count > 0 and len(flat_records) == 4 * record_count
    codec = CODECS[compression]
    # Slices and counts run in C: a few ns per record, against ~25 for packing a column.
    stamps: list[Any] | None = flat_records[0::4]
    assert stamps is not None
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
    if codec != CODEC_NONE:
        if len(payload) > UNCOMPRESSED_BYTES_MAX:
            raise RecordTooLarge(f"batch payload of {len(payload)} bytes exceeds the {UNCOMPRESSED_BYTES_MAX} "
                                 "bytes a compressed batch may hold (UNCOMPRESSED_BYTES_MAX)")
        body = (lz4.block.compress(payload, store_size=False) if codec == CODEC_LZ4
                else _zstd_compressor().compress(payload))
        payload = _UNCOMPRESSED_LEN.pack(len(payload)) + body
        attributes |= codec << CODEC_SHIFT
    tail = _TAIL.pack(MAGIC, attributes, 0, -1, record_count, -1, max_ts_ms,
                      producer_id, producer_epoch, base_sequence, len(payload))
    crc = crc32c(tail, crc32c(payload))
    return b"".join((struct.pack(">I", crc), tail, payload))


def _check_format(header: BatchHeader) -> None:
    """The batch's format is one this version reads: its magic, and attributes naming no unknown codec or
    flag (a batch of a newer bus, or damage the CRC happened to miss)."""
    if header[1] != MAGIC:
        older = " (a batch of an older bus: this version reads format 2 only)" if 0 < header[1] < MAGIC else ""
        raise CorruptRecord(f"batch magic {header[1]} is not {MAGIC}{older}")
    _check_attributes(header[2])


def _check_attributes(attributes: int) -> None:
    if attributes & ~_ATTRIBUTES_KNOWN or (attributes & CODEC_MASK) >> CODEC_SHIFT not in _CODEC_NAMES:
        raise CorruptRecord(f"batch attributes 0x{attributes:02x} name an unknown codec or flag (this version "
                            f"knows codecs {', '.join(_CODEC_NAMES.values())} and the APPEND_TIME flag)")


def _uncompressed_len(payload: Buffer, attributes: int) -> int:
    """A compressed payload's claimed size once decompressed, checked against UNCOMPRESSED_BYTES_MAX
    (reading 4 bytes, decompressing nothing)."""
    if len(payload) < _UNCOMPRESSED_LEN.size:
        raise CorruptRecord(f"{_CODEC_NAMES[(attributes & CODEC_MASK) >> CODEC_SHIFT]} payload of {len(payload)} "
                            "bytes is shorter than its uncompressed length")
    claimed: int = _UNCOMPRESSED_LEN.unpack_from(payload)[0]
    if claimed > UNCOMPRESSED_BYTES_MAX:
        raise CorruptRecord(f"compressed payload claims {claimed} bytes uncompressed, above "
                            f"UNCOMPRESSED_BYTES_MAX={UNCOMPRESSED_BYTES_MAX} (a decompression bomb?)")
    return claimed


def decompress(payload: Buffer, attributes: int) -> Buffer:
    """The msgpack payload of a batch whose header has ``attributes``: ``payload`` itself when uncompressed,
    else decompressed into at most its claimed ``uncompressed_len`` (<= UNCOMPRESSED_BYTES_MAX) bytes,
    which it must fill exactly, with nothing after the codec's output. CorruptRecord otherwise."""
    _check_attributes(attributes)
    codec = (attributes & CODEC_MASK) >> CODEC_SHIFT
    assert codec != CODEC_KAFKA, "Kafka batches are read by kafka_batch.columns, not decompressed"
    if codec == CODEC_NONE:
        return payload
    claimed = _uncompressed_len(payload, attributes)
    body = memoryview(payload)[_UNCOMPRESSED_LEN.size:]
    try:
        if codec == CODEC_LZ4:
            # The output buffer is the claimed size; a block that would write past it is an error.
            raw: bytes = lz4.block.decompress(body, uncompressed_size=claimed)
        else:  # CODEC_ZSTD, the one other codec _check_attributes lets by
            # decompress() allocates the frame's own content size: check it is the (bounded) claim first.
            framed = zstandard.frame_content_size(body)
            if framed != claimed:
                raise CorruptRecord(f"zstd frame holds {framed} bytes, its batch claims {claimed}")
            raw = _zstd_decompressor().decompress(body, allow_extra_data=False)
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise CorruptRecord(f"{_CODEC_NAMES[codec]} payload does not decompress: {exc}") from None
    if len(raw) != claimed:
        raise CorruptRecord(f"{_CODEC_NAMES[codec]} payload decompressed to {len(raw)} bytes, "
                            f"its batch claims {claimed}")
    return raw


def read_header(buf: Buffer, at: int = 0) -> BatchHeader:
    if len(buf) - at < HEADER_BYTES:
        raise CorruptRecord(f"batch of {len(buf) - at} bytes is shorter than its {HEADER_BYTES}-byte header")
    return BatchHeader(HEADER.unpack_from(buf, at))


def verify(buf: Buffer, at: int = 0) -> BatchHeader:
    """Check one batch starting at ``at`` of ``buf``: magic, length and CRC. Returns its header."""
    header = read_header(buf, at)
    _check_format(header)
    end = at + HEADER_BYTES + header[11]
    if end > len(buf):
        raise CorruptRecord(f"batch payload_len {header[11]} runs past the {len(buf) - at} bytes given")
    view = memoryview(buf)
    if crc32c(view[at + 4:at + HEADER_BYTES], crc32c(view[at + HEADER_BYTES:end])) != header[0]:
        raise CorruptRecord(f"CRC32C mismatch in batch at base offset {header[3]}")
    if header[5] <= 0:
        raise CorruptRecord(f"batch claims {header[5]} records")
    return header


def stamp(buf: Buffer, base_offset: int, append_ts_ms: int,
          leader_epoch: int = -1) -> tuple[bytearray | memoryview, BatchHeader]:
    """Verify a batch as a producer sent it and give it ``base_offset`` and its append time (for storing).

    ``buf`` must hold exactly one batch. A writable ``buf`` (the node's received frame) is stamped in place
    and returned, saving a copy of every batch; a read-only one is copied first. One pass over the
    payload: its CRC is computed once, checked against the producer's, then continued over the re-stamped
    header tail. Nothing is written unless the batch is valid. A compressed payload is not decompressed:
    only its claimed uncompressed length is checked (no reader would take a larger one), so the node stores
    it as the producer sent it.
    """
    header = read_header(buf)
    _check_format(header)
    if HEADER_BYTES + header[11] != len(buf):
        raise CorruptRecord(f"batch payload_len {header[11]} does not match its {len(buf)} bytes")
    if header[5] <= 0:
        raise CorruptRecord(f"batch claims {header[5]} records")
    view = memoryview(buf)
    payload_crc = crc32c(view[HEADER_BYTES:])
    if crc32c(view[4:HEADER_BYTES], payload_crc) != header[0]:
        raise CorruptRecord("CRC32C mismatch in produced batch")
    kafka = holds_kafka(header[2])
    if header[2] & CODEC_MASK and not kafka:
        _uncompressed_len(view[HEADER_BYTES:], header[2])
    out = bytearray(buf) if view.readonly else view
    if kafka:  # the Kafka batches inside take their offsets and epoch too: a second pass for the payload's CRC
        kafka_batch.stamp_offsets(out, HEADER_BYTES, len(out), base_offset, leader_epoch, header[5])
        payload_crc = crc32c(memoryview(out)[HEADER_BYTES:])
    max_ts_ms = max(header[7], append_ts_ms) if header[2] & APPEND_TIME else header[7]
    _STAMPED.pack_into(out, _STAMPED_AT, base_offset, leader_epoch, header[5], append_ts_ms, max_ts_ms)
    crc = crc32c(memoryview(out)[4:HEADER_BYTES], payload_crc)
    struct.pack_into(">I", out, 0, crc)
    return out, BatchHeader((crc, header[1], header[2], base_offset, leader_epoch, header[5], append_ts_ms,
                             max_ts_ms) + header[8:])


def wrap_kafka(records: Buffer) -> bytearray:
    """A Kafka producer's batches for one partition (``records``, one or more: see bus/kafka_batch.py), every
    record checked, as one unstamped batch of this format holding them as sent (codec CODEC_KAFKA), with
    their idempotent producer's id, epoch and first sequence. Writable: the node stamps it in place."""
    checked = kafka_batch.check_batches(records)
    attributes = _KAFKA_ATTRIBUTE | (APPEND_TIME if checked.no_timestamp else 0)
    tail = _TAIL.pack(MAGIC, attributes, 0, -1, checked.record_count, -1, checked.max_ts_ms, checked.producer_id,
                      checked.producer_epoch, checked.base_sequence, len(records))
    out = bytearray(4) + tail + records
    struct.pack_into(">I", out, 0, crc32c(tail, crc32c(records)))
    return out


def iter_batches(buf: Buffer, *, crc_checked: bool = False) -> Iterator[tuple[BatchHeader, memoryview]]:
    """Yield (header, payload memoryview) for each batch in a concatenation of stored batches, verified;
    with ``crc_checked`` (batches this process read from its store a moment ago, which checked every CRC)
    their format and lengths only, so the node's fetch does not run a second CRC pass over them."""
    view = memoryview(buf)
    at, end = 0, len(buf)
    while at < end:
        if crc_checked:
            header = read_header(view, at)
            _check_format(header)
            if at + HEADER_BYTES + header[11] > end:
                raise CorruptRecord(f"batch payload_len {header[11]} runs past the {end - at} bytes given")
        else:
            header = verify(view, at)
        start = at + HEADER_BYTES
        at = start + header[11]
        yield header, view[start:at]


def read_columns(payload: Buffer, record_count: int, attributes: int = 0) -> list[list[Any] | None]:
    """The columns of a payload as stored, ``[timestamps, keys, values, headers]``, each checked to hold
    ``record_count`` items; a column but ``values`` is None when no record has one. ``attributes``: its
    batch header's, which name the codec (0: packed uncompressed; CODEC_KAFKA: Kafka batches, converted)."""
    if holds_kafka(attributes):
        return kafka_batch.columns(payload, record_count)
    try:
        columns = msgpack.unpackb(decompress(payload, attributes), raw=False, use_list=True)
    except ValueError as exc:  # msgpack's errors (extra data, bad format, bad UTF-8) are ValueErrors
        raise CorruptRecord(f"payload of {record_count} records is not msgpack: {exc}") from None
    if (type(columns) is not list or len(columns) != 4 or type(columns[2]) is not list
            or any(c is not None and (type(c) is not list or len(c) != record_count) for c in columns)):
        raise CorruptRecord(f"payload is not the four columns of {record_count} records")
    return columns
