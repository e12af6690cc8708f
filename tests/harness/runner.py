"""One fault-harness run, end to end: cluster (and proxies), workload, nemesis, final drain, check.

``run(RunConfig(...), data_dir)`` is what tests/test_faults.py and scripts/chaos.py call. It starts a
LocalCluster under ``data_dir`` (a sabotaged build of its processes if asked), creates one
topic, runs ``producers`` ProducerWorkers while the Nemesis carries out the seeded schedule, heals every
fault, drains every partition from its log start and checks the history. The same config and seed give
the same workload values, partitions and fault schedule (thread timing is not reproducible, by nature).

It owns the orchestration and the timings; clients are in workload.py, faults in nemesis.py and proxy.py,
judgement in checker.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

from bus import Admin
from nodes.cluster import LocalCluster, free_ports

from .checker import check
from .history import History
from .nemesis import Nemesis, plan
from .sabotage import cluster_options
from .proxy import FaultProxy
from .workload import ProducerWorker, Progress, ZombieWorker, drain, wait_serving_topic

TOPIC = "jepsen"


@dataclass
class RunConfig:
    records: int = 200_000  # sends over the whole run, split across the producers
    partitions: int = 12
    nodes: int = 3
    replication_factor: int | None = None  # None: the cluster's default, min(3, nodes)
    min_insync_replicas: int | None = None
    producers: int = 4
    seed: int = 0
    kills: int = 5  # kill -9 + restart of a random node
    pauses: int = 3  # SIGSTOP + SIGCONT of a random node
    coordinator_kills: int = 0
    cuts: int = 0  # a node's proxy drops everything for a while (needs proxy=True)
    stalls: int = 0  # a node's proxy holds everything for a while, then delivers it late
    stall_hold_s: tuple = (1.0, 2.5)
    zombies: int = 0  # rounds of the producer-fencing scenario (workload.ZombieWorker), alongside
    proxy: bool = False  # put a FaultProxy in front of every node
    drop: float = 0.0  # proxy fault rates, per message
    duplicate: float = 0.0
    delay: float = 0.0
    sabotage: str = ""  # the sabotage switches of the cluster's processes (tests/harness/sabotage.py)
    value_bytes: int = 32
    request_timeout_ms: int = 1_000  # shorter than a pause, so pauses make producers time out and retry
    delivery_timeout_ms: int = 60_000
    linger_ms: int = 5
    rate: int = 15_000  # sends per second over all producers (0: unlimited); a steady pace puts every
    # fault in a busy cluster, where an unlimited workload would race past the schedule's last gate
    kill_hold_s: tuple = (0.2, 1.0)
    pause_hold_s: tuple = (1.5, 3.0)
    drain_timeout_s: float = 120.0
    node_args: tuple = ()
    history_path: str | None = None  # save the history (JSON lines) here


@dataclass
class RunResult:
    config: RunConfig
    report: object  # checker.Report
    history: History
    outcomes: dict  # ok / fail / unknown counts over all sends
    drained: int  # records in the final drain
    faults: list  # [(Fault, seconds from start to healed)]
    timings: dict = field(default_factory=dict)  # phase -> seconds
    proxy_stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.config
        lines = [f"records={c.records} partitions={c.partitions} nodes={c.nodes} "
                 f"replication_factor={c.replication_factor or 'default'} producers={c.producers} "
                 f"seed={c.seed} kills={c.kills} pauses={c.pauses} coordinator_kills={c.coordinator_kills} "
                 f"cuts={c.cuts} stalls={c.stalls} proxy={c.proxy} drop={c.drop} duplicate={c.duplicate} "
                 f"delay={c.delay} delivery_timeout_ms={c.delivery_timeout_ms} "
                 f"sabotage={c.sabotage or '-'}",
                 "sends: " + " ".join(f"{k}={v}" for k, v in self.outcomes.items()) + f"; drained={self.drained}",
                 "faults: " + (", ".join(f"{f.kind} {f.target} {f.hold_s:.1f}s (took {t:.1f}s)"
                                         for f, t in self.faults) or "none"),
                 "timings: " + " ".join(f"{k}={v:.1f}s" for k, v in self.timings.items())]
        if self.proxy_stats:
            lines.append("proxies: " + "; ".join(f"node-{n} {s}" for n, s in sorted(self.proxy_stats.items())))
        return "\n".join(lines) + "\n" + self.report.table()


def run(config: RunConfig, data_dir: str, log=None) -> RunResult:
    log = log or (lambda message: None)
    timings = {}
    started_s = time.monotonic()
    node_ids = list(range(1, config.nodes + 1))
    proxies: dict[int, FaultProxy] = {}
    if config.proxy or config.cuts or config.stalls:
        for node_id, port in zip(node_ids, free_ports(config.nodes)):
            proxies[node_id] = FaultProxy(f"tcp://127.0.0.1:{port}", "", seed=config.seed, name=f"node-{node_id}")
    cluster = LocalCluster(os.path.join(data_dir, "cluster"), config.nodes, node_args=config.node_args,
                           advertise={n: p.listen for n, p in proxies.items()}, **cluster_options(config.sabotage))
    history = History()
    workers: list[ProducerWorker] = []
    nemesis = None
    try:
        for node_id, proxy in proxies.items():
            proxy.upstream = cluster.node_address(node_id)
            proxy.set_faults(drop=config.drop, duplicate=config.duplicate, delay=config.delay)
            proxy.start()
        cluster.start()
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, config.partitions, replication_factor=config.replication_factor,
                               min_insync_replicas=config.min_insync_replicas)
        wait_serving_topic(cluster.bootstrap, TOPIC, config.partitions)
        timings["start"] = time.monotonic() - started_s

        faults = plan(config.seed, node_ids, kills=config.kills, pauses=config.pauses,
                      coordinator_kills=config.coordinator_kills, cuts=config.cuts, stalls=config.stalls,
                      kill_hold_s=config.kill_hold_s, pause_hold_s=config.pause_hold_s,
                      stall_hold_s=config.stall_hold_s)
        progress = Progress(config.records, [f.at_fraction for f in faults])
        nemesis = Nemesis(cluster, history, faults, progress, proxies, log=log)
        options = {"linger_ms": config.linger_ms, "request_timeout_ms": config.request_timeout_ms,
                   "delivery_timeout_ms": config.delivery_timeout_ms, "retry_backoff_ms": 20}
        share, extra = divmod(config.records, config.producers)
        workers = [ProducerWorker(f"producer-{i}", cluster.bootstrap, TOPIC, config.partitions,
                                  share + (1 if i < extra else 0), history, progress, seed=config.seed,
                                  value_bytes=config.value_bytes, producer_options=options,
                                  flush_timeout_s=config.delivery_timeout_ms / 1000 + 10,
                                  rate=config.rate / config.producers)
                   for i in range(config.producers)]
        if config.zombies:
            workers.append(ZombieWorker(cluster.bootstrap, TOPIC, config.partitions, config.zombies, history,
                                        seed=config.seed))
        phase_s = time.monotonic()
        nemesis.start()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        progress.finish()
        # Faults still running (or not yet begun: a fast workload's tail) are carried out in full; the
        # producers have flushed, so they meet the cluster's recovery at worst.
        nemesis.join(600)
        timings["workload"] = time.monotonic() - phase_s
        for worker in workers:
            if worker.error is not None:
                raise RuntimeError(f"{worker.name} failed: {worker.error!r}") from worker.error
        if nemesis.error is not None:
            raise RuntimeError(f"the nemesis failed: {nemesis.error!r}") from nemesis.error

        # Heal everything before the drain: every node up, proxies transparent.
        phase_s = time.monotonic()
        for proxy in proxies.values():
            proxy.heal()
        for node_id in node_ids:
            if cluster.nodes[node_id].poll() is not None:
                cluster.restart_node(node_id)
        cluster.wait_ready(60)
        records, log_start = drain(cluster.bootstrap, TOPIC, config.partitions, config.drain_timeout_s)
        history.record_drain(records)
        timings["drain"] = time.monotonic() - phase_s

        phase_s = time.monotonic()
        report = check(history, log_start=log_start)
        timings["check"] = time.monotonic() - phase_s
        outcomes = {"ok": 0, "fail": 0, "unknown": 0}
        for worker in workers:
            for key, value in worker.outcomes.items():
                outcomes[key] += value
        timings["total"] = time.monotonic() - started_s
        return RunResult(dataclasses.replace(config), report, history, outcomes, len(records),
                         list(nemesis.done), timings, {n: dict(p.stats) for n, p in proxies.items()})
    finally:
        if config.history_path:
            history.save(config.history_path)  # also when the run broke off: what happened until then
        if nemesis is not None:
            nemesis.stop()
        cluster.stop()
        for proxy in proxies.values():
            proxy.stop()
