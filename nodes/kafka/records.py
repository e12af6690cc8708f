"""Kafka's RecordBatch (magic 2) to and from the bus's batch (bus/batch.py): the conversion at the edge of
the Kafka listener, for this first step of issue 13 (docs/kafka.md).

A Kafka producer's batch is converted once, on produce, into a bus batch holding the same records (key,
value, headers, timestamp) and stored like any other; a Kafka consumer's fetch converts each stored bus batch
back into one Kafka batch with the same base offset, so offsets are the same on both sides. Pure: bytes in,
bytes out, no sockets, no clock.

Kafka's layout (big-endian; https://kafka.apache.org/documentation/#recordbatch)::

    baseOffset i64, batchLength i32 (bytes after this field), partitionLeaderEpoch i32, magic i8 (2),
    crc u32 (CRC-32C of everything after it), attributes i16 (bits 0-2 codec, bit 3 LogAppendTime,
    bit 4 transactional, bit 5 control), lastOffsetDelta i32, baseTimestamp i64, maxTimestamp i64,
    producerId i64, producerEpoch i16, baseSequence i32, recordCount i32, then the records:
    length varint, attributes i8, timestampDelta varlong, offsetDelta varint, key (varint length, -1 null),
    value (the same), header count varint, each header's key (varint length, UTF-8) and value (nullable).

Refused, never guessed at: a batch whose CRC, magic, lengths, record count or offset deltas do not hold
(``CorruptRecord``: Kafka's CORRUPT_MESSAGE); transactional and control batches and compressed ones other
than gzip, snappy, lz4 and zstd (``UnsupportedBatch``, ``UnsupportedCompression``); a payload that decompresses past
``UNCOMPRESSED_BYTES_MAX`` (a decompression bomb: checked while decompressing, never after).
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

import cramjam
import lz4.frame
import zstandard
from crc32c import crc32c

from bus import batch as bus_batch
from bus.errors import CorruptRecord

MAGIC = 2
HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_BYTES = HEADER.size  # 61
_CRC_AT = 17  # crc field offset; the CRC covers bytes from 21 (attributes) to the end
_CRC_FROM = 21
_LENGTH_PREFIX_BYTES = 12  # baseOffset and batchLength: batchLength counts what follows them
CODEC_MASK = 0x07
CODEC_NONE, CODEC_GZIP, CODEC_SNAPPY, CODEC_LZ4, CODEC_ZSTD = 0, 1, 2, 3, 4
LOG_APPEND_TIME = 0x08
TRANSACTIONAL = 0x10
CONTROL = 0x20
UNCOMPRESSED_BYTES_MAX = bus_batch.UNCOMPRESSED_BYTES_MAX  # the bound on one batch's records, as the bus's
assert HEADER_BYTES == 61


class UnsupportedCompression(CorruptRecord):
    """A codec Kafka does not have (attributes bits 0-2 above 4): nothing is written."""

    kafka_code = 76  # UNSUPPORTED_COMPRESSION_TYPE


class UnsupportedBatch(CorruptRecord):
    """A transactional or control batch (no transactions yet): nothing is written."""

    kafka_code = 87  # INVALID_RECORD


# -- varints (zigzag, as Kafka's records use) --------------------------------------------------------

def _read_varint(buf, at: int) -> tuple[int, int]:
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


def _write_varint(out: bytearray, value: int) -> None:
    value = (value << 1) ^ (value >> 63)
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_bytes(buf, at: int) -> tuple[bytes | None, int]:
    length, at = _read_varint(buf, at)
    if length < 0:
        if length != -1:
            raise CorruptRecord(f"field length {length}")
        return None, at
    if at + length > len(buf):
        raise CorruptRecord("field runs past the end of its record")
    return bytes(buf[at:at + length]), at + length


def _write_bytes(out: bytearray, value) -> None:
    if value is None:
        out.append(1)  # zigzag(-1)
    else:
        _write_varint(out, len(value))
        out += value


# -- Kafka -> bus (produce) --------------------------------------------------------------------------

def split_batches(records) -> list:
    """The Kafka batches in a produce's ``records`` field (memoryviews), each checked for length only."""
    view, at, out = memoryview(records), 0, []
    while at < len(view):
        if len(view) - at < HEADER_BYTES:
            raise CorruptRecord(f"{len(view) - at} bytes left, shorter than a {HEADER_BYTES}-byte batch header")
        length = struct.unpack_from(">i", view, at + 8)[0]
        end = at + _LENGTH_PREFIX_BYTES + length
        if length < HEADER_BYTES - _LENGTH_PREFIX_BYTES or end > len(view):
            raise CorruptRecord(f"batch length {length} does not fit the {len(view) - at} bytes given")
        out.append(view[at:end])
        at = end
    return out


