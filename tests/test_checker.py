"""Tests of the fault harness's history recorder and checker, with synthetic histories.

Each anomaly has a hand-written history asserting exact counts of every anomaly; a simulated
log generates random valid histories that must check clean, and the same simulation with one
injected fault of a random kind must be caught.
"""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import ANOMALIES, History, check

T = "t"
G = "g"


class StepClock:
    """A clock that advances 1 ms per reading, so synthetic events have distinct times."""

    def __init__(self) -> None:
        self.now_ms = 0

    def __call__(self) -> int:
        self.now_ms += 1
        return self.now_ms


def send(h: History, process: str, value: bytes, partition: int, offset: int | None = None,
         outcome: str = "ok") -> int:
    op = h.invoke(process, "send", topic=T, partition=partition, value=value)
    if outcome == "ok":
        h.ok(op, offset=offset)
    elif outcome == "fail":
        h.fail(op, error="not leader")
    elif outcome == "unknown":
        h.unknown(op, error="timeout")
    return op


def poll(h: History, process: str, partition: int, offset: int, value: bytes,
         group: str | None = G) -> None:
    h.record(process, "poll", topic=T, partition=partition, offset=offset, value=value,
             group=group, member=process)


def commit(h: History, process: str, partition: int, offset: int, epoch: int | None) -> None:
    op = h.invoke(process, "commit", group=G, topic=T, partition=partition, offset=offset,
                  member=process, epoch=epoch)
    h.ok(op)


def assign(h: History, process: str, partition: int, epoch: int) -> None:
    h.record(process, "assign", group=G, topic=T, partition=partition, member=process, epoch=epoch)


def revoke(h: History, process: str, partition: int | None, epoch: int) -> None:
    h.record(process, "revoke", group=G, topic=T, partition=partition, member=process, epoch=epoch)


def assert_counts(report, **expected: int) -> None:
    assert set(expected) <= set(ANOMALIES)
    want = {a: expected.get(a, 0) for a in ANOMALIES}
    assert dict(report.counts) == want, report.table()


def clean_scenario() -> tuple[History, list[tuple]]:
    """Two partitions, two producers, a consumer group with one hand-over; no anomalies."""
    h = History(clock_ms=StepClock())
    send(h, "producer-1", b"a", 0, 0)
    send(h, "producer-1", b"b", 0, 1)
    send(h, "producer-2", b"d", 1, 0)
    send(h, "producer-1", b"c", 0, 2)
    send(h, "producer-2", b"x", 1, outcome="fail")  # definitely not written
    send(h, "producer-2", b"y", 1, outcome="unknown")  # not written: fine
    send(h, "producer-2", b"z", 1, outcome="unknown")  # written: also fine
    assign(h, "consumer-1", 0, epoch=1)
    poll(h, "consumer-1", 0, 0, b"a")
    poll(h, "consumer-1", 0, 1, b"b")
    commit(h, "consumer-1", 0, 2, epoch=1)
    revoke(h, "consumer-1", 0, epoch=2)
    assign(h, "consumer-2", 0, epoch=2)
    poll(h, "consumer-2", 0, 2, b"c")
    commit(h, "consumer-2", 0, 3, epoch=2)
    assign(h, "consumer-2", 1, epoch=3)
    poll(h, "consumer-2", 1, 0, b"d")
    poll(h, "consumer-2", 1, 1, b"z")
    commit(h, "consumer-2", 1, 2, epoch=3)
    drain = [(T, 0, 0, b"a"), (T, 0, 1, b"b"), (T, 0, 2, b"c"), (T, 1, 0, b"d"), (T, 1, 1, b"z")]
    return h, drain


# --- clean histories -------------------------------------------------------------------------


def test_clean_history_has_no_anomalies():
    h, drain = clean_scenario()
    report = check(h, drain)
    assert_counts(report)
    assert report.ok and report.drain_checked
    assert "OK" in report.table()


def test_without_a_drain_drain_anomalies_are_skipped():
    h, _drain = clean_scenario()
    send(h, "producer-3", b"e", 0, 3)  # would be lost, but there is no drain to tell
    report = check(h)
    assert_counts(report)
    assert not report.drain_checked


def test_drain_recorded_in_the_history_is_used():
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 0, 3)
    h.record_drain(drain)
    assert_counts(check(h), lost=1, unseen=1)


def test_empty_recorded_drain_is_still_a_drain():
    h = History(clock_ms=StepClock())
    send(h, "producer-1", b"a", 0, 0)
    h.record_drain([])
    report = check(h)
    assert report.drain_checked
    assert_counts(report, lost=1, unseen=1)


def test_str_and_bytes_values_compare_equal():
    h = History(clock_ms=StepClock())
    send(h, "producer-1", "a", 0, 0)
    poll(h, "consumer-1", 0, 0, b"a", group=None)
    assert_counts(check(h, [(T, 0, 0, b"a")]))


