"""One partition's replica on one node, as a pure state machine: its role, and as leader the followers'
progress, the high watermark and the in-sync set it proposes to the controller.

This module owns every decision a node makes about replication (docs/replication.md): whether it may
take a produce or serve a fetch at the epoch a client names, when the high watermark moves, which
followers are in sync, and when to ask the controller to change the ISR. It must never touch sockets,
clocks, threads or disk: the log's end offset and ``now_ms`` (monotonic) arrive as arguments, and what the
node must do leaves as return values. The shell (nodes/node.py) stores, sends and replies.

The rules, after Kafka's ``Partition`` (apache/kafka) and KIP-101, KIP-207, KIP-279, KIP-497, KIP-966:
- The controller's ``Assignment`` (replicas, leader, leader epoch, ISR, partition epoch) is the truth.
  An assignment older than the one held (a lower partition epoch) is ignored.
- The leader's high watermark is the smallest log end offset over the *maximal* ISR: the committed ISR
  plus the members of an expansion still pending at the controller. A pending shrink does not take
  effect until the controller committed it, so a leader cut off from the controller keeps waiting for
  the followers it cannot see, and never acknowledges alone.
- The high watermark advances only while the committed ISR holds at least ``min_insync`` replicas
  (KIP-966): a follower removed from an ISR below that size then still holds every committed record.
- It never goes down. A new leader's high watermark may lag the old leader's; until it reaches the
  start of the new epoch it is not *known* (KIP-207): list-offsets answer OFFSET_NOT_AVAILABLE, and the
  end offset a fetch reports is the log start (clients keep their own).
- A follower is caught up when it fetched from at least the leader's log end offset as of its previous
  fetch (so a steady stream of produces does not make everyone lag); one not caught up for longer than
  ``replica_lag_max_ms`` is proposed for removal. A replica outside the ISR whose log end reached the high
  watermark and the start of the leader's epoch is proposed for addition, with its incarnation, which
  the controller checks (KIP-903: a replica that lost its disk came back as a new incarnation).
- One proposal is in flight at a time; it is resent after ``ALTER_RETRY_MS`` without an answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus.errors import (FencedLeaderEpoch, NotEnoughReplicas, NotLeader, OffsetNotAvailable,
                        UnknownLeaderEpoch)

NO_LEADER = -1
LEADER = "leader"
FOLLOWER = "follower"
NONE = "none"  # not a replica of it, or the partition has no leader

ACKS_ALL = -1  # a produce's acks: 0, 1, or all (-1, Kafka's value)
ALTER_RETRY_MS = 2_000  # an ISR proposal unanswered (or refused) this long ago may be sent again
REPLICA_LAG_MAX_MS = 10_000  # a follower not caught up for this long leaves the ISR
# A follower is only proposed for the ISR if it fetched this recently: followers fetch without pause (a
# long poll holds a fetch 500 ms at most), so one silent for longer may be gone, and the controller would
# refuse it while the proposal held up the high watermark.
FOLLOWER_ACTIVE_MS = 1_500

# What ``Replica.apply`` reports.
BECAME_LEADER = "became_leader"
BECAME_FOLLOWER = "became_follower"
STOPPED = "stopped"  # no longer leader or follower (deleted, or leaderless)
ISR_CHANGED = "isr_changed"  # same role and epoch, a new ISR
UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Assignment:
    """A partition's state as the controller committed it."""

    replicas: tuple  # node ids; the first is the preferred leader
    leader: int  # node id, or NO_LEADER
    leader_epoch: int  # bumped at every election
    isr: tuple  # node ids in sync, the leader among them; empty only when there is no leader
    partition_epoch: int  # bumped at every change (election or ISR): the compare-and-set version

    @classmethod
    def from_wire(cls, raw: dict) -> "Assignment":
        return cls(tuple(raw["replicas"]), raw["leader"], raw["leader_epoch"], tuple(raw["isr"]),
                   raw["partition_epoch"])

    def to_wire(self) -> dict:
        return {"replicas": list(self.replicas), "leader": self.leader, "leader_epoch": self.leader_epoch,
                "isr": list(self.isr), "partition_epoch": self.partition_epoch}


