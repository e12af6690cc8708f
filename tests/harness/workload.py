"""The fault harness's client side: producers that record every send in a History, readers and a monitor
that record what clients saw during the run, and the final drain.

This module owns how a send becomes history (invoke before ``send()``, then ok / fail / unknown from its
future), how a record read during the run becomes a ``poll`` event and a leader's high watermark an ``hw``
op, the progress gates that let the nemesis fire at a given point of the workload, the wait until every
ISR is full, and the drain that reads every partition from its log start to its end. It never injects
faults (nemesis.py) and never judges a history (checker.py).

Outcome of a send, from its future:
    ok        acknowledged: offset recorded
    fail      a definite or fenced error: not written (BufferFull, StorageFull, ProducerFenced, ...)
    unknown   an indeterminate error (delivery timeout after sending, ...) or no answer by the end

One producer per thread and one process name per producer, so "invoke order" in the checker's
``reordered`` is the order in which that producer's ``send()`` calls were made.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque

import zmq

from bus import Admin, Consumer, Producer, wire
from bus.admin import list_offsets
from bus.batch import pack_batch
from bus.connection import Requester
from bus.errors import DEFINITE, FENCED, BusError, Timeout, error_class

GATE_EVERY = 256  # a producer reports progress (and may wait at a gate) every this many sends


class Progress:
    """How many sends the workload has invoked, and gates at which producers wait for the nemesis.

    Gate ``i`` is a count of sends; a producer that reaches it waits until the nemesis has *started*
    fault ``i`` (``open``). So every planned fault happens while the workload is running, however fast
    or slow the machine is, and in the same place of the workload for a given seed.
    """

    def __init__(self, total: int, gate_fractions=()):
        self.total = total
        self.gates = [max(1, min(total - 1, int(f * total))) for f in sorted(gate_fractions)]
        self.invoked = 0
        self.opened = 0  # gates the nemesis has opened
        self.finished = False  # the producers are done (or gave up): nobody waits for gates any more
        self._cond = threading.Condition()

    def advance(self, count: int, wait_s_max: float = 120.0) -> None:
        """A producer invoked ``count`` more sends; waits while the next unopened gate is behind it."""
        with self._cond:
            self.invoked += count
            self._cond.notify_all()
            deadline_s = time.monotonic() + wait_s_max
            while self.opened < len(self.gates) and self.invoked >= self.gates[self.opened]:
                remaining = deadline_s - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the nemesis did not open gate {self.opened} within {wait_s_max} s")
                self._cond.wait(remaining)

    def wait_gate(self, index: int, stop: threading.Event | None = None) -> bool:
        """For the nemesis: wait until the workload reaches gate ``index``; False if it finished first."""
        with self._cond:
            while self.invoked < self.gates[index] and not self.finished:
                if stop is not None and stop.is_set():
                    return False
                self._cond.wait(0.1)
            return not self.finished or self.invoked >= self.gates[index]

    def open(self, index: int) -> None:
        with self._cond:
            self.opened = max(self.opened, index + 1)
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self.opened = len(self.gates)
            self._cond.notify_all()


def record_outcome(history, op_id: int, future=None, error: BaseException | None = None) -> str:
    """Complete ``op_id`` from a done future (or an error raised by ``send()``); returns the type recorded."""
    if future is not None:
        error = future.exception(0)
        if error is None:
            history.ok(op_id, offset=future.get(0).offset)
            return "ok"
    outcome = getattr(error, "outcome", None)
    code = getattr(error, "code", type(error).__name__)
    if outcome in (DEFINITE, FENCED):
        history.fail(op_id, error=code)
        return "fail"
    history.unknown(op_id, error=code)
    return "unknown"


class ProducerWorker(threading.Thread):
    """One Producer in one thread: ``count`` sends of unique values to seeded random partitions."""

    def __init__(self, name: str, bootstrap: str, topic: str, partitions: int, count: int, history,
                 progress: Progress | None = None, *, seed: int = 0, value_bytes: int = 32,
                 producer_options: dict | None = None, flush_timeout_s: float = 120.0, rate: float = 0.0):
        super().__init__(name=f"workload-{name}", daemon=True)
        self.process, self.bootstrap, self.topic, self.partitions = name, bootstrap, topic, partitions
        self.count, self.history, self.progress = count, history, progress
        self.rng = random.Random(f"{seed}/{name}")
        self.value_bytes = value_bytes
        self.producer_options = dict(producer_options or {})
        self.flush_timeout_s = flush_timeout_s
        self.rate = rate  # sends per second this producer keeps to (0: as fast as it can)
        self.outcomes = {"ok": 0, "fail": 0, "unknown": 0}
        self.error: BaseException | None = None

    def value(self, index: int) -> bytes:
        return f"{self.process}-{index:09d}-".encode().ljust(self.value_bytes, b".")

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the runner; the thread must not die silently
            self.error = exc
            raise

    def _run(self) -> None:
        history, outcomes = self.history, self.outcomes
        producer = Producer(self.bootstrap, **self.producer_options)
        pending: deque = deque()  # (op id, future), in invoke order
        started_s = time.monotonic()
        try:
            for index in range(self.count):
                if index % GATE_EVERY == GATE_EVERY - 1:
                    if self.progress is not None:
                        self.progress.advance(GATE_EVERY)
                    if self.rate:
                        # A steady pace, so the nemesis strikes a busy cluster wherever its gate falls; a
                        # producer that fell behind (a gate, a full buffer) catches up, but not in a burst
                        # of more than one gate's worth.
                        ahead_s = started_s + index / self.rate - time.monotonic()
                        if ahead_s > 0:
                            time.sleep(ahead_s)
                        elif ahead_s < -GATE_EVERY / self.rate:
                            started_s -= ahead_s + GATE_EVERY / self.rate
                partition = self.rng.randrange(self.partitions)
                value = self.value(index)
                op_id = history.invoke(self.process, "send", topic=self.topic, partition=partition, value=value)
                try:
                    future = producer.send(self.topic, value, partition=partition)
                except BusError as exc:
                    outcomes[record_outcome(history, op_id, error=exc)] += 1
                    continue
                pending.append((op_id, future))
                while pending and pending[0][1].done():
                    outcomes[record_outcome(history, *pending.popleft())] += 1
            if self.progress is not None:
                self.progress.advance(self.count % GATE_EVERY)
            try:
                producer.flush(self.flush_timeout_s)
            except Timeout:
                pass  # what is still pending is recorded as unknown below
        finally:
            while pending:
                op_id, future = pending.popleft()
                if future.done():
                    outcomes[record_outcome(history, op_id, future)] += 1
                else:
                    history.unknown(op_id, error="not completed when the workload ended")
                    outcomes["unknown"] += 1
            try:
                producer.close(timeout=5.0)
            except Timeout:
                pass  # records still unsent were recorded as unknown above


class ZombieWorker(threading.Thread):
    """Producer fencing, Kafka's zombie scenario, with hand-made batches (the Producer never bumps epochs).

    Each round takes a fresh producer id and plays two incarnations of one producer on one partition:
      1. the zombie (epoch 0) writes ``a`` at sequence 0, then sends ``b`` at sequence 1, and that
         request is held up in the network (here: held back by this worker);
      2. the application, not knowing whether ``b`` was written, restarts the producer: the new
         incarnation (epoch 1) writes ``b`` again at sequence 0, and on even rounds ``c`` at sequence 1;
      3. the zombie's held request finally arrives. The node must fence it (ProducerFenced: ``fail``).
         A node that ignores the epoch appends it (``b`` twice: duplicates) or takes it for a retry of
         ``c`` and acknowledges it at ``c``'s offset (lost, inconsistent_offsets).
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int, rounds: int, history, *, seed: int = 0,
                 request_timeout_ms: int = 2_000, attempts_max: int = 30):
        super().__init__(name="workload-zombies", daemon=True)
        self.bootstrap, self.topic, self.partitions, self.rounds = bootstrap, topic, partitions, rounds
        self.history = history
        self.rng = random.Random(f"{seed}/zombies")
        self.request_timeout_ms, self.attempts_max = request_timeout_ms, attempts_max
        self.outcomes = {"ok": 0, "fail": 0, "unknown": 0}
        self.error: BaseException | None = None

    def run(self) -> None:
        self._context = zmq.Context()
        self._requester = Requester(self._context, self.bootstrap, self.request_timeout_ms)
        try:
            for round_ in range(self.rounds):
                self._round(round_)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._requester.close()
            self._context.term()

    def _round(self, round_: int) -> None:
        partition = self.rng.randrange(self.partitions)
        producer_id = self._init_producer_id()
        zombie, incarnation = f"zombie-{round_}", f"incarnation-{round_}"
        value = lambda name: f"{zombie}-{name}".encode()  # noqa: E731
        self._send(zombie, partition, value("a"), producer_id, 0, 0)
        held = self.history.invoke(zombie, "send", topic=self.topic, partition=partition, value=value("b"))
        self._send(incarnation, partition, value("b"), producer_id, 1, 0)
        if round_ % 2 == 0:
            self._send(incarnation, partition, value("c"), producer_id, 1, 1)
        self._send(zombie, partition, value("b"), producer_id, 0, 1, op_id=held)

    def _init_producer_id(self) -> int:
        """A fresh producer id from the coordinator, asking again while it is down (the nemesis kills it)."""
        for attempt in range(self.attempts_max):
            try:
                return self._requester.coordinator(wire.INIT_PRODUCER_ID, {})["producer_id"]
            except BusError:
                if attempt == self.attempts_max - 1:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def _send(self, process, partition, value, producer_id, epoch, sequence, op_id=None) -> None:
        if op_id is None:
            op_id = self.history.invoke(process, "send", topic=self.topic, partition=partition, value=value)
        batch = pack_batch([None, None, value, None], 1, producer_id, epoch, sequence)
        code, message, offset = self._produce(partition, batch)
        if code is None:
            self.history.ok(op_id, offset=offset)
            self.outcomes["ok"] += 1
        elif code == "TIMEOUT":
            self.history.unknown(op_id, error=message)
            self.outcomes["unknown"] += 1
        else:
            self.history.fail(op_id, error=code)
            self.outcomes["fail"] += 1

    def _produce(self, partition, batch):
        """(error code or None, message, base offset), resending the same batch on transient errors."""
        message = "no attempt"
        for _ in range(self.attempts_max):
            try:
                metadata = self._requester.metadata([self.topic])
                address = metadata.address(metadata.leader(self.topic, partition))
                epoch = metadata.leader_epoch(self.topic, partition)
                # acks="all": with replicas, only a committed batch is sure to survive its leader.
                result = self._requester.request(address, wire.PRODUCE,
                                                 {"acks": "all", "parts": [[self.topic, partition, epoch]]}, [batch])
            except BusError as exc:
                message = f"{exc.code}: {exc.message}"
                time.sleep(0.1)
                continue
            code, message, offset, _, _ = result["parts"][0]
            if code == "STORAGE_FULL" or (code is not None and error_class(code).refresh_metadata):
                time.sleep(0.1)
                continue
            return code, message, offset
        return "TIMEOUT", f"no definite answer after {self.attempts_max} attempts ({message})", -1


