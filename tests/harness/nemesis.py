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
    kill_consumer     kill -9 a consumer process of a group run, keep it down ``hold_s``, start a new one
                      in its place (a new process, so a new member); needs ``consumers``
    pause_consumer    SIGSTOP a consumer process for ``hold_s``, then SIGCONT; needs ``consumers``

``consumers`` (tests/harness/group_workload.py) is anything with ``kill(slot)``, ``restart(slot)``,
``pause(slot)`` and ``resume(slot)``; a consumer fault's target is ``consumer-<slot>``.

This module owns the schedule and its execution; it never judges the outcome (checker.py).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass

KINDS = ("kill", "pause", "kill_coordinator", "cut", "stall", "kill_consumer", "pause_consumer")
FRACTION_MIN, FRACTION_MAX = 0.03, 0.85  # faults land inside the workload, not at its edges


@dataclass(frozen=True)
class Fault:
    kind: str  # one of KINDS
    target: str  # "node-<id>", "coordinator" or "consumer-<slot>"
    at_fraction: float  # fires when the workload has invoked this fraction of its sends
    hold_s: float  # how long the node stays down, paused or cut off
    lead_s: float = 0.0  # the workload runs this long past its gate before the fault strikes

    @property
    def node_id(self) -> int | None:
        return int(self.target.split("-")[1]) if self.target.startswith("node-") else None

    @property
    def consumer_slot(self) -> int | None:
        return int(self.target.split("-")[1]) if self.target.startswith("consumer-") else None


def plan(seed: int, node_ids, *, kills: int = 0, pauses: int = 0, coordinator_kills: int = 0, cuts: int = 0,
         stalls: int = 0, kill_hold_s=(0.2, 1.0), pause_hold_s=(1.5, 3.0), coordinator_hold_s=(0.5, 2.0),
         cut_hold_s=(1.0, 2.5), stall_hold_s=(1.0, 2.5), lead_s=(0.1, 0.4), consumer_slots=(),
         consumer_kills: int = 0, consumer_pauses: int = 0, consumer_kill_hold_s=(0.2, 1.0),
         consumer_pause_hold_s=(2.5, 3.5)) -> list[Fault]:
    """A seeded fault schedule: the kinds shuffled, spread over the workload, targets and holds drawn.
    Without consumer faults, a seed gives the same schedule as before they existed."""
    rng = random.Random(f"nemesis/{seed}")
    node_ids = sorted(node_ids)
    consumer_slots = sorted(consumer_slots)
    if (consumer_kills or consumer_pauses) and not consumer_slots:
        raise ValueError("consumer faults need consumer_slots")
    kinds = (["kill"] * kills + ["pause"] * pauses + ["kill_coordinator"] * coordinator_kills + ["cut"] * cuts
             + ["stall"] * stalls + ["kill_consumer"] * consumer_kills + ["pause_consumer"] * consumer_pauses)
    rng.shuffle(kinds)
    holds = {"kill": kill_hold_s, "pause": pause_hold_s, "kill_coordinator": coordinator_hold_s,
             "cut": cut_hold_s, "stall": stall_hold_s, "kill_consumer": consumer_kill_hold_s,
             "pause_consumer": consumer_pause_hold_s}
    faults = []
    span = (FRACTION_MAX - FRACTION_MIN) / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        # One fault per slot of the workload, at a random point of its slot.
        at = FRACTION_MIN + span * (i + rng.uniform(0.1, 0.9))
        if kind == "kill_coordinator":
            target = "coordinator"
        elif kind in ("kill_consumer", "pause_consumer"):
            target = f"consumer-{rng.choice(consumer_slots)}"
        else:
            target = f"node-{rng.choice(node_ids)}"
        faults.append(Fault(kind, target, round(at, 4), round(rng.uniform(*holds[kind]), 3),
                            round(rng.uniform(*lead_s), 3)))
    return faults


class Nemesis(threading.Thread):
    """Carries out ``faults`` against ``cluster`` as the workload reaches each one's gate."""

    def __init__(self, cluster, history, faults: list[Fault], progress, proxies: dict | None = None,
                 log=None, consumers=None):
        super().__init__(name="nemesis", daemon=True)
        self.cluster, self.history, self.faults, self.progress = cluster, history, faults, progress
        self.proxies = proxies or {}
        self.consumers = consumers  # group runs: the consumer processes (see the module docstring)
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
        op_id = self.history.invoke("nemesis", "nemesis", action=fault.kind, target=fault.target,
                                    hold_s=fault.hold_s, at_fraction=fault.at_fraction, fault_index=index)
        self.log(f"nemesis: {fault.kind} {fault.target} for {fault.hold_s:.2f} s "
                 f"at {self.progress.invoked}/{self.progress.total} sends")
        node_id = fault.node_id
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

    def _hold(self, hold_s: float) -> None:
        self._halt.wait(hold_s)
