"""``bus bench``: the multi-process benchmark of the bus against its raw ceiling and its peers.

Each system is a ``System`` with ``run_produce(cfg)``, ``run_consume(cfg)`` and ``run_latency(cfg, rate)``
returning a ``Result``; ``SYSTEMS`` holds the baselines (the bus's own runner is added beside them).
"""

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
    stop_processes,
    storage_notes,
    throughput,
)

SYSTEMS = {s.name: s for s in (RAW, REDIS, NATS)}

__all__ = [
    "MODES",
    "NATS",
    "RAW",
    "REDIS",
    "SYSTEMS",
    "BenchConfig",
    "BenchError",
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
    "stop_processes",
    "storage_notes",
    "throughput",
    "to_json",
    "write_json",
]
