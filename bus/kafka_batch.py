"""Kafka's RecordBatch (magic 2), read: the second format a node stores (bus/batch.py's ``CODEC_KAFKA``), and
what a bus reader decodes it with. A format leaf like bus/batch.py: bytes in, records out, no sockets, no clock.

A Kafka producer's batches are stored as sent, inside a bus batch header (docs/storage.md): the node stamps
each one's baseOffset and partitionLeaderEpoch (the two fields Kafka's own CRC leaves out, as a Kafka broker
does) and nothing else, so a Kafka consumer is served the stored bytes, and only a bus consumer converts
them, here, into the four columns a bus batch holds (``columns``).

Kafka's layout (big-endian; https://kafka.apache.org/documentation/#recordbatch)::

    baseOffset i64, batchLength i32 (bytes after this field), partitionLeaderEpoch i32, magic i8 (2),
    crc u32 (CRC-32C of everything after it), attributes i16 (bits 0-2 codec, bit 3 LogAppendTime,
    bit 4 transactional, bit 5 control), lastOffsetDelta i32, baseTimestamp i64, maxTimestamp i64,
    producerId i64, producerEpoch i16, baseSequence i32, recordCount i32, then the records:
    length varint, attributes i8, timestampDelta varlong, offsetDelta varint, key (varint length, -1 null),
    value (the same), header count varint, each header's key (varint length, UTF-8) and value (nullable).

Refused, never guessed at: a batch whose CRC, magic, lengths, record count or offset deltas do not hold
(``CorruptRecord``: Kafka's CORRUPT_MESSAGE); transactional and control batches, batches claiming
LogAppendTime (the broker's to set), and compressed ones other than gzip, snappy, lz4 and zstd
(``UnsupportedBatch``, ``UnsupportedCompression``); a payload that decompresses past
``UNCOMPRESSED_BYTES_MAX`` (a decompression bomb: checked while decompressing, never after).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, NamedTuple

import cramjam
import lz4.frame
import zstandard
from crc32c import crc32c

from .errors import CorruptRecord
from .records import Buffer

# An idempotent producer's sequence numbers are int32 and wrap from SEQUENCE_MAX to 0, as Kafka's do
# (DefaultRecordBatch.incrementSequence), in Kafka's batches and the bus's alike: a producer id and epoch go
# on past 2**31 records per partition (18 minutes of one partition at 2 M records/s), and a batch may span
# the wrap.
SEQUENCE_MAX = (1 << 31) - 1


def sequence_after(sequence: int, delta: int) -> int:
    """The sequence ``delta`` (>= 0) records after ``sequence`` (>= 0), wrapping past SEQUENCE_MAX to 0."""
    return (sequence + delta) & SEQUENCE_MAX


MAGIC = 2
HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_BYTES = HEADER.size  # 61
CRC_AT = 17  # crc field offset; the CRC covers bytes from 21 (attributes) to the end
CRC_FROM = 21
LENGTH_PREFIX_BYTES = 12  # baseOffset and batchLength: batchLength counts what follows them
LEADER_EPOCH_AT = 12  # partitionLeaderEpoch, after baseOffset and batchLength
CODEC_MASK = 0x07
CODEC_NONE, CODEC_GZIP, CODEC_SNAPPY, CODEC_LZ4, CODEC_ZSTD = 0, 1, 2, 3, 4
LOG_APPEND_TIME = 0x08
TRANSACTIONAL = 0x10
CONTROL = 0x20
# The bound on one batch's records once decompressed: the bus's own (bus/batch.py, which imports this module
# and asserts the two are one), so a reader's memory for one batch is bounded alike in either format.
UNCOMPRESSED_BYTES_MAX = 16 << 20
assert HEADER_BYTES == 61


class UnsupportedCompression(CorruptRecord):
    """A codec Kafka does not have (attributes bits 0-2 above 4): nothing is written."""

    kafka_code = 76  # UNSUPPORTED_COMPRESSION_TYPE


class UnsupportedBatch(CorruptRecord):
    """A transactional or control batch (no transactions yet): nothing is written."""

    kafka_code = 87  # INVALID_RECORD


# -- varints (zigzag, as Kafka's records use) --------------------------------------------------------

def _read_varint(buf: Buffer, at: int) -> tuple[int, int]:
    """A zigzag varint (up to 64 bits) at ``at``: (value, next position)."""
    shift = result = 0
    end = len(buf)
    while True:
        if at >= end:
            raise CorruptRecord("record runs past the end of its batch")
        byte = buf[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), at
        shift += 7
        if shift > 63:
            raise CorruptRecord("varint longer than 10 bytes")


def write_varint(out: bytearray, value: int) -> None:
    value = (value << 1) ^ (value >> 63)
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_bytes(buf: Buffer, at: int) -> tuple[bytes | None, int]:
    length, at = _read_varint(buf, at)
    if length < 0:
        if length != -1:
            raise CorruptRecord(f"field length {length}")
        return None, at
    if at + length > len(buf):
        raise CorruptRecord("field runs past the end of its record")
    return bytes(buf[at:at + length]), at + length


def _write_bytes(out: bytearray, value: Buffer | None) -> None:
    if value is None:
        out.append(1)  # zigzag(-1)
    else:
        write_varint(out, len(value))
        out += value


# -- reading Kafka's batches ---------------------------------------------------------------------------

def split_batches(records: Buffer) -> list[memoryview]:
    """The Kafka batches in a produce's ``records`` field (memoryviews), each checked for length only."""
    view, at, out = memoryview(records), 0, []
    while at < len(view):
        if len(view) - at < HEADER_BYTES:
            raise CorruptRecord(f"{len(view) - at} bytes left, shorter than a {HEADER_BYTES}-byte batch header")
        length = struct.unpack_from(">i", view, at + 8)[0]
        end = at + LENGTH_PREFIX_BYTES + length
        if length < HEADER_BYTES - LENGTH_PREFIX_BYTES or end > len(view):
            raise CorruptRecord(f"batch length {length} does not fit the {len(view) - at} bytes given")
        out.append(view[at:end])
        at = end
    return out


