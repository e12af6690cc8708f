"""``bus bench``: the multi-process benchmark of the bus against its raw ceiling and its peers.

Each system is a ``System`` with ``run_produce(cfg)``, ``run_consume(cfg)`` and ``run_latency(cfg, rate)``
(and, for a replicated bus, ``run_failover(cfg)``) returning a ``Result``; ``SYSTEMS`` holds the baselines,
``BUS`` (``make_bus_system(BusOptions(...))``: one replica, acks=1 unless told) the bus, and
``runner.run_bench`` is what ``bus bench`` runs.

The modules: results.py (the workload, the results and their arithmetic), values.py (what the records
hold), stats.py (the pure statistics), pacer.py (fixed-rate pacing), harness.py (the client processes and the servers' sampling), raw.py (the
ceiling), bus_system.py (the bus), failover.py (the bus's leaders killed while it produces), peer.py with
redis_peer.py and nats_peer.py (the peers), kafka_clients.py (Kafka's clients against the bus's Kafka listener), report.py (the table, JSON and plot) and runner.py (the command
end to end).
"""

from .bus_system import SYSTEM as BUS
from .bus_system import BusOptions, make_bus_system
from .harness import Gate, reap, run_clients, run_interleaved, scratch_dir, stop_processes, storage_notes
from .kafka_clients import KAFKA_CLIENT_SYSTEMS
from .nats_peer import NATS
from .pacer import Pacer
from .raw import SYSTEM as RAW
from .redis_peer import REDIS
from .report import PlotUnavailable, format_table, load_json, plot, to_json, write_json
from .results import (
    MODES,
    BenchConfig,
    BenchError,
    ClientReport,
    PeerUnavailable,
    Result,
    ServerUsage,
    System,
    assign_partitions,
    build_result,
    expected_per_partition,
    latency_result,
    median_of_runs,
    ratio,
    ratios,
    record_partition,
    split,
)
from .stats import percentiles, steadiness, throughput

# The baselines (and Kafka's clients against the bus); the bus is BUS (make_bus_system for options).
SYSTEMS = {**{s.name: s for s in (RAW, REDIS, NATS)}, **KAFKA_CLIENT_SYSTEMS}

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
