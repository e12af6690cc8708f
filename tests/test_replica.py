"""The replica core (nodes/replica.py) alone: a fake clock, log ends as numbers, every rule probed at its
edge (a lag 1 ms either side of replica_lag_max_ms, a pending ISR change before and after the controller's
answer). The whole protocol under faults is tests/test_replication_sim.py."""

from __future__ import annotations

import pytest

from bus.errors import FencedLeaderEpoch, NotEnoughReplicas, NotLeader, OffsetNotAvailable, UnknownLeaderEpoch
from nodes.replica import (ACKS_ALL, ALTER_RETRY_MS, BECAME_FOLLOWER, BECAME_LEADER, FOLLOWER, ISR_CHANGED,
                           LEADER, NO_LEADER, NONE, STOPPED, UNCHANGED, Assignment, Replica)

LAG_MS = 1_000


def assignment(leader=1, isr=(1, 2, 3), epoch=0, partition_epoch=0, replicas=(1, 2, 3)) -> Assignment:
    return Assignment(tuple(replicas), leader, epoch, tuple(isr), partition_epoch)


def leader(min_insync=2, isr=(1, 2, 3), leo=0, now_ms=0) -> Replica:
    r = Replica(1, min_insync, replica_lag_max_ms=LAG_MS)
    assert r.apply(assignment(isr=isr), leo, now_ms) == BECAME_LEADER
    return r


def test_roles_follow_the_assignment_and_older_words_are_ignored():
    r = Replica(2, 2)
    assert r.apply(assignment(leader=1), 0, 0) == BECAME_FOLLOWER and r.role == FOLLOWER
    assert r.apply(assignment(leader=1), 0, 0) == UNCHANGED
    assert r.apply(assignment(leader=2, epoch=1, partition_epoch=1), 0, 0) == BECAME_LEADER and r.role == LEADER
    assert r.apply(assignment(leader=1, epoch=0, partition_epoch=0), 0, 0) == UNCHANGED  # a late, older word
    assert r.role == LEADER
    assert r.apply(assignment(leader=2, epoch=1, partition_epoch=2, isr=(2, 3)), 0, 0) == ISR_CHANGED
    assert r.apply(assignment(leader=NO_LEADER, epoch=2, partition_epoch=3, isr=()), 0, 0) == STOPPED
    assert r.role == NONE


def test_the_high_watermark_is_the_smallest_log_end_over_the_isr_and_never_goes_down():
    r = leader()
    assert not r.advance(10)  # no follower has fetched yet
    assert not r.follower_fetched(2, "i2", 10, 10, 1)
    assert r.follower_fetched(3, "i3", 7, 10, 1) and r.high_watermark == 7
    assert r.follower_fetched(3, "i3", 10, 10, 2) and r.high_watermark == 10
    assert not r.follower_fetched(3, "i3", 4, 10, 3)  # a follower that truncated does not move it back
    assert r.high_watermark == 10


def test_the_high_watermark_stops_below_min_insync_replicas():
    r = leader(isr=(1,), min_insync=2)
    assert not r.advance(10) and r.high_watermark == 0
    with pytest.raises(NotEnoughReplicas):
        r.check_produce(0, ACKS_ALL)
    r.check_produce(0, 1)  # acks=1 is taken


def test_a_pending_expansion_counts_at_once_and_a_pending_shrink_does_not():
    r = leader(isr=(1, 2), min_insync=1, leo=0)
    r.follower_fetched(2, "i2", 0, 0, 0)
    r.follower_fetched(3, "i3", 0, 0, 0)
    proposal = r.proposal(0, 10)
    assert proposal.isr == (1, 2, 3) and proposal.incarnations == {2: "i2", 3: "i3"}
    r.follower_fetched(2, "i2", 5, 5, 20)
    assert not r.advance(5)  # node 3, about to join, has not got offset 5: it holds the high watermark
    assert r.follower_fetched(3, "i3", 5, 5, 21) and r.high_watermark == 5
    # The controller's answer ends the pending change.
    assert r.apply(assignment(isr=(1, 2, 3), partition_epoch=1), 5, 22) == ISR_CHANGED and r.pending is None


