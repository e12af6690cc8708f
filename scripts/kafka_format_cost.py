"""The cost of each path a Kafka batch or a bus batch takes between the protocols (docs/kafka.md, Storage):
one batch of 100 keyed records of 100 bytes, microseconds per batch, the minimum of 5 timeit runs.

    python scripts/kafka_format_cost.py
"""

from __future__ import annotations

import timeit

from kafka.record.default_records import DefaultRecordBatchBuilder

from bus import batch as bus_batch
from nodes.kafka import records

RECORDS = 100


def _us(fn, number: int = 2000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    rows = [(1_700_000_000_000 + i, b"key-%06d" % i, bytes(100)) for i in range(RECORDS)]
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 22)
    for offset, (ts, key, value) in enumerate(rows):
        builder.append(offset, timestamp=ts, key=key, value=value, headers=[])
    sent = bytes(builder.build())
    wrapped = bus_batch.wrap_kafka(sent)
    kafka_stored = bytes(bus_batch.stamp(bytearray(wrapped), 100, 1, 3)[0])
    flat = [x for ts, key, value in rows for x in (ts, key, value, None)]
    bus_stored = bytes(bus_batch.stamp(bytearray(bus_batch.pack_batch(flat, RECORDS)), 100, 1, 3)[0])
    kafka_attributes = bus_batch.verify(kafka_stored).attributes
    figures = [
        ("produce: a Kafka batch checked and wrapped", lambda: bus_batch.wrap_kafka(sent)),
        ("produce: the node stamps it", lambda: bus_batch.stamp(bytearray(wrapped), 100, 1, 3)),
        ("fetch by a Kafka consumer of a Kafka producer's batch", lambda: records.as_kafka(kafka_stored)),
        ("fetch by a Kafka consumer of a bus producer's batch", lambda: records.as_kafka(bus_stored)),
        ("a bus consumer decoding a Kafka producer's batch",
         lambda: bus_batch.read_columns(kafka_stored[bus_batch.HEADER_BYTES:], RECORDS, kafka_attributes)),
        ("a bus consumer decoding a bus producer's batch",
         lambda: bus_batch.read_columns(bus_stored[bus_batch.HEADER_BYTES:], RECORDS)),
    ]
    for name, fn in figures:
        print(f"{_us(fn):8.1f} us  {name}")


if __name__ == "__main__":
    main()
