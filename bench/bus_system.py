"""The bus itself as a ``System`` of the bench: a LocalCluster, producer processes and consumer processes.

``make_bus_system(BusOptions(...))`` returns a ``results.System`` whose runners measure the bus exactly as
the raw ceiling and the peers are measured (same ``BenchConfig``, same start gate, same arithmetic):

- The cluster: a ``LocalCluster`` (a coordinator and ``nodes`` node processes, ``--sync`` from the config)
  on fresh storage for every run, or, with ``bootstrap``, a cluster that is already running (then the
  bench makes a topic of its own, deletes it afterwards, and cannot sample the nodes' CPU and memory).
  Server CPU and RSS are sampled on the node processes (the coordinator only answers metadata, producer
  ids and group heartbeats).
- Produce: each producer process calls ``Producer.send()`` once per record (``send_many=True``: it hands
  ``SEND_MANY_RECORDS`` records at a time to ``send_many``), sticky partitioning as users get it, its
  values cycled from ``cfg.client_values`` (values.py) and compressed as ``compression`` says. The
  acknowledgement latency is taken per chunk of ``ACK_CHUNK_RECORDS`` records: from the moment ``send()``
  returned for the chunk's last record to its acknowledgement (a callback on that record's future), and
  it stands for every record of the chunk. Raw's "batch sent -> acked" starts later (when the batch is
  full), so the bus's figure also holds the linger and the wait for the batch to fill. After the run the
  cluster is stopped and each node's store opened to add up what it holds (``BusCluster.storage``: the
  stored batches' bytes, every replica, and the LMDB files' size), so compressed and uncompressed rows
  can be compared by the space they take.
- Consume: the records are loaded first (not measured); then each consumer process reads its share with
  ``poll()``, as a member of one consumer group (``group=True``) or by ``assign()`` over
  ``results.assign_partitions``. A group member waits before the gate until the whole group holds every
  partition, and parks at the log end, so nobody reads ahead of the gate; after the gate it seeks to 0.
  Consumers leave only after all of them are done, so no partition moves during the measured window.
  Completeness is checked without touching each record: the number returned must equal what was stored
  and every partition's position must end at its log end (positions advance exactly one per record).
- Latency: records carry their due time (``time.time_ns()``, 8 bytes big-endian) as raw's do; producers
  hand each record to ``send()`` when it is due (the producer's own ``linger_ms`` batches them) and
  consumers take the latency of every record when ``poll()`` returns it.

Client functions are module-level (the harness spawns them by name). This module imports the bus only
inside the functions that run in client processes or start the cluster. It must never tune the bus beyond
what the BenchConfig and BusOptions say (batch_bytes, linger_ms, acks, compression, sync): everything else
is the user's default.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from array import array
from typing import Any

from .harness import Gate, run_clients, scratch_dir, storage_notes, wait_toward
from .pacer import Pacer
from .results import (
    SEND_TIME,
    BenchConfig,
    BenchError,
    ClientReport,
    Result,
    System,
    assign_partitions,
    build_result,
    expected_per_partition,
    latency_result,
    record_partition,
    split,
)

SYSTEM_NAME = "bus"
SEND_MANY_NAME = "bus send_many"
AIO_NAME = "bus aio"  # bus.aio's Producer and Consumer, in an asyncio loop
CLIENTS = ("sync", "aio")
# The consumer's order over its partitions: "fair" (bus/rotation.py, take_in_turn), or "drain" (take_draining:
# the order before fair polling, each partition drained before the next), to measure what fairness costs.
POLL_ORDERS = ("fair", "drain")
# The Producer's compression= values (bus.batch.CODECS, not imported: this module loads without the bus).
COMPRESSIONS = (None, "lz4", "zstd")

ACK_CHUNK_RECORDS = 1024  # produce mode: records whose acknowledgement one callback times
SEND_MANY_RECORDS = 1024  # send_many mode: records per call
POLL_RECORDS_MAX = 10_000  # what poll() returns at most (its default)
POLL_TIMEOUT_MS = 100
CLUSTER_START_TIMEOUT_S = 60.0
TOPIC_READY_TIMEOUT_S = 30.0
GROUP_STABLE_TIMEOUT_S = 60.0  # consumers of one group settle their assignment within this
GROUP_STABLE_CHECKS = 3  # ... and must see it unchanged this many times in a row
GROUP_CHECK_INTERVAL_S = 0.1
ACKS_WAIT_TIMEOUT_S = 60.0  # after flush(): callbacks still running on the sender thread
BUFFER_BYTES_MIN = 64 << 20  # the producer's default buffer
ACK_LATENCY_NOTE = (
    "latency: send() returned -> acked, so it includes the time records queue in the producer's buffer "
    f"({BUFFER_BYTES_MIN >> 20} MB, the default); raw's starts when a full batch is sent"
)


@dataclasses.dataclass(frozen=True)
class BusOptions:
    """How the bus is run: what the BenchConfig (shared with every system) does not say."""

    nodes: int | None = None  # node processes of the LocalCluster the bench starts (None: replication_factor)
    bootstrap: str | None = None  # use this running cluster instead of starting one
    # The bench producer's acks, always given explicitly: the Producer's own default is "all", but every
    # figure in docs/benchmarks.md before replication was taken with 1.
    acks: Any = 1  # 0, 1 or "all" (every in-sync replica has the batch on disk; with one replica: as 1)
    replication_factor: int = 1  # replicas of each partition of the bench's topic (always given explicitly)
    min_insync_replicas: int | None = None  # None: the bus's default (2 with 3 or more replicas, else 1)
    group: bool = True  # consumers as one consumer group; False: assign() over a split of the partitions
    send_many: bool = False  # produce with send_many() (the bulk path) instead of send() per record
    compression: str | None = None  # the producers' Producer(compression=...): None, "lz4" or "zstd"
    client: str = "sync"  # the measured clients: bus's ("sync") or bus.aio's ("aio")
    poll_order: str = "fair"  # the measured consumers' order over their partitions (POLL_ORDERS)

    @property
    def node_count(self) -> int:
        """The nodes of the cluster the bench starts: as many as asked, else enough for the replicas."""
        return self.nodes if self.nodes is not None else self.replication_factor

    def validate(self) -> BusOptions:
        if self.nodes is not None and self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        if self.acks not in (0, 1, "all"):
            raise ValueError(f"acks must be 0, 1 or 'all', not {self.acks!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be None, 'lz4' or 'zstd', not {self.compression!r}")
        if self.client not in CLIENTS or self.poll_order not in POLL_ORDERS:
            raise ValueError(f"client must be one of {CLIENTS} and poll_order one of {POLL_ORDERS}")
        if self.client == "aio" and self.send_many:
            raise ValueError("bus.aio has no send_many(): its rows are send()'s")
        if self.replication_factor < 1:
            raise ValueError("replication_factor must be >= 1")
        if self.bootstrap is None and self.replication_factor > self.node_count:
            raise ValueError(f"replication factor {self.replication_factor} needs at least as many nodes, "
                             f"not {self.node_count}")
        m = self.min_insync_replicas
        if m is not None and not 1 <= m <= self.replication_factor:
            raise ValueError(f"min_insync_replicas must be in 1..{self.replication_factor}, not {m}")
        return self


def system_name(opts: BusOptions) -> str:
    """The row's name: the path (``bus`` or ``bus send_many``), then the replication factor (and its
    min_insync_replicas when given) and acks, then the codec when the producer compresses, so rows of one
    run with different settings tell apart: ``bus R=3 acks=all``, ``bus send_many R=1 acks=1 zstd``. An
    uncompressed row's name says nothing of compression: it is named as before there was any."""
    base = SEND_MANY_NAME if opts.send_many else AIO_NAME if opts.client == "aio" else SYSTEM_NAME
    isr = "" if opts.min_insync_replicas is None else f" M={opts.min_insync_replicas}"
    codec = "" if opts.compression is None else f" {opts.compression}"
    order = "" if opts.poll_order == "fair" else f" {opts.poll_order}"
    return f"{base} R={opts.replication_factor}{isr} acks={opts.acks}{codec}{order}"


