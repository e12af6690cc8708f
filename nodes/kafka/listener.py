"""The Kafka listener: a plain TCP socket served in the same thread and loop as a server's ZeroMQ ROUTER
(``zmq.Poller`` polls its file descriptors beside the ZeroMQ sockets), so a Kafka client's request reaches
the node's own handlers with no hop in between.

It owns the sockets only: non-blocking, one ``FrameReader`` (the length-prefixed framing, checked
against ``frame_bytes_max`` before anything is allocated) and one output buffer per connection. Each
whole frame is decoded (``codec.decode_request``) and handed to ``handle(header, body, respond)``; the
handler calls ``respond(values)`` once, now or later (a long-poll fetch, an acks=all produce), with the
response's fields, or ``respond(None)`` for a request Kafka answers with nothing (a produce with acks=0).

Kafka's rule is that a connection's responses go out in the order of its requests, so each request takes
a slot in its connection's queue and a response leaves only when every earlier one has. Bounded: at most
``INFLIGHT_REQUESTS_MAX`` unanswered requests and ``OUTPUT_BYTES_MAX`` unsent bytes per connection (past
either, its socket is not read until it drains), ``CONNECTIONS_MAX`` connections (past it, new ones are
closed at once).

Bad input closes that connection alone: a frame that does not decode (``codec.Malformed``), a length
prefix past the limit. A key or version not implemented is answered (UNSUPPORTED_VERSION) and the
connection kept. The server goes on serving everyone else.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket

import zmq

from . import codec
from .framing import FrameReader, FrameTooLarge

log = logging.getLogger("bus.kafka")

CONNECTIONS_MAX = 1024
INFLIGHT_REQUESTS_MAX = 128  # per connection: librdkafka's max.in.flight is 1,000,000, so this is the bound
OUTPUT_BYTES_MAX = 64 << 20  # per connection: unsent responses past this stop its reading
RECV_BYTES = 1 << 16
READS_PER_TURN_MAX = 16  # per connection per loop turn, so one busy client cannot starve the others
ACCEPTS_PER_TURN_MAX = 64
LISTEN_BACKLOG = 128


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


class Connection:
    __slots__ = ("sock", "fd", "peer", "reader", "slots", "out", "closed")

    def __init__(self, sock: socket.socket, peer, frame_bytes_max: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.reader = FrameReader(frame_bytes_max)
        self.slots: collections.deque = collections.deque()  # [response bytes or None] per request, in order
        self.out = bytearray()  # responses ready to send, in order
        self.closed = False

    def readable(self) -> bool:
        return len(self.slots) < INFLIGHT_REQUESTS_MAX and len(self.out) < OUTPUT_BYTES_MAX


class KafkaListener:
    def __init__(self, listen: str, handle, *, frame_bytes_max: int):
        host, port = parse_host_port(listen)
        self.handle = handle
        self.frame_bytes_max = frame_bytes_max
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(LISTEN_BACKLOG)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.host, self.port = self.sock.getsockname()[:2]
        self.connections: dict[int, Connection] = {}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- the loop's side ---------------------------------------------------------------------------

    def register(self, poller: zmq.Poller) -> None:
        poller.register(self.fd, zmq.POLLIN)
        for conn in self.connections.values():
            flags = (zmq.POLLIN if conn.readable() else 0) | (zmq.POLLOUT if conn.out else 0)
            if flags:
                poller.register(conn.fd, flags)

    def serve(self, ready: dict) -> int:
        """Accept, read, handle and write what ``ready`` (the poller's answer) says can be. Returns how
        many requests were handed to ``handle``."""
        handled = 0
        if ready.get(self.fd, 0) & zmq.POLLIN:
            self._accept()
        for fd, events in ready.items():
            conn = self.connections.get(fd) if isinstance(fd, int) else None
            if conn is None:
                continue
            if events & zmq.POLLIN:
                handled += self._read(conn)
            if events & zmq.POLLOUT and not conn.closed:
                self._flush(conn)
        return handled

    def close(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)
        self.sock.close()

    # -- connections -------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN_MAX):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the next turn tries again
                log.warning("kafka listener cannot accept: %s", exc)
                return
            if len(self.connections) >= CONNECTIONS_MAX:
                log.warning("kafka connection from %s refused: %d connections open", peer, len(self.connections))
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, peer, self.frame_bytes_max)
            self.connections[conn.fd] = conn

    def _close(self, conn: Connection, why: str | None = None) -> None:
        if conn.closed:
            return
        if why:
            log.warning("kafka connection from %s closed: %s", conn.peer, why)
        conn.closed = True
        self.connections.pop(conn.fd, None)
        conn.slots.clear()
        try:
            conn.sock.close()
        except OSError:
            pass

    def _read(self, conn: Connection) -> int:
        handled = 0
        for _ in range(READS_PER_TURN_MAX):
            if conn.closed or not conn.readable():
                break
            try:
                data = conn.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # A reset is a client going away (as a close is); anything else is worth a line.
                self._close(conn, None if exc.errno == errno.ECONNRESET else f"read failed: {exc}")
                break
            if not data:
                self._close(conn)  # the client closed it
                break
            try:
                frames = conn.reader.feed(data)
            except FrameTooLarge as exc:
                self._close(conn, str(exc))
                break
            for frame in frames:
                if conn.closed:
                    break
                self._request(conn, frame)
                handled += 1
        return handled

    def _request(self, conn: Connection, frame: bytes) -> None:
        slot = [None]
        conn.slots.append(slot)
        try:
            header, body = codec.decode_request(frame)
        except codec.Unsupported as exc:
            log.info("kafka request from %s: %s", conn.peer, exc)
            self._fill(conn, slot, codec.unsupported_response(exc))
            return
        except codec.Malformed as exc:
            self._close(conn, f"malformed request: {exc}")
            return
        answered = []

        def respond(values) -> None:
            assert not answered, "a Kafka request answered twice"
            answered.append(True)
            if conn.closed:
                return
            if values is None:
                self._fill(conn, slot, b"")
                return
            try:
                data = codec.encode_response(header, values)
            except (TypeError, ValueError, OverflowError, AttributeError) as exc:
                # A value no field can carry (a bug, or numbers from a hostile request): that client's
                # connection goes, the server stays.
                self._close(conn, f"response to api key {header.api_key} v{header.api_version} does not "
                                  f"encode: {exc.__class__.__name__}: {exc}")
                return
            self._fill(conn, slot, data)

        try:
            self.handle(header, body, respond)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            self._close(conn, f"request api key {header.api_key} v{header.api_version} refused: "
                              f"{exc.__class__.__name__}: {exc}")

    def _fill(self, conn: Connection, slot: list, data) -> None:
        """A response is ready: send what is now at the head of the connection's queue. A response with
        nothing unsent before it goes to the socket as it is, and only what the socket did not take is
        buffered: a Fetch answer is megabytes, and copying it into the buffer first cost more than sending it
        (each copy of that size is a fresh allocation)."""
        slot[0] = data
        while conn.slots and conn.slots[0][0] is not None:
            ready = conn.slots.popleft()[0]
            if not conn.out and ready:
                sent = self._send(conn, ready)
                if conn.closed:
                    return
                ready = memoryview(ready)[sent:]
            conn.out += ready
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        while conn.out:
            sent = self._send(conn, conn.out)
            if not sent:
                return
            del conn.out[:sent]

    def _send(self, conn: Connection, data) -> int:
        """What the socket took of ``data`` now (0 if it takes nothing until it drains); a failed send
        closes the connection."""
        try:
            return conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("kafka connection from %s: send failed: %s", conn.peer, exc)
            self._close(conn)
            return 0
