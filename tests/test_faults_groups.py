"""The fault harness's consumer-group run: consumer processes of one group under kill -9, SIGSTOP past their
session, and a kill -9 of the coordinator (tests/harness/group_workload.py).

Three consumer processes share a 12-partition topic of 40,000 unique records, each recording its own
history (polls, assigns, revokes and losses from its callbacks, commits); the nemesis kills two of them
(new processes take their place), freezes three past their session timeout, and kills the coordinator. The
histories are merged with the group's committed offsets read back at the end and the final drain, and
checked: no committed offset went back, no stale-epoch commit was accepted, no partition had two owners,
and no record below the final committed offset was left undelivered. With ``skip_member_epoch_check`` (the
coordinator accepting commits of fenced members) the same run must report it. A failing run leaves its
merged history (JSON lines) and every consumer's own file in the test's tmp_path; ``python scripts/chaos.py
--groups --seed S`` replays a schedule by seed.
"""

from __future__ import annotations

import json
import threading

from bus import Admin, Consumer, Producer
from tests.conftest import wait_for
from tests.harness import History, check
from tests.harness.group_workload import (
    ConsumerProcesses,
    GroupConsumer,
    GroupRunConfig,
    Journal,
    clock_ms,
    load_journal,
    merge,
    run_groups,
)
from tests.harness.workload import drain

# ~30 s each on two cores: 6 faults spread over ~20 s of consumption at 3 x 800 records/s. A pause that
# freezes a member while it handles records (nearly always) makes it send a zombie commit once it resumes.
GROUP_RUN = dict(records=40_000, partitions=12, nodes=3, consumers=3, consumer_kills=2, consumer_pauses=3,
                 coordinator_kills=1, rate=800, seed=1)


def _run(tmp_path, **options):
    config = GroupRunConfig(history_path=str(tmp_path / "history.jsonl"), **{**GROUP_RUN, **options})
    result = run_groups(config, str(tmp_path))
    print(result.summary())  # shown by pytest when the test fails
    return result


def test_group_under_consumer_kills_pauses_and_a_coordinator_kill(tmp_path):
    result = _run(tmp_path)
    assert result.report.drain_checked
    assert result.report.ok, result.summary()
    assert len(result.faults) == result.config.fault_count(), "every planned fault must have happened"
    assert result.committed == result.ends, "the group committed every record"
    stats = result.stats
    # The faults had teeth: members frozen past their session were evicted and learned of it late
    # (on_lost), their zombie commits were fenced, and each killed process left members behind for the
    # coordinator to evict.
    assert stats["lost_partitions"] > 0, result.summary()
    assert stats["zombie_commits_refused"] > 0 and stats["zombie_commits_accepted"] == 0, result.summary()
    assert stats["killed_members"] >= result.config.consumer_kills
    assert stats["processes"] == result.config.consumers + result.config.consumer_kills


def test_skip_member_epoch_check_is_caught(tmp_path):
    """Frozen members resume and commit what they handled, as the members they were before they were evicted;
    the sabotaged coordinator accepts those commits, after other members were given the partitions."""
    # Pauses alone make the zombie commits; a shorter run without the kills (the main run's) catches it.
    result = _run(tmp_path, sabotage="skip_member_epoch_check", records=20_000, consumer_kills=0,
                  coordinator_kills=0, consumer_pauses=2)
    counts = result.report.counts
    assert counts["stale_epoch_commit_accepted"] > 0, f"the sabotage went unnoticed:\n{result.summary()}"


# -- one fault, by hand ------------------------------------------------------------------------------------


def _events(path, f, type="ok"):
    return [e for e in load_journal(path) if e.f == f and e.type == type]


