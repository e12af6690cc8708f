"""Measurement for ``bus bench``: the config, the result, the arithmetic, and the process harness.

Every system the bench compares (the raw pyzmq+LMDB ceiling, Redis Streams, NATS JetStream and the bus
itself) is measured by the same code, here, so that their figures differ only by the system:

- ``BenchConfig`` is the workload; ``Result`` is what one run of one system in one mode measured;
  ``System`` bundles a system's three runners (``run_produce(cfg)``, ``run_consume(cfg)``,
  ``run_latency(cfg, rate_per_s)``) with a check that it can run here; ``run_interleaved`` alternates
  systems across repeated runs.
- Pure arithmetic: nearest-rank ``percentiles`` (exact on small samples, never interpolated), ``throughput``,
  the throughput-over-time ``timeline``, ``median_of_runs`` and ``ratio`` to the raw ceiling.
- ``Pacer``: which records a fixed-rate producer sends now (pure: it is handed the clock).
- The harness: ``run_clients`` starts client processes with the "spawn" context, holds them at a start gate
  until all are connected, releases them together, samples the server processes' CPU and RSS while they
  run, and always reaps them. ``build_result`` (``latency_result`` in latency mode) turns their
  ``ClientReport``s into a ``Result``; ``scratch_dir`` gives each run fresh storage and removes it.

Clocks: durations and timelines use ``time.monotonic_ns()``, which on Linux is one system-wide clock and so
comparable across processes; end-to-end latency uses ``time.time_ns()`` carried inside the record.

This module must never know a system's protocol: no zmq, LMDB, Redis or NATS here.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import queue as queue_mod
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import accumulate
from typing import Any

MODES = ("produce", "consume", "latency")
SYNC_MODES = ("always", "none")
MB = 1_000_000  # MB/s is decimal megabytes of record payload per second
RAW = "raw"  # the system every ratio is taken against

# The percentiles the table shows, in percent; 100 is the maximum.
REPORTED_PERCENTILES = (50, 99, 99.9, 100)
# The points kept for plotting a latency distribution (percent), dense in the tail.
CDF_PERCENTILES = tuple(range(0, 90, 5)) + tuple(range(90, 99)) + (99, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 100)
# Timeline bin widths to choose from (seconds): the smallest giving at most TIMELINE_BINS_MAX bins.
TIMELINE_BIN_CHOICES_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TIMELINE_BINS_MAX = 200

CLIENT_READY_TIMEOUT_S = 60.0  # a client that cannot connect and set up within this is broken
SAMPLE_INTERVAL_S = 0.1  # how often the server's RSS is sampled
PROGRESS_INTERVAL_S = 0.5  # how often the harness shows the records its clients have done
REAP_TIMEOUT_S = 5.0  # per step of join -> terminate -> kill
LATENCY_RATE_SUSTAINED_MIN = 0.97  # latency mode: below this fraction of the target rate, say so
LATENCY_PRODUCER_BEHIND_MS_MAX = 100.0  # latency mode: a producer stalled longer than this is worth a note


class BenchError(RuntimeError):
    """A benchmark run failed: a client or server crashed, timed out, or lost records."""


class PeerUnavailable(BenchError):
    """A system cannot run here (its server or client library is not installed); the message says how to fix it."""


# --------------------------------------------------------------------------------------------------------------
# The workload and the result


@dataclass
class BenchConfig:
    """One workload. Every system is run with the same one."""

    record_bytes: int = 100  # payload bytes of each record (>= 8: latency mode stores the send time in it)
    records: int = 200_000  # records written (produce) or stored then read (consume)
    partitions: int = 1  # streams / partitions the records are spread over
    producers: int = 1  # producer processes
    consumers: int = 1  # consumer processes (<= partitions: an idle consumer measures nothing)
    sync: str = "always"  # "always": an ack means fsynced; "none": acks after the write, no fsync
    batch_bytes: int = 1 << 20  # payload bytes a producer packs into one batch
    linger_ms: float = 5  # how long a latency-mode producer waits for a batch to fill
    latency_rate: int = 5000  # records/s offered in latency mode, across all producers
    latency_seconds: float = 5  # how long latency mode offers them
    data_dir: str | None = None  # parent of each run's scratch directory; None: the system temp dir
    inflight_batches_max: int = 8  # batches a producer may have sent and not yet seen acked
    timeout_s: float = 600  # a run still going after this fails loudly

    def validate(self) -> BenchConfig:
        if self.record_bytes < 8:
            raise ValueError("record_bytes must be >= 8 (latency mode carries an 8-byte send time)")
        if self.records < 1:
            raise ValueError("records must be >= 1")
        if self.partitions < 1 or self.producers < 1 or self.consumers < 1:
            raise ValueError("partitions, producers and consumers must each be >= 1")
        if self.consumers > self.partitions:
            raise ValueError("consumers must be <= partitions (an idle consumer measures nothing)")
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {self.sync!r}")
        if self.batch_bytes < self.record_bytes:
            raise ValueError("batch_bytes must hold at least one record")
        if self.linger_ms < 0 or self.latency_rate <= 0 or self.latency_seconds <= 0:
            raise ValueError("linger_ms must be >= 0; latency_rate and latency_seconds > 0")
        if self.inflight_batches_max < 1 or self.timeout_s <= 0:
            raise ValueError("inflight_batches_max must be >= 1 and timeout_s > 0")
        return self

    @property
    def batch_records(self) -> int:
        """Records per full batch."""
        return max(1, self.batch_bytes // self.record_bytes)

    def latency_records(self, rate_per_s: float) -> int:
        """Records offered by a latency run at ``rate_per_s`` for ``latency_seconds``."""
        return max(1, round(rate_per_s * self.latency_seconds))


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts, the larger ones first."""
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def assign_partitions(partitions: int, consumers: int) -> list[list[int]]:
    """Consumer ``c`` reads every partition ``p`` with ``p % consumers == c``."""
    return [list(range(c, partitions, consumers)) for c in range(consumers)]


