"""What the coordinator and the partition-owner node share: their ROUTER socket and its safety rules.

- ROUTER_MANDATORY, so a reply to a vanished client raises instead of vanishing silently, and is dropped
  here on purpose (the client retries by request id).
- Bounded high-water marks and a short LINGER, so a stuck client cannot make the server buffer without
  limit, and a stopping server does not hang on unsent replies.
- ``decode`` turns any malformed message into an error reply for that client alone; the loop goes on.
"""

from __future__ import annotations

import logging
import signal

import zmq

from bus import wire
from bus.errors import BusError, InvalidRequest

log = logging.getLogger(__name__)

SOCKET_HWM_MESSAGES = 10_000
LINGER_MS = 500
REQUESTS_PER_TURN_MAX = 512  # requests drained per loop turn: one group commit covers them all
# Exceptions that malformed arguments from a rogue client can raise deep in a handler.
MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError)


class RouterServer:
    def __init__(self, context: zmq.Context, bind: str):
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.SNDHWM, SOCKET_HWM_MESSAGES)
        self.socket.setsockopt(zmq.RCVHWM, SOCKET_HWM_MESSAGES)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.bind(bind)
        self.bind = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv_batch(self) -> list:
        """Every message waiting now, up to REQUESTS_PER_TURN_MAX, without blocking."""
        messages = []
        for _ in range(REQUESTS_PER_TURN_MAX):
            try:
                messages.append(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        return messages

    def decode(self, frames: list):
        """(identity, op, request_id, args, bulk), or None after answering a malformed message."""
        if len(frames) < 2:
            return None  # not even an identity and a header; a ROUTER always gives an identity frame
        identity = frames[0].bytes
        try:
            op, request_id, args, bulk = wire.decode_request([f.buffer for f in frames[1:]])
        except InvalidRequest as exc:
            self.reply(identity, getattr(exc, "request_id", None), error=exc)
            return None
        return identity, op, request_id, args, bulk

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