def _decompress(codec: int, data: Buffer) -> bytes:
    bound = UNCOMPRESSED_BYTES_MAX
    try:
        if codec == CODEC_GZIP:
            inflater = zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
            raw = inflater.decompress(data, bound)
            if inflater.unconsumed_tail or not inflater.eof:
                raise CorruptRecord(f"gzip payload is truncated or decompresses past {bound} bytes")
            return raw
        if codec == CODEC_LZ4:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            raw = bytes(decompressor.decompress(data, max_length=bound))
            if not decompressor.eof:
                raise CorruptRecord(f"lz4 payload is truncated or decompresses past {bound} bytes")
            return raw
        if codec == CODEC_ZSTD:
            size = zstandard.frame_content_size(data)
            if size > bound:
                raise CorruptRecord(f"zstd frame claims {size} bytes, above {bound}")
            # A frame without its content size (-1) is decompressed into at most the bound.
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=bound if size < 0 else 0)
        if codec == CODEC_SNAPPY:
            return _snappy(memoryview(data), bound)
    except (zlib.error, RuntimeError, zstandard.ZstdError, cramjam.DecompressionError) as exc:
        raise CorruptRecord(f"compressed records do not decompress: {exc}") from None
    raise UnsupportedCompression(f"compression codec {codec} is not known; Kafka's are none, gzip, snappy, lz4 "
                                 "and zstd")


_XERIAL_MAGIC = b"\x82SNAPPY\x00"  # the Java client's snappy framing: 16-byte header, then sized blocks
_XERIAL_HEADER_BYTES = 16


def _snappy(data: memoryview, bound: int) -> bytes:
    """Kafka's snappy: raw snappy (librdkafka), or xerial-framed blocks of raw snappy (the Java client).
    Each block's claimed length (its preamble) is checked against what is left of ``bound`` before a buffer
    of exactly that size is made and decompressed into."""
    if bytes(data[:8]) != _XERIAL_MAGIC:
        return _snappy_raw(data, bound)
    out, at, total = [], _XERIAL_HEADER_BYTES, 0
    while at < len(data):
        if at + 4 > len(data):
            raise CorruptRecord("xerial snappy block length runs past the records")
        size = int.from_bytes(data[at:at + 4], "big")
        at += 4
        if size <= 0 or at + size > len(data):
            raise CorruptRecord(f"xerial snappy block of {size} bytes does not fit the records")
        block = _snappy_raw(data[at:at + size], bound - total)
        at += size
        total += len(block)
        out.append(block)
    return b"".join(out)


