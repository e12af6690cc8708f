"""The consumer's fetcher thread: keeps one long-poll fetch outstanding per node for the assigned
partitions, and stores what comes back in the consumer's bounded prefetch buffer.

It owns the node sockets. The user's thread changes assignment and positions under ``Consumer._lock``
and wakes it; each partition's ``epoch`` goes up on every seek, so data fetched for an older position is
recognised and dropped rather than returned.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from . import wire
from .connection import Connection, Waker, next_request_id
from .errors import BusError, OffsetOutOfRange, error_for

log = logging.getLogger("bus.consumer")

REFRESH_CODES = {"NOT_OWNER", "UNKNOWN_TOPIC", "UNKNOWN_PARTITION"}
LOOP_WAIT_MS_MAX = 100
RESET_HOLD_MS = 200  # fetching waits this long at most for positions still being resolved on other nodes


class Fetcher(threading.Thread):
    def __init__(self, consumer, context: zmq.Context):
        super().__init__(name="bus-consumer-fetcher", daemon=True)
        self.consumer = consumer
        self.context = context
        self.waker = Waker(context, "consumer")
        self.stopping = False
        self.metadata = None
        self.metadata_refresh_s = 0.0
        self.nodes: dict[int, Connection] = {}
        self.outstanding: dict[int, tuple] = {}  # node id -> (request id, {tp: (offset, epoch)}, deadline_s)
        # node id -> (request id or None while backing off, {tp: (reset spec, epoch)}, deadline_s, hold_s):
        # the list_offsets out to resolve positions. Asynchronous like fetches, so a node that does not
        # answer holds up its own partitions, and the others for at most RESET_HOLD_MS (until hold_s), never
        # close().
        self.resets: dict[int, tuple] = {}

    def stop(self) -> None:
        self.stopping = True
        self.waker()
        self.join()
        self.waker.close()

    def run(self) -> None:
        coordinator = Connection(self.context, self.consumer.bootstrap)
        self.coordinator = coordinator
        try:
            while not self.stopping:
                self._resolve_positions()
                self._issue_fetches()
                self._wait()
        except Exception:
            log.exception("consumer fetcher thread failed")
            raise
        finally:
            for connection in self.nodes.values():
                connection.close()
            self.coordinator.close()
            self.waker.pull.close(0)

    # -- metadata ----------------------------------------------------------------------------------

    def _refresh_metadata(self, force: bool = False) -> None:
        if self.metadata is not None and not force:
            return
        now_s = time.monotonic()
        if now_s < self.metadata_refresh_s:
            return
        self.metadata_refresh_s = now_s + self.consumer.retry_backoff_s
        try:
            result, _ = self.coordinator.request(wire.METADATA, {}, timeout_ms=self.consumer.request_timeout_ms)
        except BusError as exc:
            log.warning("metadata refresh failed: %s", exc)
            self.coordinator.close()
            self.coordinator = Connection(self.context, self.consumer.bootstrap)
            return
        from .metadata import ClusterMetadata

        self.metadata = ClusterMetadata(result)

    def _owner(self, tp):
        self._refresh_metadata()
        if self.metadata is None:
            return None
        topic = self.metadata.topics.get(tp[0])
        if topic is None or tp[1] >= len(topic["partitions"]):
            self._refresh_metadata(force=True)
            return None
        node_id = topic["partitions"][tp[1]]
        return node_id if node_id in self.metadata.nodes else None

    def _connection(self, node_id: int) -> Connection:
        address = self.metadata.address(node_id)
        connection = self.nodes.get(node_id)
        if connection is None or connection.address != address:
            if connection is not None:
                connection.close()
                self.outstanding.pop(node_id, None)
                self.resets.pop(node_id, None)
            connection = self.nodes[node_id] = Connection(self.context, address, monitor=True)
        return connection

    # -- positions ---------------------------------------------------------------------------------

    def _resolve_positions(self) -> None:
        """Partitions whose position is a reset spec (earliest/latest) ask their owner for the offset; the
        answer is handled by ``_drain`` (``_resolved_reply``)."""
        pending = self.consumer._pending_resets()
        if not pending:
            return
        by_node: dict[int, dict] = {}
        for tp, spec, epoch in pending:
            node_id = self._owner(tp)
            if node_id is not None:
                by_node.setdefault(node_id, {})[tp] = (spec, epoch)
        now_s = time.monotonic()
        for node_id, parts in by_node.items():
            current = self.resets.get(node_id)
            if current is not None and current[1] == parts and current[2] > now_s:
                continue  # the same question is still out (or backing off after an error)
            request_id = next_request_id()
            try:
                self._connection(node_id).send(
                    wire.LIST_OFFSETS, {"parts": [[t, p, spec] for (t, p), (spec, _) in parts.items()]},
                    request_id=request_id)
            except zmq.ZMQError:
                continue
            self.resets[node_id] = (request_id, parts, now_s + self.consumer.request_timeout_ms / 1000,
                                    now_s + RESET_HOLD_MS / 1000)

    def _resolved_reply(self, node_id: int, parts: dict, error, result) -> None:
        retry = False
        if error is not None:
            log.warning("list_offsets from node %d failed: %s: %s", node_id, *error)
            retry = True
        else:
            for (tp, (_, epoch)), (code, _, offset, _, _) in zip(parts.items(), result["parts"]):
                if code is None:
                    self.consumer._resolved(tp, epoch, offset)
                else:
                    retry = True
                    if code in REFRESH_CODES:
                        self._refresh_metadata(force=True)
        if retry:  # ask again after a back-off, not at once
            self.resets[node_id] = (None, parts, time.monotonic() + self.consumer.retry_backoff_s, 0.0)

    # -- fetching ----------------------------------------------------------------------------------

    def _issue_fetches(self) -> None:
        if self.resets:
            now_s = time.monotonic()
            if any(request_id is not None and now_s < hold_s for request_id, _, _, hold_s in self.resets.values()):
                return  # positions are being resolved: start together, so the first records come from all
        wanted = self.consumer._fetchable()  # {tp: (fetch offset, epoch)} when the buffer has room
        if not wanted:
            return
        by_node: dict[int, dict] = {}
        for tp, position in wanted.items():
            node_id = self._owner(tp)
            if node_id is not None:
                by_node.setdefault(node_id, {})[tp] = position
        now_s = time.monotonic()
        for node_id, parts in by_node.items():
            current = self.outstanding.get(node_id)
            if current is not None and current[1] == parts and current[2] > now_s:
                continue  # the same fetch is still out
            connection = self._connection(node_id)
            args = {"max_wait_ms": self.consumer.fetch_max_wait_ms, "min_bytes": self.consumer.fetch_min_bytes,
                    "max_bytes": self.consumer.fetch_max_bytes,
                    "parts": [[t, p, offset, self.consumer.max_partition_fetch_bytes]
                              for (t, p), (offset, _) in parts.items()]}
            request_id = next_request_id()
            try:
                connection.send(wire.FETCH, args, request_id=request_id)
            except zmq.ZMQError:
                continue
            deadline_s = now_s + (self.consumer.fetch_max_wait_ms + self.consumer.request_timeout_ms) / 1000
            self.outstanding[node_id] = (request_id, parts, deadline_s)

    def _wait(self) -> None:
        poller = zmq.Poller()
        poller.register(self.waker.pull, zmq.POLLIN)
        for connection in self.nodes.values():
            poller.register(connection.socket, zmq.POLLIN)
            poller.register(connection.monitor, zmq.POLLIN)
        ready = dict(poller.poll(LOOP_WAIT_MS_MAX))
        if self.waker.pull in ready:
            self.waker.drain()
        now_s = time.monotonic()
        for node_id, connection in list(self.nodes.items()):
            if connection.monitor in ready and connection.disconnected():
                self.outstanding.pop(node_id, None)  # the fetch died with the connection: ask again
                self.resets.pop(node_id, None)
            if connection.socket in ready:
                self._drain(node_id, connection)
            current = self.outstanding.get(node_id)
            if current is not None and current[2] <= now_s:
                del self.outstanding[node_id]
            reset = self.resets.get(node_id)
            if reset is not None and reset[2] <= now_s:
                del self.resets[node_id]

    def _drain(self, node_id: int, connection: Connection) -> None:
        while connection.socket.poll(0):
            try:
                request_id, error, result, bulk = connection.recv()
            except Exception as exc:
                log.warning("undecodable fetch reply from node %d: %s", node_id, exc)
                continue
            reset = self.resets.get(node_id)
            if reset is not None and reset[0] == request_id:
                del self.resets[node_id]
                self._resolved_reply(node_id, reset[1], error, result)
                continue
            current = self.outstanding.get(node_id)
            if current is None or current[0] != request_id:
                continue  # superseded: a newer fetch to this node is out
            del self.outstanding[node_id]
            if error is not None:
                log.warning("fetch from node %d failed: %s: %s", node_id, *error)
                continue
            parts = current[1]
            for (topic, partition, code, message, log_start, log_end, next_offset), data in zip(result["parts"], bulk):
                tp = (topic, partition)
                offset, epoch = parts[tp]
                if code is None:
                    self.consumer._fetched(tp, epoch, offset, bytes(data), next_offset, log_end)
                elif code == OffsetOutOfRange.code:
                    self.consumer._out_of_range(tp, epoch, offset, log_start, log_end)
                elif code in REFRESH_CODES:
                    self._refresh_metadata(force=True)
                else:
                    self.consumer._fetch_error(tp, epoch, error_for(code, message))