def drain(bootstrap: str, topic: str, partitions: int, timeout_s: float = 120.0, history=None):
    """Every record of every partition, from its log start to its end now, as (topic, partition, offset,
    value) tuples; and {(topic, partition): log start offset}. Raises TimeoutError if it cannot finish.
    With ``history``, the end offsets it drains to are recorded as observed high watermarks ("hw")."""
    tps = [(topic, p) for p in range(partitions)]
    consumer = Consumer(bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100)
    try:
        consumer.assign(tps)
        deadline_s = time.monotonic() + timeout_s
        asked = [history.invoke("drain", "hw", topic=t, partition=p) for t, p in tps] if history is not None else []
        ends, starts = _offsets(consumer, tps, deadline_s)
        for op_id, tp in zip(asked, tps):
            history.ok(op_id, offset=ends[tp])
        next_offsets = dict(starts)
        records = []
        while any(next_offsets[tp] < ends[tp] for tp in tps):
            if time.monotonic() > deadline_s:
                behind = {f"{t}/{p}": (next_offsets[(t, p)], ends[(t, p)]) for t, p in tps
                          if next_offsets[(t, p)] < ends[(t, p)]}
                raise TimeoutError(f"drain did not reach the log ends within {timeout_s} s: {behind}")
            for r in consumer.poll(timeout_ms=500):
                records.append((r.topic, r.partition, r.offset, r.value))
                next_offsets[(r.topic, r.partition)] = r.offset + 1
        return records, {tp: starts[tp] for tp in tps}
    finally:
        consumer.close()


