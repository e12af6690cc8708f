"""Kafka's own clients as systems of the bench: confluent-kafka, kafka-python and aiokafka, each producing
into and consuming from the bus through its Kafka listener (docs/kafka.md), on the same workload as the bus's
own clients, so that one run gives the ratios issue 13 asks for (a Kafka client against the bus's
``send()`` and consumer).

The server is the bus (``KafkaBus``): a LocalCluster of one node, sync as the config says, a Kafka listener
on a free port, and a topic of ``cfg.partitions`` partitions, one replica, created through the bus's Admin
and waited for. Server CPU and RSS are sampled on the node. Each library is used as its documentation says
for throughput, with the settings a bus producer has by default where the library lets them be said:
``acks=1`` (the bench's bus row: one replica, acks=1), idempotence off (librdkafka's default; kafka-python's
and aiokafka's turned off alike), ``linger.ms`` as the bench's, batches of ``cfg.batch_bytes``. Produce:
chunks of ``CHUNK_RECORDS`` records to one partition at a time, round robin, one delivery callback per chunk
(its last record) timing send -> ack for the chunk, as the bus's row times its chunks. Consume: connected to
the partitions' leader before the start gate (a ListOffsets), ``assign()`` of them from offset 0 after it (as
the bus's row resolves its positions before the gate and reads after it), as many records as were stored, with
the library's defaults but for confluent-kafka's ``fetch.queue.backoff.ms`` (``_ConfluentConsumer``); the
fetch knobs librdkafka documents for throughput (``max.partition.fetch.bytes``, ``fetch.max.bytes``,
``queued.min.messages``, ``queued.max.messages.kbytes``) were measured and left at their defaults: none read
faster (docs/kafka.md, Speed). Latency: the pacer's due time in each value (``peer.stamp``), read back on
consume.

Public face: ``KAFKA_CLIENT_SYSTEMS`` (name -> ``results.System``). The client libraries are imported only
inside the functions that run in client processes (and in the checks), so the bench runs without them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from array import array
from functools import partial
from typing import Any

from .harness import Gate, wait_toward
from .peer import PeerServer, paced_start, peer_system, send_time_ns, stamp
from .results import BenchConfig, BenchError, ClientReport, PeerUnavailable, record_partition

TOPIC = "bench"
CHUNK_RECORDS = 1024  # records one delivery callback times (the bus's ACK_CHUNK_RECORDS)
POLL_RECORDS_MAX = 10_000
POLL_TIMEOUT_MS = 100  # how long one take() waits for records
FETCH_QUEUE_BACKOFF_MS = 10  # confluent-kafka's consumer (see _ConfluentConsumer)
CLUSTER_START_TIMEOUT_S = 60.0
TOPIC_READY_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 30.0  # a consumer's ListOffsets to the leader before the gate
INSTALL = {"confluent-kafka": "pip install confluent-kafka", "kafka-python": "pip install kafka-python",
           "aiokafka": "pip install aiokafka"}
MODULE = {"confluent-kafka": "confluent_kafka", "kafka-python": "kafka", "aiokafka": "aiokafka"}


def _check(name: str) -> None:
    try:
        __import__(MODULE[name])
    except ImportError:
        raise PeerUnavailable(f"{name} not installed: {INSTALL[name]}") from None


class KafkaBus(PeerServer):
    """The bus with a Kafka listener, and the bench's topic, for a ``with`` block; always stopped."""

    def __enter__(self) -> KafkaBus:
        from bus import Admin
        from nodes.cluster import LocalCluster

        self._cluster = LocalCluster(os.path.join(self.data_dir, "cluster"), 1, sync=self.cfg.sync, kafka_port=0)
        try:
            self._cluster.start(CLUSTER_START_TIMEOUT_S)
            self.port = int(self._cluster.kafka_bootstrap.rpartition(":")[2])
            self.pid = next(iter(self._cluster.nodes.values())).pid
            with Admin(self._cluster.bootstrap) as admin:
                admin.create_topic(TOPIC, self.cfg.partitions, replication_factor=1)
                deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
                while not all(p["end_offset"] is not None for p in admin.describe_topic(TOPIC)["partitions"]):
                    if time.monotonic() > deadline:
                        raise BenchError(f"topic {TOPIC} not served within {TOPIC_READY_TIMEOUT_S} s")
                    time.sleep(0.02)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cluster.stop()


