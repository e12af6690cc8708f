"""The producer's sender thread: ships closed batches to partition owners, retries, completes futures.

The per-partition decisions (the window, retries in order, renumbering, delivery timeouts) are
PartitionQueue's methods, pure (``now_s`` passed in; tests/test_sender_core.py); this thread drives them
and does the I/O (producer ids, sends, replies).

It owns every socket of the producer (ZeroMQ sockets are single-threaded; the loop, the metadata and the
node connections are bus/background.py's); ``send()`` reaches it only through the accumulator (under
``Producer._lock``) and a wake-up message on an inproc socket.

Ordering and exactly-once (idempotent producer, on by default): each partition's batches get
consecutive sequence numbers under a producer id from the coordinator. Several batches of one partition
may be in flight, within a window of 16 from the oldest not yet settled (the node remembers a producer's
last 16 batches, so a resend of any batch in the window is recognised); the node refuses any batch that
skips a sequence. When a batch must be retried, nothing more is sent for its partition until all of its
in-flight batches have come back; then the unacked ones go again, in sequence order, with their original
sequences, so the node writes each once, in order. A batch that definitely failed (e.g. StorageFull)
leaves a hole: the ones after it are renumbered from the last acknowledged sequence. A batch whose fate is
unknown when its delivery timeout passes may have been written, so the partition moves to a fresh
producer id rather than reuse its sequence numbers; the batches already sent after it are as uncertain
(a copy may still land under the old id) and fail with it, as unknown; only unsent ones move on.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import zmq

from . import wire
from .background import BackgroundIO
from .batch import pack_batch
from .connection import Connection, ZmqContext, next_request_id
from .errors import (BusError, ClosedError, DEFINITE, INDETERMINATE, NodeUnavailable, RecordTooLarge, Timeout,
                     UnknownTopic, error_for)
from .kafka_batch import sequence_after

if TYPE_CHECKING:
    from .producer import Producer, ProducerBatch

log = logging.getLogger("bus.producer")

REQUEST_BYTES_MAX = 8 << 20  # batches per produce request to one node, beyond the first
# A node remembers the last IDEMPOTENCE_WINDOW_BATCHES batches of each producer per partition (bus/wire.py):
# a resent batch older than those would look like a sequence gap, not a retry. So a partition's batches go
# out in a window of that many that starts at its oldest batch still unsettled: a batch whose reply was
# lost stays in the window even while later ones are acknowledged, and nothing beyond the window is sent
# until it is settled, so when it is resent the node still knows it.
PARTITION_IN_FLIGHT_BATCHES_MAX = wire.IDEMPOTENCE_WINDOW_BATCHES


class PartitionQueue:
    """The sender's state for one partition: unsent batches in sequence order and sequence bookkeeping."""

    __slots__ = ("queue", "in_flight", "window", "retrying", "renumber", "new_producer_id", "next_sequence",
                 "acked_sequence", "producer_id", "producer_epoch", "not_before_s")

    def __init__(self, producer_id: int, producer_epoch: int) -> None:
        self.queue: list[ProducerBatch] = []  # batches not in flight, ascending sequence
        self.in_flight = 0
        # Batches sent under the current numbering, ascending sequence, from the oldest not yet completed
        # (acknowledged or failed) on: at most PARTITION_IN_FLIGHT_BATCHES_MAX.
        self.window: deque[ProducerBatch] = deque()
        self.retrying = False  # hold sends until in-flight batches return, then resend in order
        self.renumber = False  # a batch failed for certain: renumber the queue from acked_sequence
        self.new_producer_id = False  # a batch's fate is unknown: renumber under a fresh producer id
        self.next_sequence = 0
        self.acked_sequence = 0  # one past the last acknowledged sequence
        self.producer_id, self.producer_epoch = producer_id, producer_epoch
        self.not_before_s = 0.0

    # The partition's decisions, pure (no socket, thread or clock: ``now_s`` is passed in); Sender drives them.

    def sendable(self, now_s: float) -> bool:
        """Whether batches of this partition may go out now: it has some, is past its back-off, and no retry
        is waiting for batches still in flight. Call renumber_needed() next, when it says True."""
        if not self.queue or now_s < self.not_before_s:
            return False
        return not (self.retrying and self.in_flight)

    def renumber_needed(self) -> bool:
        """After sendable(): whether the queue must be renumbered (a batch failed) before anything goes out.
        Ends the retry hold either way."""
        needed = self.retrying and (self.renumber or self.new_producer_id)
        self.retrying = False
        return needed

    def take_if_in_window(self, idempotent: bool) -> ProducerBatch | None:
        """The next queued batch, taken out of the queue and counted in flight, if it may go out now (within
        the window of PARTITION_IN_FLIGHT_BATCHES_MAX from the oldest unsettled one); else None."""
        if not self.queue:
            return None
        if idempotent:
            window, batch = self.window, self.queue[0]
            while window and window[0].done.is_set():
                window.popleft()
            if not (window and batch.sequence <= window[-1].sequence):  # not a resend of one in the window
                if len(window) >= PARTITION_IN_FLIGHT_BATCHES_MAX:
                    return None
                window.append(batch)
        elif self.in_flight >= PARTITION_IN_FLIGHT_BATCHES_MAX:
            return None
        self.in_flight += 1
        return self.queue.pop(0)

    def acknowledged(self, batch: ProducerBatch) -> None:
        """One of its in-flight batches was written."""
        self.in_flight -= 1
        self.acked_sequence = max(self.acked_sequence, batch.sequence + batch.count)

    def retry(self, batch: ProducerBatch, exc: BusError, now_s: float, backoff_s: float, in_flight: bool = True
              ) -> None:
        """``batch`` goes again (after ``backoff_s``), in sequence order, once every in-flight batch is back."""
        batch.last_error = exc
        if exc.outcome != DEFINITE:
            batch.maybe_written = True
        if in_flight:
            self.in_flight -= 1
        self.retrying = True
        self.not_before_s = now_s + backoff_s
        bisect.insort(self.queue, batch, key=lambda b: b.sequence)

    def failed(self, exc: BusError) -> None:
        """A batch failed for good: the ones after it are renumbered before they go (under a fresh producer id
        when its fate is unknown, as it may have been written)."""
        self.retrying = True
        if exc.outcome == DEFINITE:
            self.renumber = True
        else:
            self.new_producer_id = True

    def expired(self, now_s: float) -> list[ProducerBatch]:
        """The queued batches whose delivery timeout has passed, taken out of the queue (oldest first)."""
        out: list[ProducerBatch] = []
        while self.queue and self.queue[0].deadline_s <= now_s:
            out.append(self.queue.pop(0))
        return out