def record_partition(record_index: int, producer_index: int, partitions: int) -> int:
    """Where latency mode sends a producer's record: round robin, each producer starting one further on.

    Fixed in advance so that consumers know how many records to expect from each partition."""
    return (record_index + producer_index) % partitions


def expected_per_partition(per_producer: Sequence[int], partitions: int) -> list[int]:
    """Records each partition receives when producer ``j`` sends ``per_producer[j]`` records by ``record_partition``."""
    out = [0] * partitions
    for j, n in enumerate(per_producer):
        q, r = divmod(n, partitions)
        for k in range(partitions):
            out[k] += q
        for k in range(r):
            out[record_partition(k, j, partitions)] += 1
    return out


@dataclass
class ClientReport:
    """What one client process measured; it crosses the process boundary, so arrays rather than lists."""

    start_ns: int  # monotonic: when this client was released from the gate
    end_ns: int  # monotonic: its last ack (producer) or last record received (consumer)
    records: int  # records acked (producer) or received (consumer)
    events_t_ns: array = field(default_factory=lambda: array("q"))  # monotonic time of each ack / receive
    events_n: array = field(default_factory=lambda: array("q"))  # records completed at that event
    latencies_ns: array = field(default_factory=lambda: array("q"))  # one per ack or per record
    latency_counts: array | None = None  # records each latency stands for (None: one each)
    cpu_s: float = 0.0  # this process's CPU seconds from the gate to its end (set by the harness)
    extra: dict = field(default_factory=dict)  # system-specific facts (per-partition counts, lag, ...)

    def add_event(self, t_ns: int, n: int) -> None:
        self.events_t_ns.append(t_ns)
        self.events_n.append(n)
        if _progress_slot is not None:  # in a client process: the harness shows it (run_clients)
            counts, index = _progress_slot
            counts[index] += n


