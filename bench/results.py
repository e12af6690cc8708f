"""The bench's workload and results: what is asked of every system, what one run measured, and how the
client processes' reports become those figures.

- ``BenchConfig`` is the workload, and ``split`` / ``assign_partitions`` / ``record_partition`` /
  ``expected_per_partition`` say which process does which part of it.
- ``ClientReport`` is what one client process measured; ``ServerUsage`` what the servers used meanwhile.
- ``build_result`` (``latency_result`` in latency mode) turns the reports into a ``Result``;
  ``median_of_runs`` combines repeated runs; ``ratio`` / ``ratios`` compare a result with the raw ceiling,
  ``replication_pairs`` / ``replication_ratio`` a replicated bus with the same bus on fewer replicas,
  ``compression_pairs`` / ``stored_ratio`` a compressing bus with the same bus uncompressed.
- ``System`` bundles a system's three runners (``run_produce(cfg)``, ``run_consume(cfg)``,
  ``run_latency(cfg, rate_per_s)``) with a check that it can run here; ``BenchError`` and
  ``PeerUnavailable`` are how a run or a system fails.

The statistics themselves are in stats.py, the processes that produce the reports in harness.py. This
module must never start a process or know a system's protocol: no zmq, LMDB, Redis or NATS here.
"""

from __future__ import annotations

import dataclasses
import statistics
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .stats import percentiles, throughput, timeline
from .values import JSON_BYTES_MIN, VALUE_KINDS, client_values

MODES = ("produce", "consume", "latency", "failover")
DEFAULT_MODES = ("produce", "consume", "latency")  # failover kills nodes: only when asked for
SYNC_MODES = ("always", "none")
RAW = "raw"  # the system every ratio is taken against
# Latency mode: a record's value starts with its send time, time.time_ns() as a big-endian i64 (so
# record_bytes >= 8); every system writes and reads it with this one struct.
SEND_TIME = struct.Struct(">q")