def _decompress(codec: int, data) -> bytes:
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
            raw = decompressor.decompress(data, max_length=bound)
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
    flat: list  # timestamp ms or None, key, value, headers per record, as bus.batch.pack_batch takes them
    producer_id: int  # -1 for none; else the idempotent producer's, with its epoch and first sequence
    producer_epoch: int
    base_sequence: int


def decode_batch(view) -> Decoded:
    """One Kafka batch (as ``split_batches`` gives it) checked (magic, CRC-32C, lengths, record count,
    offset deltas), its records as ``bus.batch.pack_batch`` takes them."""
    (_, length, _, magic, crc, attributes, last_delta, base_ts, max_ts, producer_id, producer_epoch, base_sequence,
     count) = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptRecord(f"batch magic {magic}: only record batches of magic 2 are taken")
    if crc32c(view[_CRC_FROM:]) != crc:
        raise CorruptRecord("CRC-32C mismatch in produced batch")
    if attributes & (TRANSACTIONAL | CONTROL):
        raise UnsupportedBatch("transactional and control batches are not supported yet")
    if count <= 0 or last_delta != count - 1:
        raise CorruptRecord(f"batch claims {count} records and a last offset delta of {last_delta}")
    codec = attributes & CODEC_MASK
    # bytes, not a view: indexing and slicing bytes is the faster (and the slices are the records' bytes)
    body = bytes(view[HEADER_BYTES:]) if codec == CODEC_NONE else _decompress(codec, view[HEADER_BYTES:])
    log_append = bool(attributes & LOG_APPEND_TIME)
    try:
        flat = _decode_records(body, count, base_ts if not log_append and base_ts >= 0 else None)
    except IndexError:
        raise CorruptRecord("a record runs past the end of its batch") from None
    if producer_id < 0:
        producer_epoch = base_sequence = -1
    elif producer_epoch < 0 or base_sequence < 0:
        raise CorruptRecord(f"producer id {producer_id} with epoch {producer_epoch}, base sequence {base_sequence}")
    return Decoded(count, flat, producer_id, producer_epoch, base_sequence)


def _decode_records(body: bytes, count: int, base_ts: int | None) -> list:
    """The ``count`` records of a batch's (uncompressed) ``body``, flat. The varints that are one byte (every
    offset delta below 64, most lengths and timestamp deltas) are read inline, the others by _read_varint:
    the per-record cost here is what a Kafka producer's record costs the node. IndexError past the end."""
    read_varint = _read_varint
    flat, at, end = [], 0, len(body)
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


def to_bus_batches(records) -> tuple[bytes, int]:
    """A produce's ``records`` for one partition (one Kafka batch or more) as one bus batch, unstamped as a
    bus producer would send it, with the idempotent producer's id, epoch and first sequence: (bytes, record
    count). More than one batch must be one producer's consecutive sequences."""
    decoded = [decode_batch(view) for view in split_batches(records)]
    if not decoded:
        raise CorruptRecord("no records")
    first = decoded[0]
    flat, count = [], 0
    for batch in decoded:
        if (batch.producer_id, batch.producer_epoch) != (first.producer_id, first.producer_epoch) or (
                first.producer_id >= 0 and batch.base_sequence != first.base_sequence + count):
            raise CorruptRecord("the batches of one partition are not one producer's consecutive sequences")
        flat += batch.flat
        count += batch.record_count
    return bus_batch.pack_batch(flat, count, first.producer_id, first.producer_epoch, first.base_sequence), count