def is_bus(name: str) -> bool:
    """Whether a row's system name is one of the bus's (``system_name``)."""
    return name == SYSTEM_NAME or name.startswith(SYSTEM_NAME + " ")


def rss_peak_mb() -> float:
    """This process's peak resident memory so far, in MB (10^6 bytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # Linux reports KiB


def cpu_s() -> float:
    """CPU seconds this process (all its threads) used so far, user and system."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _started(report: ClientReport, gate: Gate) -> None:
    """Through the start gate: the measured window (and the client's CPU count) starts now."""
    report.start_ns = gate.wait()
    report.extra["cpu_start_s"] = cpu_s()


def _client_usage(report: ClientReport) -> None:
    """At the end of a client's measured work: its peak RSS, and the CPU it used since the gate."""
    report.extra["rss_peak_mb"] = rss_peak_mb()
    report.extra["cpu_s"] = cpu_s() - report.extra.pop("cpu_start_s")


def _client_rss(result: Result, reports: list[ClientReport]) -> None:
    """Keep the clients' largest peak RSS with the result (runner.py shows it): memory must stay bounded; and
    their CPU per record, which other processes on the machine change far less than they change records/s."""
    peaks = [r.extra["rss_peak_mb"] for r in reports if "rss_peak_mb" in r.extra]
    if peaks:
        result.config["client_rss_peak_mb"] = max(peaks)
    cpu = [r.extra["cpu_s"] for r in reports if "cpu_s" in r.extra]
    records = sum(r.records for r in reports)
    if cpu and records:
        result.config["client_cpu_us_per_record"] = sum(cpu) / records * 1e6


