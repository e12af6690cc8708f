"""Failover mode: kill -9 of a partition's leader while a producer sends with the bench's acks, ``kills`` times
over; the figure is the longest wait between acknowledgements around each kill.

One run (``run_failover``): a LocalCluster of ``opts.node_count`` nodes and the bench's topic with
``opts.replication_factor`` replicas; one producer process (``failover_client``) offers ``latency_rate``
records/s to partition 0 through ``Producer.send()`` and timestamps every acknowledgement. Meanwhile a
thread of the bench process (``Killer``) repeats, ``kills`` times:

1. wait until every replica of partition 0 is in its ISR (each kill starts from a fully replicated
   partition: with min_insync_replicas 2 of 3, a kill while one follower is still catching up would stop
   acks=all produces for good, which is not what is measured) and acknowledgements flow;
2. read the leader from ``Admin.describe_topic``, ``kill_node`` it (SIGKILL), note the time;
3. wait until the metadata names another leader, then until acknowledgements come again;
4. after ``RESTART_AFTER_S``, ``start_node`` the killed node (on its own disk) and wait until it serves.

Afterwards ``stats.longest_gaps`` takes, for each kill, the longest interval between consecutive
acknowledgements from the last one before the kill to the next kill (so the killed node's restart and
return to the ISR count against the kill that caused them). The table's latency columns are those gaps,
one sample per kill (p99 of 20 kills is nearly their maximum); ``kill_notes``, which the runner adds once
over all of a system's runs, pools every kill and splits its gap into kill -> new leader in the metadata
and kill -> acknowledged again.

The node processes change under it, so their CPU and memory are not sampled. This module imports the bus
and nodes only inside the functions that run the cluster or the client, as bus_system.py does.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from array import array
from typing import Any

from .bus_system import ACKS_WAIT_TIMEOUT_S, BusCluster, BusOptions, bench_producer
from .harness import Gate, progress_sink, run_clients, scratch_dir, showing_progress, wait_toward
from .pacer import Pacer
from .results import BenchConfig, BenchError, ClientReport, Result, build_result
from .stats import longest_gaps

PARTITION = 0  # the partition produced to, and whose leader is killed
KILL_WARM_S = 1.0  # acknowledgements flow this long before each kill (and after the last restart)
RESTART_AFTER_S = 1.0  # after acknowledgements come again from the new leader, before the old one restarts
STEP_TIMEOUT_S = 60.0  # each step of a kill's cycle (in sync, new leader, acks again, serving) within this
POLL_INTERVAL_S = 0.02  # how often the killer looks at the metadata and the acknowledgement count
LOG_TAIL_LINES = 15  # of each process's log, in the error of a failed run


class _Stopped(Exception):
    """The run was stopped from outside (the client failed): the killer gives up quietly."""


# --------------------------------------------------------------------------------------------------------------
# The producer process


def failover_client(
    bootstrap: str, topic: str, cfg: BenchConfig, acks: Any, compression: str | None, acked: Any, stop: Any,
    gate: Gate
) -> ClientReport:
    """Offer ``cfg.latency_rate`` records/s to partition ``PARTITION`` until ``stop`` is set; every
    acknowledgement is an event (its monotonic time), and ``acked.value`` counts them for the killer."""
    producer = bench_producer(bootstrap, cfg, acks, compression)
    values = cfg.client_values(0)
    report = ClientReport(0, 0, 0)
    errors: list[str] = []
    completed = [0]

    def on_ack(metadata: Any, error: BaseException | None) -> None:  # on the producer's sender thread
        now = time.monotonic_ns()
        completed[0] += 1
        if error is not None:
            errors.append(repr(error))
            return
        report.add_event(now, 1)
        acked.value += 1

    try:
        producer._partitions(topic)
        start = gate.wait()
        report.start_ns = start
        # No end: the producer sends until the killer is done (stop), however long the kills take.
        pacer = Pacer(float(cfg.latency_rate), 1 << 62, 0, 1 << 30, start)
        send = producer.send
        sent = 0
        while not stop.is_set():
            due = pacer.take(time.monotonic_ns())
            if due is None:
                wait_toward(pacer.next_deadline_ns())
                continue
            for k in due:
                send(topic, values[k % len(values)], partition=PARTITION).add_callback(on_ack)
            sent += len(due)
        producer.flush()
        deadline = time.monotonic() + ACKS_WAIT_TIMEOUT_S
        while completed[0] < sent and time.monotonic() < deadline:
            time.sleep(0.001)
        report.records = len(report.events_t_ns)
        report.end_ns = report.events_t_ns[-1] if report.records else time.monotonic_ns()
        report.extra.update(sent=sent, errors=len(errors), first_error=errors[0] if errors else None)
        return report
    finally:
        producer.close()


# --------------------------------------------------------------------------------------------------------------
# The killer, in the bench process


class Killer:
    """Kills partition ``PARTITION``'s leader ``kills`` times (``run``, on a thread), noting when."""

    def __init__(self, cluster: Any, bootstrap: str, topic: str, kills: int, acked: Any, stop: Any):
        self.cluster, self.bootstrap, self.topic, self.kills = cluster, bootstrap, topic, kills
        self.acked, self.stop = acked, stop
        self.done = 0  # kills whose node is back and serving
        self.cycles: list[dict] = []  # per kill: the node, its successor, and when each step happened (ns)
        self.stopped_ns = 0  # when the killer was done (the end of the last kill's window)
        self.error: BaseException | None = None

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped()

    def _until(self, cond, what: str) -> Any:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                raise BenchError(f"failover: {what} not within {STEP_TIMEOUT_S:g} s")
            self._sleep(POLL_INTERVAL_S)

    def _state(self, admin: Any) -> dict:
        """Partition PARTITION in the coordinator's metadata (no request to its leader, which may be dead)."""
        return admin.list_topics()[self.topic]["partitions"][PARTITION]

    def _in_sync(self, admin: Any) -> bool:
        state = self._state(admin)
        return state["leader"] != -1 and sorted(state["isr"]) == sorted(state["replicas"])

    def _acks_flowing(self, seconds: float) -> None:
        before = self.acked.value
        self._sleep(seconds)
        self._until(lambda: self.acked.value > before, "acknowledgements")

    def run(self) -> None:
        from bus import Admin

        try:
            with Admin(self.bootstrap) as admin:
                self._until(lambda: self.acked.value > 0, "the first acknowledgement")
                for _ in range(self.kills):
                    self._until(lambda: self._in_sync(admin), "every replica in sync")
                    self._acks_flowing(KILL_WARM_S)
                    leader = admin.describe_topic(self.topic)["partitions"][PARTITION]["leader"]
                    cycle = {"node": leader, "kill_ns": time.monotonic_ns()}
                    self.cluster.kill_node(leader)  # SIGKILL; returns once the process is gone
                    self.cycles.append(cycle)
                    state = self._until(
                        lambda: (s := self._state(admin))["leader"] not in (leader, -1) and s, "a new leader")
                    cycle.update(new_leader=state["leader"], elected_ns=time.monotonic_ns())
                    at_election = self.acked.value
                    self._until(lambda: self.acked.value > at_election, "acknowledgements from the new leader")
                    cycle["acked_again_ns"] = time.monotonic_ns()
                    self._sleep(RESTART_AFTER_S)
                    self.cluster.start_node(leader)
                    self.cluster.wait_serving(leader, STEP_TIMEOUT_S)
                    cycle["restarted_ns"] = time.monotonic_ns()
                    self.done += 1
                self._until(lambda: self._in_sync(admin), "every replica in sync")
                self._acks_flowing(KILL_WARM_S)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the bench's thread, which raises it
            self.error = exc
        finally:
            self.stopped_ns = time.monotonic_ns()
            self.stop.set()