class Sender(BackgroundIO):
    def __init__(self, producer: Producer[Any, Any], context: ZmqContext, *, request_timeout_ms: int,
                 max_in_flight_per_node: int, idempotent: bool, retry_backoff_ms: int, metadata_timeout_ms: int
                 ) -> None:
        super().__init__(context, name="bus-producer-sender", bootstrap=producer.bootstrap,
                         metadata_timeout_ms=metadata_timeout_ms, retry_backoff_s=retry_backoff_ms / 1000, log=log)
        self.producer = producer
        self.request_timeout_s = request_timeout_ms / 1000
        self.max_in_flight = max_in_flight_per_node
        self.idempotent = idempotent
        self.partitions: dict[tuple[str, int], PartitionQueue] = {}
        # request id -> (node id, batches, deadline_s)
        self.in_flight: dict[int, tuple[int, list[ProducerBatch], float]] = {}
        self.node_in_flight: dict[int, int] = {}
        self.producer_ids: list[int] | None = None  # [producer_id, epoch] for new partition queues
        # For Producer.metrics(): written by this thread only, read unlocked (plain ints), once per batch or
        # request, never per record.
        self.requests_sent = 0  # produce requests handed to a socket
        self.batch_attempts = 0  # batches in them (a retried batch counts once per attempt)
        self.retries = 0  # batch attempts that failed retriably and were queued again
        self.records_acked = self.bytes_acked = self.batches_acked = 0  # acknowledged (or sent, with acks=0)
        self.records_failed = self.batches_failed = 0  # completed with an error

    # -- the loop (bus/background.py runs it) ------------------------------------------------------

    def _step(self, wait_ms: int) -> None:
        now_s = time.monotonic()
        held = [key for key, queue in self.partitions.items() if queue.queue]
        ready, linger_s = self.producer._take_ready(now_s, held)
        for batch in ready:
            self._enqueue(batch)
        self._expire(now_s)
        self._send(now_s)
        if any(not self.partitions[key].queue for key in held):
            return  # a partition whose open batch was held has sent its queue: take that batch now
        now_s = time.monotonic()
        wake_s = now_s + wait_ms / 1000
        if linger_s is not None:
            wake_s = min(wake_s, linger_s)
        self._poll(max(0, int((wake_s - now_s) * 1000)))

    def _stopped(self) -> None:
        self._fail_everything(ClosedError("producer closed before the record was acknowledged"))

    def _node_lost(self, node_id: int, reason: str) -> None:
        self._fail_node_requests(node_id, NodeUnavailable(reason))

    # -- producer ids ------------------------------------------------------------------------------

    def _new_producer_id(self) -> tuple[int, int]:
        if not self.idempotent:
            return -1, -1
        while not self.stopping:
            assert self.coordinator is not None  # made by run(), the thread that calls this
            try:
                result, _ = self.coordinator.request(wire.INIT_PRODUCER_ID, {}, timeout_ms=self.metadata_timeout_ms)
                return result["producer_id"], result["epoch"]
            except BusError as exc:
                log.warning("could not get a producer id: %s", exc)
                self._reset_coordinator()
        return -1, -1

    # -- queueing ----------------------------------------------------------------------------------

    def _enqueue(self, batch: ProducerBatch) -> None:
        key = (batch.topic, batch.partition)
        queue = self.partitions.get(key)
        if queue is None:
            if self.producer_ids is None and self.idempotent:
                self.producer_ids = list(self._new_producer_id())
            producer_id, epoch = cast("list[int]", self.producer_ids) if self.idempotent else (-1, -1)
            queue = self.partitions[key] = PartitionQueue(producer_id, epoch)
        try:
            self._number(queue, batch)
        except RecordTooLarge as exc:
            # A compressed payload larger than any reader takes (bus/batch.py): failed before it was sent, as
            # the node fails a batch above its limit. It took no sequence number.
            self._finish(batch, -1, exc)
            return
        queue.queue.append(batch)

    def _number(self, queue: PartitionQueue, batch: ProducerBatch) -> None:
        """Pack ``batch`` as the partition's next (compressing it if the producer does); its sequence is
        taken only once it is packed. (A renumbered batch is packed again: rare, so not worth keeping a
        compressed payload apart from its header.)"""
        producer_id, producer_epoch, sequence = ((queue.producer_id, queue.producer_epoch, queue.next_sequence)
                                                 if self.idempotent else (-1, -1, -1))
        # The queue counts sequences without bound (its order and window compare them); the wire's wrap at
        # 2**31 (sequence_after), as the node expects.
        batch.payload = pack_batch(batch.flat, batch.count, producer_id, producer_epoch,
                                   sequence if sequence < 0 else sequence_after(sequence, 0), self.producer.compression)
        batch.producer_id, batch.producer_epoch, batch.sequence = producer_id, producer_epoch, sequence
        if self.idempotent:
            queue.next_sequence += batch.count

    def _renumber(self, queue: PartitionQueue) -> None:
        """Give the queued batches fresh consecutive sequences (after a definite or unknown failure)."""
        if queue.new_producer_id:
            # A batch already sent under the old producer id may still be written under it (its request
            # held up in the network, its reply lost); renumbered under a new id it would be written
            # twice. So it shares the fate of the batch that timed out: unknown. Only batches never sent
            # move to the new id.
            for batch in [b for b in queue.queue if b.sent]:
                queue.queue.remove(batch)
                exc = Timeout("record not acknowledged before an earlier record of its partition timed out "
                              "(it may have been written)")
                exc.outcome = INDETERMINATE
                self._finish(batch, -1, exc)
            queue.producer_id, queue.producer_epoch = self._new_producer_id()
            queue.acked_sequence = 0
        queue.next_sequence = queue.acked_sequence
        for batch in queue.queue:
            self._number(queue, batch)
        queue.window.clear()  # nothing is in flight (retrying waits for that); all that is left gets resent
        queue.renumber = queue.new_producer_id = False

    # -- sending -----------------------------------------------------------------------------------

    def _send(self, now_s: float) -> None:
        if not any(q.queue for q in self.partitions.values()):
            return
        self._refresh_metadata()
        if self.metadata is None:
            return
        by_node: dict[int, list[PartitionQueue]] = {}
        for (topic, partition), queue in self.partitions.items():
            if not queue.sendable(now_s):
                continue
            if queue.renumber_needed():
                self._renumber(queue)
            try:
                node_id = self.metadata.leader(topic, partition)
            except UnknownTopic:
                self._refresh_metadata(force=True)
                continue
            connection = self.nodes.get(node_id)
            if not self.metadata.nodes.get(node_id, {}).get("alive") or (connection is not None and connection.down):
                # No leader, or one that is down: an election is under way; ask until it is over.
                self._refresh_metadata(force=True)
                continue
            by_node.setdefault(node_id, []).append(queue)
        for node_id, queues in by_node.items():
            connection = self._connection(node_id)
            while self.node_in_flight.get(node_id, 0) < self.max_in_flight:
                batches: list[ProducerBatch] = []
                size = 0
                for queue in queues:
                    while queue.queue and (not batches
                                           or size + len(cast(bytes, queue.queue[0].payload)) <= REQUEST_BYTES_MAX):
                        batch = queue.take_if_in_window(self.idempotent)
                        if batch is None:
                            break
                        batches.append(batch)
                        size += len(cast(bytes, batch.payload))  # packed when queued (_number)
                if not batches:
                    break
                self._send_request(node_id, connection, batches, now_s)

    def _send_request(self, node_id: int, connection: Connection, batches: list[ProducerBatch], now_s: float
                      ) -> None:
        request_id = next_request_id()
        assert self.metadata is not None  # _send() found it
        args = {"acks": self.producer.acks, "timeout_ms": int(self.request_timeout_s * 1000),
                "parts": [[b.topic, b.partition, self.metadata.leader_epoch(b.topic, b.partition)] for b in batches]}
        for batch in batches:
            batch.sent = True
            batch.attempts += 1
        self.requests_sent += 1
        self.batch_attempts += len(batches)
        try:
            connection.send(wire.PRODUCE, args, [b.payload for b in batches], request_id=request_id)
        except zmq.ZMQError as exc:
            for batch in batches:
                self._retry(batch, NodeUnavailable(f"could not send to node {node_id}: {exc}"), counted=True)
            return
        if self.producer.acks == 0:
            for batch in batches:
                self.partitions[(batch.topic, batch.partition)].in_flight -= 1
                self._finish(batch, -1, None)
            return
        self.in_flight[request_id] = (node_id, batches, now_s + self.request_timeout_s)
        self.node_in_flight[node_id] = self.node_in_flight.get(node_id, 0) + 1

    # -- replies -----------------------------------------------------------------------------------

    def _on_reply(self, node_id: int, request_id: int, error: list[Any] | None, result: Any, bulk: list[wire.Frame]
                  ) -> None:
        entry = self.in_flight.pop(request_id, None)
        if entry is None:
            return  # a reply to a request we already gave up on (it will be resent)
        self.node_in_flight[node_id] -= 1
        _, batches, _ = entry
        if error is not None:
            exc = error_for(*error)
            for batch in batches:
                self._outcome(batch, exc)
            return
        for batch, (code, message, base_offset, _, append_ts_ms) in zip(batches, result["parts"]):
            self._outcome(batch, None if code is None else error_for(code, message), base_offset, append_ts_ms)

    def _outcome(self, batch: ProducerBatch, exc: BusError | None, base_offset: int = -1, append_ts_ms: int = -1
                 ) -> None:
        queue = self.partitions[(batch.topic, batch.partition)]
        if exc is None:
            queue.acknowledged(batch)
            self._finish(batch, base_offset, None, append_ts_ms)
            return
        queue.in_flight -= 1
        if not exc.retriable:
            self._fail(queue, batch, exc)
            return
        if exc.refresh_metadata:
            self._refresh_metadata(force=True)
            if self.metadata is not None and batch.topic not in self.metadata.topics:
                self._fail(queue, batch, UnknownTopic(f"topic {batch.topic!r} no longer exists"))
                return
        self._retry(batch, exc)

    def _retry(self, batch: ProducerBatch, exc: BusError, counted: bool = False) -> None:
        self.partitions[(batch.topic, batch.partition)].retry(batch, exc, time.monotonic(), self.retry_backoff_s,
                                                              in_flight=counted)
        self.retries += 1
        log.debug("retrying %s/%s seq %d after %s", batch.topic, batch.partition, batch.sequence, exc)

    def _fail(self, queue: PartitionQueue, batch: ProducerBatch, exc: BusError) -> None:
        """Fail a batch for good. Later batches of its partition are renumbered before they go again."""
        queue.failed(exc)
        self._finish(batch, -1, exc)

    def _finish(self, batch: ProducerBatch, base_offset: int, exc: BusError | None, append_ts_ms: int = -1) -> None:
        if exc is None:
            self.batches_acked += 1
            self.records_acked += batch.count
            self.bytes_acked += batch.bytes
        else:
            self.batches_failed += 1
            self.records_failed += batch.count
        batch.complete(base_offset, exc, append_ts_ms)
        self.producer._release(batch)

    # -- deadlines ---------------------------------------------------------------------------------

    def _expire(self, now_s: float) -> None:
        for request_id in [r for r, (_, _, deadline_s) in self.in_flight.items() if deadline_s <= now_s]:
            node_id, batches, _ = self.in_flight.pop(request_id)
            self.node_in_flight[node_id] -= 1
            for batch in batches:
                self._outcome(batch, Timeout(f"no reply from node {node_id} within the request timeout"))
        for queue in self.partitions.values():
            for batch in queue.expired(now_s):
                if batch.sent and not batch.maybe_written and batch.last_error is not None:
                    # Every attempt was refused before anything was written (e.g. NotEnoughReplicas): say
                    # which refusal, and that it is definite.
                    self._fail(queue, batch, error_for(batch.last_error.code, f"{batch.last_error.message} "
                                                       "(not written; delivery_timeout_ms passed)"))
                    continue
                outcome = INDETERMINATE if batch.sent else DEFINITE
                exc = Timeout(f"record not acknowledged within delivery_timeout_ms "
                              f"({'it may have been written' if batch.sent else 'it was never sent'})")
                exc.outcome = outcome
                self._fail(queue, batch, exc)

    def _fail_node_requests(self, node_id: int, exc: BusError) -> None:
        for request_id in [r for r, (n, _, _) in self.in_flight.items() if n == node_id]:
            _, batches, _ = self.in_flight.pop(request_id)
            self.node_in_flight[node_id] -= 1
            for batch in batches:
                self._outcome(batch, exc)

    def _fail_everything(self, exc: BusError) -> None:
        pending = [b for _, batches, _ in self.in_flight.values() for b in batches]
        pending += [b for q in self.partitions.values() for b in q.queue]
        ready, _ = self.producer._take_ready(time.monotonic())
        for batch in pending + ready:
            if not batch.done.is_set():
                if batch.sent:
                    # It may have been written: say so, as the delivery timeout does.
                    exc = exc.__class__(f"{exc.message} (it may have been written)")
                    exc.outcome = INDETERMINATE
                self._finish(batch, -1, exc)
