"""Consumer groups end to end: a group of three consumer PROCESSES on a 12-partition topic of 300,000 records.

Each member is a child ``python -c CHILD`` that consumes at a bounded rate (so faults land mid-consumption)
and appends one JSON line per event to its own file, unbuffered, stamped with ``time.monotonic()`` in ms
(CLOCK_MONOTONIC: the same clock in every process of this machine, the test's included):
``assign`` / ``revoke`` / ``lost`` (with partitions), ``batch`` (per partition: first and last offset a
poll() returned), ``commit`` (offsets and the error code, if any), and the markers of the faults.

From those files the tests check, per scenario:
- delivery: every record of every partition was returned by some member at least once;
- duplicates: only where a member died or froze with records handled but not committed;
- ownership: no partition was read by two processes at once. A process reads a partition from its
  ``assign`` until its ``revoke``; for partitions it ``lost`` (fenced while frozen or dead), until the last
  batch it returned from them, since it could not have read one after;
- timing: how fast the partitions of a dead, frozen or closed member move.

Sessions are short here (1500 ms, heartbeats every 200 ms) so the faults resolve in seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bus import Admin, Consumer, Producer
from bus.errors import ConfigError, Timeout
from nodes.cluster import REPO_ROOT, LocalCluster
from tests.conftest import wait_for

TOPIC = "events"
PARTITIONS = 12
RECORDS = 300_000
PER_PARTITION = RECORDS // PARTITIONS
SESSION_MS = 1_500
HEARTBEAT_MS = 200
AUTO_COMMIT_MS = 300
RATE_PER_CHILD = 15_000  # records/s each member handles at most: ~7 s to drain with three
VALUE_PAD = b"." * 90  # ~100-byte records: a fetched batch is a short backlog

CHILD = r"""
import json, logging, os, signal, sys, time
from bus import Consumer
from bus.errors import BusError

bootstrap, topic, group, log_path, control, name, options = sys.argv[1:8]
options = json.loads(options)
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

