"""What the bench's peers (redis_peer.py, nats_peer.py) share: how a peer's server is found, started and
waited for, how a latency-mode record carries its send time, and the one set of produce / consume /
latency runs that every peer goes through.

A peer is a ``Peer``: its check, its server (a ``PeerServer``: a free loopback port, a fresh data
directory, stopped and reaped on the way out) and the client functions its processes run through the
peer's usual Python client. ``peer_system()`` turns it into a bench ``System``. A record is
``record_bytes`` of value, one of ``BenchConfig.client_values`` (values.py); in latency mode the value
starts with its send time (``stamp``).

This module must never know a peer's protocol, nor import a peer's client library.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from .harness import Gate, run_clients, scratch_dir, stop_processes, storage_notes
from .pacer import Pacer
from .results import (
    SEND_TIME,
    BenchConfig,
    BenchError,
    ClientReport,
    PeerUnavailable,
    Result,
    System,
    assign_partitions,
    build_result,
    expected_per_partition,
    latency_result,
    split,
)

SERVER_START_TIMEOUT_S = 20.0


def find_exe(name: str) -> str | None:
    """``name`` on this interpreter's bin directory first (a pip-installed server), then on PATH."""
    here = os.path.dirname(sys.executable)
    return shutil.which(name, path=here + os.pathsep + os.environ.get("PATH", os.defpath))


def server_exe(name: str, install: str) -> str:
    """The path of the server ``name`` (``find_exe``); PeerUnavailable saying how to ``install`` it if none."""
    exe = find_exe(name)
    if exe is None:
        raise PeerUnavailable(f"{name} not installed: {install}")
    return exe


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server is started on it straight after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(proc: subprocess.Popen, probe: Any, log: str, what: str, retry_on: tuple = (OSError,)) -> None:
    """Poll ``probe()`` until it succeeds; fail loudly if the server exits, the deadline passes, or
    ``probe`` raises anything but ``retry_on`` (not up yet)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} while starting:\n{_log_tail(log)}")
        try:
            probe()
            return
        except retry_on as e:
            last = e
            time.sleep(0.05)
    raise BenchError(f"{what} not ready within {SERVER_START_TIMEOUT_S} s ({last!r}):\n{_log_tail(log)}")


def send_time_ns(value: bytes) -> int:
    """The send time (``time.time_ns()``) a latency-mode record's value starts with."""
    return SEND_TIME.unpack_from(value)[0]


def stamp(t_ns: int, rest: bytes) -> bytes:
    """A latency-mode record's value: its send time ``t_ns``, then ``rest`` (``BenchConfig.latency_tails``)."""
    return SEND_TIME.pack(t_ns) + rest


def paced_start(
    gate: Gate, report: ClientReport, cfg: BenchConfig, rate_per_s: float, count: int, batch_records_max: int
) -> tuple[Pacer, int]:
    """A latency-mode producer's start: wait at the gate, then pace ``count`` records from the release.

    Returns the ``Pacer`` and the offset from its (monotonic) clock to the wall clock, so that record ``k``
    carries ``stamp(pacer.due_ns(k) + wall_offset_ns, rest)``: the wall time it was due, not when it went."""
    start_ns = gate.wait()
    wall_offset_ns = time.time_ns() - start_ns
    report.start_ns = start_ns
    return Pacer(rate_per_s, count, int(cfg.linger_ms * 1e6), batch_records_max, start_ns), wall_offset_ns


class PeerServer:
    """A peer's server process for a ``with`` block: ``__enter__`` (per peer) starts it on a free port and
    waits until it serves; leaving the block always stops it."""

    def __init__(self, cfg: BenchConfig, data_dir: str):
        self.cfg = cfg
        self.data_dir = data_dir
        self.port = 0
        self.pid = 0
        self.notes: list[str] = []
        self._proc: subprocess.Popen | None = None

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            stop_processes([self._proc])


@dataclass(frozen=True)
class Peer:
    """What differs between the peers: the server to start and the client functions its processes run."""

    name: str
    check: Callable[[], None]
    server: Callable  # (cfg, data_dir) -> a context manager with .port, .pid, .notes
    produce_client: Callable
    consume_client: Callable
    latency_consume_client: Callable
    latency_produce_client: Callable


def _run_produce(peer: Peer, cfg: BenchConfig) -> Result:
    cfg.validate()
    peer.check()
    with scratch_dir(cfg, peer.name) as d, peer.server(cfg, d) as srv:
        shares = enumerate(split(cfg.records, cfg.producers))
        clients = [(peer.produce_client, (srv.port, cfg, j, n)) for j, n in shares]
        reports, usage = run_clients(clients, [srv.pid], cfg.timeout_s)
        notes = srv.notes + storage_notes(d, cfg.sync)
        return build_result(peer.name, "produce", cfg, reports, usage, latency_kind="ack", notes=notes)


def _run_consume(peer: Peer, cfg: BenchConfig) -> Result:
    cfg.validate()
    peer.check()
    with scratch_dir(cfg, peer.name) as d, peer.server(cfg, d) as srv:
        load = [(peer.produce_client, (srv.port, cfg, j, n)) for j, n in enumerate(split(cfg.records, cfg.producers))]
        loaded, _ = run_clients(load, [srv.pid], cfg.timeout_s)
        stored = [sum(r.extra["per_partition"][p] for r in loaded) for p in range(cfg.partitions)]
        clients = [
            (peer.consume_client, (srv.port, cfg, parts, [stored[p] for p in parts]))
            for parts in assign_partitions(cfg.partitions, cfg.consumers)
        ]
        reports, usage = run_clients(clients, [srv.pid], cfg.timeout_s)
        return build_result(peer.name, "consume", cfg, reports, usage, notes=srv.notes + storage_notes(d, cfg.sync))


def _run_latency(peer: Peer, cfg: BenchConfig, rate_per_s: float | None = None) -> Result:
    cfg.validate()
    peer.check()
    rate = float(rate_per_s or cfg.latency_rate)
    per_producer = split(cfg.latency_records(rate), cfg.producers)
    per_partition = expected_per_partition(per_producer, cfg.partitions)
    with scratch_dir(cfg, peer.name) as d, peer.server(cfg, d) as srv:
        consumers = [
            (peer.latency_consume_client, (srv.port, cfg, parts, [per_partition[p] for p in parts]))
            for parts in assign_partitions(cfg.partitions, cfg.consumers)
        ]
        producers = [
            (peer.latency_produce_client, (srv.port, cfg, j, n, rate / cfg.producers))
            for j, n in enumerate(per_producer)
        ]
        reports, usage = run_clients(consumers + producers, [srv.pid], cfg.timeout_s)
        k = len(consumers)
        notes = srv.notes + storage_notes(d, cfg.sync)
        return latency_result(peer.name, cfg, rate, reports[:k], reports[k:], usage, notes)


def peer_system(name, check, server, produce_client, consume_client, latency_consume_client,
                latency_produce_client) -> System:
    """A peer as a bench ``System``: the same produce / consume / latency runs for every peer."""
    peer = Peer(name, check, server, produce_client, consume_client, latency_consume_client, latency_produce_client)
    return System(name, partial(_run_produce, peer), partial(_run_consume, peer), partial(_run_latency, peer),
                  check=check)