def _linger_ms(cfg: BenchConfig) -> int:
    """The producer takes whole milliseconds."""
    return max(0, round(cfg.linger_ms))


def bench_producer(bootstrap: str, cfg: BenchConfig, acks: Any, compression: str | None = None,
                   client: str = "sync") -> Any:
    """The producer every bench client uses (``client``: bus's or bus.aio's): the user's defaults but for what
    the BenchConfig, acks and compression say."""
    if client == "aio":
        from bus.aio import Producer
    else:
        from bus import Producer

    return Producer(
        bootstrap,
        acks=acks,
        linger_ms=_linger_ms(cfg),
        batch_bytes=cfg.batch_bytes,
        buffer_bytes=max(BUFFER_BYTES_MIN, 4 * cfg.batch_bytes),
        idempotent=acks != 0,
        compression=compression,
    )


# --------------------------------------------------------------------------------------------------------------
# The cluster


class BusCluster:
    """A LocalCluster on ``data_dir`` (or the one at ``opts.bootstrap``) and a fresh topic, for a ``with`` block."""

    def __init__(self, cfg: BenchConfig, opts: BusOptions, data_dir: str):
        self.cfg, self.opts, self.data_dir = cfg, opts, data_dir
        self.bootstrap = opts.bootstrap or ""
        self.topic = f"bench-{uuid.uuid4().hex[:12]}"
        self.pids: list[int] = []  # the node processes, sampled for CPU and RSS
        self.notes: list[str] = []
        self.topic_id: Any = None  # the topic's id, as the coordinator gave it (names its logs on the nodes)
        self.replicas: list[list[int]] = []  # per partition, the ids of the nodes holding a replica
        self._cluster: Any = None
        self._stopped = False  # stop() ran: the nodes' stores can be read (storage)

    def __enter__(self) -> BusCluster:
        try:
            if self.opts.bootstrap is None:
                from nodes.cluster import LocalCluster

                path = os.path.join(self.data_dir, "cluster")
                self._cluster = LocalCluster(path, self.opts.node_count, sync=self.cfg.sync)
                self._cluster.start(CLUSTER_START_TIMEOUT_S)
                self.bootstrap = self._cluster.bootstrap
                self.pids = [p.pid for p in self._cluster.nodes.values()]
            else:
                self.notes.append(
                    f"external cluster at {self.opts.bootstrap}: its own sync setting applies; node CPU/RSS not sampled"
                )
            self._create_topic()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create_topic(self) -> None:
        from bus import Admin

        with Admin(self.bootstrap) as admin:
            # The replication factor is always given: the bus's default (min(3, live nodes)) would make a
            # three-node run replicated without saying so.
            admin.create_topic(self.topic, self.cfg.partitions, replication_factor=self.opts.replication_factor,
                               min_insync_replicas=self.opts.min_insync_replicas)
            # Wait until every partition's leader serves it and every replica is in sync, so no client starts
            # against a node that has not heard the placement yet, nor while the ISR is still forming.
            deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
            while True:
                described = admin.describe_topic(self.topic)
                parts = described["partitions"]
                if all(p["end_offset"] is not None and not p["under_replicated"] for p in parts):
                    self.topic_id, self.replicas = described["id"], [p["replicas"] for p in parts]
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"topic {self.topic} not served by its nodes within {TOPIC_READY_TIMEOUT_S} s")
                time.sleep(0.02)

    @property
    def local(self) -> Any:
        """The LocalCluster the bench started (None with ``bootstrap``): failover mode kills its nodes."""
        return self._cluster

    def stored(self) -> list[int]:
        """Records stored in each partition (log end - log start)."""
        from bus import Admin

        with Admin(self.bootstrap) as admin:
            parts = admin.describe_topic(self.topic)["partitions"]
        if any(p["end_offset"] is None for p in parts):
            raise BenchError("a partition's node did not answer after the load")
        return [p["end_offset"] - p["start_offset"] for p in parts]

    def stop(self) -> None:
        """Stop the cluster the bench started, before the end of the block (storage needs its nodes gone)."""
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
            self._stopped = True

    def storage(self) -> tuple[int, int]:
        """After ``stop``: (bytes of the topic's record batches stored on the nodes, summed over every
        replica; bytes the nodes' LMDB files take on disk). The first is each partition log's own count
        (``size_bytes``: every stored batch's length, header included, as retention by size counts it), read
        by opening each node's store as the node would; the second the files' allocated blocks."""
        from store.log_store import LogStore

        if not self._stopped or self.topic_id is None:
            raise BenchError("storage() reads the stores of a cluster the bench started, after stop()")
        stored = disk = 0
        for node_id in range(1, self.opts.node_count + 1):  # LocalCluster numbers its nodes from 1
            store = LogStore(os.path.join(self.data_dir, "cluster", f"node-{node_id}"), sync="none")
            try:
                for index, holders in enumerate(self.replicas):
                    if node_id in holders:
                        # A node names a partition's log "<topic id>/<index>" (nodes/node.py, docs/storage.md).
                        stored += store.open_partition(f"{self.topic_id}/{index}").size_bytes
                disk += os.stat(store.disk_path()).st_blocks * 512
            finally:
                store.close()
        return stored, disk

    def __exit__(self, *exc: Any) -> None:
        if self._cluster is not None:
            self.stop()
        elif self.opts.bootstrap is not None:
            try:
                from bus import Admin

                with Admin(self.bootstrap) as admin:
                    admin.delete_topic(self.topic)
            except Exception:  # noqa: BLE001 - a topic left behind is not worth hiding the real error
                pass


