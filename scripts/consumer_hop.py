"""The consumer's own hop at a steady rate (docs/benchmarks.md, E): a producer process sends a 100-byte record
every 1/RATE s (linger 0, acks=1) to a one-node local cluster; this process's consumer times, for each
fetched chunk, from the fetcher thread's hand-over (Consumer._fetched) to poll()'s wait returning, and to
the return of the poll() that hands its first record out.

    python scripts/consumer_hop.py [RATE] [SECONDS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from bus import Admin, Consumer, TopicPartition

PRODUCER = r'''
import sys, time
from bus import Producer
bootstrap, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Producer(bootstrap, linger_ms=0, acks=1) as producer:
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        due = start + n / rate
        while time.perf_counter() < due:
            pass
        producer.send("hop", b"x" * 100, partition=0)
        n += 1
    producer.flush(30)
'''


def _quantiles(name: str, values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return f"{name}: none"
    at = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"{name}: p50 {at(0.5):.0f} us, p99 {at(0.99):.0f} us, max {values[-1]:.0f} us ({len(values)})"


def main() -> None:
    from nodes.cluster import LocalCluster

    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    with tempfile.TemporaryDirectory() as data_dir, LocalCluster(data_dir, 1) as local:
        with Admin(local.bootstrap) as admin:
            admin.create_topic("hop", 1, replication_factor=1)
        consumer = Consumer(local.bootstrap, auto_offset_reset="latest")
        tp = TopicPartition("hop", 0)
        consumer.assign([tp])
        consumer.position(tp)
        handed: dict[int, int] = {}  # a chunk's first offset -> perf_counter_ns at its hand-over
        woke = [0]
        fetched, wait = consumer._fetched, consumer._data.wait

        def timed_fetched(parts, fetched=fetched):  # type: ignore[no-untyped-def]
            parts = list(parts)
            now_ns = time.perf_counter_ns()
            for part in parts:
                if part[3]:
                    handed[part[2]] = now_ns
            fetched(parts)

        def timed_wait(timeout: float | None = None) -> bool:
            try:
                return wait(timeout)
            finally:
                woke[0] = time.perf_counter_ns()

        consumer._fetched = timed_fetched  # type: ignore[method-assign]
        consumer._data.wait = timed_wait  # type: ignore[method-assign]
        producer = subprocess.Popen([sys.executable, "-c", PRODUCER, local.bootstrap, str(rate), str(seconds)])
        to_return: list[float] = []
        to_wake: list[float] = []
        try:
            deadline_s = time.monotonic() + seconds + 10
            while producer.poll() is None and time.monotonic() < deadline_s:
                records = consumer.poll(timeout_ms=200)
                now_ns = time.perf_counter_ns()
                for r in records:
                    handed_ns = handed.pop(r.offset, None)
                    if handed_ns is not None:
                        to_return.append((now_ns - handed_ns) / 1000)
                        if woke[0] > handed_ns:
                            to_wake.append((woke[0] - handed_ns) / 1000)
        finally:
            producer.kill() if producer.poll() is None else None
            producer.wait()
            consumer.close()
    print(_quantiles("hand-over -> poll() returns", to_return))
    print(_quantiles("hand-over -> poll()'s wait returns", to_wake))
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