def test_a_follower_lagging_past_replica_lag_max_ms_is_proposed_for_removal_not_removed():
    r = leader(leo=0, now_ms=0)
    r.follower_fetched(2, "i2", 0, 0, 0)
    r.follower_fetched(3, "i3", 0, 0, 0)
    for now_ms in range(100, 1_101, 100):
        r.follower_fetched(2, "i2", now_ms, now_ms, now_ms)  # node 2 keeps up; node 3 fetched at 0 last
    assert r.proposal(1_000, LAG_MS) is None  # exactly the lag: still in
    proposal = r.proposal(1_000, LAG_MS + 1)
    assert proposal.isr == (1, 2)
    # Until the controller commits it, node 3 still counts: the high watermark waits for it.
    assert r.maximal_isr() == (1, 2, 3)
    assert not r.advance(1_000) and r.high_watermark == 0


def test_a_steady_stream_does_not_make_a_follower_lag():
    """Caught up means: fetched from the leader's log end as of its previous fetch."""
    r = leader(leo=0)
    leo = 0
    for now_ms in range(0, 5 * LAG_MS, 50):
        r.follower_fetched(2, "i2", leo, leo + 10, now_ms)  # always one fetch behind a growing log
        r.follower_fetched(3, "i3", leo, leo + 10, now_ms)
        leo += 10
    assert r.proposal(leo, 5 * LAG_MS) is None


def test_a_silent_replica_is_not_proposed_for_the_isr_and_a_refusal_backs_off():
    r = leader(isr=(1, 2), min_insync=1, leo=0)
    r.follower_fetched(3, "i3", 0, 0, 0)  # caught up, at 0 ...
    for now_ms in range(0, 2_001, 100):
        r.follower_fetched(2, "i2", 0, 0, now_ms)  # (node 2, in the ISR, keeps fetching)
    assert r.proposal(0, 2_000) is None  # ... but silent for 2 s since: it may be gone
    r.follower_fetched(2, "i2", 0, 0, 2_100)
    r.follower_fetched(3, "i3", 0, 0, 2_100)
    assert r.proposal(0, 2_100).isr == (1, 2, 3)
    r.proposal_refused(2_101)  # e.g. INELIGIBLE_REPLICA
    assert r.proposal(0, 2_102) is None and r.maximal_isr() == (1, 2)
    assert r.proposal(0, 2_101 + ALTER_RETRY_MS) is not None


def test_an_unanswered_proposal_is_sent_again_after_the_retry_interval():
    r = leader(isr=(1, 2), min_insync=1)
    r.follower_fetched(2, "i2", 0, 0, 0)
    r.follower_fetched(3, "i3", 0, 0, 0)
    first = r.proposal(0, 0)
    assert r.proposal(0, ALTER_RETRY_MS - 1) is None
    assert r.proposal(0, ALTER_RETRY_MS) == first


def test_epochs_fence_and_only_the_leader_serves():
    r = leader()
    r.check_epoch(0)
    r.check_epoch(None)  # a tool that names no epoch
    with pytest.raises(UnknownLeaderEpoch):
        r.check_epoch(1)  # a client that heard of an election this node has not
    assert r.apply(assignment(epoch=1, partition_epoch=1), 0, 0) == BECAME_LEADER  # re-elected, a new epoch
    with pytest.raises(FencedLeaderEpoch):
        r.check_epoch(0)
    r.check_epoch(1)
    follower = Replica(2, 2)
    follower.apply(assignment(), 0, 0)
    with pytest.raises(NotLeader):
        follower.check_epoch(0)


def test_a_new_leaders_high_watermark_is_unknown_until_it_reaches_the_epoch_start():
    r = Replica(2, 1, high_watermark=4)  # a follower one fetch behind: its high watermark lags its log end
    r.apply(assignment(leader=1, isr=(1, 2)), 6, 0)
    assert r.apply(assignment(leader=2, isr=(2,), epoch=1, partition_epoch=1), 6, 0) == BECAME_LEADER
    assert not r.high_watermark_known
    with pytest.raises(OffsetNotAvailable):
        r.check_list_offsets(1)
    assert r.advance(6) and r.high_watermark_known  # alone in its ISR: its log end is committed
    r.check_list_offsets(1)


def test_a_follower_takes_the_leaders_high_watermark_bounded_by_its_own_log_end():
    r = Replica(2, 2)
    r.apply(assignment(), 0, 0)
    assert r.follow(10, 6) and r.high_watermark == 6
    assert not r.follow(5, 8) and r.high_watermark == 6  # never down


def test_check_invariants_catches_a_high_watermark_past_the_log_end():
    r = leader()
    r.high_watermark = 11
    with pytest.raises(AssertionError):
        r.check_invariants(10, 0)
