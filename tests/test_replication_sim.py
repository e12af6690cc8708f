"""The replication protocol's pure cores under a seeded simulator (tests/harness/replication_sim.py): the
real controller and replica cores and the in-memory storage contract, a fake clock, a network that
delays, drops and cuts, nodes that crash, pause and lose their disks. Every property is checked after
every event (``Simulation.check``); each test below also proves that the checks catch the bug it is about,
by running a broken rule through the same scenario.
"""

from __future__ import annotations

import pytest

from nodes.replica import LEADER
from tests.harness.replication_sim import Simulation, Violation


@pytest.mark.parametrize("seed", range(8))
def test_random_faults_keep_every_property(seed):
    """Crashes, restarts (a fifth of them on a new disk), pauses and cuts, two nodes at a time, with 2 % of
    messages lost: nothing acknowledged is lost, no replica diverges below its high watermark, and after
    healing every replica holds the same log."""
    sim = Simulation(seed, nodes=3, partitions=2, drop=0.02)
    sim.run(500, down_max=2)
    assert sim.acked_total > 50, "the schedule acknowledged almost nothing: it tested nothing"
    assert sim.converged()
    assert sim.live(), "healed, the cluster no longer acknowledges"
    # Only the loss of a disk can leave a partition without a clean leader (its last in-sync replica's).
    assert sim.unclean == 0 or any("wiped" in event for event in sim.events)


def test_a_single_failure_at_a_time_with_four_nodes_and_three_partitions():
    sim = Simulation(99, nodes=4, partitions=3)
    sim.run(600, down_max=1)
    assert len(sim.acked) > 100 and sim.converged() and sim.live()


def _kip101(truncate_to_hw_on_follow: bool) -> Simulation:
    """KIP-101's loss, by fast successive elections: the follower that lags one fetch behind the leader's
    high watermark must keep the committed record it holds above its own, when a new leader takes over
    and then dies before it fetched again."""
    sim = Simulation(1, nodes=3, partitions=1, truncate_to_hw_on_follow=truncate_to_hw_on_follow)
    sim.produce(0)
    sim.until(lambda: all(sim.replica(n).high_watermark == 1 for n in (1, 2, 3)))
    # Node 3 fetches the next record and reports it; node 2 is cut, so the high watermark waits for it.
    sim.cut(2)
    sim.produce(0)
    sim.until(lambda: sim.nodes[1].replicas[0].followers[3].leo == 2)
    sim.pause(3, True)  # node 3 holds offset 1 but believes the high watermark is 1
    sim.heal()
    sim.until(lambda: sim.replica(1).high_watermark == 2 and sim.replica(2).high_watermark == 2)
    assert sim.acked == [(0, 0), (0, 1)]
    assert sim.replica(3).high_watermark == 1 and sim.log(3).next_offset == 2
    sim.crash(1)
    sim.pause(3, False)
    sim.until(lambda: sim.leader(0) == 2)  # node 1's session ended: node 2 is elected
    sim.pause(2, True)  # and is lost before node 3 fetched from it
    sim.until(lambda: sim.leader(0) == 3)
    sim.until(lambda: sim.replica(3).role == LEADER)
    sim.settle()
    return sim


def test_kip101_a_follower_one_fetch_behind_keeps_the_committed_record_through_two_failovers():
    sim = _kip101(truncate_to_hw_on_follow=False)
    assert len(sim.values(3)) == 2 and sim.converged()


def test_kip101_truncating_to_the_high_watermark_on_a_leader_change_is_caught():
    with pytest.raises(Violation, match="lacks the committed batch at 1"):
        _kip101(truncate_to_hw_on_follow=True)


def _kip279(truncation=None) -> Simulation:
    """KIP-279's divergence: a follower whose log diverged in an epoch the new leader never had must cut
    at its own end of the last epoch both share, not at the leader's."""
    sim = Simulation(2, nodes=2, partitions=1, replication_factor=2, min_insync=1, truncation=truncation)
    sim.produce(0)
    sim.until(lambda: all(sim.replica(n).high_watermark == 1 for n in (1, 2)))
    sim.cut(2)  # node 2 misses m2, and node 1 will lose its session
    sim.produce(0)
    sim.until(lambda: sim.log(1).next_offset == 2)
    sim.heal()
    sim.cut(1)  # the leader is cut off from the controller and node 2: node 2 is elected
    sim.until(lambda: sim.leader(0) == 2 and sim.replica(2).role == LEADER)
    sim.produce(0)  # m3 at offset 1, in node 2's epoch
    sim.until(lambda: sim.log(2).next_offset == 2)
    sim.crash(2)
    sim.heal()
    sim.until(lambda: sim.leader(0) == -1)  # node 2's session ended; node 1 is not in the ISR
    sim.elect_unclean(0)  # node 1 leads again, with m2 at offset 1 of its first epoch
    sim.until(lambda: sim.replica(1).role == LEADER)
    sim.restart(2)
    sim.settle()
    return sim


def test_kip279_a_divergence_in_an_epoch_the_leader_never_had_is_cut_at_the_followers_own_epoch_end():
    sim = _kip279()
    assert sim.converged()
    assert sim.values(2) == sim.values(1) and len(sim.values(1)) == 2


def test_kip279_cutting_at_the_leaders_epoch_end_alone_leaves_the_logs_diverged():
    # The pre-KIP-279 rule: truncate to the leader's end offset of the requested epoch.
    sim = _kip279(truncation=lambda node, index, epoch, end: min(end, node.logs[index].next_offset))
    assert not sim.converged()


def test_a_leader_cut_off_from_the_controller_and_its_followers_acknowledges_nothing():
    """Its clients still reach it, and it still believes it leads until it hears otherwise; but its high
    watermark cannot move without its followers and it cannot shrink the ISR without the controller."""
    sim = Simulation(3, nodes=3, partitions=1)
    sim.produce(0)
    sim.until(lambda: sim.acked == [(0, 0)])
    sim.cut(1)
    hw_at_cut = sim.replica(1).high_watermark
    for _ in range(40):
        sim.produce(0)
        sim.advance(50)
    assert sim.leader(0) in (2, 3)  # elected when node 1's session ended
    assert sim.acked_by[1:] and 1 not in sim.acked_by[1:]  # the new leader acknowledged; node 1 never again
    assert sim.replica(1).high_watermark == hw_at_cut
    sim.heal()
    sim.settle()
    assert sim.converged()


def test_a_node_back_on_an_empty_disk_catches_up_and_is_never_elected_empty():
    sim = Simulation(4, nodes=3, partitions=1)
    for _ in range(30):
        sim.produce(0)
        sim.advance(5)
    sim.until(lambda: len(sim.acked) == 30)
    sim.crash(3)
    sim.restart(3, wipe=True)
    sim.until(lambda: sim.nodes[3].version >= 0 and 0 in sim.nodes[3].logs)
    assert 3 not in sim.controller.topics["t"]["partitions"][0]["isr"]  # it left the ISR on its new disk
    sim.until(lambda: 3 in sim.controller.topics["t"]["partitions"][0]["isr"])
    assert sim.log(3).next_offset == 30  # let back in only once caught up
    assert sim.converged()
