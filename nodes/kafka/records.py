"""What a Kafka consumer's fetch is served (docs/kafka.md, docs/storage.md): the stored batches as Kafka's
RecordBatch (magic 2), one for one with the same base offsets, so offsets are the same on both sides. A batch
a Kafka producer wrote is stored as it was sent (bus/kafka_batch.py) and served untouched; a batch a bus
producer wrote is converted here, once per fetch that reads it. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

from bus import batch as bus_batch
from bus.kafka_batch import (CRC_AT, CRC_FROM, HEADER, HEADER_BYTES, LENGTH_PREFIX_BYTES, LOG_APPEND_TIME, MAGIC,
                             write_varint)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    write_varint(out, value)
    return bytes(out)


# The zigzag varints of 0 .. VARINT_TABLE_SIZE - 1, looked up rather than computed: a record's offset delta,
# its timestamp delta and its lengths are almost always below it, and one lookup is several times faster
# than the loop in write_varint.
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
    header = bytearray(HEADER.pack(base_offset, HEADER_BYTES - LENGTH_PREFIX_BYTES + len(body), leader_epoch,
                                   MAGIC, 0, attributes, count - 1, base_ts, max_ts, producer_id, producer_epoch,
                                   base_sequence, count))
    crc = crc32c(body, crc32c(memoryview(header)[CRC_FROM:]))
    struct.pack_into(">I", header, CRC_AT, crc)
    return bytes(header) + body


def as_kafka(data, skip_below: int = 0) -> bytes:
    """Stored batches (concatenated, as a fetch reads them) as Kafka batches with the same base offsets: a
    Kafka producer's as stored, a bus producer's converted; a batch ending at or below ``skip_below`` is
    left out (the consumer asked from there)."""
    out = []
    for header, payload in bus_batch.iter_batches(data, crc_checked=True):  # the node's read checked them
        if header.next_offset <= skip_below:
            continue
        if bus_batch.holds_kafka(header.attributes):
            out.append(payload)
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