@dataclass
class ServerUsage:
    """CPU and memory of the server process(es) over the measured window."""

    cpu_s: float  # user + system CPU seconds, all server processes and threads
    wall_s: float  # length of the sampled window
    rss_peak_mb: float  # largest sampled sum of resident memory, in MB (10^6 bytes)
    # ... of which not file-backed (heap, stacks): RSS less what a memory-mapped log file (LMDB's map)
    # counts, which the kernel reclaims; this is the server's own memory
    anon_peak_mb: float = 0.0

    @property
    def cpu_pct(self) -> float:
        """CPU as percent of one core (a multi-threaded server can exceed 100)."""
        return 100.0 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Result:
    """One run of one system in one mode (or the median of several: ``runs``)."""

    system: str  # "raw", "redis", "nats", "bus"
    mode: str  # "produce", "consume" or "latency"
    records: int  # records measured
    bytes: int  # payload bytes measured (records * record_bytes)
    elapsed_s: float  # first send to last ack (produce), first fetch to last record (consume), ...
    records_per_s: float
    mb_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    latency_kind: str = ""  # "ack": batch sent -> acked, per record; "end_to_end": sent -> consumed
    latency_samples: int = 0  # records the percentiles were taken over
    server_cpu_pct: float | None = None  # percent of one core
    server_rss_mb: float | None = None  # peak
    server_anon_mb: float | None = None  # peak of the part of it that is not file-backed (ServerUsage)
    client_cpu_pct: float | None = None  # all client processes, percent of one core
    target_rate: float | None = None  # latency mode: records/s offered
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (bin start s, records completed)
    timeline_bin_s: float = 0.0
    latency_cdf: list[tuple[float, float]] = field(default_factory=list)  # (percentile, ms) for plots
    runs: int = 1
    records_per_s_runs: list[float] = field(default_factory=list)  # every run's figure, when runs > 1
    notes: list[str] = field(default_factory=list)  # anything that qualifies the figures
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class System:
    """One system the bench can run: its three runners and a check that it can run here at all."""

    name: str  # as shown in the table; "raw" is the ceiling every ratio is taken against
    run_produce: Callable[[BenchConfig], Result]
    run_consume: Callable[[BenchConfig], Result]
    run_latency: Callable[..., Result]  # (cfg, rate_per_s=None) -> Result
    check: Callable[[], None] = lambda: None  # raises PeerUnavailable (with the install hint) if not runnable

    def run(self, mode: str, cfg: BenchConfig, rate_per_s: float | None = None) -> Result:
        if mode == "produce":
            return self.run_produce(cfg)
        if mode == "consume":
            return self.run_consume(cfg)
        if mode == "latency":
            return self.run_latency(cfg, rate_per_s)
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")

    def run_median(self, mode: str, cfg: BenchConfig, runs: int = 1, rate_per_s: float | None = None) -> Result:
        """``runs`` independent runs (each on fresh storage and fresh processes), combined by ``median_of_runs``."""
        if runs < 1:
            raise ValueError("runs must be >= 1")
        return median_of_runs([self.run(mode, cfg, rate_per_s) for _ in range(runs)])


def run_interleaved(
    systems: Sequence[System], mode: str, cfg: BenchConfig, runs: int = 1, rate_per_s: float | None = None
) -> list[Result]:
    """``runs`` rounds of every system in turn (``round_order``), each combined by ``median_of_runs``.

    Interleaving keeps slow drift of the machine (disk write-back, page cache, a noisy neighbour) from
    landing on one system only, so the ratio to raw compares runs taken side by side. On this kind of VM
    an fsync-bound produce run varies by up to 2x from run to run: use ``runs`` >= 3 for ratios.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    rounds: dict[str, list[Result]] = {s.name: [] for s in systems}
    for i in range(runs):
        for s in round_order(systems, i):
            rounds[s.name].append(s.run(mode, cfg, rate_per_s))
    return [median_of_runs(rounds[s.name]) for s in systems]


def round_order(systems: Sequence[System], round_index: int) -> list[System]:
    """The order of the systems in round ``round_index``: as given, then reversed, and so on (raw, bus,
    redis; redis, bus, raw; ...). On the VMs here a run's disk speed alternated from one run to the next
    (slow, fast, slow, ...: docs/benchmarks.md). Reversing every other round moves each system from an
    odd place in the sequence of runs to an even one and back, whatever the number of systems; a fixed
    order does not when that number is even, nor does rotating when it is odd."""
    return list(systems) if round_index % 2 == 0 else list(reversed(systems))


# --------------------------------------------------------------------------------------------------------------
# Arithmetic


def percentiles(
    values: Sequence[float], counts: Sequence[int] | None = None, qs: Iterable[float] = REPORTED_PERCENTILES
) -> list[float | None]:
    """Nearest-rank percentiles: the ``q``th is the smallest sample with at least ``q``% of samples <= it.

    Never interpolates, so every answer is a latency that was observed, and on a small sample the tail
    percentiles honestly collapse to the maximum (p99.9 of 10 samples is the largest). ``counts[i]`` says
    how many records ``values[i]`` stands for (a batch ack covers all its records). The rank is computed in
    exact arithmetic: 99.9% of 1000 is rank 999, not 1000 as a float product would give. Empty -> Nones.
    """
    qs = list(qs)
    if counts is None:
        ordered = sorted(values)
        n = len(ordered)
        if n == 0:
            return [None] * len(qs)
        return [ordered[_rank(q, n) - 1] for q in qs]
    if len(counts) != len(values):
        raise ValueError("values and counts differ in length")
    pairs = sorted((v, c) for v, c in zip(values, counts) if c > 0)
    if any(c < 0 for c in counts):
        raise ValueError("counts must be >= 0")
    cumulative = list(accumulate(c for _, c in pairs))
    if not cumulative:
        return [None] * len(qs)
    total = cumulative[-1]
    return [pairs[bisect_left(cumulative, _rank(q, total))][0] for q in qs]


def _rank(q: float, n: int) -> int:
    """1-based nearest rank of percentile ``q`` among ``n`` samples."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    return max(1, math.ceil(Fraction(str(q)) * n / 100))