# --------------------------------------------------------------------------------------------------------------
# Producer processes


class _Acks:
    """Ack callbacks (run on the producer's sender thread) recording into a ClientReport."""

    def __init__(self, report: ClientReport):
        self.report = report
        self.acked = 0
        self.errors: list[str] = []

    def chunk(self, sent_ns: int, n: int):
        report = self.report

        def on_ack(metadata: Any, error: BaseException | None) -> None:
            now = time.monotonic_ns()
            if error is not None:
                self.errors.append(repr(error))
                self.acked += n
                return
            report.latencies_ns.append(now - sent_ns)
            report.latency_counts.append(n)
            report.add_event(now, n)
            if now > report.end_ns:
                report.end_ns = now
            self.acked += n

        return on_ack

    def wait(self, count: int) -> None:
        deadline = time.monotonic() + ACKS_WAIT_TIMEOUT_S
        while self.acked < count:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.acked} of {count} acknowledgements after flush()")
            time.sleep(0.001)
        if self.errors:
            raise BenchError(f"{len(self.errors)} chunk(s) failed, first: {self.errors[0]}")


def produce_client(
    bootstrap: str, topic: str, cfg: BenchConfig, acks: Any, compression: str | None, bulk: bool, index: int,
    count: int, gate: Gate
) -> ClientReport:
    """Send ``count`` records of ``cfg.record_bytes`` (the values of ``cfg.client_values(index)``, in turn):
    ``send()`` per record, or ``send_many`` with ``bulk``."""
    producer = bench_producer(bootstrap, cfg, acks, compression)
    report = ClientReport(0, 0, 0, latency_counts=array("q"))
    acked = _Acks(report)
    chunk = SEND_MANY_RECORDS if bulk else ACK_CHUNK_RECORDS
    chunks, heads, lasts = _value_chunks(cfg, index, chunk)
    try:
        producer._partitions(topic)  # the topic's metadata, fetched before the gate (send() caches it)
        _started(report, gate)
        sent = j = 0
        if bulk:
            send_many = producer.send_many
            while sent < count:
                n = min(chunk, count - sent)
                values = chunks[j % len(chunks)]
                futures = send_many(topic, values if n == chunk else values[:n])
                sent += n
                j += 1
                if acks != 0:
                    futures[-1].add_callback(acked.chunk(time.monotonic_ns(), n))
        else:
            send = producer.send
            while sent < count:
                n = min(chunk, count - sent)
                k = j % len(chunks)
                if n == chunk:
                    for value in heads[k]:
                        send(topic, value)
                    future = send(topic, lasts[k])
                else:
                    for value in chunks[k][:n - 1]:
                        send(topic, value)
                    future = send(topic, chunks[k][n - 1])
                sent += n
                j += 1
                if acks != 0:
                    future.add_callback(acked.chunk(time.monotonic_ns(), n))
        producer.flush()
        return _produced(report, acked, acks, count)
    finally:
        producer.close()