def _bootstrap(port: int) -> str:
    return f"127.0.0.1:{port}"


# -- the libraries, behind one small face each ---------------------------------------------------------------
# A producer: send_chunk(partition, values, n, on_ack or None): the next n values to one partition, on_ack(error
# or None) called when the last is acknowledged; poll() (serve callbacks), flush(), close().
# A consumer: made before the gate, connected to its partitions' leader (a ListOffsets) with nothing fetched, as
# the bus's row resolves its positions before the gate with nothing read; start() after the gate (assign from
# offset 0); take() -> {partition: [message, ...]} within POLL_TIMEOUT_MS (errors raised), value(message),
# close(). Records are counted per partition, not touched one by one: the bus's row does not touch them either.


class _Confluent:
    def __init__(self, port: int, cfg: BenchConfig):
        import confluent_kafka

        self._producer = confluent_kafka.Producer({
            "bootstrap.servers": _bootstrap(port), "acks": 1, "enable.idempotence": False,
            "linger.ms": cfg.linger_ms, "batch.size": cfg.batch_bytes,
            "queue.buffering.max.kbytes": 1 << 20, "queue.buffering.max.messages": 1_000_000})

    def send_chunk(self, partition: int, values, n: int, on_ack) -> None:
        produce, last = self._producer.produce, n - 1
        for i in range(n):
            value = next(values)
            while True:
                try:
                    if i < last or on_ack is None:
                        produce(TOPIC, value, partition=partition)
                    else:
                        produce(TOPIC, value, partition=partition, on_delivery=lambda err, msg: on_ack(err))
                    break
                except BufferError:  # its queue is full: serve deliveries until there is room
                    self._producer.poll(0.01)

    def poll(self) -> None:
        self._producer.poll(0)

    def flush(self) -> None:
        if self._producer.flush(FLUSH_TIMEOUT_S):
            raise BenchError(f"confluent-kafka: records still unacknowledged after {FLUSH_TIMEOUT_S} s")

    def close(self) -> None:
        pass


class _ConfluentConsumer:
    def __init__(self, port: int, parts: list[int]):
        import confluent_kafka

        # fetch.queue.backoff.ms as its documentation says to lower it "if the application is experiencing
        # long (~1s) delays between messages": with its default (1000 ms) librdkafka stops fetching for a
        # second whenever queued.min.messages (100,000) are queued, which a fast reader drains in a fraction
        # of it (a Kafka broker's readers see the same: librdkafka issues #2879, #4275).
        self._consumer = confluent_kafka.Consumer({
            "bootstrap.servers": _bootstrap(port), "group.id": "bench", "enable.auto.commit": False,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS})
        self._tps = [confluent_kafka.TopicPartition(TOPIC, p, 0) for p in parts]
        for tp in self._tps:  # connected to the leader before the gate (ListOffsets), nothing fetched yet
            self._consumer.get_watermark_offsets(tp, timeout=CONNECT_TIMEOUT_S)
        self._parts = parts

    def start(self) -> None:
        self._consumer.assign(self._tps)

    def take(self) -> dict:
        msgs = self._consumer.consume(POLL_RECORDS_MAX, POLL_TIMEOUT_MS / 1000)
        for msg in msgs:
            if msg.error():
                raise BenchError(f"confluent-kafka: {msg.error()}")
        if len(self._parts) == 1:
            return {self._parts[0]: msgs} if msgs else {}
        groups: dict = {}
        for msg in msgs:
            groups.setdefault(msg.partition(), []).append(msg)
        return groups

    @staticmethod
    def value(msg) -> bytes:
        return msg.value()

    def close(self) -> None:
        self._consumer.close()