def _snappy_raw(block: memoryview, bound: int) -> bytes:
    claimed, shift, at = 0, 0, 0
    while True:  # the preamble: the uncompressed length, an unsigned varint of at most 5 bytes
        if at >= len(block) or at >= 5:
            raise CorruptRecord("snappy preamble is truncated or too long")
        byte = block[at]
        claimed |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            break
        shift += 7
    if claimed > bound:
        raise CorruptRecord(f"snappy block claims {claimed} bytes, past the {bound} left of the bound")
    out = bytearray(claimed)
    written = cramjam.snappy.decompress_raw_into(bytes(block), out)
    if written != claimed:
        raise CorruptRecord(f"snappy block decompressed to {written} bytes, its preamble claims {claimed}")
    return bytes(out)


class Decoded(NamedTuple):
    record_count: int
    flat: list[Any]  # timestamp ms or None, key, value, headers per record, as bus.batch.pack_batch takes them
    producer_id: int  # -1 for none; else the idempotent producer's, with its epoch and first sequence
    producer_epoch: int
    base_sequence: int


def _checked(view: memoryview) -> tuple[tuple[Any, ...], bytes]:
    """One Kafka batch's header fields, checked (magic, CRC-32C, flags, record count, producer fields), and
    its records' bytes (decompressed)."""
    fields = HEADER.unpack_from(view, 0)
    _, _, _, magic, crc, attributes, last_delta, _, _, producer_id, producer_epoch, base_sequence, count = fields
    if magic != MAGIC:
        raise CorruptRecord(f"batch magic {magic}: only record batches of magic 2 are taken")
    if crc32c(view[CRC_FROM:]) != crc:
        raise CorruptRecord("CRC-32C mismatch in produced batch")
    if attributes & (TRANSACTIONAL | CONTROL):
        raise UnsupportedBatch("transactional and control batches are not supported yet")
    if count <= 0 or last_delta != count - 1:
        raise CorruptRecord(f"batch claims {count} records and a last offset delta of {last_delta}")
    if producer_id >= 0 and (producer_epoch < 0 or base_sequence < 0):
        raise CorruptRecord(f"producer id {producer_id} with epoch {producer_epoch}, base sequence {base_sequence}")
    codec = attributes & CODEC_MASK
    # bytes, not a view: indexing and slicing bytes is the faster (and the slices are the records' bytes)
    return fields, bytes(view[HEADER_BYTES:]) if codec == CODEC_NONE else _decompress(codec, view[HEADER_BYTES:])


def decode_batch(view: memoryview) -> Decoded:
    """One Kafka batch (as ``split_batches`` gives it) checked (``_checked``, and every record's fields and
    offset delta), its records as ``bus.batch.pack_batch`` takes them."""
    fields, body = _checked(view)
    attributes, base_ts, producer_id, count = fields[5], fields[7], fields[9], fields[12]
    log_append = bool(attributes & LOG_APPEND_TIME)
    try:
        flat = _decode_records(body, count, base_ts if not log_append and base_ts >= 0 else None)
    except IndexError:
        raise CorruptRecord("a record runs past the end of its batch") from None
    if producer_id < 0:
        return Decoded(count, flat, -1, -1, -1)
    return Decoded(count, flat, producer_id, fields[10], fields[11])