def test_sends_never_completed_count_as_unknown():
    h = History(clock_ms=StepClock())
    h.invoke("producer-1", "send", topic=T, partition=0, value=b"a")
    h.invoke("producer-1", "send", topic=T, partition=0, value=b"b")
    assert_counts(check(h, [(T, 0, 0, b"a")]))


# --- one test per anomaly --------------------------------------------------------------------


def test_lost_and_unseen_when_an_acked_record_is_missing():
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 0, 3)
    assert_counts(check(h, drain), lost=1, unseen=1)


def test_lost_but_not_unseen_when_an_acked_record_is_at_another_offset():
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 1, 7)
    assert_counts(check(h, drain + [(T, 1, 2, b"e")]), lost=1)


def test_acked_records_below_the_log_start_are_not_lost():
    h = History(clock_ms=StepClock())
    for i in range(4):
        send(h, "producer-1", b"v%d" % i, 0, i)
    drain = [(T, 0, 2, b"v2"), (T, 0, 3, b"v3")]
    assert_counts(check(h, drain, log_start={(T, 0): 2}))
    assert_counts(check(h, drain), lost=2, unseen=2, drain_gaps=1)


def test_unseen_for_an_ack_without_offset():
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 0, offset=None)
    assert_counts(check(h, drain), unseen=1)


def test_duplicates():
    h, drain = clean_scenario()
    assert_counts(check(h, drain + [(T, 0, 3, b"c"), (T, 0, 4, b"a"), (T, 0, 5, b"a")]),
                  duplicates=2)


def test_inconsistent_offsets_between_poll_and_drain():
    h, drain = clean_scenario()
    poll(h, "consumer-2", 1, 1, b"other", group="audit")  # a read the log did not keep, too
    assert_counts(check(h, drain), inconsistent_offsets=1, phantom_reads=1)


def test_inconsistent_offsets_when_an_ack_names_an_occupied_offset():
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 0, 1)  # offset 1 holds b"b"
    assert_counts(check(h, drain), inconsistent_offsets=1, lost=1, unseen=1)


def test_reordered_sends_of_one_producer():
    h, drain = clean_scenario()
    e = h.invoke("producer-3", "send", topic=T, partition=1, value=b"e")
    f = h.invoke("producer-3", "send", topic=T, partition=1, value=b"f")
    h.ok(f, offset=2)
    h.ok(e, offset=3)
    assert_counts(check(h, drain + [(T, 1, 2, b"f"), (T, 1, 3, b"e")]), reordered=1)


def test_different_producers_may_interleave_in_any_order():
    h, drain = clean_scenario()
    e = h.invoke("producer-3", "send", topic=T, partition=1, value=b"e")
    f = h.invoke("producer-4", "send", topic=T, partition=1, value=b"f")
    h.ok(f, offset=2)
    h.ok(e, offset=3)
    assert_counts(check(h, drain + [(T, 1, 2, b"f"), (T, 1, 3, b"e")]))


def test_drain_gaps():
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 1, 3)
    send(h, "producer-3", b"f", 1, 6)
    assert_counts(check(h, drain + [(T, 1, 3, b"e"), (T, 1, 6, b"f")]), drain_gaps=2)


def test_drain_starting_late_is_a_gap_unless_it_is_the_log_start():
    h = History(clock_ms=StepClock())
    drain = [(T, 0, 5, b"q")]
    assert_counts(check(h, drain), drain_gaps=1)
    assert_counts(check(h, drain, log_start={(T, 0): 5}))


def test_poll_skips():
    h, drain = clean_scenario()
    send(h, "producer-2", b"e", 1, 2)
    send(h, "producer-2", b"f", 1, 3)
    poll(h, "consumer-2", 1, 3, b"f")  # last polled 1; offset 2 exists
    assert_counts(check(h, drain + [(T, 1, 2, b"e"), (T, 1, 3, b"f")]), poll_skips=1)


def test_poll_jumps_are_fine_across_ownerships_holes_and_rewinds():
    h = History(clock_ms=StepClock())
    drain = [(T, 0, o, b"v%d" % o) for o in (0, 1, 2, 3, 5, 6, 7)]
    assign(h, "consumer-1", 0, epoch=1)
    poll(h, "consumer-1", 0, 0, b"v0", group=None)
    revoke(h, "consumer-1", 0, epoch=2)
    assign(h, "consumer-1", 0, epoch=3)
    poll(h, "consumer-1", 0, 2, b"v2", group=None)  # new ownership: starts where it likes
    poll(h, "consumer-1", 0, 3, b"v3", group=None)
    poll(h, "consumer-1", 0, 5, b"v5", group=None)  # offset 4 does not exist
    poll(h, "consumer-1", 0, 1, b"v1", group=None)  # rewind (seek)
    h.record("coordinator", "revoke", group=G, member="consumer-1", reason="evicted")
    poll(h, "consumer-1", 0, 7, b"v7", group=None)  # after an eviction of its member
    # The hole at offset 4 is the drain's anomaly, not the consumer's.
    assert_counts(check(h, drain), drain_gaps=1)