class _KafkaPython:
    def __init__(self, port: int, cfg: BenchConfig):
        import kafka

        self._producer = kafka.KafkaProducer(bootstrap_servers=_bootstrap(port), acks=1, enable_idempotence=False,
                                             linger_ms=cfg.linger_ms, batch_size=cfg.batch_bytes,
                                             max_request_size=max(1 << 20, cfg.batch_bytes))

    def send_chunk(self, partition: int, values, n: int, on_ack) -> None:
        send = self._producer.send
        for _ in range(n):
            future = send(TOPIC, next(values), partition=partition)
        if on_ack is not None:
            future.add_both(lambda result: on_ack(result if isinstance(result, Exception) else None))

    def poll(self) -> None:
        pass  # its sender thread runs the callbacks

    def flush(self) -> None:
        self._producer.flush(FLUSH_TIMEOUT_S)

    def close(self) -> None:
        self._producer.close()


class _KafkaPythonConsumer:
    def __init__(self, port: int, parts: list[int]):
        import kafka

        self._consumer = kafka.KafkaConsumer(bootstrap_servers=_bootstrap(port), enable_auto_commit=False,
                                             max_poll_records=POLL_RECORDS_MAX)
        self._tps = [kafka.TopicPartition(TOPIC, p) for p in parts]
        self._consumer.end_offsets(self._tps)  # connected to the leader before the gate, nothing fetched yet

    def start(self) -> None:
        self._consumer.assign(self._tps)
        for tp in self._tps:
            self._consumer.seek(tp, 0)

    def take(self) -> dict:
        got = self._consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=POLL_RECORDS_MAX)
        return {tp.partition: rows for tp, rows in got.items()}

    value = staticmethod(lambda record: record.value)  # a ConsumerRecord's, as aiokafka's

    def close(self) -> None:
        self._consumer.close()


SYNC_CLIENTS = {"confluent-kafka": (_Confluent, _ConfluentConsumer), "kafka-python": (_KafkaPython, _KafkaPythonConsumer)}


# -- the runs over those faces -------------------------------------------------------------------------------

class _Chunks:
    """Delivery callbacks, one per chunk, recording into a ClientReport (on whatever thread the library runs
    them)."""

    def __init__(self, name: str, report: ClientReport):
        self.name, self.report, self.acked, self.error = name, report, 0, None

    def callback(self, sent_ns: int, n: int):
        def on_ack(error) -> None:
            now = time.monotonic_ns()
            if error is not None:
                self.error = error
                return
            self.report.latencies_ns.append(now - sent_ns)
            self.report.latency_counts.append(n)
            self.report.add_event(now, n)
            self.report.end_ns = max(self.report.end_ns, now)
            self.acked += n
        return on_ack

    def check(self, count: int) -> None:
        if self.error is not None or self.acked != count:
            raise BenchError(f"{self.name}: {self.acked} of {count} records acknowledged ({self.error})")


class _Tally:
    """What a consumer has received: per partition, and into its ClientReport; the checks at the end."""

    def __init__(self, name: str, cfg: BenchConfig, parts: list[int], expected: list[int], latency: bool):
        self.name, self.cfg, self.latency = name, cfg, latency
        self.want, self.got = dict(zip(parts, expected)), dict.fromkeys(parts, 0)
        self.total = sum(expected)
        self.report = ClientReport(0, 0, 0)
        self.give_up_ns = 0

    def start(self, start_ns: int) -> None:
        self.report.start_ns = start_ns
        self.give_up_ns = start_ns + int(self.cfg.timeout_s * 1e9)

    @property
    def done(self) -> bool:
        return self.report.records >= self.total

    def add(self, groups: dict, value) -> None:
        """``groups``: {partition: [message, ...]} as one take gave them; ``value(message)`` its bytes."""
        now_wall, now = time.time_ns(), time.monotonic_ns()
        n = 0
        for partition, rows in groups.items():
            self.got[partition] += len(rows)
            n += len(rows)
            if self.latency:
                self.report.latencies_ns.extend(now_wall - send_time_ns(value(m)) for m in rows)
        if n:
            self.report.records += n
            self.report.add_event(now, n)
            self.report.end_ns = now
        elif now > self.give_up_ns:
            raise BenchError(f"{self.name}: {self.report.records} of {self.total} records after {self.cfg.timeout_s} s")

    def check(self) -> ClientReport:
        if self.got != self.want:
            raise BenchError(f"{self.name}: records per partition {self.got}, expected {self.want}")
        return self.report