def _value_chunks(cfg: BenchConfig, index: int, chunk: int) -> tuple[list, list, list]:
    """The client's pool of values cut once into the chunks handed out (one send_many call, or one timed
    acknowledgement), and for send() each chunk's last value apart: the send loops do no more per record than
    with one fixed value."""
    pool = cfg.client_values(index)
    assert len(pool) % chunk == 0, (len(pool), chunk)  # values.POOL_CHUNK_RECORDS: whole chunks
    chunks = [pool[i:i + chunk] for i in range(0, len(pool), chunk)]
    return chunks, [c[:-1] for c in chunks], [c[-1] for c in chunks]


def _produced(report: ClientReport, acked: _Acks, acks: Any, count: int) -> ClientReport:
    """A produce client's report once everything was flushed."""
    if acks == 0:
        report.end_ns = time.monotonic_ns()  # nothing is acknowledged: the end is the flush
        report.add_event(report.end_ns, count)
    else:
        acked.wait(count)
    report.records = count
    _client_usage(report)
    return report


def produce_client_aio(
    bootstrap: str, topic: str, cfg: BenchConfig, acks: Any, compression: str | None, bulk: bool, index: int,
    count: int, gate: Gate
) -> ClientReport:
    """``produce_client`` with bus.aio's Producer in an asyncio loop: ``send()`` per record, the loop given a
    turn after each chunk of ACK_CHUNK_RECORDS (so acknowledgements are taken as they come, as a service's
    loop would) and ``wait_for_room()`` awaited there (the backpressure of a full buffer), each chunk's last
    awaitable timed by a task."""
    import asyncio

    assert not bulk, "bus.aio has no send_many()"
    return asyncio.run(_produce_aio(bootstrap, topic, cfg, acks, compression, index, count, gate))


async def _produce_aio(bootstrap: str, topic: str, cfg: BenchConfig, acks: Any, compression: str | None,
                       index: int, count: int, gate: Gate) -> ClientReport:
    import asyncio

    producer = bench_producer(bootstrap, cfg, acks, compression, client="aio")
    report = ClientReport(0, 0, 0, latency_counts=array("q"))
    acked = _Acks(report)
    chunk = ACK_CHUNK_RECORDS
    chunks, heads, lasts = _value_chunks(cfg, index, chunk)
    timers = []
    try:
        producer._sync._partitions(topic)  # the topic's metadata, fetched before the gate (send() caches it)
        _started(report, gate)
        sent = j = 0
        send = producer.send
        while sent < count:
            n = min(chunk, count - sent)
            k = j % len(chunks)
            for value in heads[k] if n == chunk else chunks[k][:n - 1]:
                send(topic, value)
            last = send(topic, lasts[k] if n == chunk else chunks[k][n - 1])
            sent += n
            j += 1
            if acks != 0:
                timers.append(asyncio.ensure_future(_timed(last, acked.chunk(time.monotonic_ns(), n))))
            await producer.wait_for_room()  # backpressure, where the sync send() blocks on a full buffer
            await asyncio.sleep(0)
        await producer.flush()
        await asyncio.gather(*timers)
        return _produced(report, acked, acks, count)
    finally:
        await producer.close()