# The points kept for plotting a latency distribution (percent), dense in the tail.
CDF_PERCENTILES = tuple(range(0, 90, 5)) + tuple(range(90, 99)) + (99, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 100)
LATENCY_RATE_SUSTAINED_MIN = 0.97  # latency mode: below this fraction of the target rate, say so
LATENCY_PRODUCER_BEHIND_MS_MAX = 100.0  # latency mode: a producer stalled longer than this is worth a note
# latency mode: a producer whose median batch went out later than this after it was due is worth a note (the
# bench's own pacing is 0.1-0.25 ms late on the reference machine: docs/benchmarks.md, P)
LATENCY_PRODUCER_LATE_P50_MS_MAX = 0.3


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
    values: str = "random"  # what a record's value holds (values.VALUE_KINDS): opaque random bytes, or JSON
    partitions: int = 1  # streams / partitions the records are spread over
    producers: int = 1  # producer processes
    consumers: int = 1  # consumer processes (<= partitions: an idle consumer measures nothing)
    sync: str = "always"  # "always": an ack means fsynced; "none": acks after the write, no fsync
    batch_bytes: int = 1 << 20  # payload bytes a producer packs into one batch
    linger_ms: float = 5  # how long a latency-mode producer waits for a batch to fill
    latency_rate: int = 5000  # records/s offered in latency mode, across all producers
    latency_seconds: float = 5  # how long latency mode offers them
    kills: int = 20  # failover mode: leader kills per run (failover offers latency_rate records/s meanwhile)
    data_dir: str | None = None  # parent of each run's scratch directory; None: the system temp dir
    inflight_batches_max: int = 8  # batches a producer may have sent and not yet seen acked
    timeout_s: float = 600  # a run still going after this fails loudly

    def validate(self) -> BenchConfig:
        if self.record_bytes < 8:
            raise ValueError("record_bytes must be >= 8 (latency mode carries an 8-byte send time)")
        if self.records < 1:
            raise ValueError("records must be >= 1")
        if self.values not in VALUE_KINDS:
            raise ValueError(f"values must be one of {', '.join(VALUE_KINDS)}, not {self.values!r}")
        if self.values == "json" and self.record_bytes < JSON_BYTES_MIN:
            raise ValueError(f"JSON values need record_bytes >= {JSON_BYTES_MIN} (room for an event's fields)")
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
        if self.kills < 1:
            raise ValueError("kills must be >= 1")
        if self.inflight_batches_max < 1 or self.timeout_s <= 0:
            raise ValueError("inflight_batches_max must be >= 1 and timeout_s > 0")
        return self

    def client_values(self, client_index: int) -> list[bytes]:
        """The distinct values client process ``client_index`` cycles through (values.py): made before its
        start gate, the same in every run and for every system."""
        return client_values(self.values, self.record_bytes, self.batch_bytes, client_index)

    def latency_tails(self, client_index: int) -> list[bytes]:
        """``client_values`` without their first ``SEND_TIME.size`` bytes: in latency mode a record's value
        is its send time, then one of these."""
        return [v[SEND_TIME.size:] for v in self.client_values(client_index)]

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
    # In a client process, (the shared counts, this client's index): the harness sets it there
    # (harness.run_clients) so that add_event also counts each event's records for the progress display.
    # A class attribute, not a field: it belongs to the process, and never crosses to the parent.
    progress_slot: ClassVar[tuple | None] = None

    def add_event(self, t_ns: int, n: int) -> None:
        self.events_t_ns.append(t_ns)
        self.events_n.append(n)
        if ClientReport.progress_slot is not None:
            counts, index = ClientReport.progress_slot
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

    system: str  # "raw", "redis", "nats", "bus R=1 acks=1", ...
    mode: str  # "produce", "consume", "latency" or "failover"
    records: int  # records measured
    bytes: int  # payload bytes measured (records * record_bytes)
    elapsed_s: float  # first send to last ack (produce), first fetch to last record (consume), ...
    records_per_s: float
    mb_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    # "ack": batch sent -> acked, per record; "end_to_end": sent -> consumed; "ack_gap" (failover): the
    # longest wait between acknowledgements around each leader kill, one sample per kill
    latency_kind: str = ""
    latency_samples: int = 0  # records the percentiles were taken over
    server_cpu_pct: float | None = None  # percent of one core
    server_rss_mb: float | None = None  # peak
    server_anon_mb: float | None = None  # peak of the part of it that is not file-backed (ServerUsage)
    client_cpu_pct: float | None = None  # all client processes, percent of one core
    target_rate: float | None = None  # latency mode: records/s offered
    # latency mode: how late the producers handed batches out after they were due, at the median (the latest
    # producer's); the latency figures include it, as they run from the due time
    producer_late_p50_ms: float | None = None
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (bin start s, records completed)
    timeline_bin_s: float = 0.0
    latency_cdf: list[tuple[float, float]] = field(default_factory=list)  # (percentile, ms) for plots
    runs: int = 1
    records_per_s_runs: list[float] = field(default_factory=list)  # every run's figure, when runs > 1
    # Produce mode, the bus on a cluster the bench started (else None): after the run, the bytes of record
    # batches its nodes store, summed over every replica (the nodes' own count, the one retention by size
    # uses: headers and payloads as written, compressed where the producer compressed), and the space
    # their LMDB files take (allocated blocks: the batches, LMDB's pages around them and its free pages).
    stored_bytes: float | None = None
    disk_bytes: float | None = None
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
    run_failover: Callable[[BenchConfig], Result] | None = None  # None: no failover mode (not replicated)

    def run(self, mode: str, cfg: BenchConfig, rate_per_s: float | None = None) -> Result:
        if mode == "produce":
            return self.run_produce(cfg)
        if mode == "consume":
            return self.run_consume(cfg)
        if mode == "latency":
            return self.run_latency(cfg, rate_per_s)
        if mode == "failover":
            if self.run_failover is None:
                raise BenchError(f"{self.name} has no failover mode")
            return self.run_failover(cfg)
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")

    def run_median(self, mode: str, cfg: BenchConfig, runs: int = 1, rate_per_s: float | None = None) -> Result:
        """``runs`` independent runs (each on fresh storage and fresh processes), combined by ``median_of_runs``."""
        if runs < 1:
            raise ValueError("runs must be >= 1")
        return median_of_runs([self.run(mode, cfg, rate_per_s) for _ in range(runs)])


# --------------------------------------------------------------------------------------------------------------
# From reports to results, and results compared


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
        "client_cpu_pct stored_bytes disk_bytes producer_late_p50_ms"
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


