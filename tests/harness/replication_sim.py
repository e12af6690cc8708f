"""A seeded simulator of the replication protocol: the real controller core (nodes/controller.py), the real
replica core (nodes/replica.py) and the real storage contract (store/memory_log.py), on a fake clock and a
fake network that delays, drops and cuts messages; nodes crash (losing everything but their disk), lose
their disk, pause and come back. Test code only.

What runs is the protocol, not the sockets: each simulated node does what nodes/node.py does with the
same cores (produce and its acks=all wait, a follower's fetch and what it does with the answer, the
leader's side of a replica fetch, ISR proposals, heartbeats, placement), in a few lines each. After every
event ``check()`` asserts the properties that must always hold (after Vanlightly's kafka-tlaplus):

- no divergence below a high watermark: every replica's log below its own high watermark equals the
  committed log (``committed``: offset -> batch bytes, gathered from every replica below its high
  watermark as the run goes; a second, different batch at a committed offset is a violation);
- no acknowledged record lost: every batch acknowledged to a producer is committed at its offset, and
  the leader the controller elected, once it acts as leader, holds the whole committed log;
- a replica's high watermark never goes down, and is never cut by a truncation;
- a consumer only ever reads committed batches (no phantom reads);
- the controller's and every replica's own ``check_invariants``.

``Simulation.run(steps)`` drives a seeded random schedule; tests also script scenarios event by event
(KIP-101's and KIP-279's) with ``crash``, ``restart``, ``cut``, ``heal``, ``produce`` and ``advance``.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from bus import batch as batch_format
from bus.errors import BusError, OffsetOutOfRange
from nodes.controller import NO_LEADER, Controller
from nodes.replica import ACKS_ALL, BECAME_FOLLOWER, BECAME_LEADER, FOLLOWER, LEADER, Assignment, Replica, divergence
from store.memory_log import MemoryDisk, MemoryLogStore

TOPIC = "t"
SESSION_MS = 1_000
HEARTBEAT_MS = 100
FETCH_INTERVAL_MS = 5  # a follower asks again this soon after an empty answer (the simulator has no long poll)
FETCH_TIMEOUT_MS = 200  # a replica fetch unanswered this long is sent again (its request or reply was lost)
REPLICA_LAG_MAX_MS = 400
PRODUCE_TIMEOUT_MS = 2_000
CONTROLLER = "controller"


class Violation(AssertionError):
    """A property the protocol must keep was broken; the message says which and where."""


@dataclass(order=True)
class Message:
    at_ms: int
    seq: int
    src: object = field(compare=False)
    dst: object = field(compare=False)
    kind: str = field(compare=False)
    body: dict = field(compare=False)


class SimNode:
    """One node: a disk that survives crashes, and everything else, which does not."""

    def __init__(self, sim: "Simulation", node_id: int):
        self.sim, self.node_id = sim, node_id
        self.disk = MemoryDisk()
        self.disk_id = f"d{node_id}.0"  # the data directory's identity: a new disk gets a new one
        self.generation = 0
        self.up = False
        self.paused = False
        self.start()

    def start(self) -> None:
        self.generation += 1
        self.instance = f"n{self.node_id}.{self.generation}"
        self.store = MemoryLogStore(self.disk, clock_ms=lambda: self.sim.now_ms, high_watermark_follows_append=False)
        self.store.claim_identity(f"node-{self.node_id}")
        self.replicas: dict[int, Replica] = {}
        self.logs: dict[int, object] = {}
        self.version = -1
        self.waiting: list = []  # acks=all produces: (client, request, partition, epoch, end offset, deadline)
        self.fetching: dict[int, tuple] = {}  # partition -> (request, when given up on) of its replica fetch out
        self.next_fetch_ms: dict[int, int] = {}
        self.alter_out: set[int] = set()
        self.up = True
        self.paused = False
        self.next_heartbeat_ms = self.sim.now_ms

    def wipe(self) -> None:
        """It lost its disk (it comes back empty, under a new directory id)."""
        self.disk = MemoryDisk()
        self.disk_id = f"d{self.node_id}.{self.generation}w"

    # -- placement ---------------------------------------------------------------------------------

    def placement(self, body: dict) -> None:
        if body["version"] <= self.version or body.get("topics") is None:
            return
        self.version = body["version"]
        topic = body["topics"].get(TOPIC)
        if topic is None:
            return
        for index, state in enumerate(topic["partitions"]):
            if self.node_id not in state["replicas"]:
                continue
            if index not in self.replicas:
                plog = self.logs[index] = self.store.open_partition(f"1/{index}")
                self.replicas[index] = Replica(self.node_id, topic["min_insync_replicas"],
                                               replica_lag_max_ms=REPLICA_LAG_MAX_MS,
                                               high_watermark=plog.high_watermark)
            self.assign(index, Assignment.from_wire(state))

    def assign(self, index: int, assignment: Assignment) -> None:
        replica, plog = self.replicas[index], self.logs[index]
        before = replica.high_watermark
        change = replica.apply(assignment, plog.next_offset, self.sim.now_ms)
        if change == BECAME_LEADER:
            self.store.begin_epoch(plog, assignment.leader_epoch)
        elif change == BECAME_FOLLOWER and self.sim.truncate_to_hw_on_follow:
            # The pre-KIP-101 rule, as a sabotage: a new follower cuts its log at its own high watermark.
            self.store.truncate_to(plog, _boundary_at_or_below(self.store, plog, replica.high_watermark))
        self.advance(index)
        self.sim.watch_hw(self, index, before)
        self.complete_waiting()

    def advance(self, index: int) -> None:
        replica, plog = self.replicas[index], self.logs[index]
        if replica.advance(plog.next_offset):
            self.store.set_high_watermark(plog, replica.high_watermark)
            self.complete_waiting()

    # -- the leader's side -------------------------------------------------------------------------

    def produce(self, client, request: int, index: int, client_epoch: int, batch: bytes) -> None:
        replica = self.replicas.get(index)
        try:
            if replica is None:
                raise BusError("not a replica")
            replica.check_produce(client_epoch, ACKS_ALL)
        except BusError as exc:
            self.sim.send(self, client, "produce_reply", {"request": request, "error": exc.code})
            return
        plog = self.logs[index]
        (result,) = self.store.append([(plog, batch)])
        if isinstance(result, BusError):
            self.sim.send(self, client, "produce_reply", {"request": request, "error": result.code})
            return
        base_offset = result[0]
        end = base_offset + batch_format.read_header(batch).record_count
        self.waiting.append((client, request, index, replica.leader_epoch, base_offset, end,
                             self.sim.now_ms + PRODUCE_TIMEOUT_MS))
        self.advance(index)
        self.complete_waiting()

    def complete_waiting(self) -> None:
        still = []
        for client, request, index, epoch, base_offset, end, deadline in self.waiting:
            replica = self.replicas.get(index)
            if replica is None or replica.role != LEADER or replica.leader_epoch != epoch:
                self.sim.send(self, client, "produce_reply", {"request": request, "error": "NOT_COMMITTED"})
            elif replica.high_watermark >= end:
                self.sim.acknowledge(self, index, base_offset)
                self.sim.send(self, client, "produce_reply", {"request": request, "offset": base_offset})
            elif self.sim.now_ms >= deadline:
                self.sim.send(self, client, "produce_reply", {"request": request, "error": "TIMEOUT"})
            else:
                still.append((client, request, index, epoch, base_offset, end, deadline))
        self.waiting = still

    def replica_fetch(self, follower: int, body: dict) -> None:
        index = body["partition"]
        replica, plog = self.replicas.get(index), self.logs.get(index)
        reply = {"partition": index, "request": body["request"]}
        try:
            if replica is None:
                raise BusError("not a replica")
            replica.check_epoch(body["leader_epoch"])
            diverged = divergence(plog, body["last_epoch"], body["offset"])
            if diverged is not None:
                reply.update(diverging=diverged, hw=replica.high_watermark)
            elif not plog.start_offset <= body["offset"] <= plog.next_offset:
                raise OffsetOutOfRange("outside the log")
            else:
                before = replica.high_watermark
                if replica.follower_fetched(follower, body["incarnation"], body["offset"], plog.next_offset,
                                            self.sim.now_ms):
                    self.store.set_high_watermark(plog, replica.high_watermark)
                    self.sim.watch_hw(self, index, before)
                    self.complete_waiting()
                data, _ = self.store.read(plog, body["offset"], 1 << 20)
                reply.update(data=data, hw=replica.high_watermark)
        except BusError as exc:
            reply.update(error=exc.code, log_start=plog.start_offset if plog is not None else -1)
        self.sim.send(self, follower, "replica_fetch_reply", reply)

    def propose(self) -> None:
        for index, replica in self.replicas.items():
            proposal = replica.proposal(self.logs[index].next_offset, self.sim.now_ms)
            if proposal is not None:
                self.sim.send(self, CONTROLLER, "alter", {
                    "partition": index, "leader_epoch": proposal.leader_epoch,
                    "partition_epoch": proposal.partition_epoch, "isr": list(proposal.isr),
                    "incarnations": proposal.incarnations, "instance": self.instance})

    def altered(self, body: dict) -> None:
        index = body["partition"]
        replica = self.replicas.get(index)
        if replica is None:
            return
        if "error" in body:
            replica.proposal_refused(self.sim.now_ms)
            self.advance(index)
        else:
            self.assign(index, Assignment.from_wire(body["state"]))

    # -- the follower's side -----------------------------------------------------------------------

    def fetch_due(self) -> None:
        for index, replica in self.replicas.items():
            if replica.role != FOLLOWER or self.fetching.get(index, (0, -1))[1] > self.sim.now_ms:
                continue
            if self.sim.now_ms < self.next_fetch_ms.get(index, 0):
                continue
            plog = self.logs[index]
            request = self.sim.next_seq()
            self.fetching[index] = (request, self.sim.now_ms + FETCH_TIMEOUT_MS)
            self.sim.send(self, replica.leader, "replica_fetch", {
                "partition": index, "request": request, "leader_epoch": replica.leader_epoch,
                "offset": plog.next_offset, "last_epoch": plog.latest_epoch(), "incarnation": self.instance})

    def fetched(self, leader: int, body: dict) -> None:
        index = body["partition"]
        if self.fetching.get(index, (None,))[0] != body["request"]:
            return  # a reply to a fetch given up on
        del self.fetching[index]
        replica, plog = self.replicas.get(index), self.logs.get(index)
        if replica is None or replica.role != FOLLOWER or replica.leader != leader:
            return
        self.next_fetch_ms[index] = self.sim.now_ms + FETCH_INTERVAL_MS
        if "error" in body:
            if body["error"] == OffsetOutOfRange.code and body["log_start"] > plog.next_offset:
                self.store.reset_to(plog, body["log_start"])
                replica.log_rewritten(plog.high_watermark)
            return
        if "diverging" in body:
            offset = self.sim.truncation_point(self, index, *body["diverging"])
            if offset < replica.high_watermark and not self.sim.on_old_history(plog, index):
                self.sim.violation(f"node {self.node_id} truncates {index} to {offset}, below its high "
                                   f"watermark {replica.high_watermark}")
            self.store.truncate_to(plog, offset)
            replica.log_rewritten(plog.high_watermark)
            self.next_fetch_ms[index] = self.sim.now_ms
            return
        if body["data"]:
            self.store.append_replica(plog, body["data"])
            self.next_fetch_ms[index] = self.sim.now_ms  # report the new log end at once
        before = replica.high_watermark
        if replica.follow(body["hw"], plog.next_offset):
            self.store.set_high_watermark(plog, replica.high_watermark)
            self.sim.watch_hw(self, index, before)

    # -- time --------------------------------------------------------------------------------------

    def tick(self) -> None:
        if self.sim.now_ms >= self.next_heartbeat_ms:
            self.next_heartbeat_ms = self.sim.now_ms + HEARTBEAT_MS
            self.sim.send(self, CONTROLLER, "heartbeat", {"instance": self.instance, "dir_id": self.disk_id,
                                                          "version": self.version})
        self.complete_waiting()
        self.propose()
        self.fetch_due()
        self.store.flush_due(self.sim.now_ms)


class SimClient:
    """A producer (acks=all, one batch per request, a fresh value each) and a reader of committed data."""

    def __init__(self, sim: "Simulation", name: str):
        self.sim, self.name = sim, name
        self.metadata = None
        self.out: dict[int, tuple] = {}  # request -> (partition, value)

    def produce(self, index: int) -> None:
        if self.metadata is None:
            self.metadata = self.sim.controller.metadata(None, False, self.sim.now_ms)
        topic = self.metadata["topics"].get(TOPIC)
        if topic is None:
            return
        state = topic["partitions"][index]
        if state["leader"] == NO_LEADER:
            self.metadata = None
            return
        value = b"%s-%d" % (self.name.encode(), self.sim.next_seq())
        batch = batch_format.pack_batch([None, None, value, None], 1)
        request = self.sim.next_seq()
        self.out[request] = (index, value)
        self.sim.send(self, state["leader"], "produce", {"request": request, "partition": index,
                                                         "epoch": state["leader_epoch"], "batch": batch})

    def produced(self, body: dict) -> None:
        if self.out.pop(body["request"], None) is not None and "error" in body:
            self.metadata = None  # refresh, as the real clients do on NOT_LEADER / fenced epochs


class Simulation:
    def __init__(self, seed: int, nodes: int = 3, partitions: int = 2, *, replication_factor: int = 3,
                 min_insync: int = 2, drop: float = 0.0, truncation=None, truncate_to_hw_on_follow: bool = False):
        self.rng = random.Random(f"schedule-{seed}")  # the schedule: faults, produces, the time between them
        # The network's randomness (delays, losses) apart, so a change in what the protocol sends does not
        # reshuffle a seed's schedule.
        self.net_rng = random.Random(f"network-{seed}")
        self.link_at_ms: dict[tuple, int] = {}  # (src, dst) -> when the last message sent on it is delivered
        self.now_ms = 0
        self._seq = 0
        self.drop = drop
        self.truncate_to_hw_on_follow = truncate_to_hw_on_follow
        self.queue: list[Message] = []
        self.cuts: set[frozenset] = set()
        self.controller, _ = Controller.restore((), "sim", 0, node_session_timeout_ms=SESSION_MS)
        self.nodes = {n: SimNode(self, n) for n in range(1, nodes + 1)}
        self.clients = [SimClient(self, "p")]
        # How a follower finds its truncation point: the log's own (KIP-279), unless a test swaps in a
        # broken one to prove the checks catch it.
        self.truncation = truncation or (lambda node, index, epoch, end: node.logs[index].truncation_offset(epoch, end)[0])
        # partition -> {offset: the batch committed there}, as seen below every replica's high watermark
        self.committed_by_partition: dict[int, dict[int, bytes]] = {}
        self.acked: list[tuple] = []  # (partition, base offset) acknowledged (and not given up by an unclean election)
        self.acked_total = 0
        self.acked_by: list[int] = []  # the node that acknowledged each, in order
        self.violations: list[str] = []
        self.unclean = 0  # unclean elections settle() had to make
        self.unclean_epoch: dict[int, int] = {}  # partition -> the leader epoch of its last unclean election
        self._checked: dict[tuple, int] = {}  # (node, generation, partition) -> offset its log is checked up to
        self._leader_checked: dict[tuple, int] = {}  # (node, partition, epoch) -> committed offsets checked
        self.events: list[str] = []
        for node in self.nodes.values():
            self._heartbeat_now(node)
        self.controller.create_topic(TOPIC, partitions, None, None, 0, replication_factor=replication_factor,
                                     min_insync_replicas=min_insync)
        self._push()
        self.until(lambda: all(len(node.replicas) == sum(n in p["replicas"] for p in self.controller.topics[TOPIC]
                                                         ["partitions"]) for n, node in self.nodes.items()))

    # -- plumbing ----------------------------------------------------------------------------------

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _id(self, endpoint):
        return endpoint.node_id if isinstance(endpoint, SimNode) else endpoint.name if isinstance(endpoint, SimClient) else endpoint

    def send(self, src, dst, kind: str, body: dict) -> None:
        src_id, dst_id = self._id(src), self._id(dst)
        if frozenset((src_id, dst_id)) in self.cuts or self.net_rng.random() < self.drop:
            return
        # Delayed 1-8 ms, but never past a message sent before it on the same link: a ZeroMQ connection does
        # not reorder (tests/harness/proxy.py).
        at_ms = max(self.now_ms + self.net_rng.randint(1, 8), self.link_at_ms.get((src_id, dst_id), 0))
        self.link_at_ms[(src_id, dst_id)] = at_ms
        heapq.heappush(self.queue, Message(at_ms, self.next_seq(), src_id, dst_id, kind, body))

    def _heartbeat_now(self, node: SimNode) -> None:
        outcome = self.controller.node_heartbeat(node.node_id, f"sim://{node.node_id}", node.instance, node.disk_id,
                                                 node.version, self.now_ms)
        node.placement(outcome.reply)
        if outcome.notify:
            self._push()

    def _push(self) -> None:
        placement = self.controller.placement()
        for node in self.nodes.values():
            self.send(CONTROLLER, node, "placement", placement)

    def deliver_due(self) -> None:
        while self.queue and self.queue[0].at_ms <= self.now_ms:
            message = heapq.heappop(self.queue)
            self._deliver(message)
            self.check()

    def _deliver(self, m: Message) -> None:
        if m.dst == CONTROLLER:
            node = self.nodes[m.src]
            try:
                if m.kind == "heartbeat":
                    outcome = self.controller.node_heartbeat(node.node_id, f"sim://{node.node_id}", m.body["instance"],
                                                             m.body["dir_id"], m.body["version"], self.now_ms)
                    self.send(CONTROLLER, node, "placement", outcome.reply)
                elif m.kind == "alter":
                    b = m.body
                    outcome = self.controller.alter_partition(node.node_id, b["instance"], TOPIC, b["partition"],
                                                              b["leader_epoch"], b["partition_epoch"], b["isr"],
                                                              b["incarnations"], self.now_ms)
                    self.send(CONTROLLER, node, "altered", {"partition": b["partition"], "state": outcome.reply})
            except BusError as exc:
                if m.kind == "alter":
                    self.send(CONTROLLER, node, "altered", {"partition": m.body["partition"], "error": exc.code})
                return
            if outcome.notify:
                self._push()
            return
        if isinstance(m.dst, str):
            for client in self.clients:
                if client.name == m.dst:
                    client.produced(m.body)
            return
        node = self.nodes[m.dst]
        if not node.up:
            return  # lost with the crashed process
        if node.paused:
            heapq.heappush(self.queue, Message(self.now_ms + 1, m.seq, m.src, m.dst, m.kind, m.body))
            return
        if m.kind == "placement":
            node.placement(m.body)
        elif m.kind == "altered":
            node.altered(m.body)
        elif m.kind == "produce":
            node.produce(m.src, m.body["request"], m.body["partition"], m.body["epoch"], m.body["batch"])
        elif m.kind == "replica_fetch":
            node.replica_fetch(m.src, m.body)
        elif m.kind == "replica_fetch_reply":
            node.fetched(m.src, m.body)

    def advance(self, ms: int = 1) -> None:
        """Let ``ms`` milliseconds pass, one at a time: deliveries, node timers, controller sessions."""
        for _ in range(ms):
            self.now_ms += 1
            self.deliver_due()
            for node in self.nodes.values():
                if node.up and not node.paused:
                    node.tick()
            outcome = self.controller.tick(self.now_ms)
            if outcome.notify:
                self._push()
            self.check()

    # -- faults and load -----------------------------------------------------------------------------

    def crash(self, node_id: int) -> None:
        self.events.append(f"{self.now_ms} crash {node_id}")
        self.nodes[node_id].up = False

    def restart(self, node_id: int, wipe: bool = False) -> None:
        node = self.nodes[node_id]
        self.events.append(f"{self.now_ms} restart {node_id}{' wiped' if wipe else ''}")
        if wipe:
            node.wipe()
        node.start()

    def pause(self, node_id: int, paused: bool) -> None:
        self.events.append(f"{self.now_ms} {'pause' if paused else 'resume'} {node_id}")
        self.nodes[node_id].paused = paused

    def cut(self, node_id: int) -> None:
        """Cut ``node_id`` off from every other node and from the controller (the clients still reach it)."""
        self.events.append(f"{self.now_ms} cut {node_id}")
        others = [n for n in self.nodes if n != node_id] + [CONTROLLER]
        self.cuts |= {frozenset((node_id, other)) for other in others}

    def heal(self) -> None:
        self.events.append(f"{self.now_ms} heal")
        self.cuts.clear()

    def produce(self, index: int | None = None) -> None:
        partitions = len(self.controller.topics[TOPIC]["partitions"])
        self.clients[0].produce(self.rng.randrange(partitions) if index is None else index)

    def until(self, condition, max_ms: int = 10_000) -> None:
        """Advance a millisecond at a time until ``condition()`` holds (AssertionError after ``max_ms``)."""
        for _ in range(max_ms):
            if condition():
                return
            self.advance(1)
        raise AssertionError(f"not reached within {max_ms} ms; events: {self.events[-10:]}")

    def live(self, max_ms: int = 3_000) -> bool:
        """Liveness after ``settle``: a record produced to each partition is acknowledged within ``max_ms``."""
        before = self.acked_total
        partitions = len(self.controller.topics[TOPIC]["partitions"])
        for index in range(partitions):
            self.clients[0].metadata = None
            self.produce(index)
        try:
            self.until(lambda: self.acked_total >= before + partitions, max_ms)
        except AssertionError:
            return False
        return True

    def elect_unclean(self, index: int) -> None:
        """The operator's unclean election. What the new leader lacks is lost by choice, so the record of
        what was committed starts again from what it holds."""
        self.events.append(f"{self.now_ms} unclean election of {index}")
        outcome = self.controller.elect_unclean(TOPIC, index, self.now_ms)
        # Replicas still on the old history (below the new leader's epoch) are left out of the checks until
        # they follow it: cutting it, even below their high watermark, is what they must do.
        self.unclean_epoch[index] = outcome.reply["leader_epoch"]
        self.committed_by_partition[index] = {}
        self.acked = [(i, offset) for i, offset in self.acked if i != index]
        self._checked = {k: 0 for k in self._checked}
        if outcome.notify:
            self._push()

    def replica(self, node_id: int, index: int = 0) -> Replica:
        return self.nodes[node_id].replicas[index]

    def log(self, node_id: int, index: int = 0):
        return self.nodes[node_id].logs[index]

    def values(self, node_id: int, index: int = 0) -> list:
        """The values of ``node_id``'s log of partition ``index``, in offset order."""
        node = self.nodes[node_id]
        out = []
        for _, stored in _batches(node.store, node.logs[index], node.logs[index].next_offset):
            header = batch_format.read_header(stored)
            out += batch_format.read_columns(memoryview(stored)[batch_format.HEADER_BYTES:], header.record_count)[2]
        return out

    def leader(self, index: int) -> int:
        return self.controller.topics[TOPIC]["partitions"][index]["leader"]

    def truncation_point(self, node, index, epoch, end) -> int:
        return self.truncation(node, index, epoch, end)

    def run(self, steps: int, *, faults: bool = True, down_max: int = 1) -> None:
        """A seeded schedule: produce often; now and then crash, restart (sometimes on a new disk), pause,
        cut or heal a node, with at most ``down_max`` nodes down, paused or cut at a time."""
        down: list[int] = []
        for _ in range(steps):
            roll = self.rng.random()
            up = [n for n in self.nodes if n not in down]
            if roll < 0.4:
                self.produce()
            elif faults and roll < 0.43 and len(down) < down_max:
                node_id = self.rng.choice(up)
                self.crash(node_id)
                down.append(node_id)
            elif faults and roll < 0.47 and down:
                node_id = down.pop(self.rng.randrange(len(down)))
                self.heal()  # (heals every cut: the others stay down by crash or pause only)
                if self.nodes[node_id].paused:
                    self.pause(node_id, False)
                if not self.nodes[node_id].up:
                    self.restart(node_id, wipe=self.rng.random() < 0.2)
            elif faults and roll < 0.48 and len(down) < down_max:
                node_id = self.rng.choice(up)
                self.pause(node_id, True)
                down.append(node_id)
            elif faults and roll < 0.49 and len(down) < down_max:
                node_id = self.rng.choice(up)
                self.cut(node_id)
                down.append(node_id)
            self.advance(self.rng.randint(1, 40))
        self.settle()

    def settle(self, ms: int = 6_000) -> None:
        """Heal everything, restart what is down, and let the cluster converge. A partition whose last in-sync
        replica came back on an empty disk has no clean leader: as an operator would, elect one uncleanly
        (``unclean`` counts them; they happen only after a disk was lost)."""
        self.heal()
        for node_id, node in self.nodes.items():
            if node.paused:
                self.pause(node_id, False)
            if not node.up:
                self.restart(node_id)
        self.advance(ms // 2)
        for index, state in enumerate(self.controller.topics[TOPIC]["partitions"]):
            if state["leader"] == NO_LEADER and not state["isr"]:
                self.unclean += 1
                self.elect_unclean(index)
        self.advance(ms // 2)

    # -- the properties --------------------------------------------------------------------------------

    def on_old_history(self, plog, index: int) -> bool:
        return plog.latest_epoch() < self.unclean_epoch.get(index, -1)

    def violation(self, message: str) -> None:
        self.violations.append(f"{self.now_ms}: {message}")

    def acknowledge(self, node: SimNode, index: int, base_offset: int) -> None:
        self.acked.append((index, base_offset))
        self.acked_by.append(node.node_id)
        self.acked_total += 1

    def watch_hw(self, node: SimNode, index: int, before: int) -> None:
        after = node.replicas[index].high_watermark
        if after < before:
            self.violation(f"node {node.node_id}'s high watermark of {index} went down {before} -> {after}")

    def check(self) -> None:
        self.controller.check_invariants()
        for node in self.nodes.values():
            if not node.up:
                continue
            for index, replica in node.replicas.items():
                plog = node.logs[index]
                replica.check_invariants(plog.next_offset, plog.start_offset)
                if self.on_old_history(plog, index):
                    continue
                committed = self.committed_by_partition.setdefault(index, {})
                key = (node.node_id, node.generation, index)
                checked = min(self._checked.get(key, 0), replica.high_watermark)
                self._checked[key] = replica.high_watermark
                for offset, stored in _batches(node.store, plog, replica.high_watermark, checked):
                    known = committed.get(offset)
                    if known is None:
                        committed[offset] = stored
                    elif known != stored:
                        self.violation(f"node {node.node_id} holds another batch at committed offset {offset} "
                                       f"of {index}")
        for index, base_offset in self.acked:
            if base_offset not in self.committed_by_partition.get(index, {}):
                self.violation(f"acknowledged batch at {index}/{base_offset} is not committed")
        for index, state in enumerate(self.controller.topics[TOPIC]["partitions"]):
            leader = self.nodes.get(state["leader"])
            if leader is None or not leader.up or index not in leader.replicas:
                continue
            replica = leader.replicas[index]
            if replica.role != LEADER or replica.leader_epoch != state["leader_epoch"]:
                continue  # not acting on its election yet
            committed = self.committed_by_partition.get(index, {})
            plog = leader.logs[index]
            key = (leader.node_id, index, state["leader_epoch"])
            checked = self._leader_checked.get(key, -1)
            newest = max(committed, default=-1)
            if newest <= checked:
                continue
            self._leader_checked[key] = newest
            held = dict(_batches(leader.store, plog, plog.next_offset, max(checked, 0)))
            for offset, stored in committed.items():
                if offset > checked and offset >= plog.start_offset and held.get(offset) != stored:
                    self.violation(f"leader {leader.node_id} of {index} (epoch {state['leader_epoch']}) lacks the "
                                   f"committed batch at {offset}")
        if self.violations:
            raise Violation("\n".join(self.violations[:5]) + "\nevents: " + "; ".join(self.events[-20:]))

    def converged(self) -> bool:
        """Every replica of every partition holds the same log (after ``settle``)."""
        for index in range(len(self.controller.topics[TOPIC]["partitions"])):
            logs = []
            for node in self.nodes.values():
                if index in node.logs:
                    plog = node.logs[index]
                    logs.append(dict(_batches(node.store, plog, plog.next_offset)))
            if any(log != logs[0] for log in logs):
                return False
        return True


def _batches(store, plog, upto: int, start: int = 0):
    """(base offset, stored bytes) of each batch of ``plog`` from the one holding ``start`` to below ``upto``,
    read through the contract."""
    start = max(start, plog.start_offset)
    if upto <= start:
        return
    data, _ = store.read(plog, start, 1 << 40, upto)
    view, at = memoryview(data), 0
    for header, _ in batch_format.iter_batches(data):
        end = at + batch_format.HEADER_BYTES + header.payload_len
        yield header.base_offset, bytes(view[at:end])
        at = end


def _boundary_at_or_below(store, plog, offset: int) -> int:
    """The largest batch boundary of ``plog`` at or below ``offset``."""
    boundary = plog.start_offset
    for base_offset, _ in _batches(store, plog, plog.next_offset):
        if base_offset > offset:
            break
        boundary = base_offset
    return offset if offset == plog.next_offset else boundary