def test_a_member_frozen_inside_poll_hands_out_nothing_after_its_eviction(tmp_path, make_cluster):
    """A member blocked in a long poll() is frozen past its session. Records for it arrive at once (its fetch in
    flight is answered while it is frozen, so they wait in its socket), and another member is given its
    partitions. Resumed, the frozen poll() must not hand those records out: it may no longer own them."""
    cluster = make_cluster(1)
    topic, group = "frozen", "frozen"
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, 2)
    history = History(clock_ms=clock_ms)
    producer = Producer(cluster.bootstrap, linger_ms=0)

    def send(value: bytes, partition: int) -> None:
        op = history.invoke("producer", "send", topic=topic, partition=partition, value=value)
        history.ok(op, offset=producer.send(topic, value, partition=partition).get(10).offset)

    options = dict(topic=topic, group=group, session_timeout_ms=1_500, heartbeat_interval_ms=200)
    a = ConsumerProcesses(cluster.bootstrap, str(tmp_path), count=1, rate=1_000, max_records=100,
                          poll_timeout_ms=8_000, **options).start()
    a_path, b_path = a.history_path("consumer-0.0"), str(tmp_path / "consumer-b.jsonl")
    b = b_thread = None
    try:
        wait_for(lambda: len(_events(a_path, "assign")) == 2, 20, message="the first member owning both partitions")
        send(b"warm-up", 0)
        # Handled and committed: it is back in poll(), fetching, with nothing to read.
        wait_for(lambda: _events(a_path, "commit"), 10, message="the first member committing the warm-up record")
        a.pause(0)
        send(b"while-frozen-0", 0)
        send(b"while-frozen-1", 1)
        # A second member joins: the first is evicted, and the second gets both partitions.
        b = GroupConsumer(cluster.bootstrap, history=Journal(b_path), process="consumer-b", rate=1_000,
                          max_records=100, **options)
        b_thread = threading.Thread(target=b.run, name="consumer-b", daemon=True)
        b_thread.start()
        wait_for(lambda: len(_events(b_path, "poll")) == 2, 20,
                 message="the second member reading both records")
        resumed_ms = clock_ms()
        a.resume(0)
        wait_for(lambda: len([e for e in _events(a_path, "revoke") if e.extra.get("lost")]) == 2, 10,
                 message="the first member dropping its partitions as lost")
        late = [e for e in _events(a_path, "poll") if e.time_ms > resumed_ms]
        assert late == [], "the frozen member handed out records of partitions it no longer owned"
    finally:
        if b_thread is not None:
            b.stop.set()
            b_thread.join(20)
        a.stop()
        producer.close()
    records, log_start = drain(cluster.bootstrap, topic, 2)
    merged = merge([history.events(), load_journal(a_path), load_journal(b_path)], group=group)
    report = check(merged, records, log_start=log_start)
    assert report.ok, report.table()


def test_a_member_closed_after_losing_its_partitions_reports_them_lost(make_cluster):
    """close() of a member that was fenced or left, before a poll() dropped its partitions, must still say
    they are gone (on_lost), or the application believes it owned them to the end."""
    cluster = make_cluster(1)
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("left", 2)
    calls = []
    consumer = Consumer(cluster.bootstrap, topics=["left"], group="left", session_timeout_ms=1_500,
                        heartbeat_interval_ms=200, max_poll_interval_ms=500,
                        on_revoke=lambda tps: calls.append(("revoke", sorted(tps))),
                        on_lost=lambda tps: calls.append(("lost", sorted(tps))))
    try:
        wait_for(lambda: consumer.poll(50) is not None and len(consumer.assignment()) == 2, 20,
                 message="both partitions assigned")
        # No poll() for max_poll_interval_ms: the member leaves the group (state "left"), partitions in hand.
        wait_for(lambda: consumer._group.state == "left", 5, message="the member leaving")
    finally:
        consumer.close()
    assert calls == [("lost", [("left", 0), ("left", 1)])]