def _chunk_sizes(count: int) -> list[int]:
    return [min(CHUNK_RECORDS, count - at) for at in range(0, count, CHUNK_RECORDS)]


def _produce(name: str, port: int, cfg: BenchConfig, index: int, count: int, gate: Gate) -> ClientReport:
    producer = SYNC_CLIENTS[name][0](port, cfg)
    values = itertools.cycle(cfg.client_values(index))
    per_partition = [0] * cfg.partitions
    report = ClientReport(0, 0, 0, latency_counts=array("q"))
    chunks = _Chunks(name, report)
    try:
        report.start_ns = gate.wait()
        for number, n in enumerate(_chunk_sizes(count)):
            part = (number + index) % cfg.partitions
            producer.send_chunk(part, values, n, chunks.callback(time.monotonic_ns(), n))
            producer.poll()
            per_partition[part] += n
        producer.flush()
        chunks.check(count)
        report.records = count
        report.extra["per_partition"] = per_partition
        return report
    finally:
        producer.close()


def _consume(name: str, port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate,
             latency: bool = False) -> ClientReport:
    consumer = SYNC_CLIENTS[name][1](port, parts)
    tally = _Tally(name, cfg, parts, expected, latency)
    try:
        tally.start(gate.wait())
        consumer.start()
        while not tally.done:
            tally.add(consumer.take(), consumer.value)
        return tally.check()
    finally:
        consumer.close()


def _latency_produce(name: str, port: int, cfg: BenchConfig, index: int, count: int, rate_per_s: float,
                     gate: Gate) -> ClientReport:
    producer = SYNC_CLIENTS[name][0](port, cfg)
    tails = cfg.latency_tails(index)
    report = ClientReport(0, 0, 0)
    try:
        pacer, wall_offset_ns = paced_start(gate, report, cfg, rate_per_s, count, CHUNK_RECORDS)
        while not pacer.done:
            batch = pacer.take(time.monotonic_ns())
            if batch is None:
                producer.poll()
                wait_toward(pacer.next_deadline_ns())
                continue
            for k in batch:
                value = stamp(pacer.due_ns(k) + wall_offset_ns, tails[k % len(tails)])
                producer.send_chunk(record_partition(k, index, cfg.partitions), iter((value,)), 1, None)
            report.records += len(batch)
        producer.flush()
        report.end_ns = time.monotonic_ns()
        report.extra.update(pacer.lateness())
        return report
    finally:
        producer.close()


# -- aiokafka: the same runs, on its event loop ------------------------------------------------------------------

def _aio_producer(port: int, cfg: BenchConfig):
    import aiokafka

    return aiokafka.AIOKafkaProducer(bootstrap_servers=_bootstrap(port), acks=1, enable_idempotence=False,
                                     linger_ms=cfg.linger_ms, max_batch_size=cfg.batch_bytes,
                                     max_request_size=max(1 << 20, cfg.batch_bytes))


