"""What fair polling costs against the draining order (docs/benchmarks.md, L), in one process, each order in
turn (the order reversed every round), medians:

    python scripts/fair_polling_cost.py cluster [RECORDS_PER_PARTITION] [ROUNDS] [PREFETCH_MB]
    python scripts/fair_polling_cost.py polling [BATCHES_PER_PARTITION] [ROUNDS] [POLL_RECORDS]

``cluster``: one node (a local cluster in a temporary directory), 4 partitions of 100-byte records, each round
reads them all with ``Consumer.poll(max_records=10_000)`` once fair and once draining: records/s, CPU per
record (every thread of this process) and the seconds poll() waited for the fetcher (the buffer empty).
``polling``: no fetcher and no sockets: 4 partitions' chunks (8 MB of 9,000-record batches each) fed to the
core (bus/positions.py) and read with the Consumer's decode: the polling thread's CPU per record alone.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time

from bus import Admin, Consumer, Producer, TopicPartition
from bus.batch import pack_batch, stamp
from bus.positions import Positions
from bus.rotation import take_draining, take_in_turn

ORDERS = (("fair", take_in_turn), ("drain", take_draining))
POLL_RECORDS = 10_000
BATCH_RECORDS = 9_000  # about what a producer's 1 MB batch holds of 100-byte records
CHUNK_BATCHES = 8  # a fetch's chunk per partition: max_partition_fetch_bytes, 8 MB


def _rounds(rounds: int):
    for r in range(rounds):
        yield from ORDERS if r % 2 == 0 else ORDERS[::-1]


def cluster(per_partition: int, rounds: int, prefetch_mb: int) -> None:
    from nodes.cluster import LocalCluster

    tps = [TopicPartition("fair", p) for p in range(4)]
    results: dict[str, list[tuple[float, float, float]]] = {"fair": [], "drain": []}
    with tempfile.TemporaryDirectory() as data_dir, LocalCluster(data_dir, 1) as local:
        with Admin(local.bootstrap) as admin:
            admin.create_topic("fair", len(tps), replication_factor=1)
        value = os.urandom(100)
        with Producer(local.bootstrap, acks=1) as producer:
            for tp in tps:
                for start in range(0, per_partition, 100_000):
                    producer.send_many("fair", [value] * min(100_000, per_partition - start), partition=tp.partition)
            producer.flush(300)
        for name, order in _rounds(rounds):
            with Consumer(local.bootstrap, auto_offset_reset="earliest", prefetch_bytes_max=prefetch_mb << 20) as c:
                c._take_order = order
                waited = [0.0]
                wait = c._data.wait

                def timed_wait(timeout: float | None = None) -> bool:
                    started = time.perf_counter()
                    try:
                        return wait(timeout)
                    finally:
                        waited[0] += time.perf_counter() - started

                c._data.wait = timed_wait  # type: ignore[method-assign]
                c.assign(tps)
                for tp in tps:
                    c.position(tp)
                got, want = 0, len(tps) * per_partition
                wall_0, cpu_0 = time.perf_counter(), time.process_time()
                while got < want:
                    got += len(c.poll(timeout_ms=5_000, max_records=POLL_RECORDS))
                wall, cpu = time.perf_counter() - wall_0, time.process_time() - cpu_0
                results[name].append((want / wall, cpu / want * 1e9, waited[0]))
                print(f"{name:5s} {want / wall / 1e6:.2f} M records/s, {cpu / want * 1e9:.0f} ns CPU per record, "
                      f"poll() waited {waited[0]:.2f} s of {wall:.2f}; load {os.getloadavg()[0]:.1f}", flush=True)
    fair, drain = ([statistics.median(x) for x in zip(*results[k])] for k in ("fair", "drain"))
    print(f"medians: fair {fair[0] / 1e6:.2f} M/s, drain {drain[0] / 1e6:.2f} M/s: {fair[0] / drain[0]:.2f}x the "
          f"records/s at {fair[1] / drain[1]:.2f}x the CPU per record; poll() waited {fair[2]:.2f} s fair, "
          f"{drain[2]:.2f} s draining")


def polling(batches: int, rounds: int, poll_records: int) -> None:
    value = os.urandom(100)
    flat = [field for _ in range(BATCH_RECORDS) for field in (None, None, value, None)]
    packed = pack_batch(flat, BATCH_RECORDS)
    stored = [bytes(stamp(packed, i * BATCH_RECORDS, 1_000)[0]) for i in range(batches)]
    tps = [TopicPartition("fair", p) for p in range(4)]
    total = len(tps) * batches * BATCH_RECORDS
    shell = Consumer.__new__(Consumer)  # only its _aged (the collector's ageing), never opened
    shell._lock = threading.Lock()
    results: dict[str, list[float]] = {"fair": [], "drain": []}
    for name, order in _rounds(rounds):
        core = Positions("earliest", 1 << 40)
        core.assign(tps, {tp: 0 for tp in tps})
        for tp in tps:
            for i in range(0, batches, CHUNK_BATCHES):
                part = stored[i:i + CHUNK_BATCHES]
                core.fetched([(tp, 0, i * BATCH_RECORDS, b"".join(part), (i + len(part)) * BATCH_RECORDS, 0)])
        got = 0
        cpu_0 = time.process_time()
        with shell._lock:
            while got < total:
                out: list = []
                order(core.ready, poll_records, lambda tp, n: core.take_from(tp, out, n, shell._aged))
                got += len(out)
                del out
        results[name].append((time.process_time() - cpu_0) / total * 1e9)
        print(f"{name:5s} {results[name][-1]:.0f} ns CPU per record; load {os.getloadavg()[0]:.1f}", flush=True)
    fair, drain = statistics.median(results["fair"]), statistics.median(results["drain"])
    print(f"medians: fair {fair:.0f} ns, drain {drain:.0f} ns per record: {fair / drain:.3f}x")


def main() -> None:
    mode, *args = sys.argv[1:] or ["cluster"]
    numbers = [int(a) for a in args]
    if mode == "cluster":
        cluster(*(numbers + [1_000_000, 6, 64][len(numbers):]))
    elif mode == "polling":
        polling(*(numbers + [48, 6, POLL_RECORDS][len(numbers):]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
