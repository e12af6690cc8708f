"""The nemesis: a seeded schedule of faults injected into a LocalCluster while the workload runs.

``plan(seed, ...)`` turns a seed into a list of Faults, each with the point of the workload where it fires
(a fraction of the sends, see workload.Progress), how long the workload runs on past that point before it
strikes, and how long it lasts; the same seed gives the same
schedule. ``Nemesis`` is the thread that carries it out, one fault at a time, and records each in the
History as a ``nemesis`` operation (invoke when it starts, ok when it is healed), with what it did in the
extras, so a failing history shows what the system was going through.

Faults:
    kill              kill -9 a node, keep it down ``hold_s``, restart it on the same data directory
    pause             SIGSTOP a node for ``hold_s``, then SIGCONT (its sockets stay open: clients time out)
    kill_coordinator  kill -9 the coordinator, keep it down ``hold_s``, restart it
    cut               a node's FaultProxy drops everything for ``hold_s`` (needs proxies)
    stall             a node's FaultProxy holds everything for ``hold_s``, then delivers it (needs proxies)
    kill_leader       kill -9 the current leader of a partition (the coordinator's metadata at fault time
                      names it), keep it down ``hold_s``, restart it on the same data directory
    wipe              kill -9 a node, delete its data directory, restart it empty after ``hold_s``. First
                      it waits until every ISR is full: a wipe never takes the last copy of a record
                      (two disks lost at once may lose data, and no replicated log claims otherwise)
    isolate           cut a partition's current leader off from the coordinator and from every other node
                      for ``hold_s`` (topology.Topology.isolate: its clients still reach it), then heal
    cascade           KIP-101's double failover: kill -9 a partition's leader A; cut its successor C (the
                      replica the controller elects next) off from the other nodes at once, so C takes
                      over but no follower can fetch from it; once C leads, cut it from the coordinator
                      too, so the third replica B takes over in turn, without having fetched anything
                      from C; after ``hold_s`` heal C and restart A. B must still hold everything
                      committed under A: a follower that cut its log on becoming C's follower lost it
    kill_consumer     kill -9 a consumer process of a group run, keep it down ``hold_s``, start a new one
                      in its place (a new process, so a new member); needs ``consumers``
    pause_consumer    SIGSTOP a consumer process for ``hold_s``, then SIGCONT; needs ``consumers``

``consumers`` (tests/harness/group_workload.py) is anything with ``kill(slot)``, ``restart(slot)``,
``pause(slot)`` and ``resume(slot)``; a consumer fault's target is ``consumer-<slot>``. A fault aimed at a
partition's leader has the target ``leader-<partition>``: the node is the leader the coordinator names
when the fault strikes (recorded as ``node`` in the nemesis op, with ``successor``: the in-sync replica the
controller would elect next), which needs ``topic``; so does a wipe, which waits for every ISR of it to be
full. Isolate and cascade need a ``topology`` with coordinator links.

This module owns the schedule and its execution; it never judges the outcome (checker.py).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass

import zmq

from bus.connection import Requester
from bus.errors import BusError

from .workload import wait_in_sync

KINDS = ("kill", "pause", "kill_coordinator", "cut", "stall", "kill_consumer", "pause_consumer", "kill_leader",
         "wipe", "isolate", "cascade")
LEADER_KINDS = ("kill_leader", "isolate", "cascade")  # aimed at a partition's leader, found when they strike
LEADER_WAIT_S = 30.0  # a partition without a live leader this long when a fault aims at it stops the nemesis
IN_SYNC_WAIT_S = 90.0  # a wipe waits this long at most for every ISR to be full
ELECTION_WAIT_S = 30.0  # a cascade waits this long at most for each of its two elections
FRACTION_MIN, FRACTION_MAX = 0.03, 0.85  # faults land inside the workload, not at its edges


@dataclass(frozen=True)
class Fault:
    kind: str  # one of KINDS
    target: str  # "node-<id>", "coordinator", "consumer-<slot>" or "leader-<partition>"
    at_fraction: float  # fires when the workload has invoked this fraction of its sends
    hold_s: float  # how long the node stays down, paused or cut off
    lead_s: float = 0.0  # the workload runs this long past its gate before the fault strikes

    @property
    def node_id(self) -> int | None:
        return int(self.target.split("-")[1]) if self.target.startswith("node-") else None

    @property
    def consumer_slot(self) -> int | None:
        return int(self.target.split("-")[1]) if self.target.startswith("consumer-") else None

    @property
    def partition(self) -> int | None:
        return int(self.target.split("-")[1]) if self.target.startswith("leader-") else None


def plan(seed: int, node_ids, *, kills: int = 0, pauses: int = 0, coordinator_kills: int = 0, cuts: int = 0,
         stalls: int = 0, kill_hold_s=(0.2, 1.0), pause_hold_s=(1.5, 3.0), coordinator_hold_s=(0.5, 2.0),
         cut_hold_s=(1.0, 2.5), stall_hold_s=(1.0, 2.5), lead_s=(0.1, 0.4), consumer_slots=(),
         consumer_kills: int = 0, consumer_pauses: int = 0, consumer_kill_hold_s=(0.2, 1.0),
         consumer_pause_hold_s=(2.5, 3.5), partitions: int = 0, kill_leaders: int = 0, wipes: int = 0,
         isolations: int = 0, cascades: int = 0, wipe_hold_s=(0.2, 1.0), isolate_hold_s=(4.0, 6.0),
         cascade_hold_s=(0.5, 1.5)) -> list[Fault]:
    """A seeded fault schedule: the kinds shuffled, spread over the workload, targets and holds drawn.
    Without consumer or replication faults, a seed gives the same schedule as before they existed.
    Faults aimed at a partition's leader need ``partitions``, the topic's partition count."""
    rng = random.Random(f"nemesis/{seed}")
    node_ids = sorted(node_ids)
    consumer_slots = sorted(consumer_slots)
    if (consumer_kills or consumer_pauses) and not consumer_slots:
        raise ValueError("consumer faults need consumer_slots")
    if (kill_leaders or isolations or cascades) and partitions < 1:
        raise ValueError("faults aimed at a partition's leader need the topic's partition count")
    kinds = (["kill"] * kills + ["pause"] * pauses + ["kill_coordinator"] * coordinator_kills + ["cut"] * cuts
             + ["stall"] * stalls + ["kill_consumer"] * consumer_kills + ["pause_consumer"] * consumer_pauses
             + ["kill_leader"] * kill_leaders + ["wipe"] * wipes + ["isolate"] * isolations
             + ["cascade"] * cascades)
    rng.shuffle(kinds)
    holds = {"kill": kill_hold_s, "pause": pause_hold_s, "kill_coordinator": coordinator_hold_s,
             "cut": cut_hold_s, "stall": stall_hold_s, "kill_consumer": consumer_kill_hold_s,
             "pause_consumer": consumer_pause_hold_s, "kill_leader": kill_hold_s, "wipe": wipe_hold_s,
             "isolate": isolate_hold_s, "cascade": cascade_hold_s}
    faults = []
    span = (FRACTION_MAX - FRACTION_MIN) / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        # One fault per slot of the workload, at a random point of its slot.
        at = FRACTION_MIN + span * (i + rng.uniform(0.1, 0.9))
        if kind == "kill_coordinator":
            target = "coordinator"
        elif kind in ("kill_consumer", "pause_consumer"):
            target = f"consumer-{rng.choice(consumer_slots)}"
        elif kind in LEADER_KINDS:
            target = f"leader-{rng.randrange(partitions)}"
        else:
            target = f"node-{rng.choice(node_ids)}"
        faults.append(Fault(kind, target, round(at, 4), round(rng.uniform(*holds[kind]), 3),
                            round(rng.uniform(*lead_s), 3)))
    return faults


class Nemesis(threading.Thread):
    """Carries out ``faults`` against ``cluster`` as the workload reaches each one's gate."""

    def __init__(self, cluster, history, faults: list[Fault], progress, proxies: dict | None = None,
                 log=None, consumers=None, topology=None, topic: str | None = None):
        super().__init__(name="nemesis", daemon=True)
        self.cluster, self.history, self.faults, self.progress = cluster, history, faults, progress
        self.proxies = proxies or {}  # node id -> the FaultProxy in front of it (cut, stall)
        self.consumers = consumers  # group runs: the consumer processes (see the module docstring)
        self.topology = topology  # isolate, cascade: topology.Topology
        self.topic = topic  # whose partitions' leaders the leader faults aim at
        self.log = log or (lambda message: None)
        self.done: list[tuple[Fault, float]] = []  # (fault, seconds it took from start to healed)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            for index, fault in enumerate(self.faults):
                if not self.progress.wait_gate(index, self._halt) or self._halt.is_set():
                    self.progress.open(index)
                    break
                # Let the producers run past the gate first, so the fault strikes a node that is busy
                # (requests in flight, acknowledgements just sent), not one idling at the gate.
                self.progress.open(index)
                self._hold(fault.lead_s)
                self._inject(index, fault)
        except BaseException as exc:
            self.error = exc
            self.log(f"nemesis failed: {exc!r}")
        finally:
            self.progress.finish()  # never leave a producer waiting at a gate

    def _inject(self, index: int, fault: Fault) -> None:
        started_s = time.monotonic()
        found = {}  # what the fault found when it struck: the leader it aims at, the wait for full ISRs
        if fault.kind in LEADER_KINDS:
            found = self._leader_of(fault.partition)
        elif fault.kind == "wipe":
            waited_s = time.monotonic()
            if wait_in_sync(self.cluster.bootstrap, self.topic, IN_SYNC_WAIT_S) is None:
                raise TimeoutError(f"every ISR of {self.topic} was not full within {IN_SYNC_WAIT_S} s: a wipe now "
                                   "could take the last copy of committed records")
            found = {"waited_in_sync_s": round(time.monotonic() - waited_s, 3)}
        op_id = self.history.invoke("nemesis", "nemesis", action=fault.kind, target=fault.target,
                                    hold_s=fault.hold_s, at_fraction=fault.at_fraction, fault_index=index, **found)
        self.log(f"nemesis: {fault.kind} {fault.target} for {fault.hold_s:.2f} s "
                 f"at {self.progress.invoked}/{self.progress.total} sends"
                 + "".join(f" {k}={v}" for k, v in found.items()))
        node_id = found.get("node", fault.node_id)
        healed = False
        try:
            if fault.kind == "kill":
                self.cluster.kill_node(node_id, signal.SIGKILL)
                self.progress.open(index)
                self._hold(fault.hold_s)
                self.cluster.restart_node(node_id)
            elif fault.kind == "pause":
                self.cluster.pause_node(node_id)
                self.progress.open(index)
                try:
                    self._hold(fault.hold_s)
                finally:
                    self.cluster.resume_node(node_id)
            elif fault.kind == "kill_coordinator":
                self.cluster.kill_coordinator(signal.SIGKILL)
                self.progress.open(index)
                self._hold(fault.hold_s)
                self.cluster.restart_coordinator()
            elif fault.kind == "cut":
                proxy = self.proxies[node_id]
                proxy.cut()
                self.progress.open(index)
                try:
                    self._hold(fault.hold_s)
                finally:
                    proxy.cut_off = False
            elif fault.kind == "stall":
                proxy = self.proxies[node_id]
                proxy.stall()
                self.progress.open(index)
                try:
                    self._hold(fault.hold_s)
                finally:
                    proxy.unstall()
            elif fault.kind == "kill_consumer":
                self.consumers.kill(fault.consumer_slot)
                self.progress.open(index)
                self._hold(fault.hold_s)
                self.consumers.restart(fault.consumer_slot)
            elif fault.kind == "pause_consumer":
                self.consumers.pause(fault.consumer_slot)
                self.progress.open(index)
                try:
                    self._hold(fault.hold_s)
                finally:
                    self.consumers.resume(fault.consumer_slot)
            elif fault.kind == "kill_leader":
                self.cluster.kill_node(node_id, signal.SIGKILL)
                self.progress.open(index)
                self._hold(fault.hold_s)
                self.cluster.restart_node(node_id)
            elif fault.kind == "wipe":
                self.cluster.kill_node(node_id, signal.SIGKILL)
                shutil.rmtree(os.path.join(self.cluster.data_dir, f"node-{node_id}"))
                self.progress.open(index)
                self._hold(fault.hold_s)
                self.cluster.restart_node(node_id)
            elif fault.kind == "isolate":
                self.topology.isolate(node_id)
                self.progress.open(index)
                try:
                    self._hold(fault.hold_s)
                finally:
                    self.topology.rejoin(node_id)
            elif fault.kind == "cascade":
                self._cascade(index, fault, found)
            else:
                raise ValueError(f"unknown fault kind {fault.kind!r}")
            healed = True
        finally:
            self.progress.open(index)
            took_s = time.monotonic() - started_s
            self.done.append((fault, took_s))
            if healed:
                self.history.ok(op_id, took_s=round(took_s, 3))
            else:
                self.history.fail(op_id, took_s=round(took_s, 3), error="the nemesis could not heal this fault")

    def _cascade(self, index: int, fault: Fault, found: dict) -> None:
        leader, successor = found["node"], found.get("successor")
        self.cluster.kill_node(leader, signal.SIGKILL)
        self.progress.open(index)
        if successor is None:  # no other live in-sync replica: a plain leader kill
            self._hold(fault.hold_s)
            self.cluster.restart_node(leader)
            return
        # At once, before the controller (a session timeout from now) elects it: from here on no follower
        # fetches from the successor, so the third replica learns nothing more once it follows it.
        self.topology.cut_node_links(successor)
        try:
            elected = self._wait_leader(fault.partition, lambda n: n != leader and n >= 0)
            if elected == successor:
                self.topology.cut_coordinator_link(successor)
                third = self._wait_leader(fault.partition, lambda n: n != successor)
                self.log(f"nemesis: cascade: node {successor} led {self.topic}/{fault.partition} after node "
                         f"{leader}, then node {third}")
            else:
                self.log(f"nemesis: cascade: node {elected}, not {successor}, took over from node {leader}")
            self._hold(fault.hold_s)
        finally:
            self.topology.rejoin(successor)
        self.cluster.restart_node(leader)

    def _metadata(self):
        context = zmq.Context()
        requester = Requester(context, self.cluster.bootstrap, 1_000)
        try:
            return requester.metadata([self.topic])
        finally:
            requester.close()
            context.term()

    def _partition_state(self, partition: int):
        """(the partition's state, {node id: alive}) as the coordinator has it now, or None without an answer."""
        try:
            metadata = self._metadata()
            return (metadata.topics[self.topic]["partitions"][partition],
                    {n: bool(info.get("alive")) for n, info in metadata.nodes.items()})
        except (BusError, KeyError, IndexError):
            return None

    def _leader_of(self, partition: int) -> dict:
        """{"node": the live leader of ``partition`` now, "successor": the live in-sync replica the
        controller would elect in its place (replica order), if any}."""
        deadline_s = time.monotonic() + LEADER_WAIT_S
        while True:
            answer = self._partition_state(partition)
            if answer is not None:
                state, alive = answer
                leader = state["leader"]
                if alive.get(leader):
                    successor = next((r for r in state["replicas"]
                                      if r != leader and r in state["isr"] and alive.get(r)), None)
                    return {"node": leader, "successor": successor} if successor is not None else {"node": leader}
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"{self.topic}/{partition} had no live leader for {LEADER_WAIT_S} s")
            if self._halt.wait(0.05):
                raise InterruptedError("the nemesis was stopped")

    def _wait_leader(self, partition: int, wanted) -> int:
        """The partition's leader once ``wanted(leader)`` holds (-1: no leader)."""
        deadline_s = time.monotonic() + ELECTION_WAIT_S
        while True:
            answer = self._partition_state(partition)
            if answer is not None and wanted(answer[0]["leader"]):
                return answer[0]["leader"]
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"{self.topic}/{partition}: no election as wanted within {ELECTION_WAIT_S} s "
                                   f"(now {answer[0] if answer else 'no answer'})")
            if self._halt.wait(0.02):
                raise InterruptedError("the nemesis was stopped")

    def _hold(self, hold_s: float) -> None:
        self._halt.wait(hold_s)