# --------------------------------------------------------------------------------------------------------------
# The run


def _seconds(values_ns: list[int]) -> str:
    if not values_ns:
        return "-"
    return f"p50 {statistics.median(values_ns) / 1e9:.2f} s, max {max(values_ns) / 1e9:.2f} s"


def describe_failover(acks: Any, rate: float) -> str:
    """The note that says what a failover row's figures are."""
    from nodes.controller import NODE_SESSION_TIMEOUT_MS

    return (f"kill -9 of partition {PARTITION}'s leader while one producer offered {rate:,.0f} records/s there "
            f"with acks={acks}; p50/p99/max ms = the longest wait between acknowledgements around each kill, "
            f"one sample per kill (node session timeout {NODE_SESSION_TIMEOUT_MS / 1000:g} s)")


def kill_notes(results: list[Result]) -> list[str]:
    """The steps of every kill of ``results`` (one system's failover runs) pooled: how long until the
    metadata named a new leader, how long until acknowledgements came again, and the gaps over all kills."""
    cycles = [c for r in results for c in r.config.get("failover", [])]
    if not cycles:
        return []
    gaps = sorted(c["gap_to_ns"] - c["gap_from_ns"] for c in cycles)
    p99 = gaps[max(0, -(-99 * len(gaps) // 100) - 1)]  # nearest rank, as stats.percentiles
    runs = f" of {len(results)} runs" if len(results) > 1 else ""
    notes = [
        f"all {len(cycles)} kills{runs}: longest ack gap p50 {statistics.median(gaps) / 1e6:,.0f} ms, "
        f"p99 {p99 / 1e6:,.0f} ms, max {gaps[-1] / 1e6:,.0f} ms",
        "kill -> new leader in the metadata: " + _seconds([c["elected_ns"] - c["kill_ns"] for c in cycles
                                                           if "elected_ns" in c]),
        "kill -> acknowledged again (the end of its longest gap): " + _seconds(
            [c["gap_to_ns"] - c["kill_ns"] for c in cycles]),
    ]
    unended = sum(1 for c in cycles if c["gap_open"])
    if unended:
        notes.append(f"{unended} kill(s) with no acknowledgement before the next: their gaps are lower bounds")
    return notes


def failure_context(cluster: Any, killer: Killer, lines: int = LOG_TAIL_LINES) -> str:
    """What a failed failover run leaves to go on (its scratch directory is removed): the kill under way,
    and the last lines each process of the cluster logged."""
    out = [f"after {killer.done} kill(s); the last: {killer.cycles[-1] if killer.cycles else None}"]
    for name in ["coordinator", *(f"node-{n}" for n in sorted(cluster.nodes))]:
        tail = cluster.log_tail(name, lines).rstrip()
        out.append(f"--- {name} (last {lines} lines) ---\n{tail or '(nothing)'}")
    return "\n".join(out)


def run_failover(name: str, opts: BusOptions, cfg: BenchConfig) -> Result:
    """One failover run of the bus as ``opts`` says (``kills`` leader kills): see the module docstring."""
    cfg.validate()
    if opts.bootstrap is not None:
        raise BenchError("failover mode kills nodes: it needs the cluster the bench starts (not --bootstrap)")
    if opts.replication_factor < 2:
        raise BenchError("failover mode needs a replication factor of 2 or more")
    ctx = multiprocessing.get_context("spawn")
    acked, stop = ctx.Value("q", 0, lock=False), ctx.Event()  # one writer: the client's sender thread
    with scratch_dir(cfg, "bus") as d, BusCluster(cfg, opts, d) as cl:
        killer = Killer(cl.local, cl.bootstrap, cl.topic, cfg.kills, acked, stop)
        thread = threading.Thread(target=killer.run, name="bench-killer", daemon=True)
        outer = progress_sink()
        client = (failover_client, (cl.bootstrap, cl.topic, cfg, opts.acks, opts.compression, acked, stop))
        thread.start()
        try:
            # The progress shown is kills done, not records: what this run is made of.
            with showing_progress(None if outer is None else (lambda _records: outer(killer.done))):
                reports, _ = run_clients([client], [], cfg.timeout_s + cfg.kills * 4 * STEP_TIMEOUT_S)
        finally:
            stop.set()
            thread.join()
        if killer.error is not None:
            raise BenchError(f"{killer.error}\n{failure_context(cl.local, killer)}") from killer.error
        report = reports[0]
        kill_ns = [c["kill_ns"] for c in killer.cycles]
        gaps = longest_gaps(report.events_t_ns, kill_ns, killer.stopped_ns)
        report.latencies_ns = array("q", [end - start for start, end, _ in gaps])
        result = build_result(name, "failover", cfg, reports, None, latency_kind="ack_gap",
                              target_rate=float(cfg.latency_rate))
        result.notes.append(describe_failover(opts.acks, cfg.latency_rate))
        if report.extra["errors"]:
            result.notes.append(f"{report.extra['errors']} record(s) failed; first: {report.extra['first_error']}")
        result.config["bus"] = {**opts.__dict__, "nodes": opts.node_count}
        result.config["failover"] = [
            {**c, "gap_from_ns": g[0], "gap_to_ns": g[1], "gap_open": g[2]}
            for c, g in zip(killer.cycles, gaps)
        ]
        return result