def test_committed_regression():
    h, drain = clean_scenario()
    commit(h, "consumer-2", 1, 1, epoch=3)
    commit(h, "consumer-2", 1, 0, epoch=3)
    assert_counts(check(h, drain), committed_regression=2)


def test_commit_regression_allowed_after_reset_and_between_concurrent_commits():
    h, drain = clean_scenario()
    h.record("admin", "reset", group=G, topic=T, partition=1, offset=0)
    commit(h, "consumer-2", 1, 0, epoch=3)
    fields = dict(group=G, topic=T, partition=1, member="consumer-2", epoch=3)
    a = h.invoke("consumer-2", "commit", offset=2, **fields)
    b = h.invoke("consumer-2", "commit", offset=1, **fields)
    h.ok(a)
    h.ok(b)  # concurrent with a: the server may have applied b first
    assert_counts(check(h, drain))


def test_stale_epoch_commit_by_a_revoked_member():
    h, drain = clean_scenario()
    commit(h, "consumer-1", 0, 3, epoch=1)  # revoked at epoch 2
    assert_counts(check(h, drain), stale_epoch_commit_accepted=1)


def test_stale_epoch_commit_with_an_epoch_older_than_the_assignment():
    h, drain = clean_scenario()
    commit(h, "consumer-2", 1, 2, epoch=1)  # owns partition 1 since epoch 3
    assert_counts(check(h, drain), stale_epoch_commit_accepted=1)


def test_commit_in_flight_across_a_revoke_is_not_stale():
    h = History(clock_ms=StepClock())
    assign(h, "consumer-1", 0, epoch=1)
    op = h.invoke("consumer-1", "commit", group=G, topic=T, partition=0, offset=0,
                  member="consumer-1", epoch=1)
    revoke(h, "consumer-1", 0, epoch=2)
    h.ok(op)
    assert_counts(check(h, []))


def test_commits_without_group_assignments_are_not_fenced():
    h = History(clock_ms=StepClock())
    commit(h, "consumer-1", 0, 0, epoch=None)
    assert_counts(check(h, []))


def test_double_ownership():
    h, drain = clean_scenario()
    assign(h, "consumer-3", 1, epoch=4)  # consumer-2 still owns partition 1
    assign(h, "consumer-1", 1, epoch=5)
    revoke(h, "consumer-2", 1, epoch=6)
    # Three members overlap pairwise.
    assert_counts(check(h, drain), double_ownership=3)


def test_eviction_ends_ownership():
    h, drain = clean_scenario()
    h.record("coordinator", "revoke", group=G, member="consumer-2", epoch=4, reason="evicted")
    assign(h, "consumer-3", 0, epoch=4)
    assign(h, "consumer-3", 1, epoch=4)
    commit(h, "consumer-3", 1, 2, epoch=4)
    assert_counts(check(h, drain))


def lost(h: History, process: str, partition: int | None) -> None:
    """The member learned, late, that it had been evicted (on_lost after a freeze)."""
    h.record(process, "revoke", group=G, topic=T, partition=partition, member=process, lost=True)


def frozen_handover(h: History) -> None:
    """consumer-1 reads partition 0 and freezes; its session runs out and consumer-2 gets it."""
    send(h, "producer-1", b"a", 0, 0)
    send(h, "producer-1", b"b", 0, 1)
    assign(h, "consumer-1", 0, epoch=1)
    poll(h, "consumer-1", 0, 0, b"a")
    commit(h, "consumer-1", 0, 1, epoch=1)
    # ... frozen here; evicted; the partition moves on:
    assign(h, "consumer-2", 0, epoch=2)
    poll(h, "consumer-2", 0, 1, b"b")
    commit(h, "consumer-2", 0, 2, epoch=2)


DRAIN_AB = [(T, 0, 0, b"a"), (T, 0, 1, b"b")]


def test_a_member_that_learns_late_it_was_evicted_did_not_own_while_frozen():
    h = History(clock_ms=StepClock())
    frozen_handover(h)
    lost(h, "consumer-1", 0)  # resumed: its first poll waited for a heartbeat and dropped it all
    assert_counts(check(h, DRAIN_AB))
    # A plain revoke at the same moment would claim it owned the partition all along.
    h = History(clock_ms=StepClock())
    frozen_handover(h)
    revoke(h, "consumer-1", 0, epoch=1)
    assert_counts(check(h, DRAIN_AB), double_ownership=1)


def test_a_lost_member_that_read_after_the_handover_owned_it_twice():
    h = History(clock_ms=StepClock())
    frozen_handover(h)
    poll(h, "consumer-1", 0, 1, b"b")  # resumed and read before it learned it was evicted
    lost(h, "consumer-1", 0)
    assert_counts(check(h, DRAIN_AB), double_ownership=1)


