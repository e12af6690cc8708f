"""``bus bench``: the multi-process benchmark of the bus against its raw ceiling and its peers.

Each system is a ``System`` with ``run_produce(cfg)``, ``run_consume(cfg)`` and ``run_latency(cfg, rate)``
returning a ``Result``; ``SYSTEMS`` holds the baselines, ``BUS`` (``make_bus_system(BusOptions(...))``) the
bus, and ``runner.run_bench`` is what ``bus bench`` runs.
"""

from .bus_system import SYSTEM as BUS
from .bus_system import BusOptions, make_bus_system
from .peers import NATS, REDIS
from .raw import SYSTEM as RAW
from .report import PlotUnavailable, format_table, load_json, plot, to_json, write_json
from .stats import (
    MODES,
    BenchConfig,
    BenchError,
    ClientReport,
    Gate,
    Pacer,
    PeerUnavailable,
    Result,
    ServerUsage,
    System,
    assign_partitions,
    build_result,
    expected_per_partition,
    latency_result,
    median_of_runs,
    percentiles,
    ratio,
    ratios,
    reap,
    record_partition,
    run_clients,
    run_interleaved,
    scratch_dir,
    split,
    steadiness,
    stop_processes,
    storage_notes,
    throughput,
)

SYSTEMS = {s.name: s for s in (RAW, REDIS, NATS)}  # the baselines; the bus is BUS (make_bus_system for options)

__all__ = [
    "BUS",
    "MODES",
    "NATS",
    "RAW",
    "REDIS",
    "SYSTEMS",
    "BenchConfig",
    "BenchError",
    "BusOptions",
    "ClientReport",
    "Gate",
    "Pacer",
    "PeerUnavailable",
    "PlotUnavailable",
    "Result",
    "ServerUsage",
    "System",
    "assign_partitions",
    "build_result",
    "expected_per_partition",
    "format_table",
    "latency_result",
    "load_json",
    "make_bus_system",
    "median_of_runs",
    "percentiles",
    "plot",
    "ratio",
    "ratios",
    "reap",
    "record_partition",
    "run_clients",
    "run_interleaved",
    "scratch_dir",
    "split",
    "steadiness",
    "stop_processes",
    "storage_notes",
    "throughput",
    "to_json",
    "write_json",
]