# -- bus -> Kafka (fetch) ----------------------------------------------------------------------------

def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    _write_varint(out, value)
    return bytes(out)


# The zigzag varints of 0 .. VARINT_TABLE_SIZE - 1, looked up rather than computed: a record's offset delta,
# its timestamp delta and its lengths are almost always below it, and one lookup is several times faster
# than the loop in _write_varint.
VARINT_TABLE_SIZE = 1 << 14
_VARINTS = [_varint_bytes(v) for v in range(VARINT_TABLE_SIZE)]
_NULL_FIELD = b"\x01"  # zigzag(-1): a null key, value or header value


def _field(value) -> bytes:
    """A nullable bytes field: its varint length, then its bytes."""
    if value is None:
        return _NULL_FIELD
    length = len(value)
    return (_VARINTS[length] if length < VARINT_TABLE_SIZE else _varint_bytes(length)) + value


def encode_batch(base_offset: int, leader_epoch: int, records: list, *, log_append_ts_ms: int | None = None,
                 producer_id: int = -1, producer_epoch: int = -1, base_sequence: int = -1) -> bytes:
    """A Kafka batch (magic 2, uncompressed) of ``records``: (timestamp ms, key, value, headers) each, at
    offsets from ``base_offset``. With ``log_append_ts_ms`` the batch is LogAppendTime and every record
    has that timestamp (Kafka's consumers read it from maxTimestamp)."""
    assert records
    if log_append_ts_ms is not None:
        attributes, base_ts, max_ts = LOG_APPEND_TIME, log_append_ts_ms, log_append_ts_ms
    else:
        attributes = 0
        stamps = [r[0] for r in records]
        base_ts, max_ts = stamps[0], max(stamps)
    varints, table_size = _VARINTS, VARINT_TABLE_SIZE
    parts = []
    append = parts.append
    for index, (timestamp, key, value, headers) in enumerate(records):
        delta = 0 if log_append_ts_ms is not None else timestamp - base_ts
        record = b"".join((
            b"\0",  # attributes
            varints[delta] if 0 <= delta < table_size else _varint_bytes(delta),
            varints[index] if index < table_size else _varint_bytes(index),
            _field(key), _field(value),
            b"\0" if not headers else _varint_bytes(len(headers)) + b"".join(
                _field(name.encode() if isinstance(name, str) else name) + _field(header_value)
                for name, header_value in headers)))
        size = len(record)
        append(varints[size] if size < table_size else _varint_bytes(size))
        append(record)
    body = b"".join(parts)
    count = len(records)
    header = bytearray(HEADER.pack(base_offset, HEADER_BYTES - _LENGTH_PREFIX_BYTES + len(body), leader_epoch,
                                   MAGIC, 0, attributes, count - 1, base_ts, max_ts, producer_id, producer_epoch,
                                   base_sequence, count))
    crc = crc32c(body, crc32c(memoryview(header)[_CRC_FROM:]))
    struct.pack_into(">I", header, _CRC_AT, crc)
    return bytes(header) + body


def from_bus_batches(data, skip_below: int = 0) -> bytes:
    """Stored bus batches (concatenated, as a fetch reads them) as Kafka batches, one for one with the same
    base offsets; a batch ending at or below ``skip_below`` is left out (the consumer asked from there)."""
    out = []
    for header, payload in bus_batch.iter_batches(data):
        if header.next_offset <= skip_below:
            continue
        stamps, keys, values, headers = bus_batch.read_columns(payload, header.record_count, header.attributes)
        count = header.record_count
        if stamps is None:
            records = list(zip([None] * count, keys or [None] * count, values, headers or [None] * count))
            log_append = header.append_ts_ms
        else:
            append_ts = header.append_ts_ms
            stamps = [append_ts if ts is None else ts for ts in stamps]
            records = list(zip(stamps, keys or [None] * count, values, headers or [None] * count))
            log_append = None
        out.append(encode_batch(header.base_offset, header.leader_epoch, records, log_append_ts_ms=log_append,
                                producer_id=header.producer_id, producer_epoch=header.producer_epoch,
                                base_sequence=header.base_sequence))
    return b"".join(out)