def test_a_poll_spans_its_call_so_a_freeze_before_recording_it_is_no_double_ownership():
    h = History(clock_ms=StepClock())
    send(h, "producer-1", b"a", 0, 0)
    assign(h, "consumer-1", 0, epoch=1)
    op = h.invoke("consumer-1", "poll", group=G, topic=T, partition=0, offset=0, value=b"a",
                  member="consumer-1")
    assign(h, "consumer-2", 0, epoch=2)  # while consumer-1 was frozen inside poll()
    h.ok(op)
    lost(h, "consumer-1", 0)
    assert_counts(check(h, [(T, 0, 0, b"a")]))


def test_a_commit_in_flight_across_a_freeze_is_not_stale():
    h = History(clock_ms=StepClock())
    send(h, "producer-1", b"a", 0, 0)
    assign(h, "consumer-1", 0, epoch=1)
    poll(h, "consumer-1", 0, 0, b"a")
    op = h.invoke("consumer-1", "commit", group=G, topic=T, partition=0, offset=1,
                  member="consumer-1", epoch=1)
    assign(h, "consumer-2", 0, epoch=2)  # frozen with the commit sent; the reply came after
    h.ok(op)
    lost(h, "consumer-1", 0)
    assert_counts(check(h, [(T, 0, 0, b"a")]))


def test_a_zombie_commit_sent_after_the_handover_is_stale():
    h = History(clock_ms=StepClock())
    frozen_handover(h)
    commit(h, "consumer-1", 0, 1, epoch=1)  # resumed and committed before learning; accepted
    lost(h, "consumer-1", 0)
    # Its own view still held the partition, but consumer-2 had been given it: stale. The
    # accepted commit made it act as owner alongside consumer-2, and moved the offset back.
    assert_counts(check(h, DRAIN_AB), stale_epoch_commit_accepted=1, double_ownership=1,
                  committed_regression=1)


def test_observed_committed_offsets_are_judged_for_regression_and_delivery_not_epochs():
    h, drain = clean_scenario()
    h.record("final", "commit", group=G, topic=T, partition=0, offset=3, observed=True)
    h.record("final", "commit", group=G, topic=T, partition=1, offset=2, observed=True)
    assert_counts(check(h, drain))
    h.record("final", "commit", group=G, topic=T, partition=0, offset=2, observed=True)
    assert_counts(check(h, drain), committed_regression=1)
    h, drain = clean_scenario()
    send(h, "producer-1", b"e", 0, 3)
    h.record("final", "commit", group=G, topic=T, partition=0, offset=4, observed=True)
    assert_counts(check(h, drain + [(T, 0, 3, b"e")]), undelivered_below_commit=1)


def test_undelivered_below_commit():
    h, drain = clean_scenario()
    send(h, "producer-1", b"e", 0, 3)
    send(h, "producer-1", b"f", 0, 4)
    commit(h, "consumer-2", 0, 5, epoch=2)
    assert_counts(check(h, drain + [(T, 0, 3, b"e"), (T, 0, 4, b"f")]),
                  undelivered_below_commit=2)


def test_undelivered_below_commit_exempts_records_below_a_reset():
    h, drain = clean_scenario()
    send(h, "producer-1", b"e", 0, 3)
    send(h, "producer-1", b"f", 0, 4)
    h.record("admin", "reset", group=G, topic=T, partition=0, offset=5)
    commit(h, "consumer-2", 0, 5, epoch=2)
    assert_counts(check(h, drain + [(T, 0, 3, b"e"), (T, 0, 4, b"f")]))


def test_failed_but_present():
    h, drain = clean_scenario()
    assert_counts(check(h, drain + [(T, 1, 2, b"x")]), failed_but_present=1)


def test_failed_then_retried_value_is_not_failed_but_present():
    h, drain = clean_scenario()
    send(h, "producer-2", b"x", 1, 2)  # the retry of the failed send succeeded
    assert_counts(check(h, drain + [(T, 1, 2, b"x")]))


# --- recorder ----------------------------------------------------------------------------------


def reader_poll(h: History, partition: int, offset: int, value: bytes, process: str = "reader") -> None:
    """One record read during the run by a consumer outside any group (workload.ReaderWorker)."""
    h.record(process, "poll", topic=T, partition=partition, offset=offset, value=value)


def hw(h: History, partition: int, offset: int, process: str = "monitor", node: int | None = None) -> int:
    """An observed high watermark, invoked and answered (workload.HighWatermarkMonitor)."""
    op = h.invoke(process, "hw", topic=T, partition=partition, node=node)
    h.ok(op, offset=offset)
    return op


def replica(h: History, partition: int, node: int, below: int, digest: str, end: int | None = None) -> None:
    h.record("replicas", "replica", topic=T, partition=partition, offset=below, node=node, digest=digest,
             end=below if end is None else end)


def test_phantom_read_of_a_record_the_drain_does_not_hold():
    h, drain = clean_scenario()
    for offset, value in enumerate((b"a", b"b", b"c")):  # confirmed by the drain
        reader_poll(h, 0, offset, value)
    reader_poll(h, 0, 3, b"uncommitted")  # read past the high watermark, then truncated: nothing there
    reader_poll(h, 1, 1, b"z")
    assert_counts(check(h, drain), phantom_reads=1)