def _offsets(consumer, tps, deadline_s):
    while True:
        try:
            ends = {(t, p): o for (t, p), o in consumer.end_offsets(tps).items()}
            starts = {(t, p): o for (t, p), o in consumer.beginning_offsets(tps).items()}
            return ends, starts
        except BusError:
            if time.monotonic() > deadline_s:
                raise
            time.sleep(0.2)


class ReaderWorker(threading.Thread):
    """A consumer outside any group that reads every partition from its start while the workload runs, and
    records each record it is handed as a one-shot ``poll`` (topic, partition, offset, value): what the
    checker's ``phantom_reads`` holds against the final drain. It follows leaders as any consumer does;
    what it reads must be committed, so it must still be there at the end."""

    def __init__(self, name: str, bootstrap: str, topic: str, partitions: int, history, *,
                 fetch_max_wait_ms: int = 100, request_timeout_ms: int = 2_000):
        super().__init__(name=f"workload-{name}", daemon=True)
        self.process, self.bootstrap, self.topic, self.partitions = name, bootstrap, topic, partitions
        self.history = history
        self.options = {"auto_offset_reset": "earliest", "fetch_max_wait_ms": fetch_max_wait_ms,
                        "request_timeout_ms": request_timeout_ms}
        self.read = 0  # records recorded
        self.errors: dict[str, int] = {}  # error code -> how often poll() raised it (read on regardless)
        self.error: BaseException | None = None  # what stopped it, if anything did
        self._halt = threading.Event()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._halt.set()
        self.join(timeout_s)

    def run(self) -> None:
        try:
            consumer = self._consumer()
            if consumer is None:
                return
            try:
                while not self._halt.is_set():
                    try:
                        records = consumer.poll(timeout_ms=100)
                    except BusError as exc:  # e.g. a partition's fetch error; the consumer goes on
                        self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
                        continue
                    for r in records:
                        self.history.record(self.process, "poll", topic=r.topic, partition=r.partition,
                                            offset=r.offset, value=r.value)
                    self.read += len(records)
            finally:
                consumer.close()
        except BaseException as exc:
            self.error = exc
            raise

    def _consumer(self):
        """An assigned Consumer, asking again while the coordinator is down; None if stopped first."""
        while not self._halt.is_set():
            consumer = Consumer(self.bootstrap, **self.options)
            try:
                consumer.assign([(self.topic, p) for p in range(self.partitions)])
                return consumer
            except BusError:
                consumer.close()
                self._halt.wait(0.2)
        return None