def emit(*fields):
    os.write(fd, (json.dumps([time.monotonic_ns() // 1_000_000, *fields]) + "\n").encode())

consumer = None

def member():
    return consumer._group.member_id if consumer is not None else None

def on_commit(offsets, error):
    emit("commit", {str(p): o for (t, p), (o, _) in offsets.items()}, None if error is None else error.code)

consumer = Consumer(
    bootstrap, topics=[topic], group=group, auto_offset_reset="earliest", fetch_max_wait_ms=100,
    max_partition_fetch_bytes=64 << 10, fetch_max_bytes=64 << 10, prefetch_bytes_max=128 << 10,
    session_timeout_ms=options["session_ms"], heartbeat_interval_ms=options["heartbeat_ms"],
    auto_commit_interval_ms=options["auto_commit_ms"], client_id=name,
    on_assign=lambda ps: emit("assign", member(), sorted(p for t, p in ps)),
    on_revoke=lambda ps: emit("revoke", member(), sorted(p for t, p in ps)),
    on_lost=lambda ps: emit("lost", member(), sorted(p for t, p in ps)),
    on_commit=on_commit)
emit("start", name)

def trigger(kind):
    for path in (os.path.join(control, f"{kind}-{name}"), os.path.join(control, f"{kind}-all")):
        if os.path.exists(path):
            if path.endswith(name):
                os.unlink(path)
            return True
    return False

started_s, handled = time.monotonic(), 0
while True:
    if trigger("close"):
        emit("closing")
        consumer.close()
        emit("closed")
        break
    records = consumer.poll(timeout_ms=100, max_records=500)
    if records:
        spans = {}
        for r in records:
            span = spans.get(r.partition)
            if span is None:
                spans[r.partition] = [r.offset, r.offset]
            else:
                assert r.offset == span[1] + 1, (r.partition, span, r.offset)
                span[1] = r.offset
        emit("batch", [[p, a, b] for p, (a, b) in sorted(spans.items())])
        handled += len(records)
    if trigger("stop"):
        # Frozen between handling a batch and committing it: a zombie with work it believes is its own.
        emit("stopping", sorted(p for t, p in consumer.assignment()))
        os.kill(os.getpid(), signal.SIGSTOP)
        emit("resumed")
        try:
            consumer.commit()
            emit("commit_after_resume", None)
        except BusError as exc:
            emit("commit_after_resume", exc.code)
    ahead_s = handled / options["rate"] - (time.monotonic() - started_s)
    if ahead_s > 0:
        time.sleep(ahead_s)
"""


# -- the cluster and the data (shared by every scenario; each uses its own group) ----------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("groups") / "cluster"), 3).start()
    try:
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, PARTITIONS)
        with Producer(cluster.bootstrap, batch_bytes=128 << 10, linger_ms=20) as producer:
            for i in range(RECORDS):
                producer.send(TOPIC, b"%08d" % i + VALUE_PAD, partition=i % PARTITIONS)
            producer.flush()
        with Admin(cluster.bootstrap) as admin:
            ends = [p["end_offset"] for p in admin.describe_topic(TOPIC)["partitions"]]
        assert ends == [PER_PARTITION] * PARTITIONS
        yield cluster
    finally:
        cluster.stop()


class Member:
    """One consumer child process and its event file."""

    def __init__(self, run: GroupRun, name: str):
        self.run, self.name = run, name
        self.log_path = os.path.join(run.dir, f"{name}.jsonl")
        options = json.dumps({"session_ms": SESSION_MS, "heartbeat_ms": HEARTBEAT_MS,
                              "auto_commit_ms": AUTO_COMMIT_MS, "rate": RATE_PER_CHILD})
        env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.stderr = open(os.path.join(run.dir, f"{name}.stderr"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, run.cluster.bootstrap, TOPIC, run.group, self.log_path, run.dir, name,
             options], env=env, stdout=subprocess.DEVNULL, stderr=self.stderr, stdin=subprocess.DEVNULL)
        self.killed_ms = None  # when the test killed it (kill -9), if it did

    def events(self) -> list:
        try:
            with open(self.log_path) as f:
                text = f.read()
        except FileNotFoundError:
            return []
        # The member may be writing its next line as this reads: only whole lines (ended by a newline) count.
        return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line]

    def last(self, kind: str):
        found = [e for e in self.events() if e[1] == kind]
        return found[-1] if found else None

    def owned(self) -> set:
        """The partitions it reads now, per its assign / revoke / lost events."""
        owned: set = set()
        for event in self.events():
            if event[1] == "assign":
                owned |= set(event[3])
            elif event[1] in ("revoke", "lost"):
                owned -= set(event[3])
        return owned

    def stderr_text(self) -> str:
        with open(self.stderr.name, errors="replace") as f:
            return f.read()[-3000:]


class GroupRun:
    """Three members of a fresh group on the loaded topic; stopped and checked at the end of a scenario."""

    def __init__(self, cluster, tmp_path, group: str, members: int = 3):
        self.cluster, self.group = cluster, group
        self.dir = str(tmp_path)
        self.admin = Admin(cluster.bootstrap, request_timeout_ms=5_000)
        self.members = [Member(self, f"m{i}") for i in range(members)]

    def touch(self, kind: str, name: str = "all") -> None:
        open(os.path.join(self.dir, f"{kind}-{name}"), "w").close()

    def check_alive(self) -> None:
        for m in self.members:
            if m.killed_ms is None and m.proc.poll() is not None and m.last("closed") is None:
                raise AssertionError(f"{m.name} exited with {m.proc.returncode}:\n{m.stderr_text()}")

    def stable(self) -> dict | None:
        """The group's description once it is stable with every live member holding some partitions, by the
        coordinator's description and by the member's own assign events."""
        self.check_alive()
        try:
            info = self.admin.describe_group(self.group)
        except Exception:
            return None
        live = sum(1 for m in self.members if m.killed_ms is None and m.last("closed") is None)
        if info["state"] != "stable" or len(info["members"]) != live:
            return None
        if not all(m["assignment"] for m in info["members"]):
            return None
        # And every live member has heard it (its on_assign ran): the coordinator's word comes first.
        if not all(m.owned() for m in self.members if m.killed_ms is None and m.last("closed") is None):
            return None
        return info

    def counts(self) -> list:
        """Per partition, a bytearray: how many times each offset was returned (saturating at 255)."""
        counts = [bytearray(PER_PARTITION) for _ in range(PARTITIONS)]
        for m in self.members:
            for event in m.events():
                if event[1] == "batch":
                    for p, first, last in event[2]:
                        row = counts[p]
                        for offset in range(first, last + 1):
                            if row[offset] < 255:
                                row[offset] += 1
        return counts

    def delivered(self) -> bool:
        self.check_alive()
        return all(all(row) for row in self.counts())

    def consumed_after(self, name: str, t_ms: int) -> bool:
        m = next(m for m in self.members if m.name == name)
        return any(e[1] == "batch" and e[0] > t_ms for e in m.events())

    def stop(self, timeout_s: float = 20.0) -> None:
        self.touch("close")
        deadline = time.monotonic() + timeout_s
        for m in self.members:
            if m.proc.poll() is None:
                m.proc.send_signal(signal.SIGCONT)
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
                raise AssertionError(f"{m.name} did not close within {timeout_s} s:\n{m.stderr_text()}")
            finally:
                m.stderr.close()
        self.admin.close()

    def kill_all(self) -> None:
        for m in self.members:
            if m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait()
            m.stderr.close()
        self.admin.close()

    # -- checks -----------------------------------------------------------------------------------------

    def ownership(self) -> dict:
        """partition -> [(start_ms, end_ms, member name)]: when each process read it (see the module doc)."""
        out: dict = {p: [] for p in range(PARTITIONS)}
        for m in self.members:
            events = m.events()
            open_since: dict = {}
            last_batch: dict = {}
            for event in events:
                t, kind = event[0], event[1]
                if kind == "assign":
                    for p in event[3]:
                        assert p not in open_since, f"{m.name} assigned {p} twice without a revoke"
                        open_since[p] = t
                elif kind == "batch":
                    for p, _, _ in event[2]:
                        assert p in open_since, f"{m.name} read partition {p} it was not assigned"
                        last_batch[p] = t
                elif kind in ("revoke", "lost"):
                    for p in event[3]:
                        start = open_since.pop(p)
                        end = t if kind == "revoke" else max(start, last_batch.get(p, start))
                        out[p].append((start, end, m.name))
            for p, start in open_since.items():
                end = m.killed_ms if m.killed_ms is not None else events[-1][0]
                out[p].append((start, max(start, end), m.name))
        return out

    def check_exclusive_ownership(self) -> None:
        for p, spans in self.ownership().items():
            spans.sort()
            for (s1, e1, n1), (s2, e2, n2) in itertools.pairwise(spans):
                assert n1 == n2 or s2 >= e1, (
                    f"partition {p} read by {n1} during [{s1}, {e1}] and by {n2} from {s2}")

    def duplicates(self) -> dict:
        """partition -> sorted offsets returned more than once."""
        return {p: [o for o, c in enumerate(row) if c > 1] for p, row in enumerate(self.counts()) if max(row) > 1}

    def uncommitted_windows(self, name: str, until_ms: float) -> dict:
        """partition -> (first, last) offsets ``name`` returned after its last successful commit of it, as of
        ``until_ms`` (when it died or froze)."""
        m = next(m for m in self.members if m.name == name)
        committed: dict = {}
        last: dict = {}
        for event in m.events():
            if event[0] > until_ms:
                break
            if event[1] == "commit" and event[3] is None:
                for p, offset in event[2].items():
                    committed[int(p)] = max(offset, committed.get(int(p), 0))
            elif event[1] == "batch":
                for p, first, last_offset in event[2]:
                    committed.setdefault(p, first)
                    last[p] = last_offset
        return {p: (committed[p], last[p]) for p in last}

    def check_duplicates_only_in(self, name: str, until_ms: float) -> int:
        """Every offset returned twice lies in ``name``'s uncommitted window when it died or froze."""
        windows = self.uncommitted_windows(name, until_ms)
        dups = self.duplicates()
        for p, offsets in dups.items():
            lo, hi = windows.get(p, (0, -1))
            outside = [o for o in offsets if not lo <= o <= hi]
            assert not outside, f"partition {p}: duplicates {outside[:5]}... outside {name}'s uncommitted [{lo}, {hi}]"
        return sum(len(v) for v in dups.values())


@pytest.fixture
def group_run(loaded, tmp_path, request):
    runs = []

    def make(group: str) -> GroupRun:
        run = GroupRun(loaded, tmp_path, group)
        runs.append(run)
        return run

    yield make
    for run in runs:
        if any(m.proc.poll() is None for m in run.members):
            run.kill_all()


def first_read_by_others(run: GroupRun, victim: str, partitions, after_ms: int) -> dict:
    """partition -> the first time another member returned records of it after ``after_ms``."""
    out = {}
    for m in run.members:
        if m.name == victim:
            continue
        for event in m.events():
            if event[1] == "batch" and event[0] > after_ms:
                for p, _, _ in event[2]:
                    if p in partitions and (p not in out or event[0] < out[p]):
                        out[p] = event[0]
    return out


def first_assigned_to_others(run: GroupRun, victim: str, partitions, after_ms: int) -> dict:
    out = {}
    for m in run.members:
        if m.name == victim:
            continue
        for event in m.events():
            if event[1] == "assign" and event[0] > after_ms:
                for p in event[3]:
                    if p in partitions and (p not in out or event[0] < out[p]):
                        out[p] = event[0]
    return out


def answered(request, *args):
    """``request(*args)``, or None if it timed out (a coordinator just restarted may need a moment)."""
    try:
        return request(*args)
    except Timeout:
        return None


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# -- scenarios -----------------------------------------------------------------------------------------------


def test_kill_9_member_partitions_move_within_session_and_nothing_is_lost(group_run):
    run = group_run("kill9")
    wait_for(run.stable, 20, message="three stable members")
    victim = run.members[0]
    since_ms = now_ms()
    wait_for(lambda: victim.last("commit") is not None and run.consumed_after(victim.name, since_ms), 10,
             message="the victim consuming and committing")
    owned = victim.owned()
    assert owned
    victim.killed_ms = now_ms()
    victim.proc.kill()
    victim.proc.wait()

    bound_ms = SESSION_MS + 2 * HEARTBEAT_MS + 1_000
    wait_for(lambda: len(first_read_by_others(run, victim.name, owned, victim.killed_ms)) == len(owned),
             (bound_ms + 3_000) / 1000, message="the dead member's partitions read by the others")
    moved = first_read_by_others(run, victim.name, owned, victim.killed_ms)
    slowest = max(t - victim.killed_ms for t in moved.values())
    assert slowest <= bound_ms, f"partitions moved {slowest} ms after the kill; bound {bound_ms} ms"

    wait_for(run.delivered, 60, message="every record delivered")
    run.stop()
    dups = run.check_duplicates_only_in(victim.name, victim.killed_ms)
    run.check_exclusive_ownership()
    print(f"kill -9: partitions {sorted(owned)} moved within {slowest} ms; {dups} duplicate(s), all uncommitted")


def test_sigstop_past_session_then_sigcont_is_fenced_and_rejoins(group_run):
    run = group_run("sigstop")
    wait_for(run.stable, 20, message="three stable members")
    victim = run.members[1]
    old_member_id = victim.last("assign")[2]
    run.touch("stop", victim.name)
    wait_for(lambda: victim.last("stopping") is not None and process_state(victim.proc.pid) == "T", 10,
             message="the victim stopped")
    stopped_ms = victim.last("stopping")[0]
    owned = set(victim.last("stopping")[2])
    assert owned
    # Past its session: the others hold every partition it had.
    wait_for(lambda: len(first_assigned_to_others(run, victim.name, owned, stopped_ms)) == len(owned),
             (SESSION_MS + 2 * HEARTBEAT_MS + 3_000) / 1000, message="the frozen member's partitions moved")
    resumed_ms = now_ms()
    victim.proc.send_signal(signal.SIGCONT)

    wait_for(lambda: victim.last("commit_after_resume") is not None, 10, message="the commit after resuming")
    assert victim.last("commit_after_resume")[2] in ("UNKNOWN_MEMBER_ID", "FENCED_MEMBER_EPOCH")
    wait_for(lambda: victim.last("lost") is not None, 10, message="the zombie dropping its partitions")
    lost = victim.last("lost")
    assert set(lost[3]) == owned and lost[0] >= resumed_ms

    # It rejoins under a new member id, gets partitions again, and reads them.
    def rejoined():
        assign = victim.last("assign")
        return assign is not None and assign[0] > lost[0] and assign[2] != old_member_id and \
            run.consumed_after(victim.name, assign[0])
    wait_for(rejoined, 15, message="the member rejoining and consuming")

    wait_for(run.delivered, 60, message="every record delivered")
    run.stop()
    run.check_exclusive_ownership()
    dups = run.check_duplicates_only_in(victim.name, stopped_ms)
    print(f"SIGSTOP: {sorted(owned)} moved; commit after resume refused; rejoined; {dups} duplicate(s)")


def test_close_moves_partitions_within_a_second_without_duplicates(group_run):
    run = group_run("close")
    wait_for(run.stable, 20, message="three stable members")
    victim = run.members[2]
    since_ms = now_ms()
    wait_for(lambda: run.consumed_after(victim.name, since_ms), 10, message="the member consuming")
    owned = victim.owned()
    run.touch("close", victim.name)
    wait_for(lambda: victim.last("closed") is not None, 10, message="close() returning")
    assert victim.proc.wait(10) == 0
    closing_ms = victim.last("closing")[0]
    revoked = victim.last("revoke")
    assert revoked is not None and set(revoked[3]) == owned  # on_revoke on close
    wait_for(lambda: len(first_assigned_to_others(run, victim.name, owned, closing_ms)) == len(owned), 5,
             message="the closed member's partitions assigned to the others")
    moved = first_assigned_to_others(run, victim.name, owned, closing_ms)
    slowest = max(t - closing_ms for t in moved.values())
    assert slowest <= 1_000, f"partitions moved {slowest} ms after close() began"

    wait_for(run.delivered, 60, message="every record delivered")
    run.stop()
    run.check_exclusive_ownership()
    assert run.duplicates() == {}, "a clean close commits what it handled: nothing is read twice"
    print(f"close: {sorted(owned)} moved within {slowest} ms")


def test_coordinator_kill_9_and_restart_keeps_offsets_and_group(group_run, loaded):
    run = group_run("coordkill")
    wait_for(run.stable, 20, message="three stable members")
    before_info = run.stable()
    wait_for(lambda: all(m.last("commit") is not None for m in run.members), 10, message="commits from everyone")
    committed_before = run.admin.group_offsets(run.group)
    assert committed_before

    killed_ms = now_ms()
    loaded.kill_coordinator()
    # Members keep reading what they own while the coordinator is away, for longer than a session.
    wait_for(lambda: all(run.consumed_after(m.name, killed_ms + SESSION_MS + 100) for m in run.members), 15,
             message="consumption going on without the coordinator")
    loaded.restart_coordinator()

    committed_after = wait_for(lambda: answered(run.admin.group_offsets, run.group), 10,
                               message="the restarted coordinator answering")
    for tp, offset in committed_before.items():
        assert committed_after.get(tp, -1) >= offset, f"{tp}: committed {offset} before, {committed_after.get(tp)} after"
    info = wait_for(run.stable, 15, message="the group stable again after the restart")
    assert sorted(m["member_id"] for m in info["members"]) == sorted(m["member_id"] for m in before_info["members"])
    assert info["group_epoch"] == before_info["group_epoch"]  # no rebalance was needed

    wait_for(run.delivered, 60, message="every record delivered")
    # Heartbeats and commits work again: the group's lag drains to zero.
    wait_for(lambda: (answered(run.admin.describe_group, run.group) or {}).get("total_lag") == 0, 15,
             message="lag 0 after draining")
    run.stop()
    assert all(m.last("lost") is None for m in run.members), "nobody was expelled"
    assert run.duplicates() == {}, "no partition moved, so nothing was read twice"
    run.check_exclusive_ownership()
    failed = sum(1 for m in run.members for e in m.events() if e[1] == "commit" and e[3] is not None)
    print(f"coordinator restart: offsets intact, same members and epoch; {failed} commit(s) failed during the outage")


# -- in-process checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"session_timeout_ms": 0}, {"session_timeout_ms": -5}, {"heartbeat_interval_ms": 0},
    {"session_timeout_ms": 500, "heartbeat_interval_ms": 1_000}, {"max_poll_interval_ms": 0},
    {"auto_commit_interval_ms": -1}, {"enable_auto_commit": "yes"}, {"assignor": "fastest"},
    {"group_instance_id": ""}, {"on_assign": 5}, {"pattern": "(unclosed"}, {"session_timeout_ms": 1.5},
])
def test_absurd_group_options_are_config_errors(options):
    topics = None if "pattern" in options else ["t"]
    with pytest.raises(ConfigError):
        Consumer("tcp://127.0.0.1:9", topics=topics, group="g", **options)


def test_group_options_are_the_consumers_keyword_arguments():
    """Each of GroupMember's options is an explicit keyword of Consumer with the same default; a wrong name is
    a TypeError naming it, and a group option without a group a ConfigError naming the option."""
    import inspect

    from bus.consumer import GROUP_OPTION_DEFAULTS
    from bus.group_member import GroupMember

    member = {name: p.default for name, p in inspect.signature(GroupMember).parameters.items()
              if p.kind is p.KEYWORD_ONLY}
    consumer = inspect.signature(Consumer).parameters
    assert member == GROUP_OPTION_DEFAULTS
    assert {name: consumer[name].default for name in member} == member
    assert all(consumer[name].kind is inspect.Parameter.KEYWORD_ONLY for name in member)
    for name in member:
        assert f"``{name}" in Consumer.__doc__, f"{name} undocumented"

    for group in ("g", None):
        with pytest.raises(TypeError, match="session_timeout"):
            Consumer("tcp://127.0.0.1:9", topics=["t"] if group else None, group=group, session_timeout=5_000)
    for options in ({"session_timeout_ms": 5_000}, {"on_assign": print}, {"enable_auto_commit": 1},
                    {"assignor": "range"}, {"pattern": "t.*"}):
        with pytest.raises(ConfigError, match=rf"options \['{next(iter(options))}'\] need a group"):
            Consumer("tcp://127.0.0.1:9", **options)
    Consumer("tcp://127.0.0.1:9", session_timeout_ms=10_000, enable_auto_commit=True).close()  # the defaults


def test_pattern_subscription_commit_committed_and_max_poll_interval(loaded, tmp_path):
    import re

    with Admin(loaded.bootstrap) as admin:
        admin.create_topic("pat.a", 2)
    with Producer(loaded.bootstrap) as producer:
        for i in range(10):
            producer.send("pat.a", b"%d" % i, partition=i % 2)
        producer.flush()
    events = []
    consumer = Consumer(loaded.bootstrap, topics=re.compile(r"pat\..*"), group="patterns", auto_offset_reset="earliest",
                        session_timeout_ms=SESSION_MS, heartbeat_interval_ms=HEARTBEAT_MS, max_poll_interval_ms=800,
                        enable_auto_commit=False, on_assign=lambda ps: events.append(("assign", sorted(ps))),
                        on_lost=lambda ps: events.append(("lost", sorted(ps))))
    try:
        got = []
        wait_for(lambda: got.extend(consumer.poll(100)) or len(got) >= 10, 20, message="ten records")
        assert sorted(r.value for r in got) == [b"%d" % i for i in range(10)]
        assert consumer.commit() == {("pat.a", 0): 5, ("pat.a", 1): 5}
        assert consumer.committed(("pat.a", 1)) == 5
        done = []
        consumer.commit_async({("pat.a", 0): 3}, callback=lambda offsets, error: done.append(error))
        wait_for(lambda: done, 5, message="the async commit")
        assert done == [None] and consumer.committed(("pat.a", 0)) == 5  # never moved backwards

        # A new topic matching the pattern joins the subscription.
        with Admin(loaded.bootstrap) as admin:
            admin.create_topic("pat.b", 1)
        wait_for(lambda: consumer.poll(50) is not None and ("pat.b", 0) in consumer.assignment(), 10,
                 message="pat.b assigned")

        # Blocking inside poll() longer than max_poll_interval_ms is polling, not a stalled handler.
        member_id = consumer._group.member_id
        assert consumer.poll(1_200) == []
        assert consumer._group.member_id == member_id and consumer._group.state == "member"

        # Not polling for max_poll_interval_ms: the member leaves; the next poll drops and rejoins.
        with Admin(loaded.bootstrap) as admin:
            wait_for(lambda: admin.describe_group("patterns")["state"] == "empty", 5,
                     message="the member leaving for max_poll_interval")
            reasons = [e["reason"] for e in admin.describe_group("patterns")["evictions"]]
        assert reasons == ["max_poll_interval"]
        wait_for(lambda: consumer.poll(50) is not None and len(consumer.assignment()) == 3, 10,
                 message="rejoined with every partition")
        assert consumer._group.member_id != member_id
        assert ("lost", [("pat.a", 0), ("pat.a", 1), ("pat.b", 0)]) in events
    finally:
        consumer.close()
    with Admin(loaded.bootstrap) as admin:
        assert admin.describe_group("patterns")["state"] == "empty"  # close() left at once