def test_phantom_read_overwritten_in_the_drain_is_also_an_inconsistent_offset():
    h, drain = clean_scenario()
    reader_poll(h, 0, 3, b"old-leader-tail")
    send(h, "producer-1", b"e", 0, 3)  # the new leader's record at that offset
    assert_counts(check(h, drain + [(T, 0, 3, b"e")]), phantom_reads=1, inconsistent_offsets=1)


def test_phantom_reads_count_each_value_read_once_however_often_it_was_read():
    h, drain = clean_scenario()
    for _ in range(3):
        reader_poll(h, 0, 3, b"gone")
    reader_poll(h, 0, 3, b"gone", process="reader-2")
    assert_counts(check(h, drain), phantom_reads=1)


def test_without_a_drain_a_later_read_of_another_value_judges_a_phantom_read():
    h = History(clock_ms=StepClock())
    reader_poll(h, 0, 5, b"first")
    reader_poll(h, 0, 5, b"first")  # the same again: fine
    reader_poll(h, 0, 5, b"second")
    assert_counts(check(h), phantom_reads=1, inconsistent_offsets=1)


def test_reads_below_the_log_start_are_judged_by_later_reads_only():
    h = History(clock_ms=StepClock())
    reader_poll(h, 0, 0, b"v0")
    reader_poll(h, 0, 1, b"v1")
    drain = [(T, 0, 2, b"v2")]
    assert_counts(check(h, drain, log_start={(T, 0): 2}))  # gone by retention, not phantoms
    reader_poll(h, 0, 1, b"other")
    assert_counts(check(h, drain, log_start={(T, 0): 2}), phantom_reads=1, inconsistent_offsets=1)


def test_concurrent_reads_of_different_values_without_a_drain_are_not_judged_by_each_other():
    h = History(clock_ms=StepClock())
    a = h.invoke("reader", "poll", topic=T, partition=0)
    reader_poll(h, 0, 0, b"x", process="reader-2")
    h.ok(a, offset=0, value=b"y")  # invoked before the other completed: neither read is later
    assert_counts(check(h), inconsistent_offsets=1)


def test_hw_regression():
    h = History(clock_ms=StepClock())
    hw(h, 0, 10, node=1)
    hw(h, 0, 12, node=1)
    hw(h, 1, 3, node=2)  # another partition: its own
    hw(h, 0, 11, process="monitor-2", node=3)  # a new leader that knows less
    hw(h, 0, 11, node=3)  # the same stale answer again: one regression
    hw(h, 0, 9, node=3)  # lower still: another
    report = check(h)
    assert_counts(report, hw_regressions=2)
    assert "node 3" in report.examples["hw_regressions"][0]


def test_hw_observations_that_overlap_may_be_answered_in_either_order():
    h = History(clock_ms=StepClock())
    slow = h.invoke("monitor", "hw", topic=T, partition=0)
    hw(h, 0, 20, process="monitor-2")
    h.ok(slow, offset=15)  # invoked before the higher one completed: answered first, delivered late
    assert_counts(check(h))
    hw(h, 0, 19)
    assert_counts(check(h), hw_regressions=1)


def test_unknown_and_refused_hw_observations_are_ignored():
    h = History(clock_ms=StepClock())
    hw(h, 0, 10)
    refused = h.invoke("monitor", "hw", topic=T, partition=0)
    h.fail(refused, error="OFFSET_NOT_AVAILABLE")
    h.invoke("monitor", "hw", topic=T, partition=0)  # never answered
    hw(h, 0, -1)  # "not known yet", as a fetch reports it
    assert_counts(check(h))


def test_replica_divergence():
    h = History(clock_ms=StepClock())
    for node in (1, 2, 3):
        replica(h, 0, node, 100, "aaaa")  # the same bytes below the high watermark
    replica(h, 1, 1, 50, "bbbb")
    replica(h, 1, 2, 50, "cccc")  # differs
    replica(h, 1, 3, 50, "bbbb")
    replica(h, 2, 1, 70, "dddd")
    replica(h, 2, 2, 70, "eeee", end=60)  # lacks committed records
    report = check(h)
    assert_counts(report, replica_divergence=2)
    assert report.examples["replica_divergence"][0].startswith("t/1 below 50: node 1 bbbb")


def test_replicas_equal_below_the_high_watermark_are_no_divergence_whatever_their_number():
    h = History(clock_ms=StepClock())
    replica(h, 0, 1, 0, "e3b0c442")  # an empty partition
    replica(h, 0, 2, 0, "e3b0c442")
    replica(h, 1, 3, 9, "ffff")  # one replica alone
    assert_counts(check(h))