async def _timed(awaitable: Any, on_ack: Any) -> None:
    try:
        metadata = await awaitable
    except Exception as exc:
        on_ack(None, exc)
    else:
        on_ack(metadata, None)


def latency_produce_client(
    bootstrap: str, topic: str, cfg: BenchConfig, acks: Any, compression: str | None, index: int, count: int,
    rate_per_s: float, gate: Gate
) -> ClientReport:
    """Offer ``count`` records at ``rate_per_s``, each handed to ``send()`` when due, carrying its due time."""
    producer = bench_producer(bootstrap, cfg, acks, compression)
    tails = cfg.latency_tails(index)
    pack = SEND_TIME.pack
    partitions = cfg.partitions
    report = ClientReport(0, 0, 0)
    try:
        producer._partitions(topic)
        start = gate.wait()
        wall0 = time.time_ns()
        report.start_ns = start
        # No linger in the pacer: the producer's own linger_ms decides how records are batched.
        pacer = Pacer(rate_per_s, count, 0, count, start)
        send = producer.send
        while not pacer.done:
            due = pacer.take(time.monotonic_ns())
            if due is None:
                wait_toward(pacer.next_deadline_ns())
                continue
            offset = wall0 - start
            for k in due:
                send(topic, pack(offset + pacer.due_ns(k)) + tails[k % len(tails)],
                     partition=record_partition(k, index, partitions))
        producer.flush()
        report.end_ns = time.monotonic_ns()
        report.records = count
        report.extra.update(pacer.lateness())
        return report
    finally:
        producer.close()


# --------------------------------------------------------------------------------------------------------------
# Consumer processes


def _join(consumer: Any, topic: str, index: int, shared: Any, partitions: int) -> list:
    """Before the gate: wait until this group member's assignment is settled and the group covers every
    partition. Records a warm-up poll returns are dropped (the caller seeks before measuring)."""
    deadline = time.monotonic() + GROUP_STABLE_TIMEOUT_S
    last, same = None, 0
    while True:
        consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=1)
        mine = sorted(p for t, p in consumer.assignment() if t == topic)
        shared[index] = len(mine)
        total = sum(shared[:])
        settled = mine and mine == last and total == partitions and all(shared[:])
        same = same + 1 if settled else 0
        last = mine
        if same >= GROUP_STABLE_CHECKS:
            return mine
        if time.monotonic() > deadline:
            raise BenchError(f"group not settled within {GROUP_STABLE_TIMEOUT_S} s: member counts {list(shared[:])}")
        time.sleep(GROUP_CHECK_INTERVAL_S)


def _leave_together(done: Any, consumers: int, timeout_s: float) -> None:
    """Stay in the group until every member is done, so no partition moves to a member still measuring."""
    with done.get_lock():
        done.value += 1
    deadline = time.monotonic() + timeout_s
    while done.value < consumers and time.monotonic() < deadline:
        time.sleep(0.01)