@dataclass(frozen=True)
class Proposal:
    """An ISR change for the controller (AlterPartition): compare-and-set on ``partition_epoch``."""

    leader_epoch: int
    partition_epoch: int
    isr: tuple
    incarnations: dict  # node id -> the incarnation it fetched with, for every follower in ``isr``


class Progress:
    """What the leader knows of one follower."""

    __slots__ = ("leo", "caught_up_ms", "incarnation", "previous_leader_leo", "previous_fetch_ms")

    def __init__(self, now_ms: int, in_sync: bool):
        self.leo = -1  # the follower's log end offset (its last fetch offset), -1 before it fetched
        # When it was last caught up. A member of the ISR starts with a full lag window (Kafka resets it
        # when a leader takes over), a replica outside it as long lagging.
        self.caught_up_ms = now_ms if in_sync else -REPLICA_LAG_MAX_MS * 1_000
        self.incarnation = None  # the follower process that fetched last
        self.previous_leader_leo = -1  # the leader's log end offset when the follower last fetched
        self.previous_fetch_ms = now_ms


class Replica:
    def __init__(self, node_id: int, min_insync: int, *, replica_lag_max_ms: int = REPLICA_LAG_MAX_MS,
                 high_watermark: int = 0):
        assert min_insync >= 1
        self.node_id = node_id
        self.min_insync = min_insync
        self.replica_lag_max_ms = replica_lag_max_ms
        self.assignment: Assignment | None = None
        self.role = NONE
        self.high_watermark = high_watermark  # as the log checkpointed it; never goes down
        self.epoch_start_offset = 0  # the log end offset when this node became leader of this epoch
        self.followers: dict[int, Progress] = {}
        self.pending: Proposal | None = None  # sent to the controller, not yet answered
        self.pending_sent_ms = 0
        self.refused_ms = None  # when the controller last refused a proposal: none is made again before
        # ALTER_RETRY_MS has passed (or the assignment changed)

    # -- the controller's word -------------------------------------------------------------------

    def apply(self, assignment: Assignment, leo: int, now_ms: int) -> str:
        """Take the controller's assignment; ``leo`` is the local log's end offset. Returns what changed."""
        current = self.assignment
        if current is not None and assignment.partition_epoch < current.partition_epoch:
            return UNCHANGED  # an older word than the one held (a late heartbeat reply)
        if current == assignment:
            return UNCHANGED
        self.assignment = assignment
        self.refused_ms = None  # a new word from the controller: proposals may start again
        was = (self.role, current.leader_epoch if current is not None else None)
        if assignment.leader == self.node_id:
            if was == (LEADER, assignment.leader_epoch):
                if self.pending is not None and assignment.partition_epoch > self.pending.partition_epoch:
                    self.pending = None  # answered, by this assignment or by a later one
                return ISR_CHANGED
            self.role = LEADER
            self.epoch_start_offset = leo
            self.followers = {r: Progress(now_ms, r in assignment.isr) for r in assignment.replicas if r != self.node_id}
            self.pending = None
            return BECAME_LEADER
        self.pending = None
        self.followers = {}
        if assignment.leader != NO_LEADER and self.node_id in assignment.replicas:
            self.role = FOLLOWER
            return UNCHANGED if was == (FOLLOWER, assignment.leader_epoch) else BECAME_FOLLOWER
        self.role = NONE
        return UNCHANGED if was[0] == NONE else STOPPED

    @property
    def leader_epoch(self) -> int:
        return self.assignment.leader_epoch if self.assignment is not None else -1

    @property
    def leader(self) -> int:
        return self.assignment.leader if self.assignment is not None else NO_LEADER

    # -- what a client may do --------------------------------------------------------------------

    def check_epoch(self, client_epoch) -> None:
        """Refuse a request made for another epoch or sent to a replica that is not the leader."""
        epoch = self.leader_epoch
        if client_epoch is not None and client_epoch >= 0:
            if client_epoch > epoch:
                raise UnknownLeaderEpoch(f"epoch {client_epoch} is newer than this node's {epoch}; retry")
            if client_epoch < epoch:
                raise FencedLeaderEpoch(f"epoch {client_epoch} is older than the current {epoch}")
        if self.role != LEADER:
            raise NotLeader(f"node {self.node_id} is not the leader (the leader is node {self.leader})")

    def check_produce(self, client_epoch, acks: int) -> None:
        """A produce may be appended: this node leads, at the client's epoch, and with acks=all the ISR
        holds at least ``min_insync`` replicas (else a definite NotEnoughReplicas: nothing is written)."""
        self.check_epoch(client_epoch)
        if acks == ACKS_ALL and len(self.assignment.isr) < self.min_insync:
            raise NotEnoughReplicas(f"the in-sync replicas {list(self.assignment.isr)} are fewer than "
                                    f"min_insync_replicas={self.min_insync}")

    @property
    def high_watermark_known(self) -> bool:
        """Whether this leader's high watermark has caught up with everything committed before its epoch."""
        return self.high_watermark >= self.epoch_start_offset

    def check_list_offsets(self, client_epoch) -> None:
        self.check_epoch(client_epoch)
        if not self.high_watermark_known:
            raise OffsetNotAvailable(f"the new leader's high watermark {self.high_watermark} has not reached "
                                     f"the start of its epoch at {self.epoch_start_offset}; retry")

    def enough_in_sync(self) -> bool:
        return self.assignment is not None and len(self.assignment.isr) >= self.min_insync

    # -- the leader's high watermark ---------------------------------------------------------------

    def maximal_isr(self) -> tuple:
        isr = self.assignment.isr
        if self.pending is None:
            return isr
        return isr + tuple(r for r in self.pending.isr if r not in isr)

    def advance(self, leo: int) -> bool:
        """Recompute the leader's high watermark from the local log end ``leo`` (synced) and the
        followers' progress. Returns whether it moved."""
        if self.role != LEADER or not self.enough_in_sync():
            return False
        candidate = leo
        for member in self.maximal_isr():
            if member != self.node_id:
                progress = self.followers.get(member)
                candidate = min(candidate, progress.leo if progress is not None else -1)
        if candidate > self.high_watermark:
            self.high_watermark = candidate
            return True
        return False

    def follower_fetched(self, follower: int, incarnation, fetch_offset: int, leo: int, now_ms: int) -> bool:
        """A follower fetched from ``fetch_offset`` (so it holds everything below it, synced) while the
        leader's log ended at ``leo``. Returns whether the high watermark moved."""
        progress = self.followers.get(follower)
        if progress is None:
            raise NotLeader(f"node {follower} is not a replica of this partition")  # (checked by the shell)
        if progress.incarnation != incarnation:
            progress.incarnation = incarnation
        progress.leo = fetch_offset
        if fetch_offset >= leo:
            progress.caught_up_ms = now_ms
        elif fetch_offset >= progress.previous_leader_leo:
            progress.caught_up_ms = max(progress.caught_up_ms, progress.previous_fetch_ms)
        progress.previous_leader_leo, progress.previous_fetch_ms = leo, now_ms
        return self.advance(leo)

    # -- the ISR ---------------------------------------------------------------------------------

    def proposal(self, leo: int, now_ms: int) -> Proposal | None:
        """The ISR change to send to the controller now, if any (at most one in flight)."""
        if self.role != LEADER:
            return None
        if self.pending is not None:
            if now_ms - self.pending_sent_ms < ALTER_RETRY_MS:
                return None
            self.pending_sent_ms = now_ms
            return self.pending  # unanswered: ask again
        if self.refused_ms is not None and now_ms - self.refused_ms < ALTER_RETRY_MS:
            return None
        assignment = self.assignment
        in_sync_from = max(self.high_watermark, self.epoch_start_offset)
        isr = []
        for replica in assignment.replicas:
            if replica == self.node_id:
                isr.append(replica)
                continue
            progress = self.followers[replica]
            lagging = now_ms - progress.caught_up_ms > self.replica_lag_max_ms
            if replica in assignment.isr and not lagging:
                isr.append(replica)
            elif (replica not in assignment.isr and not lagging and progress.leo >= in_sync_from
                  and now_ms - progress.previous_fetch_ms <= FOLLOWER_ACTIVE_MS):
                isr.append(replica)
        if set(isr) == set(assignment.isr):
            return None
        self.pending = Proposal(assignment.leader_epoch, assignment.partition_epoch, tuple(isr),
                                {r: self.followers[r].incarnation for r in isr if r != self.node_id})
        self.pending_sent_ms = now_ms
        return self.pending

    def proposal_refused(self, now_ms: int) -> None:
        """The controller refused the proposal (stale, or a member not eligible): its next word decides,
        and no proposal is made again for ALTER_RETRY_MS (the same one would be refused at once)."""
        self.pending = None
        self.refused_ms = now_ms

    def next_deadline_ms(self) -> int | None:
        """When ``proposal`` may next have something to say without any other input."""
        if self.role != LEADER:
            return None
        if self.pending is not None:
            return self.pending_sent_ms + ALTER_RETRY_MS
        if self.refused_ms is not None:
            return self.refused_ms + ALTER_RETRY_MS
        in_isr = [self.followers[r].caught_up_ms for r in self.assignment.isr if r != self.node_id]
        return min(in_isr) + self.replica_lag_max_ms + 1 if in_isr else None

    # -- the follower's high watermark -------------------------------------------------------------

    def follow(self, leader_high_watermark: int, leo: int) -> bool:
        """A follower heard the leader's high watermark; its own is that, bounded by its own log end."""
        candidate = min(leader_high_watermark, leo)
        if candidate > self.high_watermark:
            self.high_watermark = candidate
            return True
        return False

    def log_rewritten(self, high_watermark: int) -> None:
        """The local log was cut at a divergence (only above committed data, so never below this high
        watermark: the shell reports it if it were) or started again at the leader's log start; its high
        watermark is now the log's."""
        self.high_watermark = high_watermark

    def check_invariants(self, leo: int, log_start: int) -> None:
        _invariant(log_start <= self.high_watermark <= leo or self.high_watermark <= log_start == leo,
                   f"high watermark {self.high_watermark} outside [{log_start}, {leo}]")
        if self.role == LEADER:
            a = self.assignment
            _invariant(self.node_id in a.isr, f"leader {self.node_id} not in its ISR {a.isr}")
            _invariant(set(a.isr) <= set(a.replicas), f"ISR {a.isr} not within replicas {a.replicas}")


def divergence(log, last_fetched_epoch: int, fetch_offset: int) -> tuple[int, int] | None:
    """The leader's check of a follower's fetch (KIP-279, as Kafka's fetch with a last fetched epoch):
    None when the follower's log up to ``fetch_offset``, whose last batch has ``last_fetched_epoch``, is a
    prefix of the leader's ``log``; else ``(epoch, end_offset)``, the leader's end of the largest epoch
    not above the follower's, for the follower to truncate to (``PartitionLog.truncation_offset``)."""
    if last_fetched_epoch < 0:
        return None  # the follower's log is empty from its start: nothing to diverge
    epoch, end_offset = log.end_offset_for_epoch(last_fetched_epoch)
    if epoch != last_fetched_epoch or end_offset < fetch_offset:
        return epoch, end_offset
    return None


class InvariantViolation(AssertionError):
    """A replica's state broke a rule that must always hold; the node must stop, not limp on."""


def _invariant(ok: bool, message: str) -> None:
    if not ok:  # not an ``assert``: it must hold under ``python -O`` too
        raise InvariantViolation(message)