def replication_pairs(results: Sequence[Result]) -> list[tuple[Result, Result]]:
    """Each bus result with more than one replica, paired with the one it is compared with in the same run:
    the same path (``send`` or ``send_many``), compression and mode with the fewest replicas in
    ``results``, and the same acks if there is one (else the first with the fewest replicas). Results
    without ``config["bus"]`` (the baselines) are never paired."""
    def key(r: Result) -> tuple:
        bus = r.config["bus"]
        return bus["send_many"], bus.get("client"), bus.get("poll_order"), bus.get("compression"), r.mode

    buses = [r for r in results if "bus" in r.config]
    pairs = []
    for r in buses:
        same = [b for b in buses if key(b) == key(r)]
        fewest = min(b.config["bus"]["replication_factor"] for b in same)
        if r.config["bus"]["replication_factor"] <= fewest:
            continue
        bases = [b for b in same if b.config["bus"]["replication_factor"] == fewest]
        pairs.append((r, next((b for b in bases if b.config["bus"]["acks"] == r.config["bus"]["acks"]), bases[0])))
    return pairs


def replication_ratio(result: Result, base: Result) -> float | None:
    """``result`` over ``base``: records/s in the throughput modes, p99 in latency mode (so here, unlike
    ``ratio``, a latency ratio above 1 is worse); None without figures to divide. (Any two rows of the
    same mode: compression's rows are compared with it too.)"""
    if result.mode != base.mode:
        raise ValueError(f"cannot compare mode {result.mode} with {base.mode}")
    if result.mode == "latency":
        return result.p99_ms / base.p99_ms if result.p99_ms is not None and base.p99_ms else None
    return result.records_per_s / base.records_per_s if base.records_per_s > 0 else None


def compression_pairs(results: Sequence[Result]) -> list[tuple[Result, Result]]:
    """Each bus result whose producer compressed, paired with the same bus uncompressed in ``results``
    (the same path, replicas, min_insync_replicas, acks and mode); one without such a row is left out."""
    def key(r: Result) -> tuple:
        bus = r.config["bus"]
        return (bus["send_many"], bus.get("client"), bus.get("poll_order"), bus["replication_factor"],
                bus.get("min_insync_replicas"), bus["acks"], r.mode)

    buses = [r for r in results if "bus" in r.config]
    plain = {key(r): r for r in reversed(buses) if r.config["bus"].get("compression") is None}  # the first
    return [(r, plain[key(r)]) for r in buses if r.config["bus"].get("compression") is not None and key(r) in plain]


def variant_pairs(results: Sequence[Result], field: str, base_value: Any) -> list[tuple[Result, Result]]:
    """Each bus result whose ``config["bus"][field]`` is not ``base_value`` (e.g. client "aio", poll_order
    "drain"), paired with the result of the same mode that differs from it in that field alone."""
    def key(r: Result) -> tuple:
        return r.mode, sorted((k, repr(v)) for k, v in r.config["bus"].items() if k != field)

    buses = [r for r in results if "bus" in r.config]
    bases = [r for r in buses if r.config["bus"].get(field) == base_value]
    return [(r, base) for r in buses if r.config["bus"].get(field, base_value) != base_value
            for base in bases if key(base) == key(r)]


def stored_ratio(result: Result, base: Result) -> float | None:
    """``result``'s stored bytes over ``base``'s (below 1: it took less space), None unless both have them."""
    if result.stored_bytes is None or not base.stored_bytes:
        return None
    return result.stored_bytes / base.stored_bytes


def stored_per_record(result: Result) -> float | None:
    """Stored bytes per record measured (over every replica: with R=3, three copies of each)."""
    return result.stored_bytes / result.records if result.stored_bytes is not None and result.records else None


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
    notes: list[str] | None = None,
) -> Result:
    """A latency-mode Result: throughput and latencies from the consumers, lag warnings from the producers
    (after ``notes``, which the caller gives: its server's and ``harness.storage_notes``)."""
    notes = list(notes or [])
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
    result = build_result(
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
    result.producer_late_p50_ms = max((r.extra["behind_ms_p50"] for r in produced if "behind_ms_p50" in r.extra),
                                      default=None)
    return result


def figure_notes(result: Result) -> list[str]:
    """``result.notes``, and what its figures call for (of a median of runs: the median's)."""
    late = result.producer_late_p50_ms
    if late is not None and late > LATENCY_PRODUCER_LATE_P50_MS_MAX:
        return [*result.notes, f"a producer handed its records out {late:.2f} ms late at the median (its records' "
                               "latency includes that)"]
    return result.notes
