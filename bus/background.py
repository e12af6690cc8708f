"""The client's background I/O thread: what the producer's sender and the consumer's fetcher share.

It owns every ZeroMQ socket its client uses after start-up (ZeroMQ sockets are single-threaded): a
connection to the coordinator for metadata, one monitored connection per node, and the pull side of the
Waker by which the user's threads wake it. It keeps the cluster metadata, refreshed at most once per
``retry_backoff_s`` and on demand. The loop calls ``_step()`` until ``stop()``; a step ends in ``_poll()``,
which sleeps until a reply, a wake-up, a disconnect or its timeout, and hands each to a hook:

- ``_on_reply(node_id, request_id, error, result, bulk)``: one decoded reply from a node;
- ``_node_lost(node_id, reason)``: whatever was outstanding on that node's connection will never be
  answered (the connection dropped, or the node moved to another address and got a new socket);
- ``_stopped()``: the loop ended; settle what is left before the sockets close.

The loop can be lent: ``step_here()`` runs one step in the calling thread, with this thread parked. A user's
thread about to wait for a reply waits for it on the socket itself, so the reply reaches it without a
wake-up of this thread and a hand-over (the consumer's poll() with an empty buffer). After a lent step the
loop stays with the user's thread for LENT_HOLD_MS (``held()``): a thread that calls again within it (a
poll() loop) steps again with no hand-over either way, and this thread takes the loop back only when the
user's has been away that long. The sockets and the loop's state belong to whichever thread runs the
step; ``_baton`` orders the two (ZeroMQ sockets may move between threads with a full memory barrier between
their uses, which taking a lock is).

It knows nothing of batches, fetches or the client's locks: those are the subclasses'.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from . import wire
from .clock import LOOP_WAIT_MS_MAX
from .connection import Connection, Waker, ZmqContext
from .errors import BusError
from .metadata import ClusterMetadata

# How long the loop stays with a user's thread after a step it ran (step_here): longer than a poll() loop
# takes between calls, short enough that a user busy elsewhere gets its fetches going again in this thread.
LENT_HOLD_MS = 10


class BackgroundIO(threading.Thread):
    def __init__(self, context: ZmqContext, *, name: str, bootstrap: str, metadata_timeout_ms: int,
                 retry_backoff_s: float, log: logging.Logger) -> None:
        super().__init__(name=name, daemon=True)
        self.context = context
        self.bootstrap = bootstrap
        self.metadata_timeout_ms = metadata_timeout_ms
        self.retry_backoff_s = retry_backoff_s
        self.log = log
        self.waker = Waker(context, name)
        self.stopping = False
        self.coordinator: Connection | None = None  # made in run(): a socket belongs to the thread using it
        self.metadata: ClusterMetadata | None = None
        self.metadata_refresh_s = 0.0  # monotonic time before which no metadata request goes out
        self.nodes: dict[int, Connection] = {}
        # Who runs the loop (see the module's docstring), each read and written under _baton: this thread is in
        # a step; a user's thread is in one; the monotonic time until which the loop stays with the user's
        # thread; the loop has ended (its sockets are closed or closing).
        self._baton = threading.Condition(threading.Lock())
        self._in_step = False
        self._lent = False
        self._held_until_s = 0.0
        self._ended = False
        self.lent_steps = 0  # steps run by a user's thread (step_here), for the suite

    # -- for the user's threads --------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True
        with self._baton:
            self._baton.notify_all()  # parked while the loop is held: stop now
        # Through the waker: its socket holds one message, and a wake-up already pending does as well (a
        # bare NOBLOCK send would raise zmq.Again then, failing close()).
        self.waker()
        self.join()
        self.waker.close()

    def held(self) -> bool:
        """The loop is with a user's thread (in a step it runs, or held after one): that thread serves it at
        its next call, and waking this one is moot. Read without the lock: a stale answer costs a wake-up."""
        return self._lent or time.monotonic() < self._held_until_s

    def step_here(self, wait_ms: int) -> bool:
        """One step of the loop in the calling thread, waiting up to ``wait_ms`` (at most LOOP_WAIT_MS_MAX)
        in its poll, while this thread is parked; a wake-up (the waker) ends the wait early as ever. Returns
        False, having done nothing, when the loop is not running (not started, stopping, or ended): the caller
        waits its own way then. One user thread at a time (the caller's lock sees to it)."""
        with self._baton:
            if self.stopping or self._ended or not self.is_alive():
                return False
            assert not self._lent, "step_here() from two threads at once"
            self._lent = True
            if self._in_step:
                self.waker()  # end this thread's poll: the step it is in ends, then it parks
                while self._in_step:
                    self._baton.wait()
            if self._ended:  # the step failed meanwhile and the loop ended
                self._lent = False
                return False
        try:
            self.lent_steps += 1
            self._step(min(wait_ms, LOOP_WAIT_MS_MAX))
            self._lent_step_done()
        finally:
            with self._baton:
                self._lent = False
                self._held_until_s = time.monotonic() + LENT_HOLD_MS / 1000
                if self.stopping:
                    self._baton.notify_all()  # run() waits for the loop back to close the sockets
        return True

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        self.coordinator = Connection(self.context, self.bootstrap)
        try:
            while self._take_turn():
                try:
                    self._step(LOOP_WAIT_MS_MAX)
                finally:
                    with self._baton:
                        self._in_step = False
                        if self._lent:
                            self._baton.notify_all()  # step_here() waits for this step to end
        except Exception:
            self.log.exception("%s thread failed", self.name)
            raise
        finally:
            with self._baton:  # the sockets close below: not while a user's thread runs a step on them
                while self._lent:
                    self._baton.wait(LENT_HOLD_MS / 1000)
                self._ended = True
            self._stopped()
            for connection in self.nodes.values():
                connection.close()
            # The current coordinator, which a failed request may have replaced: an unclosed socket would
            # keep the client's context.term() waiting for ever.
            self.coordinator.close()
            self.waker.pull.close(0)

    def _take_turn(self) -> bool:
        """Wait while the loop is with a user's thread (step_here); False when it is to end. The wait is timed
        rather than notified, so that a user's step ending wakes nothing."""
        with self._baton:
            while True:
                if self._lent:
                    self._baton.wait(LOOP_WAIT_MS_MAX / 1000)
                    continue
                if self.stopping:
                    return False
                held_s = self._held_until_s - time.monotonic()
                if held_s <= 0:
                    break
                self._baton.wait(held_s)
            self._in_step = True
            return True

    def _step(self, wait_ms: int) -> None:
        """One turn of the loop, ending in ``_poll()`` for up to ``wait_ms`` (or not, when there is more to do
        at once)."""
        raise NotImplementedError

    def _lent_step_done(self) -> None:
        """After a step that ran in a user's thread (step_here), before the loop goes back to this one."""

    def _stopped(self) -> None:
        """The loop ended (stop() or a failure); the node and coordinator sockets are still open."""

    def _poll(self, timeout_ms: int) -> float:
        """Wait up to ``timeout_ms`` for a wake-up or node traffic and dispatch it to the hooks, node by node:
        a disconnect first (what was outstanding is lost), then the node's replies. Returns the monotonic
        time at which the wait ended, before any hook ran."""
        poller = zmq.Poller()
        poller.register(self.waker.pull, zmq.POLLIN)
        for connection in self.nodes.values():
            poller.register(connection.socket, zmq.POLLIN)
            poller.register(connection.monitor, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        woke_s = time.monotonic()
        if self.waker.pull in ready:
            self.waker.drain()
        for node_id, connection in list(self.nodes.items()):
            if connection.monitor in ready and connection.disconnected():
                self._node_lost(node_id, f"lost connection to node {node_id}")
            if connection.socket in ready:
                self._drain(node_id, connection)
        return woke_s

    def _drain(self, node_id: int, connection: Connection) -> None:
        while connection.socket.poll(0):
            try:
                request_id, error, result, bulk = connection.recv()
            except Exception as exc:
                self.log.warning("undecodable reply from node %d dropped: %s", node_id, exc)
                continue
            self._on_reply(node_id, request_id, error, result, bulk)

    def _on_reply(self, node_id: int, request_id: int, error: list[Any] | None, result: Any, bulk: list[wire.Frame]
                  ) -> None:
        """One reply from ``node_id``: ``error`` is None or the wire's [code, message]."""
        raise NotImplementedError

    def _node_lost(self, node_id: int, reason: str) -> None:
        """No reply will come to what was sent to ``node_id`` on its connection until now."""
        raise NotImplementedError

    # -- metadata and node connections -------------------------------------------------------------

    def _refresh_metadata(self, force: bool = False) -> None:
        """Fetch the metadata if there is none yet (or ``force``), at most once per ``retry_backoff_s``."""
        if self.metadata is not None and not force:
            return
        now_s = time.monotonic()
        if now_s < self.metadata_refresh_s:
            return
        self.metadata_refresh_s = now_s + self.retry_backoff_s
        assert self.coordinator is not None  # made by run(), the thread that calls this
        try:
            result, _ = self.coordinator.request(wire.METADATA, {}, timeout_ms=self.metadata_timeout_ms)
        except BusError as exc:
            self.log.warning("metadata refresh failed: %s", exc)
            self._reset_coordinator()
            return
        self.metadata = ClusterMetadata(result)

    def _reset_coordinator(self) -> None:
        """A fresh socket after a failed request: nothing queued for a coordinator that did not answer stays
        in front of the next request."""
        assert self.coordinator is not None  # made by run(), the thread that calls this
        self.coordinator.close()
        self.coordinator = Connection(self.context, self.bootstrap)

    def _connection(self, node_id: int) -> Connection:
        """The connection to ``node_id`` at its current address (metadata must be known)."""
        assert self.metadata is not None
        address = self.metadata.address(node_id)
        connection = self.nodes.get(node_id)
        if connection is None or connection.address != address:
            if connection is not None:
                connection.close()
                self._node_lost(node_id, f"node {node_id} moved to {address}")
            connection = self.nodes[node_id] = Connection(self.context, address, monitor=True)
        return connection