async def _aio_produce_run(port: int, cfg: BenchConfig, index: int, count: int, gate: Gate) -> ClientReport:
    values = itertools.cycle(cfg.client_values(index))
    per_partition = [0] * cfg.partitions
    report = ClientReport(0, 0, 0, latency_counts=array("q"))
    chunks = _Chunks("aiokafka", report)
    producer = _aio_producer(port, cfg)
    await producer.start()
    try:
        report.start_ns = await asyncio.get_running_loop().run_in_executor(None, gate.wait)
        pending = []
        for number, n in enumerate(_chunk_sizes(count)):
            part = (number + index) % cfg.partitions
            for _ in range(n - 1):
                await producer.send(TOPIC, next(values), partition=part)
            last = await producer.send(TOPIC, next(values), partition=part)
            on_ack = chunks.callback(time.monotonic_ns(), n)
            last.add_done_callback(lambda f, on_ack=on_ack: on_ack(f.exception()))
            pending.append(last)
            per_partition[part] += n
        await producer.flush()
        await asyncio.gather(*pending, return_exceptions=True)
        chunks.check(count)
        report.records = count
        report.extra["per_partition"] = per_partition
        return report
    finally:
        await producer.stop()


async def _aio_consume_run(port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate,
                           latency: bool) -> ClientReport:
    import aiokafka

    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=_bootstrap(port), enable_auto_commit=False,
                                         max_poll_records=POLL_RECORDS_MAX)
    await consumer.start()
    tally = _Tally("aiokafka", cfg, parts, expected, latency)
    try:
        tps = [aiokafka.TopicPartition(TOPIC, p) for p in parts]
        await consumer.end_offsets(tps)  # connected to the leader before the gate; assigned, it fetches at once
        tally.start(await asyncio.get_running_loop().run_in_executor(None, gate.wait))
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        while not tally.done:
            batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=POLL_RECORDS_MAX)
            tally.add({tp.partition: rows for tp, rows in batches.items()}, _KafkaPythonConsumer.value)
        return tally.check()
    finally:
        await consumer.stop()


async def _aio_latency_produce_run(port: int, cfg: BenchConfig, index: int, count: int, rate_per_s: float,
                                   gate: Gate) -> ClientReport:
    tails = cfg.latency_tails(index)
    report = ClientReport(0, 0, 0)
    producer = _aio_producer(port, cfg)
    await producer.start()
    try:
        start = asyncio.get_running_loop().run_in_executor(None, paced_start, gate, report, cfg, rate_per_s, count,
                                                           CHUNK_RECORDS)
        pacer, wall_offset_ns = await start
        while not pacer.done:
            batch = pacer.take(time.monotonic_ns())
            if batch is None:
                await asyncio.sleep(max(0, pacer.next_deadline_ns() - time.monotonic_ns()) / 1e9)
                continue
            for k in batch:
                await producer.send(TOPIC, stamp(pacer.due_ns(k) + wall_offset_ns, tails[k % len(tails)]),
                                    partition=record_partition(k, index, cfg.partitions))
            report.records += len(batch)
        await producer.flush()
        report.end_ns = time.monotonic_ns()
        report.extra.update(pacer.lateness())
        return report
    finally:
        await producer.stop()


def _system(name: str, produce, consume, latency_produce):
    """The bench System of client ``name``: its client functions are partials of module-level functions, which
    the harness's spawned processes unpickle by name."""
    return peer_system(name, partial(_check, name), KafkaBus, produce, consume, partial(consume, latency=True),
                       latency_produce)


def _aio_produce(port, cfg, index, count, gate):
    return asyncio.run(_aio_produce_run(port, cfg, index, count, gate))


def _aio_consume(port, cfg, parts, expected, gate, latency: bool = False):
    return asyncio.run(_aio_consume_run(port, cfg, parts, expected, gate, latency))


def _aio_latency_produce(port, cfg, index, count, rate_per_s, gate):
    return asyncio.run(_aio_latency_produce_run(port, cfg, index, count, rate_per_s, gate))


KAFKA_CLIENT_SYSTEMS = {s.name: s for s in (
    *(_system(name, partial(_produce, name), partial(_consume, name), partial(_latency_produce, name))
      for name in SYNC_CLIENTS),
    _system("aiokafka", _aio_produce, _aio_consume, _aio_latency_produce),
)}