def throughput(records: int, payload_bytes: int, elapsed_s: float) -> tuple[float, float]:
    """(records/s, MB/s); zero when nothing measurable elapsed."""
    if elapsed_s <= 0:
        return 0.0, 0.0
    return records / elapsed_s, payload_bytes / elapsed_s / MB


def timeline(
    events_t_ns: Sequence[int], events_n: Sequence[int], start_ns: int, end_ns: int
) -> tuple[list[tuple[float, int]], float]:
    """Records completed per time bin from ``start_ns`` to ``end_ns``: ([(bin start s, records)], bin width s)."""
    span_s = max(0.0, (end_ns - start_ns) / 1e9)
    bin_s = next((b for b in TIMELINE_BIN_CHOICES_S if span_s / b <= TIMELINE_BINS_MAX), TIMELINE_BIN_CHOICES_S[-1])
    bins = [0] * (int(span_s / bin_s) + 1)
    bin_ns = bin_s * 1e9
    for t, n in zip(events_t_ns, events_n):
        i = min(len(bins) - 1, max(0, int((t - start_ns) / bin_ns)))
        bins[i] += n
    return [(round(i * bin_s, 6), n) for i, n in enumerate(bins)], bin_s


def steadiness(result: Result, bins_min: int = 9) -> float | None:
    """Throughput in the last third of a run over that in the first third (1.0: flat; None: too short).

    Taken over the middle 90 % of the timeline (and never its first and last bins), so that start-up and the
    final flush do not count. A figure well below 1.0 means each record costs more as the log grows."""
    series = result.timeline
    if len(series) < bins_min:
        return None
    trim = max(1, len(series) // 20)
    middle = [n for _, n in series[trim : len(series) - trim]]
    third = len(middle) // 3
    first, last = sum(middle[:third]), sum(middle[-third:])
    return last / first if first > 0 else None


def median_of_runs(results: Sequence[Result]) -> Result:
    """One Result from repeated runs: each figure is the median of the runs' figures.

    The series (timeline, latency CDF) come from the run whose throughput is the (lower) median, so a plot
    shows a real run. ``records_per_s_runs`` keeps every run's figure to show the spread.
    """
    if not results:
        raise ValueError("no runs to combine")
    if len({(r.system, r.mode) for r in results}) != 1:
        raise ValueError("runs of different systems or modes cannot be combined")
    if len(results) == 1:
        return results[0]
    by_rate = sorted(results, key=lambda r: r.records_per_s)
    base = by_rate[(len(by_rate) - 1) // 2]

    def med(name: str) -> Any:
        xs = [getattr(r, name) for r in results if getattr(r, name) is not None]
        return statistics.median(xs) if xs else None

    scalars = (
        "elapsed_s records_per_s mb_per_s p50_ms p99_ms p999_ms max_ms server_cpu_pct server_rss_mb server_anon_mb "
        "client_cpu_pct"
    ).split()
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    return dataclasses.replace(
        base,
        **{name: med(name) for name in scalars},
        runs=len(results),
        records_per_s_runs=[r.records_per_s for r in results],
        notes=notes,
    )


def ratio(result: Result, raw: Result) -> float | None:
    """How close ``result`` comes to the raw ceiling, as a fraction (1.0 = as good as raw).

    Throughput modes: records/s over raw's records/s. Latency mode: raw's p99 over this p99, so that in both
    a higher figure is better and 0.25 reads "a quarter of the ceiling".
    """
    if result.mode != raw.mode:
        raise ValueError(f"cannot compare mode {result.mode} with raw {raw.mode}")
    if result.mode == "latency":
        if not result.p99_ms or raw.p99_ms is None:
            return None
        return raw.p99_ms / result.p99_ms
    if raw.records_per_s <= 0:
        return None
    return result.records_per_s / raw.records_per_s


def ratios(results: Sequence[Result]) -> list[float | None]:
    """``ratio`` of each result to the raw result of the same mode in ``results`` (None where there is none)."""
    raw_by_mode = {r.mode: r for r in results if r.system == RAW}
    return [ratio(r, raw_by_mode[r.mode]) if r.mode in raw_by_mode else None for r in results]


def build_result(
    system: str,
    mode: str,
    cfg: BenchConfig,
    reports: Sequence[ClientReport],
    usage: ServerUsage | None,
    *,
    latency_kind: str = "",
    client_cpu_s: float | None = None,
    start_ns: int | None = None,
    target_rate: float | None = None,
    notes: Iterable[str] = (),
) -> Result:
    """Combine the measuring clients' reports: the window runs from the earliest start to the latest end."""
    if not reports:
        raise ValueError("no client reports")
    start = min(r.start_ns for r in reports) if start_ns is None else start_ns
    end = max(r.end_ns for r in reports)
    elapsed_s = max(0.0, (end - start) / 1e9)
    records = sum(r.records for r in reports)
    payload = records * cfg.record_bytes
    rps, mbps = throughput(records, payload, elapsed_s)

    lat_values: list[int] = []
    lat_counts: list[int] | None = None
    if any(r.latency_counts is not None for r in reports):
        lat_counts = []
    for r in reports:
        lat_values.extend(r.latencies_ns)
        if lat_counts is not None:
            lat_counts.extend(r.latency_counts if r.latency_counts is not None else [1] * len(r.latencies_ns))
    lat_ms = [v / 1e6 for v in lat_values]
    p50, p99, p999, pmax = percentiles(lat_ms, lat_counts)
    cdf_points = percentiles(lat_ms, lat_counts, CDF_PERCENTILES) if lat_ms else []
    samples = sum(lat_counts) if lat_counts is not None else len(lat_ms)

    ev_t = array("q")
    ev_n = array("q")
    for r in reports:
        ev_t.extend(r.events_t_ns)
        ev_n.extend(r.events_n)
    series, bin_s = timeline(ev_t, ev_n, start, end)
    cpu = sum(r.cpu_s for r in reports) if client_cpu_s is None else client_cpu_s

    return Result(
        system=system,
        mode=mode,
        records=records,
        bytes=payload,
        elapsed_s=elapsed_s,
        records_per_s=rps,
        mb_per_s=mbps,
        p50_ms=p50,
        p99_ms=p99,
        p999_ms=p999,
        max_ms=pmax,
        latency_kind=latency_kind if lat_ms else "",
        latency_samples=samples,
        server_cpu_pct=usage.cpu_pct if usage else None,
        server_rss_mb=usage.rss_peak_mb if usage else None,
        server_anon_mb=usage.anon_peak_mb if usage else None,
        client_cpu_pct=100.0 * cpu / elapsed_s if elapsed_s > 0 else None,
        target_rate=target_rate,
        timeline=series,
        timeline_bin_s=bin_s,
        latency_cdf=[(q, v) for q, v in zip(CDF_PERCENTILES, cdf_points)],
        notes=list(notes),
        config=dataclasses.asdict(cfg),
    )


def latency_result(
    system: str,
    cfg: BenchConfig,
    rate: float,
    consumed: list[ClientReport],
    produced: list[ClientReport],
    usage: ServerUsage | None,
    data_dir: str,
    notes: list[str] | None = None,
) -> Result:
    """A latency-mode Result: throughput and latencies from the consumers, lag warnings from the producers."""
    notes = list(notes or []) + storage_notes(data_dir, cfg.sync)
    start = min(r.start_ns for r in consumed + produced)
    end = max(r.end_ns for r in consumed)
    achieved = sum(r.records for r in consumed) / max(1e-9, (end - start) / 1e9)
    if achieved < LATENCY_RATE_SUSTAINED_MIN * rate:
        notes.append(
            f"target rate not sustained: {achieved:,.0f} of {rate:,.0f} records/s (latencies include the wait)"
        )
    behind = max((r.extra.get("behind_ms_max", 0.0) for r in produced), default=0.0)
    if behind > LATENCY_PRODUCER_BEHIND_MS_MAX:
        notes.append(f"a producer fell up to {behind:,.0f} ms behind schedule (its records' latency includes that)")
    cpu = sum(r.cpu_s for r in consumed + produced)
    return build_result(
        system,
        "latency",
        cfg,
        consumed,
        usage,
        latency_kind="end_to_end",
        client_cpu_s=cpu,
        start_ns=start,
        target_rate=rate,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------------------
# Fixed-rate pacing (pure)


class Pacer:
    """Which records a fixed-rate producer sends now.

    Record ``k`` is due at ``start_ns + k * 1e9 / rate_per_s``. Due records are held until the oldest has
    waited ``linger_ns`` or ``batch_records_max`` are due, then sent together, as a client library's linger
    does. The send time a record carries is its *due* time, not the moment the producer got round to it,
    so a producer that falls behind shows up as latency instead of quietly offering less load (coordinated
    omission). The clock is passed in; nothing here sleeps.
    """

    def __init__(self, rate_per_s: float, total: int, linger_ns: int, batch_records_max: int, start_ns: int):
        if rate_per_s <= 0 or total < 0 or linger_ns < 0 or batch_records_max < 1:
            raise ValueError("invalid pacing")
        self.rate_per_s = rate_per_s
        self.total = total  # records to send in all
        self.linger_ns = linger_ns
        self.batch_records_max = batch_records_max
        self.start_ns = start_ns
        self.sent = 0  # records handed out so far; they are 0 .. sent-1
        self.behind_ns_max = 0  # the latest any batch was handed out after it was due to go

    def due_ns(self, k: int) -> int:
        """When record ``k`` is due."""
        return self.start_ns + int(k * 1e9 / self.rate_per_s)

    def _due_count(self, now_ns: int) -> int:
        if now_ns < self.start_ns:
            return 0
        return min(self.total, int((now_ns - self.start_ns) * self.rate_per_s / 1e9) + 1)

    def take(self, now_ns: int) -> range | None:
        """The records to send now, or None if nothing is ready to go yet."""
        if self.sent >= self.total:
            return None
        due = self._due_count(now_ns)
        pending = due - self.sent
        if pending <= 0:
            return None
        go_at = self._go_at()
        if now_ns < go_at:
            return None
        self.behind_ns_max = max(self.behind_ns_max, now_ns - go_at)
        n = min(pending, self.batch_records_max)
        out = range(self.sent, self.sent + n)
        self.sent += n
        return out

    def _go_at(self) -> int:
        """When the batch starting at record ``sent`` must go: linger expired or batch full."""
        last = min(self.total, self.sent + self.batch_records_max) - 1
        return min(self.due_ns(self.sent) + self.linger_ns, self.due_ns(last))

    def next_deadline_ns(self) -> int | None:
        """When ``take`` next returns records (None when all are sent)."""
        if self.sent >= self.total:
            return None
        return self._go_at()

    @property
    def done(self) -> bool:
        return self.sent >= self.total


# --------------------------------------------------------------------------------------------------------------
# Scratch space


@contextmanager
def scratch_dir(cfg: BenchConfig, system: str) -> Iterator[str]:
    """A fresh directory for one run's data under ``cfg.data_dir``; removed afterwards."""
    parent = cfg.data_dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"bus-bench-{system}-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def storage_notes(path: str, sync: str) -> list[str]:
    """Warnings about where the data lives: on tmpfs an fsync costs nothing and 'always' proves nothing."""
    import psutil

    real = os.path.realpath(path)
    best = None
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best.mountpoint)):
            best = part
    if best is not None and best.fstype in ("tmpfs", "ramfs") and sync == "always":
        return [f"data dir {path} is on {best.fstype}: fsync costs nothing there, so sync=always is not durable"]
    return []


# --------------------------------------------------------------------------------------------------------------
# The process harness


# Progress while clients run. In a client process, ``_progress_slot`` is (the shared counts, its index):
# ``ClientReport.add_event`` adds each event's records there. In the harness, ``_progress_sink`` (set with
# ``showing_progress``) is shown the sum every PROGRESS_INTERVAL_S while run_clients waits for the reports.
_progress_slot: tuple | None = None
_progress_sink: Callable[[int], None] | None = None


@contextmanager
def showing_progress(sink: Callable[[int], None] | None) -> Iterator[None]:
    """Within the block, ``run_clients`` calls ``sink(records done so far)`` as its clients run."""
    global _progress_sink
    before, _progress_sink = _progress_sink, sink
    try:
        yield
    finally:
        _progress_sink = before


class Gate:
    """Handed to each client process. ``wait()`` reports "ready" and blocks until every client is ready.

    A client connects and sets up first, then calls ``wait()``; its measured work starts when it returns.
    """

    def __init__(self, index: int, reports: Any, go: Any, done_counts: Any = None):
        self.index = index  # position of this client in the list given to run_clients
        self._reports = reports  # multiprocessing queue back to the harness
        self._go = go  # multiprocessing event set once all clients are ready
        self.done_counts = done_counts  # shared array: records each client has completed (progress)
        self.cpu_start_s: float | None = None
        self.start_ns = 0

    def wait(self) -> int:
        """Block until released; returns the monotonic release time every client shares (to a few µs)."""
        self._reports.put(("ready", self.index, None))
        if not self._go.wait(CLIENT_READY_TIMEOUT_S * 2):
            raise BenchError("start gate never opened")
        self.start_ns = time.monotonic_ns()
        self.cpu_start_s = time.process_time()
        return self.start_ns


def _client_entry(fn: Callable[..., ClientReport], args: tuple, gate: Gate) -> None:
    """Top-level so the spawn context can find it: run one client and send its report (or traceback) home."""
    global _progress_slot
    if gate.done_counts is not None:
        _progress_slot = (gate.done_counts, gate.index)
    try:
        report = fn(*args, gate)
        if gate.cpu_start_s is not None:
            report.cpu_s = time.process_time() - gate.cpu_start_s
        gate._reports.put(("done", gate.index, report))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, then the process ends
        gate._reports.put(("error", gate.index, traceback.format_exc()))


class ResourceSampler:
    """Samples the server processes (and their children) from a thread: CPU over the window, peak RSS."""

    def __init__(self, pids: Sequence[int], interval_s: float = SAMPLE_INTERVAL_S):
        import psutil

        self._psutil = psutil
        self._procs = [psutil.Process(pid) for pid in pids]
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rss_peak = self._anon_peak = 0
        self._cpu0 = 0.0
        self._t0 = 0.0

    def _cpu(self) -> float:
        total = 0.0
        for p in self._procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self._psutil.Error:
                pass
        return total

    def _sample_rss(self) -> None:
        rss = anon = 0
        for p in self._procs:
            try:
                for proc in [p, *p.children(recursive=True)]:
                    info = proc.memory_info()
                    rss += info.rss
                    anon += info.rss - getattr(info, "shared", 0)  # Linux: shared = file-backed + shmem
            except self._psutil.Error:
                pass
        self._rss_peak = max(self._rss_peak, rss)
        self._anon_peak = max(self._anon_peak, anon)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample_rss()

    def alive(self) -> bool:
        return all(p.is_running() and p.status() != self._psutil.STATUS_ZOMBIE for p in self._procs)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = self._cpu()
        self._sample_rss()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> ServerUsage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_rss()
        return ServerUsage(
            cpu_s=max(0.0, self._cpu() - self._cpu0),
            wall_s=time.monotonic() - self._t0,
            rss_peak_mb=self._rss_peak / MB,
            anon_peak_mb=self._anon_peak / MB,
        )


def run_clients(
    clients: Sequence[tuple[Callable[..., ClientReport], tuple]],
    server_pids: Sequence[int],
    timeout_s: float,
) -> tuple[list[ClientReport], ServerUsage]:
    """Run each ``fn(*args, gate)`` in its own spawned process; all start together at the gate.

    ``fn`` must be a module-level function (spawn pickles it by name). It sets up, calls ``gate.wait()``,
    does the measured work and returns a ``ClientReport``. Returns the reports in ``clients`` order and the
    servers' usage over the window from the gate opening to the last report. Any client error, a server
    that exits, or ``timeout_s`` raises ``BenchError``; every client process is reaped whatever happens.
    """
    ctx = multiprocessing.get_context("spawn")
    reports_q = ctx.Queue()
    go = ctx.Event()
    done_counts = ctx.Array("q", len(clients), lock=False)  # one writer per slot: no lock needed
    sink = _progress_sink
    procs: list[Any] = []
    sampler = ResourceSampler(server_pids)
    sampling = False
    try:
        for i, (fn, args) in enumerate(clients):
            p = ctx.Process(target=_client_entry, args=(fn, args, Gate(i, reports_q, go, done_counts)), daemon=True)
            p.start()
            procs.append(p)

        def collect(kind: str, deadline: float) -> dict[int, Any]:
            got: dict[int, Any] = {}
            while len(got) < len(procs):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(len(procs))) - set(got))
                    raise BenchError(f"clients {missing} not {kind} within the time limit")
                if sink is not None and kind == "done":
                    sink(sum(done_counts))
                try:
                    what, index, payload = reports_q.get(timeout=min(PROGRESS_INTERVAL_S, remaining))
                except queue_mod.Empty:
                    dead = [i for i, p in enumerate(procs) if i not in got and not p.is_alive()]
                    if dead:
                        # A report may still be in the pipe after the process exited: look once more.
                        try:
                            what, index, payload = reports_q.get(timeout=1.0)
                        except queue_mod.Empty:
                            raise BenchError(f"client processes {dead} exited without a report") from None
                    elif not sampler.alive():
                        raise BenchError("a server process exited during the run") from None
                    else:
                        continue
                if what == "error":
                    raise BenchError(f"client {index} failed:\n{payload}")
                if what == kind:
                    got[index] = payload
            return got

        collect("ready", time.monotonic() + CLIENT_READY_TIMEOUT_S)
        sampler.start()
        sampling = True
        go.set()
        done = collect("done", time.monotonic() + timeout_s)
        if sink is not None:
            sink(sum(done_counts))  # the whole run, however short
        usage = sampler.stop()
        sampling = False
        return [done[i] for i in range(len(procs))], usage
    finally:
        if sampling:
            sampler.stop()
        reap(procs)
        reports_q.close()
        reports_q.join_thread()