def consume_client(
    bootstrap: str,
    topic: str,
    cfg: BenchConfig,
    index: int,
    group: str | None,
    parts: list[int],
    stored: list[int],
    shared: Any,
    done: Any,
    latency: bool,
    client: str,
    poll_order: str,
    gate: Gate,
) -> ClientReport:
    """Read this consumer's partitions to their ends (``stored[p]`` records each) with ``poll()``.

    ``group``: subscribe as a member of it (``parts`` is then what the group assigns); else ``assign(parts)``.
    ``latency``: the topic is being written while we read; take each record's end-to-end latency.
    ``client``: "aio" reads with bus.aio's Consumer (``await poll()`` in an asyncio loop; set up before the gate
    through the sync consumer it wraps). ``poll_order``: "drain" serves the partitions in the draining order.
    """
    import asyncio

    from bus import TopicPartition

    if client == "aio":
        from bus.aio import Consumer
    else:
        from bus import Consumer
    if group is not None:
        consumer = Consumer(bootstrap, topics=[topic], group=group, auto_offset_reset="earliest")
    else:
        consumer = Consumer(bootstrap, auto_offset_reset="earliest")
    sync = consumer._sync if client == "aio" else consumer
    if poll_order == "drain":
        from bus.rotation import take_draining

        sync._take_order = take_draining
    report = ClientReport(0, 0, 0)
    try:
        if group is not None:
            parts = _join(sync, topic, index, shared, cfg.partitions)
        else:
            sync.assign([(topic, p) for p in parts])
        tps = [TopicPartition(topic, p) for p in parts]
        if not latency:
            for tp in tps:
                sync.seek(tp, stored[tp.partition])  # park at the end: nothing is read before the gate
        for tp in tps:
            sync.position(tp)  # resolved before the gate
        reader = _Reader(report, sum(stored[p] for p in parts), latency, index, cfg.timeout_s)
        _started(report, gate)
        if not latency:
            for tp in tps:
                sync.seek(tp, 0)
        reader.give_up_ns = report.start_ns + int(cfg.timeout_s * 1e9)
        if client == "aio":
            asyncio.run(_read_aio(consumer, reader))
        else:
            poll = consumer.poll
            while reader.got < reader.want:
                reader.took(poll(timeout_ms=POLL_TIMEOUT_MS, max_records=POLL_RECORDS_MAX))
        ends = {tp.partition: sync.position(tp) for tp in tps}
        short = {p: (ends[p], stored[p]) for p in parts if ends[p] != stored[p]}
        if reader.got != reader.want or short:
            raise BenchError(f"consumer {index}: {reader.got} records for {reader.want} stored; positions != ends: "
                             f"{short}")
        report.records = reader.got
        report.extra["partitions"] = parts
        _client_usage(report)
        if group is not None:
            _leave_together(done, len(shared), cfg.timeout_s)
        return report
    finally:
        if client == "aio":
            asyncio.run(consumer.close())
        else:
            consumer.close()


class _Reader:
    """What a consume client's measured loop does with each poll's records (the same for both clients)."""

    def __init__(self, report: ClientReport, want: int, latency: bool, index: int, timeout_s: float):
        self.report, self.want, self.latency, self.index, self.timeout_s = report, want, latency, index, timeout_s
        self.got = 0
        self.give_up_ns = 0

    def took(self, records: list) -> None:
        report = self.report
        if not records:
            if time.monotonic_ns() > self.give_up_ns:
                raise BenchError(f"consumer {self.index}: {self.got} of {self.want} records after {self.timeout_s} s")
            return
        if self.latency:
            now_wall, unpack = time.time_ns(), SEND_TIME.unpack_from
            report.latencies_ns.extend([now_wall - unpack(r.value)[0] for r in records])
        now = time.monotonic_ns()
        n = len(records)
        self.got += n
        report.add_event(now, n)
        report.end_ns = now


async def _read_aio(consumer: Any, reader: _Reader) -> None:
    poll = consumer.poll
    while reader.got < reader.want:
        reader.took(await poll(timeout_ms=POLL_TIMEOUT_MS, max_records=POLL_RECORDS_MAX))


# --------------------------------------------------------------------------------------------------------------
# Runners