def _decode_records(body: bytes, count: int, base_ts: int | None) -> list[Any]:
    """The ``count`` records of a batch's (uncompressed) ``body``, flat. The varints that are one byte (every
    offset delta below 64, most lengths and timestamp deltas) are read inline, the others by read_varint:
    the per-record cost here is what a Kafka producer's record costs the node. IndexError past the end."""
    read_varint = _read_varint
    flat: list[Any] = []
    at, end = 0, len(body)
    key: bytes | None
    value: bytes | None
    for index in range(count):
        byte = body[at]
        if byte < 0x80:
            size, at = (byte >> 1) ^ -(byte & 1), at + 1
        elif body[at + 1] < 0x80:  # two bytes: records of 64 to 8,191 bytes
            raw = (byte & 0x7F) | (body[at + 1] << 7)
            size, at = (raw >> 1) ^ -(raw & 1), at + 2
        else:
            size, at = read_varint(body, at)
        stop = at + size
        if size < 0 or stop > end:
            raise CorruptRecord(f"record {index} of {size} bytes runs past its batch")
        at += 1  # record attributes: unused
        byte = body[at]
        if byte < 0x80:
            ts_delta, at = (byte >> 1) ^ -(byte & 1), at + 1
        elif body[at + 1] < 0x80:
            raw = (byte & 0x7F) | (body[at + 1] << 7)
            ts_delta, at = (raw >> 1) ^ -(raw & 1), at + 2
        else:
            ts_delta, at = read_varint(body, at)
        byte = body[at]
        if byte < 0x80:
            offset_delta, at = (byte >> 1) ^ -(byte & 1), at + 1
        elif body[at + 1] < 0x80:  # offset deltas 64 to 8,191
            raw = (byte & 0x7F) | (body[at + 1] << 7)
            offset_delta, at = (raw >> 1) ^ -(raw & 1), at + 2
        else:
            offset_delta, at = read_varint(body, at)
        if offset_delta != index:
            raise CorruptRecord(f"record {index} has offset delta {offset_delta}")
        byte = body[at]
        if byte == 1:  # a null key, the usual case
            key, at = None, at + 1
        elif byte < 0x80 and not byte & 1:
            at += 1
            key, at = body[at:at + (byte >> 1)], at + (byte >> 1)
        else:
            key, at = _read_bytes(body, at)
        byte = body[at]
        if byte != 1 and not byte & 1 and (byte < 0x80 or body[at + 1] < 0x80):  # a length of 1 or 2 bytes
            if byte < 0x80:
                length, at = byte >> 1, at + 1
            else:
                length, at = ((byte & 0x7F) | (body[at + 1] << 7)) >> 1, at + 2
            if at + length > stop:
                raise CorruptRecord(f"record {index}'s value runs past it")
            value, at = body[at:at + length], at + length
        else:
            value, at = _read_bytes(body, at)
        byte = body[at]
        if byte == 0:
            header_count, at = 0, at + 1
        else:
            header_count, at = read_varint(body, at)
        headers = None
        if header_count:
            if header_count < 0 or header_count > size:
                raise CorruptRecord(f"record {index} claims {header_count} headers")
            headers = []
            for _ in range(header_count):
                name, at = _read_bytes(body, at)
                header_value, at = _read_bytes(body, at)
                if name is None:
                    raise CorruptRecord(f"record {index} has a header without a name")
                try:
                    headers.append((name.decode(), header_value))
                except UnicodeDecodeError:
                    raise CorruptRecord(f"record {index} has a header name that is not UTF-8") from None
        if at != stop:
            raise CorruptRecord(f"record {index} is {size} bytes but its fields take {size + at - stop}")
        flat += (None if base_ts is None else base_ts + ts_delta, key, value, headers)
    if at != end:
        raise CorruptRecord(f"{end - at} bytes after the batch's {count} records")
    return flat


class Checked(NamedTuple):
    """What a bus batch header says of the Kafka batches it holds (``check_batches``)."""
    record_count: int
    max_ts_ms: int  # the largest record timestamp; -1 when no record has one
    no_timestamp: bool  # some batch's records have none (baseTimestamp -1): they take the append time
    producer_id: int
    producer_epoch: int
    base_sequence: int


def check_batches(records: Buffer) -> Checked:
    """A produce's ``records`` for one partition (one Kafka batch or more) checked, as a Kafka broker checks
    what it stores, and described for the bus batch header that will hold them: each batch's header
    (``_checked``) and its records' framing, walked without decoding their keys, values and headers
    (``_walk_records``: each record's length, offset delta and timestamp, the records filling the batch
    exactly). A reader decodes those fields, and refuses a batch whose fields do not hold (CorruptRecord).
    More than one batch must be one producer's consecutive sequences."""
    views = split_batches(records)
    if not views:
        raise CorruptRecord("no records")
    count, max_ts_ms, no_timestamp = 0, -1, False
    first: tuple[int, int, int] | None = None
    for view in views:
        fields, body = _checked(view)
        attributes, base_ts, producer = fields[5], fields[7], fields[9:12]
        if first is None:
            first = tuple(producer) if producer[0] >= 0 else (-1, -1, -1)
        elif producer[:2] != first[:2] or (first[0] >= 0 and producer[2] != sequence_after(first[2], count)):
            raise CorruptRecord("the batches of one partition are not one producer's consecutive sequences")
        if attributes & LOG_APPEND_TIME:
            raise UnsupportedBatch("a produced batch claims LogAppendTime, which is the broker's to set")
        try:
            max_delta = _walk_records(body, fields[12])
        except IndexError:
            raise CorruptRecord("a record runs past the end of its batch") from None
        if base_ts < 0:  # NO_TIMESTAMP: no record of the batch has one
            no_timestamp = True
        else:  # the records' own, not maxTimestamp's claim: retention and the time index read this
            max_ts_ms = max(max_ts_ms, base_ts + max_delta)
        count += fields[12]
    assert first is not None
    return Checked(count, max_ts_ms, no_timestamp, *first)


