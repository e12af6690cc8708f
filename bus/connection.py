"""A DEALER to one server, for the thread that owns it, with blocking request/reply matched by request id.

ZeroMQ reconnects by itself; what it does not do is tell us a request was lost. Every request here has a
deadline, a reply to an abandoned request is recognised by its id and dropped, and a socket monitor
reports disconnects so callers can resend at once instead of waiting out a timeout.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import wire
from .errors import Timeout, error_for

if TYPE_CHECKING:
    from .metadata import ClusterMetadata

# A client's ZeroMQ context, whose sockets send and receive bytes frames.
ZmqContext: TypeAlias = "zmq.Context[zmq.Socket[bytes]]"

SOCKET_HWM_MESSAGES = 1_000
_request_ids = itertools.count(1)
_wake_ids = itertools.count()
_ids_lock = threading.Lock()


def next_request_id() -> int:
    with _ids_lock:
        return next(_request_ids)


class Connection:
    def __init__(self, context: ZmqContext, address: str, *, monitor: bool = False) -> None:
        self.address = address
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, SOCKET_HWM_MESSAGES)
        self.socket.setsockopt(zmq.RCVHWM, SOCKET_HWM_MESSAGES)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 50)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1_000)
        self.monitor: zmq.Socket[bytes] | None = None
        # Disconnected and not connected again since (monitored connections only): a request sent now would
        # wait in the socket for a node that may never come back, while its partitions' leadership moves.
        self.down = False
        if monitor:
            self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self.socket.connect(address)

    def send(self, op: str, args: Any, bulk: Sequence[wire.Frame] = (), request_id: int | None = None) -> int:
        request_id = next_request_id() if request_id is None else request_id
        frames = wire.encode_request(op, request_id, args, bulk)
        self.socket.send_multipart(frames, copy=not bulk)
        return request_id

    def recv(self) -> tuple[Any, list[Any] | None, Any, list[wire.Frame]]:
        """(request_id, error, result, bulk) of the next reply; blocks."""
        return wire.decode_reply(self.socket.recv_multipart())

    def request(self, op: str, args: Any, bulk: Sequence[wire.Frame] = (), timeout_ms: int = 10_000
                ) -> tuple[Any, list[wire.Frame]]:
        """Send one request and wait for its reply. Returns (result, bulk); raises the typed error."""
        request_id = self.send(op, args, bulk)
        deadline_s = time.monotonic() + timeout_ms / 1000
        while True:
            remaining_ms = int((deadline_s - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.socket.poll(remaining_ms):
                raise Timeout(f"no reply from {self.address} to {op} within {timeout_ms} ms")
            reply_id, error, result, reply_bulk = self.recv()
            if reply_id != request_id:
                continue  # a late reply to a request we gave up on
            if error is not None:
                raise error_for(*error)
            return result, reply_bulk

    def disconnected(self) -> bool:
        """True if the monitor saw a disconnect since the last call (drains pending monitor events, and
        keeps ``down`` current)."""
        if self.monitor is None:
            return False
        seen = False
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                seen = self.down = True
            elif event["event"] == zmq.EVENT_CONNECTED:
                self.down = False
        return seen

    def close(self) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(0)
        self.socket.close(0)


class Waker:
    """Wakes a background thread blocked in a ZeroMQ poll, from any thread.

    An inproc PUSH/PULL pair holding at most one pending wake-up: waking twice before the thread looks is
    waking once. The background thread polls ``pull`` and calls ``drain()``; it closes ``pull`` when it
    ends. The owner calls ``close()`` after joining the thread.
    """

    def __init__(self, context: ZmqContext, name: str) -> None:
        address = f"inproc://bus-wake-{name}-{next(_wake_ids)}"
        self.pull = context.socket(zmq.PULL)
        self.pull.bind(address)
        self._push = context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 1)
        self._push.connect(address)
        self._lock = threading.Lock()  # the PUSH socket is shared by every user thread

    def __call__(self) -> None:
        with self._lock:
            if self._push.closed:
                return  # the client is closed: nothing left to wake
            try:
                self._push.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake-up is already pending

    def drain(self) -> None:
        while self.pull.poll(0):
            self.pull.recv()

    def close(self) -> None:
        with self._lock:
            self._push.close(0)


class Requester:
    """Blocking requests from any thread: one lock, one DEALER per address, replaced after a timeout.

    For the calls users make directly (Admin, ``offsets_for_times``, the producer's first metadata
    lookup); the background threads own their sockets instead.
    """

    def __init__(self, context: ZmqContext, bootstrap: str, timeout_ms: int) -> None:
        self.context, self.bootstrap, self.timeout_ms = context, bootstrap, timeout_ms
        self._lock = threading.Lock()
        self._connections: dict[str, Connection] = {}

    def request(self, address: str, op: str, args: Any, bulk: Sequence[wire.Frame] = (),
                timeout_ms: int | None = None) -> Any:
        with self._lock:
            connection = self._connections.get(address)
            if connection is None:
                connection = self._connections[address] = Connection(self.context, address)
            try:
                return connection.request(op, args, bulk, timeout_ms=timeout_ms or self.timeout_ms)[0]
            except Timeout:
                # A fresh socket, so a late reply to this request never queues up in front of the next one.
                connection.close()
                del self._connections[address]
                raise

    def coordinator(self, op: str, args: Any, timeout_ms: int | None = None) -> Any:
        return self.request(self.bootstrap, op, args, timeout_ms=timeout_ms)

    def metadata(self, topics: Iterable[str] | None = None, strict: bool = False) -> ClusterMetadata:
        from .metadata import ClusterMetadata

        args: dict[str, Any] = {} if topics is None else {"topics": list(topics), "strict": strict}
        return ClusterMetadata(self.coordinator(wire.METADATA, args))

    def close(self) -> None:
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()