def _shared(cfg: BenchConfig) -> tuple[Any, Any]:
    """Shared between the consumer processes: each one's partition count, and how many are done."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    return ctx.Array("i", cfg.consumers), ctx.Value("i", 0)


def _consumers(
    cl: BusCluster, cfg: BenchConfig, opts: BusOptions, stored: list[int], latency: bool
) -> list[tuple[Any, tuple]]:
    shared, done = _shared(cfg)
    group = f"bench-{uuid.uuid4().hex[:12]}" if opts.group else None
    splits = assign_partitions(cfg.partitions, cfg.consumers)
    return [
        (consume_client, (cl.bootstrap, cl.topic, cfg, i, group, splits[i], stored, shared, done, latency,
                          opts.client, opts.poll_order))
        for i in range(cfg.consumers)
    ]


def _finish(result: Result, cl: BusCluster, opts: BusOptions, d: str, cfg: BenchConfig) -> Result:
    if opts.bootstrap is not None:
        result.server_cpu_pct = result.server_rss_mb = result.server_anon_mb = None
    else:
        result.notes += [n for n in storage_notes(d, cfg.sync) if n not in result.notes]
    result.notes = cl.notes + result.notes
    result.config["bus"] = {**dataclasses.asdict(opts), "nodes": opts.node_count}
    return result


def make_bus_system(opts: BusOptions | None = None) -> System:
    """The bus as a bench ``System``, run as ``opts`` says."""
    opts = (opts or BusOptions()).validate()
    name = system_name(opts)

    def run_produce(cfg: BenchConfig) -> Result:
        cfg.validate()
        with scratch_dir(cfg, "bus") as d, BusCluster(cfg, opts, d) as cl:
            client = produce_client_aio if opts.client == "aio" else produce_client
            clients = [
                (client, (cl.bootstrap, cl.topic, cfg, opts.acks, opts.compression, opts.send_many, j, n))
                for j, n in enumerate(split(cfg.records, cfg.producers))
            ]
            reports, usage = run_clients(clients, cl.pids, cfg.timeout_s)
            result = build_result(name, "produce", cfg, reports, usage, latency_kind="ack")
            result.notes.append(ACK_LATENCY_NOTE)
            _client_rss(result, reports)
            if opts.bootstrap is None:
                cl.stop()  # its nodes close their stores: what they hold can be read
                result.stored_bytes, result.disk_bytes = cl.storage()
            return _finish(result, cl, opts, d, cfg)

    def run_consume(cfg: BenchConfig) -> Result:
        cfg.validate()
        with scratch_dir(cfg, "bus") as d, BusCluster(cfg, opts, d) as cl:
            # acks="all" whatever opts.acks says: the load must be under the high watermark (readable) before
            # it is read; with one replica that is the same wait as acks=1.
            load = [
                (produce_client, (cl.bootstrap, cl.topic, cfg, "all", opts.compression, True, j, n))
                for j, n in enumerate(split(cfg.records, cfg.producers))
            ]
            run_clients(load, cl.pids, cfg.timeout_s)
            stored = cl.stored()
            if sum(stored) != cfg.records:
                raise BenchError(f"loaded {sum(stored)} records, not {cfg.records}")
            reports, usage = run_clients(_consumers(cl, cfg, opts, stored, False), cl.pids, cfg.timeout_s)
            result = build_result(name, "consume", cfg, reports, usage)
            _client_rss(result, reports)
            return _finish(result, cl, opts, d, cfg)

    def run_latency(cfg: BenchConfig, rate_per_s: float | None = None) -> Result:
        cfg.validate()
        rate = float(rate_per_s or cfg.latency_rate)
        per_producer = split(cfg.latency_records(rate), cfg.producers)
        expected = expected_per_partition(per_producer, cfg.partitions)
        with scratch_dir(cfg, "bus") as d, BusCluster(cfg, opts, d) as cl:
            consumers = _consumers(cl, cfg, opts, expected, True)
            producers = [
                (latency_produce_client,
                 (cl.bootstrap, cl.topic, cfg, opts.acks, opts.compression, j, n, rate / cfg.producers))
                for j, n in enumerate(per_producer)
            ]
            reports, usage = run_clients(consumers + producers, cl.pids, cfg.timeout_s)
            k = len(consumers)
            result = latency_result(name, cfg, rate, reports[:k], reports[k:], usage, storage_notes(d, cfg.sync))
            return _finish(result, cl, opts, d, cfg)

    def run_failover(cfg: BenchConfig) -> Result:
        from .failover import run_failover as run

        return run(name, opts, cfg)

    return System(name, run_produce, run_consume, run_latency,
                  run_failover=run_failover if opts.replication_factor >= 2 and not opts.send_many else None)


SYSTEM = make_bus_system()