class HighWatermarkMonitor(threading.Thread):
    """Asks every partition's leader, as the coordinator names it now, for its high watermark ("latest")
    every ``interval_s``, and records each question and answer as an ``hw`` op (invoke before the request,
    ok with the offset, fail for a refusal such as a new leader's OFFSET_NOT_AVAILABLE, unknown without an
    answer): what the checker's ``hw_regressions`` compares. Each round asks the coordinator first, so it
    never asks a leader of an older epoch than one it already asked."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, history, *, interval_s: float = 0.1,
                 request_timeout_ms: int = 500, name: str = "monitor"):
        super().__init__(name=f"workload-{name}", daemon=True)
        self.process, self.bootstrap, self.topic, self.partitions = name, bootstrap, topic, partitions
        self.history, self.interval_s, self.request_timeout_ms = history, interval_s, request_timeout_ms
        self.observed = 0  # ok answers recorded
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._halt.set()
        self.join(timeout_s)

    def run(self) -> None:
        context = zmq.Context()
        requester = Requester(context, self.bootstrap, self.request_timeout_ms)
        try:
            while not self._halt.wait(self.interval_s):
                self._round(requester)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            requester.close()
            context.term()

    def _round(self, requester) -> None:
        try:
            metadata = requester.metadata([self.topic])
            states = metadata.topics[self.topic]["partitions"]
        except (BusError, KeyError):
            return  # the coordinator is down, or does not know the topic yet: next round
        by_leader: dict[int, list] = {}
        for partition, state in enumerate(states[:self.partitions]):
            if state["leader"] in metadata.nodes:
                by_leader.setdefault(state["leader"], []).append((partition, state["leader_epoch"]))
        for node_id, parts in sorted(by_leader.items()):
            op_ids = [self.history.invoke(self.process, "hw", topic=self.topic, partition=p, node=node_id)
                      for p, _ in parts]
            try:
                result = requester.request(metadata.address(node_id), wire.LIST_OFFSETS,
                                           {"parts": [[self.topic, p, "latest", epoch] for p, epoch in parts]})
            except BusError as exc:
                for op_id in op_ids:
                    self.history.unknown(op_id, error=exc.code)
                continue
            for op_id, (code, _message, offset, _start, _hw) in zip(op_ids, result["parts"]):
                if code is None:
                    self.history.ok(op_id, offset=offset)
                    self.observed += 1
                else:
                    self.history.fail(op_id, error=code)


def wait_in_sync(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list | None:
    """Wait until every partition of ``topic`` has a live leader that answers and every replica in its ISR;
    the described partitions then (Admin.describe_topic), or None if that did not happen within
    ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    with Admin(bootstrap, request_timeout_ms=2_000) as admin:
        while True:
            try:
                parts = admin.describe_topic(topic)["partitions"]
                if all(p["alive"] and p["high_watermark"] is not None and sorted(p["isr"]) == sorted(p["replicas"])
                       for p in parts):
                    return parts
            except BusError:
                pass
            if time.monotonic() > deadline_s:
                return None
            time.sleep(0.1)


def wait_serving_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 30.0) -> None:
    """Wait until every partition's owner serves ``topic`` (it learns placement from its heartbeats), so a
    run's first faults do not land on a cluster that is still starting."""
    context = zmq.Context()
    requester = Requester(context, bootstrap, 1_000)
    deadline_s = time.monotonic() + timeout_s
    try:
        while True:
            try:
                list_offsets(requester, {(topic, p): "latest" for p in range(partitions)})
                return
            except BusError:
                if time.monotonic() > deadline_s:
                    raise
                time.sleep(0.05)
    finally:
        requester.close()
        context.term()
