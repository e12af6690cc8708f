"""``bus bench`` end to end: which systems run in which modes, progress while they run, the table at the end.

``run_bench(...)`` is what the ``bus bench`` command (bus/cli.py) and ``scripts/bench.py`` call. For each
mode it interleaves the systems run by run (raw, bus, bus send_many, redis, nats; then nats, redis, bus
send_many, bus, raw; ...: see ``harness.round_order``), prints one line per run, combines each system's runs by
their median, and at the end prints the ratio table, writes the JSON file and draws the plot if asked to.

The bus is one system per (replication factor, acks, compression) that ``--replication-factor``, ``--acks``
and ``--compression`` list (``bus_variants``), all on the same number of nodes, each row named for its
settings (``bus R=3 acks=all``, ``bus R=1 acks=1 zstd``), so replicated and unreplicated, compressed and
uncompressed rows of the same run can be compared (report.py prints those ratios, and the bytes each
produce run left on disk).
Failover mode runs only the replicated bus systems.

A peer that cannot run here (its server or client library missing) gets one line saying how to install
it and the bench goes on without it; a peer that fails while running is reported the same way. A failure
of the bus or of the raw ceiling is an error: the table of what did finish is still printed, then the
command exits with status 1.

This module decides nothing about measuring; harness.py, results.py and stats.py do that, for every system alike.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .bus_system import BusOptions, is_bus, make_bus_system
from .report import PlotUnavailable, format_table, plot, write_json
from .harness import round_order, showing_progress
from .results import (
    DEFAULT_MODES,
    MODES,
    RAW,
    BenchConfig,
    BenchError,
    PeerUnavailable,
    Result,
    System,
    median_of_runs,
)
from .stats import steadiness

# The baselines --peers can name; the Kafka clients (kafka_clients.py) run against the bus, only when named.
PEER_NAMES = ("raw", "redis", "nats", "confluent-kafka", "kafka-python", "aiokafka")
ACKS = ("0", "1", "all")
COMPRESSIONS = ("none", "lz4", "zstd")  # --compression's names; "none" is the Producer's compression=None
STEADINESS_SECONDS_MIN = 3.0  # shorter runs are too noisy to say whether throughput held up
PROGRESS_BAR_CELLS = 24


def progress_line(label: str, done: int, total: int, per_s: float, unit: str = "records") -> str:
    """``  produce  bus  run 1/3  [#######.........] 1,200,000 / 2,000,000 records  1,950,000/s``"""
    filled = int(PROGRESS_BAR_CELLS * min(1.0, done / total)) if total > 0 else 0
    rate = f"  {per_s:,.0f}/s" if per_s > 0 and unit == "records" else ""
    return f"  {label}  [{'#' * filled}{'.' * (PROGRESS_BAR_CELLS - filled)}] {done:,} / {total:,} {unit}{rate}"


class ProgressBar:
    """A run's progress on one terminal line, redrawn in place as its clients report records done (a
    failover run: kills done), and wiped when the run ends (its summary line is printed in its place)."""

    def __init__(self, stream: TextIO, label: str, total: int, unit: str = "records"):
        self.stream, self.label, self.total, self.unit = stream, label, total, unit
        self._since: tuple[float, int] | None = None  # (time, done) the rate is measured from
        self._last, self._width = 0, 0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self._since is None or done < self._last:  # a new phase (consume: loading, then reading)
            self._since = (now, done)
        self._last = done
        since_s, since_done = self._since
        per_s = (done - since_done) / (now - since_s) if now > since_s else 0.0
        line = progress_line(self.label, done, self.total, per_s, self.unit)
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))

    def clear(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against ``allowed``; ``""`` or ``"none"`` -> ``[]``."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if items == ["none"]:
        return []
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def available_systems(peers: Sequence[str], say: Callable[[str], None]) -> list[System]:
    """The requested baselines that can run here, raw first; one line for each that cannot."""
    from . import SYSTEMS

    out = []
    for name in PEER_NAMES:
        if name not in peers:
            continue
        system = SYSTEMS[name]
        try:
            system.check()
        except PeerUnavailable as e:
            say(f"{name}: not run: {e}")
            continue
        out.append(system)
    return out


def _summary(r: Result) -> str:
    text = f"{r.records_per_s:>12,.0f} records/s {r.mb_per_s:>8,.1f} MB/s"
    if r.p99_ms is not None:
        text += f"  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms"
    return text


def run_mode(
    systems: Sequence[System],
    mode: str,
    cfg: BenchConfig,
    runs: int,
    say: Callable[[str], None],
    failures: dict[str, str],
    progress: TextIO | None = None,
) -> list[Result]:
    """``runs`` rounds of every system in turn, one line per run; each system's runs by their median.

    A system that fails is reported in ``failures`` ({"system mode": message}) and not run again in this mode.
    With ``progress`` (a terminal), each run shows a progress bar there while it runs.
    """
    total = cfg.latency_records(cfg.latency_rate) if mode == "latency" else cfg.records
    unit = "records"
    if mode == "failover":
        total, unit = cfg.kills, "kills"
    rounds: dict[str, list[Result]] = {s.name: [] for s in systems}
    failed: set[str] = set()
    width = max(len(s.name) for s in systems)
    for i in range(runs):
        for s in round_order(systems, i):
            if s.name in failed:
                continue
            t0 = time.monotonic()
            label = f"{mode:<8} {s.name:<{width}}  run {i + 1}/{runs}"
            bar = ProgressBar(progress, label, total, unit) if progress is not None else None
            try:
                with showing_progress(bar):
                    r = s.run(mode, cfg)
            except BenchError as e:
                r = e
            finally:
                if bar is not None:
                    bar.clear()  # before any line is printed in its place
            if isinstance(r, BenchError):
                failed.add(s.name)
                failures[f"{s.name} {mode}"] = str(r)
                first = str(r).strip().splitlines()[0] if str(r).strip() else type(r).__name__
                say(f"  {label}  FAILED: {first}")
                continue
            rounds[s.name].append(r)
            say(f"  {label}  {_summary(r)}  ({time.monotonic() - t0:.1f} s)")
    results = [median_of_runs(rounds[s.name]) for s in systems if rounds[s.name] and s.name not in failed]
    if mode == "failover":
        from .failover import kill_notes

        for r in results:  # the median run's kills are in r.config; the notes pool every run's
            r.notes += kill_notes(rounds[r.system])
    for r in results:
        flat = steadiness(r) if r.mode in ("produce", "consume") and r.elapsed_s >= STEADINESS_SECONDS_MIN else None
        if flat is not None:
            r.notes.append(f"throughput in the run's last third is {flat:.2f}x its first third (1.00: flat)")
        if "client_rss_peak_mb" in r.config:
            r.notes.append(f"largest client process peak RSS {r.config['client_rss_peak_mb']:,.0f} MB")
        if "client_cpu_us_per_record" in r.config:
            r.notes.append(f"client processes' CPU {r.config['client_cpu_us_per_record']:.2f} us per record")
    return results


def parse_acks(text: str) -> list[Any]:
    """``"1,all"`` -> ``[1, "all"]``: the acks of each bus system, checked."""
    return [x if x == "all" else int(x) for x in parse_list(text, ACKS, "acks")]


def parse_compressions(text: str) -> list[str | None]:
    """``"none,zstd"`` -> ``[None, "zstd"]``: the compression of each bus system, checked (``"none"`` alone
    is one system without compression, not an empty list)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError("--compression names no compression")
    bad = [x for x in items if x not in COMPRESSIONS]
    if bad:
        raise ValueError(f"unknown compression {', '.join(bad)}: choose from {', '.join(COMPRESSIONS)}")
    return [None if x == "none" else x for x in dict.fromkeys(items)]


def parse_counts(text: str, what: str) -> list[int]:
    """``"1,3"`` -> ``[1, 3]`` (each >= 1, in the order given, duplicates dropped)."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) >= 1 for x in items):
        raise ValueError(f"{what} must be a number >= 1 or a list of them (1,3), not {text!r}")
    return list(dict.fromkeys(int(x) for x in items))


def bus_variants(base: BusOptions, replication_factors: Sequence[int], acks: Sequence[Any],
                 compressions: Sequence[str | None] = (None,)) -> list[BusOptions]:
    """One bus system per (replication factor, acks, compression), in that order, all on the same number of
    nodes: ``base.nodes`` if given, else enough for the largest replication factor (so rows with R=1 and
    R=3 differ only by the replicas, not by the cluster they run on)."""
    nodes = base.nodes if base.nodes is not None or base.bootstrap is not None else max(replication_factors)
    return [dataclasses.replace(base, nodes=nodes, replication_factor=r, acks=a, compression=c).validate()
            for r in replication_factors for a in acks for c in compressions]


def _describe(buses: Sequence[BusOptions], cfg: BenchConfig) -> str:
    first = buses[0]
    where = f"cluster at {first.bootstrap}" if first.bootstrap else f"{first.node_count} node(s), sync={cfg.sync}"
    factors = ",".join(str(r) for r in dict.fromkeys(b.replication_factor for b in buses))
    acks = ",".join(str(a) for a in dict.fromkeys(b.acks for b in buses))
    isr = "" if first.min_insync_replicas is None else f", min_insync_replicas {first.min_insync_replicas}"
    codecs = ",".join(c or "none" for c in dict.fromkeys(b.compression for b in buses))
    return f"{where}, replication factor {factors}{isr}, acks={acks}, compression {codecs}"


def run_bench(
    cfg: BenchConfig,
    bus: BusOptions | Sequence[BusOptions],
    *,
    peers: Sequence[str] = PEER_NAMES,
    modes: Sequence[str] = DEFAULT_MODES,
    runs: int = 1,
    send_many: bool = True,
    aio: bool = False,
    drain_order: bool = False,
    json_path: str | None = None,
    plot_path: str | None = None,
    say: Callable[[str], None] = print,
    meta: dict[str, Any] | None = None,
    progress: TextIO | None = None,
) -> tuple[list[Result], dict[str, str]]:
    """Run the bench; print progress and the table through ``say`` (and progress bars on ``progress``, a
    terminal, while each run runs). ``bus``: the bus's options, or several (one system each: e.g. one per
    replication factor, ``bus_variants``). ``aio``: bus.aio's producer and consumer as rows of their own (produce
    and consume); ``drain_order``: the consumer with the draining order as its own row (consume), so fair
    polling's cost is measured in the same run. Returns (results, failures)."""
    cfg.validate()
    buses = [bus] if isinstance(bus, BusOptions) else list(bus)
    if not buses:
        raise ValueError("no bus options")
    for b in buses:
        b.validate()
    if runs < 1:
        raise ValueError("runs must be >= 1")
    baselines = available_systems(peers, say)
    the_buses = [make_bus_system(b) for b in buses]
    bulks = [make_bus_system(dataclasses.replace(b, send_many=True)) for b in buses]
    aios = [make_bus_system(dataclasses.replace(b, client="aio")) for b in buses] if aio else []
    drains = [make_bus_system(dataclasses.replace(b, poll_order="drain")) for b in buses] if drain_order else []
    say(
        f"bus bench: {cfg.records:,} records of {cfg.record_bytes} bytes ({cfg.values} values), "
        f"{cfg.partitions} partition(s), "
        f"{cfg.producers} producer(s), {cfg.consumers} consumer(s), {_describe(buses, cfg)}, "
        f"linger {cfg.linger_ms:g} ms, {runs} run(s) each (median)"
    )
    results: list[Result] = []
    failures: dict[str, str] = {}
    for mode in modes:
        if mode == "failover":
            systems = [s for s in the_buses if s.run_failover is not None]
            skipped = [s.name for s in the_buses if s.run_failover is None]
            if skipped:
                say(f"failover: not run for {', '.join(skipped)} (one replica: no other to fail over to)")
            if not systems:
                continue
            say(f"{mode}: {cfg.kills} leader kills, {cfg.latency_rate:,} records/s offered meanwhile")
            results += run_mode(systems, mode, cfg, runs, say, failures, progress)
            continue
        systems = [s for s in baselines if s.name == RAW] + the_buses
        if mode == "produce" and send_many:
            systems += bulks
        if mode in ("produce", "consume"):
            systems += aios
        if mode == "consume":
            systems += drains
        systems += [s for s in baselines if s.name != RAW]
        if mode == "latency":
            say(f"{mode}: {cfg.latency_rate:,} records/s for {cfg.latency_seconds:g} s")
        else:
            say(f"{mode}:")
        results += run_mode(systems, mode, cfg, runs, say, failures, progress)
    say("")
    if results:
        say(format_table(results))
    if json_path:
        write_json(json_path, results, {**(meta or {}), "failures": failures})
        say(f"wrote {json_path}")
    if plot_path:
        try:
            plot(plot_path, results)
            say(f"wrote {plot_path}")
        except PlotUnavailable as e:
            say(f"plot: not drawn: {e}")
    return results, failures


def exit_status(failures: dict[str, str]) -> int:
    """1 if the bus or the raw ceiling failed (peers may fail without failing the command)."""
    systems = [key.rsplit(" ", 1)[0] for key in failures]
    return 1 if any(name == RAW or is_bus(name) for name in systems) else 0


def command_line(options: dict[str, Any]) -> str:
    """The ``bus bench`` command line that repeats a run with exactly these options (for the JSON file)."""
    words = ["bus", "bench"]
    flags = {"group": ("--group", "--assign"), "send_many": ("--send-many", "--no-send-many"),
             "aio": ("--aio", "--no-aio"), "drain_order": ("--drain-order", "--no-drain-order")}
    for name, value in options.items():
        if name in flags:
            words.append(flags[name][0] if value else flags[name][1])
        elif value is not None and name not in ("json_path", "plot_path"):
            words += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(words)


def bench_command(
    *,
    records: int,
    record_bytes: int,
    values: str,
    partitions: int,
    nodes: int | None,
    replication_factor: str,
    min_insync_replicas: int | None,
    producers: int,
    consumers: int,
    acks: str,
    compression: str,
    linger_ms: float,
    batch_bytes: int,
    sync: str,
    runs: int,
    latency_rate: int,
    latency_seconds: float,
    kills: int,
    peers: str,
    modes: str,
    bootstrap: str | None,
    json_path: str | None,
    plot_path: str | None,
    data_dir: str | None,
    group: bool,
    send_many: bool,
    aio: bool = False,
    drain_order: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """The ``bus bench`` command's body (options as click parses them). Returns the exit status.

    Raises ValueError for options that do not fit together (the command turns it into a usage error)."""
    cfg = BenchConfig(
        record_bytes=record_bytes,
        records=records,
        values=values,
        partitions=partitions,
        producers=producers,
        consumers=consumers,
        sync=sync,
        batch_bytes=batch_bytes,
        linger_ms=linger_ms,
        latency_rate=latency_rate,
        latency_seconds=latency_seconds,
        kills=kills,
        data_dir=data_dir,
    ).validate()
    factors = parse_counts(replication_factor, "--replication-factor")
    acks_list = parse_acks(acks)
    if not acks_list:
        raise ValueError("--acks names no acks")
    base = BusOptions(nodes=nodes, bootstrap=bootstrap, min_insync_replicas=min_insync_replicas, group=group)
    buses = bus_variants(base, factors, acks_list, parse_compressions(compression))
    peer_list = parse_list(peers, PEER_NAMES, "peer")
    mode_list = parse_list(modes, MODES, "mode")
    if not mode_list:
        raise ValueError("--modes names no mode")
    if "failover" in mode_list and bootstrap is not None:
        raise ValueError("--modes failover kills nodes: it needs the cluster the bench starts (not --bootstrap)")
    options = dict(records=records, record_bytes=record_bytes, values=values, partitions=partitions, nodes=nodes,
                   replication_factor=replication_factor, min_insync_replicas=min_insync_replicas,
                   producers=producers, consumers=consumers, acks=acks, compression=compression,
                   linger_ms=linger_ms, batch_bytes=batch_bytes,
                   sync=sync, runs=runs, latency_rate=latency_rate, latency_seconds=latency_seconds, kills=kills,
                   peers=peers, modes=modes, bootstrap=bootstrap, data_dir=data_dir, group=group, send_many=send_many,
                   aio=aio, drain_order=drain_order)
    for path, option in ((json_path, "--json"), (plot_path, "--plot")):
        # Checked before a run that may last an hour, not when its results are written at the end.
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent is not None and not os.path.isdir(parent):
            raise ValueError(f"{option} {path}: the directory {parent} does not exist (create it first)")
    meta = {"command": command_line(options), "options": options}
    _, failures = run_bench(cfg, buses, peers=peer_list, modes=mode_list, runs=runs, send_many=send_many,
                            aio=aio, drain_order=drain_order,
                            json_path=json_path, plot_path=plot_path, say=say, meta=meta,
                            progress=sys.stderr if sys.stderr.isatty() else None)
    for key, message in failures.items():
        say(f"failed: {key}: {message}")
    return exit_status(failures)
