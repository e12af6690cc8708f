"""What every server of the bus shares: its ROUTER socket, its safety rules, and the one request loop.

- ROUTER_MANDATORY, so a reply to a vanished client raises instead of vanishing silently, and is dropped
  here on purpose (the client retries by request id).
- Bounded high-water marks and a short LINGER, so a stuck client cannot make the server buffer without
  limit, and a stopping server does not hang on unsent replies.
- ``serve_turn`` is the request loop of the coordinator and of the node alike: it drains what is waiting,
  decodes each message, refuses what is malformed, dispatches by op to a handler and replies with the
  handler's answer or with the typed error it raised. A malformed message gets an error reply for that
  client alone; the loop goes on.

A handler takes a ``Request`` and returns the result to reply with (a msgpack-able object), a ``Reply``
(a result with bulk frames), or ``LATER`` when it keeps the request to answer itself (a produce waiting
for its turn's group commit, a long-poll fetch). A handler that raises a ``BusError`` or one of
``MALFORMED`` gets that error sent back; anything else is a bug and escapes.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Callable, NamedTuple

import zmq

from bus import wire
from bus.errors import BusError, InvalidRequest

log = logging.getLogger(__name__)

SOCKET_HWM_MESSAGES = 10_000
LINGER_MS = 500
REQUESTS_PER_TURN_MAX = 512  # requests drained per loop turn: one group commit covers them all
# Exceptions that malformed arguments from a rogue client can raise deep in a handler.
MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError)


class Request(NamedTuple):
    """One decoded request. ``received_ms`` / ``received_s`` are the monotonic clock when its turn began."""

    identity: bytes  # the client's ROUTER identity, to address the reply
    op: str
    request_id: object  # chosen by the client, echoed in the reply
    args: dict
    bulk: list  # bulk frames (record batches), as buffers
    received_ms: int  # what the pure cores take as now_ms
    received_s: float  # for measuring how long its answer took
    # Where a held answer goes instead of the ROUTER: respond(result, bulk, error code) (the Kafka listener's
    # requests, nodes/kafka/service.py); None for the ROUTER's own.
    respond: Callable | None = None


class Reply(NamedTuple):
    """A handler's answer that carries bulk frames."""

    result: object
    bulk: list


LATER = object()  # a handler's answer: it keeps the request and replies itself later

Handler = Callable[[Request], object]


class RouterServer:
    def __init__(self, context: zmq.Context, bind: str, *, role: str, observe=None):
        self.role = role  # "node" or "coordinator": named in the refusal of an unknown op
        # observe(op, seconds, error code or None) after each answer given in the turn (metrics); a handler
        # that answers LATER reports its own.
        self.observe = observe
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.SNDHWM, SOCKET_HWM_MESSAGES)
        self.socket.setsockopt(zmq.RCVHWM, SOCKET_HWM_MESSAGES)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.bind(bind)
        self.bind = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Requests taken off the socket by ``serve_turn(defer=...)`` and dispatched first by the next turn.
        self.deferred: list[Request] = []

    # -- the request loop --------------------------------------------------------------------------

    def serve_turn(self, handlers: dict[str, Handler], bulk_ops: frozenset = frozenset(),
                   defer: frozenset = frozenset()) -> int:
        """Handle the requests the last turn deferred, then every request waiting now (up to
        REQUESTS_PER_TURN_MAX), in arrival order. Only ops in ``bulk_ops`` may carry bulk frames; those in
        ``defer`` are kept for the next turn instead (``deferred``). Returns how many messages were taken."""
        deferred, self.deferred = self.deferred, []
        for request in deferred:
            self._dispatch(request, handlers, bulk_ops)
        messages = self._recv_batch()
        received_s = time.monotonic()
        received_ms = int(received_s * 1000)
        for frames in messages:
            request = self._decode(frames, received_ms, received_s)
            if request is None:
                continue
            if request.op in defer:
                self.deferred.append(request)
            else:
                self._dispatch(request, handlers, bulk_ops)
        return len(messages)

    def _dispatch(self, request: Request, handlers: dict[str, Handler], bulk_ops: frozenset) -> None:
        try:
            handler = handlers.get(request.op)
            if handler is None:
                raise InvalidRequest(f"unknown op {request.op!r} for a {self.role}")
            if request.bulk and request.op not in bulk_ops:
                raise InvalidRequest(f"{request.op} takes no bulk frames, got {len(request.bulk)}")
            if not isinstance(request.args, dict):
                raise InvalidRequest("args must be a map")
            answer = handler(request)
        except BusError as exc:
            self.reply(request.identity, request.request_id, error=exc)
            error = exc.code
        except MALFORMED as exc:
            error = as_invalid(exc)
            self.reply(request.identity, request.request_id, error=error)
            error = error.code
        else:
            if answer is LATER:
                return
            if isinstance(answer, Reply):
                self.reply(request.identity, request.request_id, answer.result, answer.bulk)
            else:
                self.reply(request.identity, request.request_id, answer)
            error = None
        if self.observe is not None:
            # An op no handler knows is counted as "unknown": a rogue client's op names must not become labels.
            self.observe(request.op if request.op in handlers else "unknown", time.monotonic() - request.received_s,
                         error)

    def _recv_batch(self) -> list:
        """Every message waiting now, up to REQUESTS_PER_TURN_MAX, without blocking."""
        messages = []
        for _ in range(REQUESTS_PER_TURN_MAX):
            try:
                messages.append(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        return messages

    def _decode(self, frames: list, received_ms: int, received_s: float) -> Request | None:
        """The request, or None after answering a malformed message."""
        if len(frames) < 2:
            return None  # not even an identity and a header; a ROUTER always gives an identity frame
        identity = frames[0].bytes
        try:
            op, request_id, args, bulk = wire.decode_request([f.buffer for f in frames[1:]])
        except InvalidRequest as exc:
            self.reply(identity, getattr(exc, "request_id", None), error=exc)
            return None
        return Request(identity, op, request_id, args, bulk, received_ms, received_s)

    # -- replies -----------------------------------------------------------------------------------

    def reply(self, identity: bytes, request_id, result=None, bulk=(), error: BusError | None = None) -> None:
        request_id = request_id if isinstance(request_id, (int, str, bytes, type(None))) else None
        try:
            frames = wire.encode_reply(request_id, result, bulk, error)
        except (OverflowError, TypeError, ValueError) as exc:
            # An answer built from hostile arguments (e.g. an offset of 2**64 - 1, plus one) that msgpack
            # cannot carry: the client gets an error and the server goes on.
            frames = wire.encode_reply(request_id, error=InvalidRequest(f"the answer could not be encoded: {exc}"))
        try:
            self.socket.send_multipart([identity, *frames], zmq.NOBLOCK, copy=len(frames) < 2)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client is gone; EAGAIN: it stopped reading. Either way it will retry.
            log.debug("reply to %r dropped: %s", identity, exc)

    def close(self) -> None:
        self.socket.close()


def install_stop_handlers(stop) -> None:
    """SIGTERM and SIGINT call ``stop()``; the loop notices within one poll timeout and shuts down cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


def as_invalid(exc: Exception) -> InvalidRequest:
    return InvalidRequest(f"malformed arguments: {exc.__class__.__name__}: {exc}")