def test_save_load_round_trip(tmp_path):
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 0, 3)  # lost
    h.invoke("producer-3", "send", topic=T, partition=0, value="still in flight")
    h.record("consumer-1", "poll", topic=T, partition=0, offset=0, value=b"a", group=G,
             headers={"k": b"\x00\xff"}, note=[1, "two"])
    h.record_drain(drain)
    path = tmp_path / "history.jsonl"
    h.save(path)
    loaded = History.load(path)
    assert loaded.events() == h.events()
    assert loaded.open_ops() == h.open_ops()
    assert check(loaded) == check(h)
    assert_counts(check(loaded), lost=1, unseen=1)
    # A loaded history can keep recording without reusing op ids.
    op = loaded.invoke("producer-9", "send", topic=T, partition=0, value=b"new")
    assert op > max(e.op_id for e in h.events())


def test_completions_must_match_an_open_invoke():
    h = History(clock_ms=StepClock())
    op = h.invoke("producer-1", "send", topic=T, partition=0, value=b"a")
    h.ok(op, offset=0)
    with pytest.raises(KeyError):
        h.ok(op, offset=0)
    with pytest.raises(KeyError):
        h.fail(12345)
    with pytest.raises(ValueError):
        h.invoke("producer-1", "frobnicate")
    with pytest.raises(ValueError):
        h.record("producer-1", "poll", type="invoke")
    with pytest.raises(ValueError):
        h.record("producer-1", "poll", index=3)


def test_concurrent_recording_keeps_every_event():
    h = History()
    threads_n, ops_n = 8, 500

    def client(i: int) -> None:
        for j in range(ops_n):
            op = h.invoke(f"producer-{i}", "send", topic=T, partition=i, value=b"%d-%d" % (i, j))
            h.ok(op, offset=j)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = h.events()
    assert [e.index for e in events] == list(range(2 * threads_n * ops_n))
    assert len({e.op_id for e in events}) == threads_n * ops_n
    drain = [(T, i, j, b"%d-%d" % (i, j)) for i in range(threads_n) for j in range(ops_n)]
    assert_counts(check(h, drain))


def test_table_lists_every_anomaly():
    h, drain = clean_scenario()
    send(h, "producer-3", b"e", 0, 3)
    table = check(h, drain).table()
    lines = table.splitlines()
    assert lines[0].split("|")[0].strip() == "anomaly"
    for a in ANOMALIES:
        assert any(line.startswith(a + " ") for line in lines)
    assert "ANOMALIES FOUND" in lines[-1]
    lost_line = next(line for line in lines if line.startswith("lost "))
    assert [c.strip() for c in lost_line.split("|")][1] == "1"


# --- simulated log: random valid histories, with and without one injected fault ---------------

PRODUCERS = ("producer-0", "producer-1")
MEMBERS = ("consumer-0", "consumer-1", "consumer-2")
FAULTY = "producer-fault"  # sends made by an injected fault use their own producer


