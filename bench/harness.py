"""The bench's process harness: client processes started together, the servers sampled, everything reaped.

Every system the bench compares is driven by this same code, so that their figures differ only by the
system:

- ``run_clients`` starts client processes with the "spawn" context, holds them at a start ``Gate`` until
  all are connected, releases them together, samples the server processes' CPU and RSS while they run
  (``ResourceSampler``), and always reaps them; ``showing_progress`` lets a caller watch the records done.
  The clients' ``ClientReport``s become a ``Result`` in results.py.
- ``run_interleaved`` / ``round_order`` alternate the systems across repeated runs.
- ``scratch_dir`` gives each run fresh storage and removes it; ``storage_notes`` says when that storage
  makes ``sync=always`` meaningless (tmpfs).
- ``reap`` / ``stop_processes`` end client and server processes, politely first.

Clocks: durations and timelines use ``time.monotonic_ns()``, which on Linux is one system-wide clock and so
comparable across processes; end-to-end latency uses ``time.time_ns()`` carried inside the record.

psutil is imported when this module loads, not when first sampled: the harness cannot measure without it,
and ``bus bench`` turns its absence into the install hint before anything has started.

This module must never know a system's protocol: no zmq, LMDB, Redis or NATS here.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psutil

from .results import BenchConfig, BenchError, ClientReport, Result, ServerUsage, System, median_of_runs
from .stats import MB

CLIENT_READY_TIMEOUT_S = 60.0  # a client that cannot connect and set up within this is broken
SAMPLE_INTERVAL_S = 0.1  # how often the server's RSS is sampled
PROGRESS_INTERVAL_S = 0.5  # how often the harness shows the records its clients have done
REAP_TIMEOUT_S = 5.0  # per step of join -> terminate -> kill
PACE_SPIN_NS = 50_000  # a latency-mode producer sleeps until this close to its next due record, then spins


def wait_toward(deadline_ns: int) -> None:
    """One step of a latency-mode producer's wait for its next due record (the caller loops until it is
    due): a sleep to PACE_SPIN_NS before ``deadline_ns``, then ``sleep(0)`` each round, which lets go of the
    GIL (a bare spin would hold it against a client's own threads, such as the bus producer's sender).

    A record's lateness counts in its latency, so every system's producer waits through this one function:
    ``time.sleep`` alone wakes 60-115 us late (the kernel's timer slack, the wake-up: docs/benchmarks.md, P),
    and a poll's timeout in whole milliseconds up to 1 ms late (raw's producer until 2026-12-04: p50 0.29 ms
    late, p90 0.7 ms)."""
    wait_ns = deadline_ns - time.monotonic_ns()
    time.sleep((wait_ns - PACE_SPIN_NS) / 1e9 if wait_ns > 2 * PACE_SPIN_NS else 0)


# --------------------------------------------------------------------------------------------------------------
# Repeated runs


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


# Progress while clients run. In a client process, ``ClientReport.progress_slot`` is (the shared counts, its
# index): ``ClientReport.add_event`` adds each event's records there. In the harness, ``_progress_sink`` (set
# with ``showing_progress``) is shown the sum every PROGRESS_INTERVAL_S while run_clients waits for the reports.
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


def progress_sink() -> Callable[[int], None] | None:
    """What ``showing_progress`` set, if anything: a run that counts its progress in something other than
    records (failover: kills) wraps it."""
    return _progress_sink


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
    if gate.done_counts is not None:
        ClientReport.progress_slot = (gate.done_counts, gate.index)
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
            except psutil.Error:
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
            except psutil.Error:
                pass
        self._rss_peak = max(self._rss_peak, rss)
        self._anon_peak = max(self._anon_peak, anon)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample_rss()

    def alive(self) -> bool:
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self._procs)

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
