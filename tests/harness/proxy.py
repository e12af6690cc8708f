"""A seeded fault proxy between the clients and one node: it drops, duplicates and delays messages.

Topology: the node binds a hidden address and advertises the proxy's (``LocalCluster(advertise=...)``), so
every client that learns the node from the coordinator talks to the proxy. The proxy is a ROUTER in
front; for each client identity it opens a DEALER to the node, so the node sees one peer per client, as
it would without the proxy. Replies go back the same way. It runs as a thread of the test process.

Faults, drawn per message from ``random.Random(seed)``, in both directions:
- drop       the message vanishes (a request never arrives, or its reply is lost);
- duplicate  the message is delivered twice, back to back (as a client that resends, or a retransmit);
- delay      the message is held ``delay_ms`` (uniform in a range) before delivery.

Delays keep each direction of each client's path FIFO: a held message holds everything behind it, as a
slow TCP connection does. A ZeroMQ connection never reorders, and the bus's idempotence relies on that
(as Kafka's does on TCP), so a proxy that reordered within a connection would test a network the system
does not claim to handle. Pass ``reorder=True`` to explore it anyway.

``cut()`` drops everything until ``heal()``: the node is partitioned from its clients (not from the
coordinator). ``stall()`` holds everything instead, and delivers it, in order, at ``heal()`` (or
``unstall()``): a partition as TCP lives through it, where requests sent long ago arrive after the client
gave up on them.

Peers: ``classify(frames)``, if given, names the peer behind each connection from the first message it
sends (the harness's ``topology.peer_of`` says which node a replica fetch comes from; anything else is a
client, None). ``block(peers)`` then drops everything to and from those peers alone, until ``unblock()``:
a node cut off from some of its peers while the others still reach it. This module owns only the relay;
apart from that first look through ``classify`` it never reads or decodes what it carries.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time

import zmq

HWM_MESSAGES = 100_000
POLL_MS = 5


class FaultProxy(threading.Thread):
    def __init__(self, listen: str, upstream: str, *, seed: int = 0, drop: float = 0.0, duplicate: float = 0.0,
                 delay: float = 0.0, delay_ms: tuple = (1, 50), reorder: bool = False, name: str = "proxy",
                 classify=None):
        super().__init__(name=f"fault-proxy-{name}", daemon=True)
        self.listen, self.upstream = listen, upstream
        self.rng = random.Random(f"{seed}/{name}")
        self.reorder = reorder
        self.set_faults(drop=drop, duplicate=duplicate, delay=delay, delay_ms=delay_ms)
        self.cut_off = False
        self.stalled = False
        self.classify = classify  # frames of a connection's first message -> its peer (None: a client)
        self.blocked = frozenset()  # peers whose traffic is dropped both ways (swapped whole, never mutated)
        self.stats = {"forwarded": 0, "dropped": 0, "duplicated": 0, "delayed": 0, "stalled": 0, "clients": 0,
                      "blocked": 0}
        self._peers: dict[bytes, object] = {}  # client identity -> its peer, as classified (proxy thread only)
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- control (any thread) ------------------------------------------------------------------------

    def set_faults(self, *, drop: float = 0.0, duplicate: float = 0.0, delay: float = 0.0,
                   delay_ms: tuple = (1, 50)) -> None:
        """Replace the fault rates (probabilities per message); all zero makes the proxy transparent."""
        assert 0 <= drop + duplicate + delay <= 1, (drop, duplicate, delay)
        assert 0 <= delay_ms[0] <= delay_ms[1]
        # One tuple, swapped atomically, so the proxy thread never sees half an update.
        self._faults = (drop, duplicate, delay, delay_ms)

    def heal(self) -> None:
        self.cut_off = self.stalled = False
        self.blocked = frozenset()
        self.set_faults()

    def cut(self) -> None:
        self.cut_off = True

    def stall(self) -> None:
        self.stalled = True

    def block(self, peers) -> None:
        """Drop everything to and from these peers (as ``classify`` names them) until ``unblock()``."""
        assert self.classify is not None, "blocking peers needs a classify function"
        self.blocked = frozenset(peers)

    def unblock(self) -> None:
        self.blocked = frozenset()

    def unstall(self) -> None:
        self.stalled = False

    def start(self) -> "FaultProxy":
        super().start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stopping = True
        self.join(10)

    # -- the relay -----------------------------------------------------------------------------------

    def run(self) -> None:
        context = zmq.Context()
        front = context.socket(zmq.ROUTER)
        front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
        front.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
        try:
            front.bind(self.listen)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            context.term()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        backs: dict[bytes, zmq.Socket] = {}  # client identity -> DEALER to the node
        identities: dict[zmq.Socket, bytes] = {}
        held: list = []  # heap of (due_s, seq, path, frames)
        stalled: list = []  # (path, frames) held by stall(), in arrival order
        path_due: dict[tuple, float] = {}  # path -> due time of the last message held on it
        seq = itertools.count()
        try:
            while not self._stopping:
                timeout_ms = POLL_MS if held else 50
                ready = dict(poller.poll(timeout_ms))
                now_s = time.monotonic()
                if stalled and not self.stalled:
                    for path, frames in stalled:
                        self._route(path, frames, now_s, held, path_due, seq)
                    stalled.clear()
                if front in ready:
                    for _ in range(1000):
                        try:
                            frames = front.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        identity = frames[0]
                        if identity not in backs:
                            back = context.socket(zmq.DEALER)
                            back.setsockopt(zmq.LINGER, 0)
                            back.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
                            back.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
                            back.connect(self.upstream)
                            backs[identity] = back
                            identities[back] = identity
                            poller.register(back, zmq.POLLIN)
                            self.stats["clients"] += 1
                            self._peers[identity] = self.classify(frames[1:]) if self.classify else None
                        if self.stalled:
                            stalled.append((("up", identity), frames[1:]))
                            self.stats["stalled"] += 1
                        else:
                            self._route(("up", identity), frames[1:], now_s, held, path_due, seq)
                for back, identity in list(identities.items()):
                    if back in ready:
                        for _ in range(1000):
                            try:
                                frames = back.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            if self.stalled:
                                stalled.append((("down", identity), frames))
                                self.stats["stalled"] += 1
                            else:
                                self._route(("down", identity), frames, now_s, held, path_due, seq)
                while held and held[0][0] <= now_s:
                    _, _, path, frames = heapq.heappop(held)
                    self._deliver(path, frames, front, backs)
        finally:
            for back in backs.values():
                back.close(0)
            front.close(0)
            context.term()

    def _route(self, path, frames, now_s, held, path_due, seq) -> None:
        """Decide one message's fate; due messages are delivered by the loop, in due order."""
        if self.cut_off:
            self.stats["dropped"] += 1
            return
        if self.blocked and self._peers.get(path[1]) in self.blocked:
            self.stats["blocked"] += 1
            return
        drop, duplicate, delay, delay_ms = self._faults
        draw = self.rng.random()
        copies = 1
        due_s = now_s
        if draw < drop:
            self.stats["dropped"] += 1
            return
        if draw < drop + duplicate:
            self.stats["duplicated"] += 1
            copies = 2
        elif draw < drop + duplicate + delay:
            self.stats["delayed"] += 1
            due_s = now_s + self.rng.uniform(*delay_ms) / 1000
        if not self.reorder:
            due_s = max(due_s, path_due.get(path, 0.0))  # FIFO: never overtake a held message
            path_due[path] = due_s
        for _ in range(copies):
            heapq.heappush(held, (due_s, next(seq), path, frames))

    def _deliver(self, path, frames, front, backs) -> None:
        direction, identity = path
        try:
            if direction == "up":
                backs[identity].send_multipart(frames, zmq.NOBLOCK)
            else:
                front.send_multipart([identity, *frames], zmq.NOBLOCK)
            self.stats["forwarded"] += 1
        except zmq.ZMQError:
            self.stats["dropped"] += 1  # the client is gone, or its queue is full: lost, as on a network