def _walk_records(body: bytes, count: int) -> int:
    """Check that ``body`` holds exactly ``count`` records, each of its stated length, with offset deltas 0,
    1, ...: the records' framing, read as _decode_records reads it but without their keys, values and
    headers (a third of the per-record time). Returns the largest timestamp delta. IndexError past the end."""
    read_varint = _read_varint
    at, end, max_delta = 0, len(body), 0
    for index in range(count):
        byte = body[at]
        if byte < 0x80:
            size, at = (byte >> 1) ^ -(byte & 1), at + 1
        elif body[at + 1] < 0x80:
            raw = (byte & 0x7F) | (body[at + 1] << 7)
            size, at = (raw >> 1) ^ -(raw & 1), at + 2
        else:
            size, at = read_varint(body, at)
        stop = at + size
        if size < 3 or stop > end:  # attributes, a timestamp delta and an offset delta at the least
            raise CorruptRecord(f"record {index} of {size} bytes runs past its batch")
        at += 1  # record attributes: unused
        byte = body[at]
        if byte < 0x80:
            ts_delta, at = (byte >> 1) ^ -(byte & 1), at + 1
        elif body[at + 1] < 0x80:
            raw = (byte & 0x7F) | (body[at + 1] << 7)
            ts_delta, at = (raw >> 1) ^ -(raw & 1), at + 2
        else:
            ts_delta, at = read_varint(body, at)
        if ts_delta > max_delta:
            max_delta = ts_delta
        byte = body[at]
        if byte < 0x80:
            offset_delta = (byte >> 1) ^ -(byte & 1)
        elif body[at + 1] < 0x80:  # offset deltas 64 to 8,191
            raw = (byte & 0x7F) | (body[at + 1] << 7)
            offset_delta = (raw >> 1) ^ -(raw & 1)
        else:
            offset_delta = read_varint(body, at)[0]
        if offset_delta != index or at >= stop:
            raise CorruptRecord(f"record {index} has offset delta {offset_delta}")
        at = stop
    if at != end:
        raise CorruptRecord(f"{end - at} bytes after the batch's {count} records")
    return max_delta


def stamp_offsets(buf: bytearray | memoryview, at: int, end: int, base_offset: int, leader_epoch: int, record_count: int) -> None:
    """Give the Kafka batches in ``buf[at:end]`` (holding ``record_count`` records) their offsets from
    ``base_offset`` and ``leader_epoch``, in place: the two fields outside Kafka's CRC, which a broker sets.
    CorruptRecord, before anything is written, unless the batches fill the span exactly with that many
    records (a cheap check of the layout only: ``check_batches`` checked the records when they came in)."""
    spans, total = [], 0
    for view in split_batches(memoryview(buf)[at:end]):
        fields = HEADER.unpack_from(view)
        magic, last_delta, count = fields[3], fields[6], fields[12]
        if magic != MAGIC or count <= 0 or last_delta != count - 1:
            raise CorruptRecord(f"stored Kafka batch of magic {magic} claims {count} records, "
                                f"last offset delta {last_delta}")
        spans.append((len(view), count))
        total += count
    if total != record_count:
        raise CorruptRecord(f"Kafka batches hold {total} records, their bus batch claims {record_count}")
    for length, count in spans:
        struct.pack_into(">q", buf, at, base_offset)
        struct.pack_into(">i", buf, at + LEADER_EPOCH_AT, leader_epoch)
        at, base_offset = at + length, base_offset + count


def columns(payload: Buffer, record_count: int) -> list[list[Any] | None]:
    """The records of stored Kafka batches as a bus batch's four columns, ``[timestamps, keys, values,
    headers]`` (bus/batch.py's ``read_columns``): a timestamp is None for a record without one."""
    flat = []
    for view in split_batches(payload):
        flat += decode_batch(view).flat
    if len(flat) != 4 * record_count:
        raise CorruptRecord(f"Kafka batches hold {len(flat) // 4} records, their bus batch claims {record_count}")
    stamps, keys, headers = flat[0::4], flat[1::4], flat[3::4]
    return [None if stamps.count(None) == record_count else stamps,
            None if keys.count(None) == record_count else keys, flat[2::4],
            None if headers.count(None) == record_count else headers]
