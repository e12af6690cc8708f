"""The consumer's fetcher thread: keeps one long-poll fetch outstanding per node for the assigned
partitions, and stores what comes back in the consumer's bounded prefetch buffer.

It owns the node sockets (the loop, the metadata and the node connections are bus/background.py's). While
poll() waits with its buffer empty, poll()'s thread runs this loop (BackgroundIO.step_here), so a reply
reaches it without this thread's wake-up and hand-over; the next fetches go out before poll() returns
(``_lent_step_done``). The user's thread changes assignment and positions under ``Consumer._lock`` and
wakes it; each partition's ``epoch`` goes up on every seek, so data fetched for an older position is
recognised and dropped rather than returned. What to fetch and whether an answer is stale are
bus/positions.py's decisions, which this thread reaches through the Consumer's methods (``_fetchable``,
``_fetched``, ``_resolved`` ...).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import zmq

from . import wire
from .background import BackgroundIO
from .connection import ZmqContext, next_request_id
from .errors import OffsetOutOfRange, error_class, error_for
from .records import Buffer, TopicPartition

if TYPE_CHECKING:
    from .consumer import Consumer

# A fetch's partitions: {tp: (fetch offset, seek epoch, leader epoch)}.
FetchParts: TypeAlias = dict[TopicPartition, tuple[int, int, int]]
# A list_offsets' partitions: {tp: (reset spec, seek epoch, leader epoch)}.
ResetParts: TypeAlias = dict[TopicPartition, tuple[str | int, int, int]]

log = logging.getLogger("bus.consumer")

RESET_HOLD_MS = 200  # fetching waits this long at most for positions still being resolved on other nodes


class Fetcher(BackgroundIO):
    def __init__(self, consumer: Consumer[Any, Any], context: ZmqContext) -> None:
        super().__init__(context, name="bus-consumer-fetcher", bootstrap=consumer.bootstrap,
                         metadata_timeout_ms=consumer.request_timeout_ms, retry_backoff_s=consumer.retry_backoff_s,
                         log=log)
        self.consumer = consumer
        # node id -> (request id, {tp: (offset, epoch, leader epoch)}, deadline_s)
        self.outstanding: dict[int, tuple[int | None, FetchParts, float]] = {}
        # node id -> (request id or None while backing off, {tp: (reset spec, epoch)}, deadline_s, hold_s):
        # the list_offsets out to resolve positions. Asynchronous like fetches, so a node that does not
        # answer holds up its own partitions, and the others for at most RESET_HOLD_MS (until hold_s), never
        # close().
        self.resets: dict[int, tuple[int | None, ResetParts, float, float]] = {}
        # For Consumer.metrics(): written by this thread only, read unlocked (plain ints).
        self.fetch_requests = 0  # fetch requests sent
        self.fetch_errors = 0  # fetch replies that failed, and partitions a reply failed for good

    # -- the loop (bus/background.py runs it) ------------------------------------------------------

    def _step(self, wait_ms: int) -> None:
        self._ask()
        woke_s = self._poll(wait_ms)
        # A request past its deadline is forgotten, so the next turn asks again. Checked after the replies
        # that came with this wake-up, so one that arrived just in time is taken.
        for node_id in [n for n, (_, _, deadline_s) in self.outstanding.items() if deadline_s <= woke_s]:
            del self.outstanding[node_id]
        for node_id in [n for n, (_, _, deadline_s, _) in self.resets.items() if deadline_s <= woke_s]:
            del self.resets[node_id]

    def _lent_step_done(self) -> None:
        # poll()'s thread goes on with what the step took: the next fetches go out now, not when this thread
        # has the loop back.
        self._ask()

    def _ask(self) -> None:
        """What the positions need next: the list_offsets of pending resets, then the fetches."""
        self._resolve_positions()
        self._issue_fetches()

    def _node_lost(self, node_id: int, reason: str) -> None:
        self.outstanding.pop(node_id, None)  # the fetch died with the connection: ask again
        self.resets.pop(node_id, None)

    # -- metadata ----------------------------------------------------------------------------------

    def _leader(self, tp: TopicPartition) -> tuple[int, int] | None:
        """(node id, leader epoch) of the partition's leader, or None while unknown (then refresh)."""
        self._refresh_metadata()
        if self.metadata is None:
            return None
        topic = self.metadata.topics.get(tp[0])
        if topic is None or tp[1] >= len(topic["partitions"]):
            self._refresh_metadata(force=True)
            return None
        state = topic["partitions"][tp[1]]
        connection = self.nodes.get(state["leader"])
        if not self.metadata.nodes.get(state["leader"], {}).get("alive") or (connection is not None and connection.down):
            # No leader, or one that is down: an election is under way; ask until it is over.
            self._refresh_metadata(force=True)
            return None
        return state["leader"], state["leader_epoch"]

    # -- positions ---------------------------------------------------------------------------------

    def _resolve_positions(self) -> None:
        """Partitions whose position is a reset spec (earliest/latest) ask their owner for the offset; the
        answer is handled by ``_on_reply`` (``_resolved_reply``)."""
        pending = self.consumer._pending_resets()
        if not pending:
            return
        by_node: dict[int, ResetParts] = {}
        for tp, spec, epoch in pending:
            leader = self._leader(tp)
            if leader is not None:
                by_node.setdefault(leader[0], {})[tp] = (spec, epoch, leader[1])
        now_s = time.monotonic()
        for node_id, parts in by_node.items():
            current = self.resets.get(node_id)
            if current is not None and current[1] == parts and current[2] > now_s:
                continue  # the same question is still out (or backing off after an error)
            request_id = next_request_id()
            try:
                self._connection(node_id).send(
                    wire.LIST_OFFSETS, {"parts": [[t, p, spec, leader_epoch]
                                                  for (t, p), (spec, _, leader_epoch) in parts.items()]},
                    request_id=request_id)
            except zmq.ZMQError:
                continue
            self.resets[node_id] = (request_id, parts, now_s + self.consumer.request_timeout_ms / 1000,
                                    now_s + RESET_HOLD_MS / 1000)

    def _resolved_reply(self, node_id: int, parts: ResetParts, error: list[Any] | None, result: Any) -> None:
        retry = False
        if error is not None:
            log.warning("list_offsets from node %d failed: %s: %s", node_id, *error)
            retry = True
        else:
            for (tp, (spec, epoch, _)), (code, _, offset, _, _) in zip(parts.items(), result["parts"]):
                if code is None:
                    self.consumer._resolved(tp, spec, epoch, offset)
                else:
                    retry = True
                    if error_class(code).refresh_metadata:
                        self._refresh_metadata(force=True)
        if retry:  # ask again after a back-off, not at once
            self.resets[node_id] = (None, parts, time.monotonic() + self.retry_backoff_s, 0.0)

    # -- fetching ----------------------------------------------------------------------------------

    def _issue_fetches(self) -> None:
        if self.resets:
            now_s = time.monotonic()
            if any(request_id is not None and now_s < hold_s for request_id, _, _, hold_s in self.resets.values()):
                return  # positions are being resolved: start together, so the first records come from all
        wanted = self.consumer._fetchable()  # {tp: (fetch offset, epoch)} when the buffer has room
        if not wanted:
            return
        by_node: dict[int, FetchParts] = {}
        for tp, (offset, epoch) in wanted.items():
            leader = self._leader(tp)
            if leader is not None:
                by_node.setdefault(leader[0], {})[tp] = (offset, epoch, leader[1])
        now_s = time.monotonic()
        for node_id, parts in by_node.items():
            current = self.outstanding.get(node_id)
            if current is not None and current[1] == parts and current[2] > now_s:
                continue  # the same fetch is still out
            connection = self._connection(node_id)
            args = {"max_wait_ms": self.consumer.fetch_max_wait_ms, "min_bytes": self.consumer.fetch_min_bytes,
                    "max_bytes": self.consumer.fetch_max_bytes,
                    "parts": [[t, p, offset, self.consumer.max_partition_fetch_bytes, leader_epoch]
                              for (t, p), (offset, _, leader_epoch) in parts.items()]}
            request_id = next_request_id()
            try:
                connection.send(wire.FETCH, args, request_id=request_id)
            except zmq.ZMQError:
                continue
            self.fetch_requests += 1
            deadline_s = now_s + (self.consumer.fetch_max_wait_ms + self.consumer.request_timeout_ms) / 1000
            self.outstanding[node_id] = (request_id, parts, deadline_s)

    def _on_reply(self, node_id: int, request_id: int, error: list[Any] | None, result: Any, bulk: list[wire.Frame]
                  ) -> None:
        reset = self.resets.get(node_id)
        if reset is not None and reset[0] == request_id:
            del self.resets[node_id]
            self._resolved_reply(node_id, reset[1], error, result)
            return
        current = self.outstanding.get(node_id)
        if current is None or current[0] != request_id:
            return  # superseded: a newer fetch to this node is out
        del self.outstanding[node_id]
        if error is not None:
            self.fetch_errors += 1
            log.warning("fetch from node %d failed: %s: %s", node_id, *error)
            return
        parts = current[1]
        retry = False
        # Handed over together, so that the partitions of one reply join poll()'s rotation together.
        fetched: list[tuple[TopicPartition, int, int, Buffer, int, int]] = []
        for (topic, partition, code, message, log_start, log_end, next_offset), data in zip(result["parts"], bulk):
            # A plain tuple, equal to (and hashing as) the TopicPartition the consumer keys its partition by.
            tp = cast(TopicPartition, (topic, partition))
            offset, epoch, _ = parts[tp]
            if code is None:
                fetched.append((tp, epoch, offset, bytes(data), next_offset, log_end))
            elif code == OffsetOutOfRange.code:
                self.consumer._out_of_range(tp, epoch, offset, log_start, log_end)
            elif error_class(code).retriable:
                retry = True  # leadership moved, or a new leader is not ready yet: ask again shortly
                if error_class(code).refresh_metadata:
                    self._refresh_metadata(force=True)
            else:
                self.fetch_errors += 1
                self.consumer._fetch_error(tp, epoch, error_for(code, message))
        if fetched:
            self.consumer._fetched(fetched)
        if retry:  # after a back-off: the same question to the same node would get the same answer at once
            self.outstanding[node_id] = (None, parts, time.monotonic() + self.retry_backoff_s)