def reap(procs: Iterable[Any]) -> None:
    """End every process: wait a moment for each to exit, then SIGTERM those left, then SIGKILL.

    Takes multiprocessing.Process and subprocess.Popen alike (servers are Popen, stopped with SIGTERM)."""
    procs = [p for p in procs if p is not None and p.pid is not None]  # never started: nothing to end
    deadline = time.monotonic() + REAP_TIMEOUT_S
    for p in procs:
        if _alive(p):
            _wait(p, max(0.0, deadline - time.monotonic()))
    for signal_step in ("terminate", "kill"):
        left = [p for p in procs if _alive(p)]
        for p in left:
            getattr(p, signal_step)()
        for p in left:
            _wait(p, REAP_TIMEOUT_S)
    for p in procs:
        if hasattr(p, "join"):
            p.join(0)  # collect the exit status so no zombie is left


def stop_processes(procs: Iterable[Any]) -> None:
    """SIGTERM each process at once (a server asked to shut down cleanly), then reap them all."""
    procs = list(procs)
    for p in procs:
        if _alive(p):
            p.terminate()
    reap(procs)


def _alive(p: Any) -> bool:
    return p.is_alive() if hasattr(p, "is_alive") else p.poll() is None


def _wait(p: Any, timeout_s: float) -> None:
    if hasattr(p, "join"):
        p.join(timeout_s)
        return
    try:
        p.wait(timeout_s)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: the caller escalates
        pass
