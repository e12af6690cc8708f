"""One fault-harness run, end to end: cluster (and proxies), workload, nemesis, final drain, check.

``run(RunConfig(...), data_dir)`` is what tests/test_faults.py and scripts/chaos.py call. It starts a
LocalCluster under ``data_dir`` (a sabotaged build of its processes if asked; wired through fault proxies,
topology.py, when a fault needs them), creates one topic, runs ``producers`` ProducerWorkers, ``readers``
ReaderWorkers (consumers reading everything during the run) and a HighWatermarkMonitor while the Nemesis
carries out the seeded schedule, heals every fault, waits until every ISR is full, drains every partition
from its log start, stops the cluster cleanly, compares every replica's log below the high watermark (read
from each node's data directory: ``replica`` events) and checks the history. The same config and seed give
the same workload values, partitions and fault schedule (thread timing is not reproducible, by nature).

It owns the orchestration and the timings; clients are in workload.py, faults in nemesis.py, proxy.py and
topology.py, judgement in checker.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass, field

from bus import Admin
from bus import batch as batch_format
from bus.errors import BusError
from nodes.cluster import LocalCluster
from store import LogStore

from .checker import check
from .history import History
from .nemesis import Nemesis, plan
from .sabotage import cluster_options
from .topology import Topology
from .workload import (HighWatermarkMonitor, ProducerWorker, Progress, ReaderWorker, ZombieWorker, drain,
                       wait_in_sync, wait_serving_topic)

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
    kill_leaders: int = 0  # kill -9 + restart of a random partition's current leader
    wipes: int = 0  # kill -9 a random node, delete its data directory, restart it empty
    isolations: int = 0  # a random partition's leader cut off from the coordinator and the other nodes
    isolate_hold_s: tuple = (4.0, 6.0)  # past the coordinator's session timeout, so another node takes over
    cascades: int = 0  # KIP-101's double failover (nemesis.py)
    readers: int = 1  # consumers reading every partition during the run (phantom_reads)
    monitor: bool = True  # ask the leaders for their high watermarks during the run (hw_regressions)
    compare_replicas: bool = True  # at the end, every replica's log below the high watermark (replica_divergence)
    in_sync_timeout_s: float = 90.0  # after healing, how long every ISR may take to be full again
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
    proxy_stats: dict = field(default_factory=dict)  # proxy name -> its stats
    in_sync: bool = False  # every ISR was full again after the heal
    reads: int = 0  # records the readers recorded during the run
    hw_observed: int = 0  # high watermarks the monitor recorded
    replicas_compared: int = 0  # partitions whose replicas were compared at the end

    def summary(self) -> str:
        c = self.config
        lines = [f"records={c.records} partitions={c.partitions} nodes={c.nodes} "
                 f"replication_factor={c.replication_factor or 'default'} "
                 f"min_insync_replicas={c.min_insync_replicas or 'default'} producers={c.producers} "
                 f"seed={c.seed} kills={c.kills} kill_leaders={c.kill_leaders} wipes={c.wipes} "
                 f"isolations={c.isolations} cascades={c.cascades} pauses={c.pauses} "
                 f"coordinator_kills={c.coordinator_kills} cuts={c.cuts} stalls={c.stalls} proxy={c.proxy} "
                 f"drop={c.drop} duplicate={c.duplicate} delay={c.delay} "
                 f"delivery_timeout_ms={c.delivery_timeout_ms} sabotage={c.sabotage or '-'}",
                 "sends: " + " ".join(f"{k}={v}" for k, v in self.outcomes.items()) + f"; drained={self.drained}; "
                 f"read during the run={self.reads}; high watermarks observed={self.hw_observed}; "
                 f"in sync at the end={self.in_sync}; partitions whose replicas were compared={self.replicas_compared}",
                 "faults: " + (", ".join(f"{f.kind} {f.target} {f.hold_s:.1f}s (took {t:.1f}s)"
                                         for f, t in self.faults) or "none"),
                 "timings: " + " ".join(f"{k}={v:.1f}s" for k, v in self.timings.items())]
        if self.proxy_stats:
            lines.append("proxies: " + "; ".join(f"{n} {s}" for n, s in sorted(self.proxy_stats.items())))
        return "\n".join(lines) + "\n" + self.report.table()


def run(config: RunConfig, data_dir: str, log=None) -> RunResult:
    log = log or (lambda message: None)
    timings = {}
    started_s = time.monotonic()
    node_ids = list(range(1, config.nodes + 1))
    topology = None
    cluster_dir = os.path.join(data_dir, "cluster")
    if config.proxy or config.cuts or config.stalls or config.isolations or config.cascades:
        topology = Topology(node_ids, seed=config.seed,
                            coordinator_links=bool(config.isolations or config.cascades))
        cluster = topology.cluster(cluster_dir, config.nodes, node_args=config.node_args,
                                   **cluster_options(config.sabotage))
    else:
        cluster = LocalCluster(cluster_dir, config.nodes, node_args=config.node_args, **cluster_options(config.sabotage))
    history = History()
    workers: list = []
    watchers: list = []  # readers and the monitor: they run until the workload is over
    nemesis = None
    try:
        if topology is not None:
            for proxy in topology.front.values():
                proxy.set_faults(drop=config.drop, duplicate=config.duplicate, delay=config.delay)
            topology.start()
        cluster.start()
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, config.partitions, replication_factor=config.replication_factor,
                               min_insync_replicas=config.min_insync_replicas)
        wait_serving_topic(cluster.bootstrap, TOPIC, config.partitions)
        timings["start"] = time.monotonic() - started_s

        faults = plan(config.seed, node_ids, kills=config.kills, pauses=config.pauses,
                      coordinator_kills=config.coordinator_kills, cuts=config.cuts, stalls=config.stalls,
                      kill_hold_s=config.kill_hold_s, pause_hold_s=config.pause_hold_s,
                      stall_hold_s=config.stall_hold_s, partitions=config.partitions,
                      kill_leaders=config.kill_leaders, wipes=config.wipes, isolations=config.isolations,
                      cascades=config.cascades, isolate_hold_s=config.isolate_hold_s)
        progress = Progress(config.records, [f.at_fraction for f in faults])
        nemesis = Nemesis(cluster, history, faults, progress, topology.front if topology else {}, log=log,
                          topology=topology, topic=TOPIC)
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
        watchers = [ReaderWorker(f"reader-{i}", cluster.bootstrap, TOPIC, config.partitions, history)
                    for i in range(config.readers)]
        if config.monitor:
            watchers.append(HighWatermarkMonitor(cluster.bootstrap, TOPIC, config.partitions, history))
        phase_s = time.monotonic()
        for watcher in watchers:
            watcher.start()
        nemesis.start()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        progress.finish()
        # Faults still running (or not yet begun: a fast workload's tail) are carried out in full; the
        # producers have flushed, so they meet the cluster's recovery at worst.
        nemesis.join(600)
        for watcher in watchers:
            watcher.stop()
        timings["workload"] = time.monotonic() - phase_s
        for worker in [*workers, *watchers]:
            if worker.error is not None:
                raise RuntimeError(f"{worker.name} failed: {worker.error!r}") from worker.error
        if nemesis.error is not None:
            raise RuntimeError(f"the nemesis failed: {nemesis.error!r}") from nemesis.error

        # Heal everything before the drain: every node up, proxies transparent, every replica back in sync.
        phase_s = time.monotonic()
        if topology is not None:
            topology.heal()
        for node_id in node_ids:
            if cluster.nodes[node_id].poll() is not None:
                cluster.restart_node(node_id)
        cluster.wait_ready(60)
        in_sync = wait_in_sync(cluster.bootstrap, TOPIC, config.in_sync_timeout_s)
        if in_sync is None:
            log(f"the ISRs were not all full within {config.in_sync_timeout_s} s of the heal")
        timings["heal"] = time.monotonic() - phase_s
        phase_s = time.monotonic()
        records, log_start = drain(cluster.bootstrap, TOPIC, config.partitions, config.drain_timeout_s,
                                   history=history)
        history.record_drain(records)
        timings["drain"] = time.monotonic() - phase_s

        compared = 0
        if config.compare_replicas:
            phase_s = time.monotonic()
            described = describe_topic(cluster.bootstrap, TOPIC)
            cluster.stop()  # a clean stop: every replica's log and high watermark are on disk
            compared = record_replicas(history, cluster.data_dir, TOPIC, described)
            timings["replicas"] = time.monotonic() - phase_s

        phase_s = time.monotonic()
        report = check(history, log_start=log_start)
        timings["check"] = time.monotonic() - phase_s
        outcomes = {"ok": 0, "fail": 0, "unknown": 0}
        for worker in workers:
            for key, value in worker.outcomes.items():
                outcomes[key] += value
        timings["total"] = time.monotonic() - started_s
        return RunResult(dataclasses.replace(config), report, history, outcomes, len(records),
                         list(nemesis.done), timings,
                         {n: dict(p.stats) for n, p in topology.proxies().items()} if topology else {},
                         in_sync=in_sync is not None,
                         reads=sum(w.read for w in watchers if isinstance(w, ReaderWorker)),
                         hw_observed=sum(w.observed for w in watchers if isinstance(w, HighWatermarkMonitor)),
                         replicas_compared=compared)
    finally:
        if config.history_path:
            history.save(config.history_path)  # also when the run broke off: what happened until then
        if nemesis is not None:
            nemesis.stop()
        for watcher in watchers:
            if watcher.is_alive():
                watcher.stop()
        cluster.stop()
        if topology is not None:
            topology.stop()


def describe_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict:
    """The topic as the coordinator and its leaders describe it (Admin.describe_topic), once it answers."""
    deadline_s = time.monotonic() + timeout_s
    with Admin(bootstrap, request_timeout_ms=2_000) as admin:
        while True:
            try:
                return admin.describe_topic(topic)
            except BusError:
                if time.monotonic() > deadline_s:
                    raise
                time.sleep(0.2)


READ_CHUNK_BYTES = 8 << 20


def record_replicas(history, cluster_dir: str, topic: str, described: dict) -> int:
    """Read every in-sync replica's log of every partition of ``topic`` from its node's (stopped) data
    directory, below the high watermark its leader checkpointed, and record each as a ``replica`` event:
    the digest of those bytes, where they end, and the first batch where it differs from the leader's.
    Replicas outside the ISR (still catching up) are left out: they may lack committed records. Returns
    the number of partitions compared."""
    compared = 0
    for p in described["partitions"]:
        name = f"{described['id']}/{p['partition']}"
        leader = p["leader"] if p["leader"] in p["isr"] else (p["isr"][0] if p["isr"] else None)
        if leader is None:
            continue
        below = _read_log(os.path.join(cluster_dir, f"node-{leader}"), name)[2]  # the leader's high watermark
        scans = {node: _scan(os.path.join(cluster_dir, f"node-{node}"), name, below) for node in p["isr"]}
        for node, (digest, end, ours) in scans.items():
            theirs = scans[leader][2]
            at = next((a[0] for a, b in zip(ours, theirs) if a != b), None)
            if at is None and len(ours) != len(theirs):
                at = (ours if len(ours) > len(theirs) else theirs)[min(len(ours), len(theirs))][0]
            history.record("replicas", "replica", topic=topic, partition=p["partition"], offset=below, node=node,
                           leader=node == leader, digest=digest, end=end, diverges_at=at)
        compared += 1
    return compared


def _read_log(path: str, name: str) -> tuple:
    """(start offset, next offset, high watermark) of log ``name`` in the data directory ``path``."""
    store = LogStore(path)
    try:
        plog = store.open_partition(name)
        return plog.start_offset, plog.next_offset, plog.high_watermark
    finally:
        store.close()


def _scan(path: str, name: str, below: int) -> tuple:
    """Log ``name`` of the data directory ``path`` from its start up to ``below``: (sha256 of its bytes, the
    offset they end at, [(base offset, CRC) of each batch]: where two replicas part, batch by batch)."""
    digest, fingerprints = hashlib.sha256(), []
    store = LogStore(path)
    try:
        plog = store.open_partition(name)
        offset = plog.start_offset
        while offset < min(below, plog.next_offset):
            data, offset = store.read(plog, offset, READ_CHUNK_BYTES, upto=below)
            if not data:
                break
            data = bytes(data)
            digest.update(data)
            at = 0
            while at < len(data):
                header = batch_format.read_header(data, at)
                fingerprints.append((header.base_offset, header.crc))
                at += batch_format.HEADER_BYTES + header.payload_len
        return digest.hexdigest(), offset, fingerprints
    finally:
        store.close()