class Sim:
    """A tiny correct log + group coordinator driving a History; `inject(kind)` misbehaves once.

    Records are appended when a send is invoked (the server got it), acks arrive later and in
    any order; consumers poll from their position and commit it under their member epoch.
    """

    def __init__(self, seed: int, partitions_n: int):
        self.rng = random.Random(seed)
        self.now_ms = 0
        self.h = History(clock_ms=lambda: self.now_ms)
        self.partitions = list(range(partitions_n))
        self.log: dict[int, list] = {p: [] for p in self.partitions}  # None marks a hole
        self.owner: dict[int, str | None] = {p: None for p in self.partitions}
        self.member_epoch: dict[str, int] = {}
        self.group_epoch = 0
        self.position: dict[tuple[str, int], int] = {}  # (member, partition) -> next offset
        self.committed = {p: 0 for p in self.partitions}
        self.inflight: dict[str, list] = {p: [] for p in PRODUCERS}
        self.values_n = 0
        self.late: list[tuple[str, int]] = []  # (member, partition) evicted, not yet told
        self.diverged: set[int] = set()  # partitions whose second replica ends up differing

    def value(self) -> bytes:
        self.values_n += 1
        return b"v%d" % self.values_n

    # Correct behaviour ------------------------------------------------------------------------

    def send_invoke(self, producer: str) -> None:
        if len(self.inflight[producer]) >= 3:
            return
        p = self.rng.choice(self.partitions)
        v = self.value()
        op = self.h.invoke(producer, "send", topic=T, partition=p, value=v)
        outcome = self.rng.choices(["ok", "fail", "unknown"], [8, 1, 1])[0]
        written = outcome == "ok" or (outcome == "unknown" and self.rng.random() < 0.5)
        offset = None
        if written:
            offset = len(self.log[p])
            self.log[p].append(v)
        self.inflight[producer].append((op, outcome, offset))

    def send_complete(self, producer: str) -> None:
        if not self.inflight[producer]:
            return
        op, outcome, offset = self.inflight[producer].pop(
            self.rng.randrange(len(self.inflight[producer])))
        if outcome == "ok":
            self.h.ok(op, offset=offset)
        elif outcome == "fail":
            self.h.fail(op)
        else:
            self.h.unknown(op)

    def rebalance(self, p: int, new: str | None = None) -> str:
        old = self.owner[p]
        if new is None:
            new = self.rng.choice([m for m in MEMBERS if m != old])
        self.group_epoch += 1
        if old is not None:
            self.h.record(old, "revoke", group=G, topic=T, partition=p, member=old,
                          epoch=self.group_epoch)
            self.position.pop((old, p), None)
        self.assign(p, new)
        return new

    def assign(self, p: int, member: str) -> None:
        if (member, p) in self.late:  # it learns of its loss before it can be given p again
            self.tell_late(self.late.index((member, p)))
        self.h.record(member, "assign", group=G, topic=T, partition=p, member=member,
                      epoch=self.group_epoch)
        self.member_epoch[member] = self.group_epoch
        self.owner[p] = member
        self.position[(member, p)] = self.committed[p]

    def evict(self, member: str) -> None:
        if any(m == member for m, _ in self.late):
            return  # gone already, it just does not know yet
        self.group_epoch += 1
        # Either the coordinator's eviction is recorded, or the member (frozen meanwhile, so it
        # neither polls nor commits) records the loss itself, later.
        told_late = self.rng.random() < 0.5
        if not told_late:
            self.h.record("coordinator", "revoke", group=G, member=member, epoch=self.group_epoch,
                          reason="evicted")
        for p in self.partitions:
            if self.owner[p] == member:
                self.owner[p] = None
                self.position.pop((member, p), None)
                if told_late:
                    self.late.append((member, p))

    def tell_late(self, index: int) -> None:
        member, p = self.late.pop(index)
        self.h.record(member, "revoke", group=G, topic=T, partition=p, member=member, lost=True)

    def poll(self, p: int, n: int) -> None:
        m = self.owner[p]
        if m is None:
            return
        pos = self.position[(m, p)]
        while n > 0 and pos < len(self.log[p]):
            v = self.log[p][pos]
            if v is not None:
                self.record_poll(m, p, pos, v)
                n -= 1
            pos += 1
        self.position[(m, p)] = pos

    def record_poll(self, m: str, p: int, offset: int, v: bytes) -> None:
        self.h.record(m, "poll", group=G, topic=T, partition=p, offset=offset, value=v, member=m,
                      epoch=self.member_epoch[m])

    def commit(self, p: int, member: str | None = None, offset: int | None = None,
               epoch: int | None = None) -> None:
        m = member or self.owner[p]
        if m is None:
            return
        offset = self.position[(m, p)] if offset is None else offset
        epoch = self.member_epoch[m] if epoch is None else epoch
        op = self.h.invoke(m, "commit", group=G, topic=T, partition=p, offset=offset, member=m,
                           epoch=epoch)
        self.h.ok(op)
        self.committed[p] = offset

    def step(self) -> None:
        self.now_ms += self.rng.choice([0, 0, 1, 2])  # equal times exercise the index tie-break
        r = self.rng.random()
        p = self.rng.choice(self.partitions)
        if r < 0.30:
            self.send_invoke(self.rng.choice(PRODUCERS))
        elif r < 0.55:
            self.send_complete(self.rng.choice(PRODUCERS))
        elif r < 0.62:
            self.rebalance(p)
        elif r < 0.65:
            self.evict(self.rng.choice(MEMBERS))
        elif r < 0.67 and self.late:
            self.tell_late(self.rng.randrange(len(self.late)))
        elif r < 0.85:
            self.poll(p, self.rng.randint(1, 3))
        else:
            self.commit(p)
        if self.rng.random() < 0.1:
            self.observe_hw(p)

    def observe_hw(self, p: int, offset: int | None = None) -> None:
        """A monitor reads the partition's end offset (here its log's length, which only grows)."""
        op = self.h.invoke("monitor", "hw", topic=T, partition=p)
        self.now_ms += self.rng.choice([0, 1])
        self.h.ok(op, offset=len(self.log[p]) if offset is None else offset)

    def finish(self) -> list[tuple]:
        while self.late:
            self.tell_late(0)
        for producer in PRODUCERS:
            while self.inflight[producer]:
                self.send_complete(producer)
        for p in self.partitions:  # two replicas of each partition, read at the end
            digest = repr(self.log[p])
            for node in (1, 2):
                if node == 2 and p in self.diverged:
                    digest += "!"
                self.h.record("replicas", "replica", topic=T, partition=p, offset=len(self.log[p]), node=node,
                              digest=digest, end=len(self.log[p]))
        return [(T, p, o, v) for p in self.partitions for o, v in enumerate(self.log[p])
                if v is not None]

    # Faults -----------------------------------------------------------------------------------

    def acked_send(self, p: int) -> int:
        v = self.value()
        op = self.h.invoke(FAULTY, "send", topic=T, partition=p, value=v)
        offset = len(self.log[p])
        self.log[p].append(v)
        self.h.ok(op, offset=offset)
        return offset

    def owned(self, p: int) -> str:
        return self.owner[p] or self.rebalance(p)

    def inject(self, kind: str) -> None:
        p = self.rng.choice(self.partitions)
        if kind in ("lost", "unseen"):
            op = self.h.invoke(FAULTY, "send", topic=T, partition=p, value=self.value())
            self.h.ok(op, offset=len(self.log[p]))  # acked, never written
        elif kind == "duplicates":
            v = self.value()
            op = self.h.invoke(FAULTY, "send", topic=T, partition=p, value=v)
            self.log[p] += [v, v]  # a retry written twice
            self.h.ok(op, offset=len(self.log[p]) - 2)
        elif kind == "inconsistent_offsets":
            if not [v for v in self.log[p] if v is not None]:
                self.acked_send(p)
            o = next(o for o, v in enumerate(self.log[p]) if v is not None)
            self.h.record("consumer-rogue", "poll", group="rogue", topic=T, partition=p, offset=o,
                          value=b"garbage")
        elif kind == "reordered":
            a = self.h.invoke(FAULTY, "send", topic=T, partition=p, value=self.value())
            b = self.h.invoke(FAULTY, "send", topic=T, partition=p, value=self.value())
            ev = {e.op_id: e.value for e in self.h.events() if e.op_id in (a, b)}
            self.log[p] += [ev[b], ev[a]]
            self.h.ok(a, offset=len(self.log[p]) - 1)
            self.h.ok(b, offset=len(self.log[p]) - 2)
        elif kind == "drain_gaps":
            self.log[p].append(None)  # an offset assigned but never written
            self.acked_send(p)
        elif kind == "poll_skips":
            m = self.owned(p)
            pos = self.position[(m, p)]
            while len(self.log[p]) < pos + 3:
                self.acked_send(p)
            self.record_poll(m, p, pos, self.log[p][pos])
            self.record_poll(m, p, pos + 2, self.log[p][pos + 2])  # skips pos + 1
            self.position[(m, p)] = pos + 3
        elif kind == "committed_regression":
            m = self.owned(p)
            if self.position[(m, p)] == 0:
                self.acked_send(p)
                self.poll(p, 1)
            high = self.position[(m, p)]
            self.commit(p, offset=high)
            self.commit(p, offset=high - 1)
        elif kind == "stale_epoch_commit_accepted":
            m = self.owned(p)
            stale_epoch = self.member_epoch[m]
            self.rebalance(p)
            self.commit(p, member=m, offset=self.committed[p], epoch=stale_epoch)
        elif kind == "double_ownership":
            old = self.owned(p)
            new = self.rng.choice([m for m in MEMBERS if m != old])
            self.group_epoch += 1
            self.assign(p, new)  # before the old owner gave it up
            self.now_ms += 1
            self.h.record(old, "revoke", group=G, topic=T, partition=p, member=old,
                          epoch=self.group_epoch)
            self.position.pop((old, p), None)
        elif kind == "undelivered_below_commit":
            m = self.owned(p)
            self.acked_send(p)
            end = len(self.log[p])
            self.commit(p, offset=end)  # commits past a record nobody polled
            self.position[(m, p)] = end
        elif kind == "failed_but_present":
            v = self.value()
            op = self.h.invoke(FAULTY, "send", topic=T, partition=p, value=v)
            self.log[p].append(v)
            self.h.fail(op)
        elif kind == "phantom_reads":
            # Read past the end of what the log keeps (an uncommitted record, truncated later).
            self.h.record("reader-rogue", "poll", topic=T, partition=p, offset=len(self.log[p]) + 5,
                          value=self.value())
        elif kind == "hw_regressions":
            self.observe_hw(p, len(self.log[p]) + 1)
            self.observe_hw(p)
        elif kind == "replica_divergence":
            self.diverged.add(p)
        else:
            raise AssertionError(kind)


def simulate(seed: int, partitions_n: int, steps_n: int, fault: str | None = None,
             fault_step: int = 0) -> tuple[History, list[tuple]]:
    sim = Sim(seed, partitions_n)
    for i in range(steps_n):
        if fault is not None and i == fault_step:
            sim.inject(fault)
        sim.step()
    if fault is not None and fault_step >= steps_n:
        sim.inject(fault)
    return sim.h, sim.finish()


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), partitions_n=st.integers(1, 3),
       steps_n=st.integers(0, 200))
def test_random_valid_histories_check_clean(seed, partitions_n, steps_n):
    h, drain = simulate(seed, partitions_n, steps_n)
    assert_counts(check(h, drain))


@settings(max_examples=500, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), partitions_n=st.integers(1, 3),
       steps_n=st.integers(0, 200), fault=st.sampled_from(ANOMALIES), where=st.floats(0, 1))
def test_one_injected_fault_is_always_caught(seed, partitions_n, steps_n, fault, where):
    h, drain = simulate(seed, partitions_n, steps_n, fault, int(where * steps_n))
    report = check(h, drain)
    assert report.counts[fault] >= 1, report.table()
    assert not report.ok