def test_poll_hands_out_no_records_the_member_may_have_lost_and_puts_them_back(make_cluster):
    """The check at the end of poll(): a member that knows it was fenced, or has not heard from the
    coordinator for a session (frozen inside poll()), refuses the records it took; they come back later."""
    cluster = make_cluster(1)
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("back", 1)
    with Producer(cluster.bootstrap) as producer:
        for i in range(10):
            producer.send("back", b"%d" % i, partition=0)
        producer.flush()
    # A heartbeat every 20 s: none comes between the steps below to change what they set.
    consumer = Consumer(cluster.bootstrap, topics=["back"], group="back", auto_offset_reset="earliest",
                        enable_auto_commit=False, session_timeout_ms=60_000, heartbeat_interval_ms=20_000)
    try:
        first = wait_for(lambda: consumer.poll(100, max_records=4), 20, message="the first records")
        assert [r.offset for r in first] == [0, 1, 2, 3]
        member = consumer._group
        assert member.on_records(first) and member.on_records([])
        with member._lock:
            member._last_attempt_ms -= 60_001  # as after a freeze of a session inside poll()
        assert not member.on_records(first) and member.on_records([])
        with member._lock:
            member._last_attempt_ms += 60_001
            member._state = "lost"  # as when the heartbeat thread learns of a fencing meanwhile
        assert not member.on_records(first)
        with member._lock:
            member._state = "member"
        consumer._unread(first)
        again = wait_for(lambda: consumer.poll(100, max_records=4), 10, message="the records again")
        assert [(r.offset, r.value) for r in again] == [(r.offset, r.value) for r in first]
    finally:
        consumer.close()


# -- the pieces, without processes -------------------------------------------------------------------------


def test_merge_orders_by_time_keeps_ops_apart_and_ends_a_killed_members_ownership():
    a, b = History(clock_ms=iter([1.0, 2.0, 5.0, 6.0]).__next__), History(clock_ms=iter([3.0, 4.0]).__next__)
    a.record("consumer-0.0", "assign", group="g", topic="t", partition=0, member="m0", epoch=1)
    op = a.invoke("consumer-0.0", "poll", group="g", topic="t", partition=0, offset=0, value=b"v", member="m0")
    b.record("consumer-1.0", "assign", group="g", topic="t", partition=1, member="m1", epoch=1)
    b.invoke("consumer-1.0", "commit", group="g", topic="t", partition=1, offset=0, member="m1", epoch=1)
    a.ok(op)
    merged = merge([a.events(), b.events()], killed=[("consumer-0.0", 7.0)], group="g")
    events = merged.events()
    assert [e.index for e in events] == list(range(6))
    assert [e.time_ms for e in events] == [1.0, 2.0, 3.0, 4.0, 5.0, 7.0]
    assert len({e.op_id for e in events}) == 5  # a's poll is one op; the rest are one event each
    death = events[-1]
    assert (death.process, death.f, death.member, death.topic, death.extra) == \
        ("consumer-0.0", "revoke", "m0", None, {"reason": "killed"})
    assert merged.open_ops() == [next(e.op_id for e in events if e.f == "commit")]  # b's commit, in flight
    assert check(merged).ok


def test_a_journal_line_cut_short_by_a_kill_is_dropped(tmp_path):
    h = History(clock_ms=iter([1.0, 2.0]).__next__)
    h.record("consumer-0.0", "assign", group="g", topic="t", partition=0, member="m0", epoch=1)
    h.record("consumer-0.0", "assign", group="g", topic="t", partition=1, member="m0", epoch=1)
    path = tmp_path / "consumer-0.0.jsonl"
    lines = [json.dumps(e.to_json()) for e in h.events()]
    path.write_text(lines[0] + "\n" + lines[1][:17])
    assert load_journal(str(path)) == h.events()[:1]
    path.write_text(lines[0] + "\n" + lines[1] + "\n")
    assert load_journal(str(path)) == h.events()
    assert load_journal(str(tmp_path / "never-written.jsonl")) == []
