"""The fault harness's consumer-group run: consumer PROCESSES in one group, each recording its own history.

Two halves, one per side of a process boundary:

- The consumer (``python -m tests.harness.group_workload consume ...``, one process per group member): a
  Consumer subscribed to the topic in the group, auto-commit off. It loops: ``poll()``, handle the records
  at a bounded rate (a sleep), then ``commit()`` their offsets synchronously, and records as it goes:
      poll    one op per record returned: invoked at the time poll() was CALLED, ok once it returned (a
              record is handed out somewhere inside the call; a freeze inside it must not be counted
              as a read after it), with group, member and epoch as this process saw them
      assign  in on_assign, per partition, with the member id and member epoch
      revoke  in on_revoke, per partition, after committing what it handled of them; in on_lost
              with lost=True (it was fenced or evicted, and learns of it only now)
      commit  per partition: invoked before commit(), ok with the offset the coordinator says is now
              committed (which is the requested one unless a higher one was there), fail for a definite
              or fenced error, unknown for a timeout. A consumer that finds it was frozen past its
              session while handling records first sends their commit as a hand-made request with the
              member id and epoch it had when it polled them (zombie=True): a zombie's request, or one
              delayed in the network past its eviction, which the coordinator must fence. (Through
              commit() the client itself would most often refuse it, having just heard of the eviction.)
  Every event is written to the process's own JSON-lines file the moment it is recorded (``Journal``),
  so a kill -9 loses at most the event being written; times come from CLOCK_MONOTONIC, which every
  process of the machine shares, in fractional milliseconds. SIGTERM asks it to commit, close (which
  revokes everything) and exit 0.

- The run (``run_groups(GroupRunConfig(...), data_dir)``): a LocalCluster, a topic filled by a producer
  (before, or while the group consumes), ``consumers`` processes, and the nemesis (nemesis.py) killing
  (-9, then a new process: a new member) and SIGSTOPping consumers, and killing the coordinator, at
  seeded points of the consumption (its progress is the sum of the group's committed offsets). When every
  fault is healed and the group has committed every record, the consumers are stopped; then the group's
  committed offsets are read back (``commit`` events with observed=True), every partition is drained, the
  histories are merged (``merge``) and checked. A consumer killed by the nemesis gets a revoke of every
  member it had at the moment it died (reason="killed"), since it never got to record one.

Judging ownership from the consumers' own events is faithful only because the group member code makes
it so: a member frozen past its session hands out no record until a fresh heartbeat says whether it is
still a member (bus/group_member.py; poll() checks when it begins and again before it returns), so a member
that learns of its eviction late (on_lost) read nothing in the meantime. The checker ends such an ownership
at the member's last act (tests/harness/checker.py).

This module owns the consumer workload and the group run's orchestration; faults are nemesis.py's and
judgement is checker.py's. It never judges a history itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .checker import check
from .history import Event, History
from .nemesis import Nemesis, plan
from .sabotage import cluster_options
from .workload import ProducerWorker, Progress, drain, wait_serving_topic

TOPIC = "group-jepsen"
GROUP = "jepsen"
MONITOR_INTERVAL_S = 0.1  # how often the run reads the group's committed offsets (its progress)
CATCH_UP_S_MAX = 0.5  # a consumer that fell behind its rate catches up at most this much in a burst
STOP_TIMEOUT_S = 30.0  # SIGTERM to exit, per consumer
STALL_S_MAX = 10.0  # after the faults, the group's committed offsets not moving this long: it is stuck


def clock_ms() -> float:
    """CLOCK_MONOTONIC in milliseconds, to the microsecond: the same clock in every process here, and
    fine enough that events of two processes in the same millisecond are still ordered."""
    return time.monotonic_ns() / 1e6


class Journal(History):
    """A History that also appends every event to ``path`` (JSON lines) as it is recorded, one write
    each, in index order, so what a process recorded survives its kill -9."""

    def __init__(self, path: str, clock_ms=clock_ms):
        super().__init__(clock_ms=clock_ms)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)

    def _append(self, **kwargs) -> int:  # caller holds the lock, so lines land in index order
        op_id = super()._append(**kwargs)
        line = json.dumps(self._events[-1].to_json(), separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())
        return op_id

    def close(self) -> None:
        os.close(self._fd)


def load_journal(path: str) -> list[Event]:
    """The events of a Journal file. Every event is written as one whole line ending in a newline, so
    only a last line without one can be cut short (by a kill -9); it is dropped."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError:
        return []
    return [Event.from_json(json.loads(line)) for line in lines[:-1] if line.strip()]


# -- the consumer process ----------------------------------------------------------------------------------


class GroupConsumer:
    """One group member's loop and its recording (see the module docstring). Runs in the consumer process."""

    def __init__(self, bootstrap: str, topic: str, group: str, process: str, history: History, *,
                 session_timeout_ms: int, heartbeat_interval_ms: int, rate: float, max_records: int,
                 poll_timeout_ms: int = 100):
        from bus import Consumer

        self.topic, self.group, self.process, self.history = topic, group, process, history
        self.rate, self.max_records, self.poll_timeout_ms = rate, max_records, poll_timeout_ms
        self.session_timeout_s = session_timeout_ms / 1000
        self.stop = threading.Event()
        self.owners: dict = {}  # tp -> (member id, member epoch) at on_assign: this process's view
        self.pending: dict = {}  # tp -> offset after the last record handled, not yet committed
        self.consumer = Consumer(
            bootstrap, topics=[topic], group=group, auto_offset_reset="earliest", enable_auto_commit=False,
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=heartbeat_interval_ms,
            client_id=process, fetch_max_wait_ms=100, max_partition_fetch_bytes=16 << 10,
            fetch_max_bytes=64 << 10, prefetch_bytes_max=128 << 10, on_assign=self._on_assign,
            on_revoke=self._on_revoke, on_lost=self._on_lost)

    # Callbacks run in this thread, inside poll() (or close()).

    def _on_assign(self, tps) -> None:
        member, epoch = self.consumer._group.member_id, self.consumer._group.member_epoch
        for tp in tps:
            self.owners[tp] = (member, epoch)
            self.history.record(self.process, "assign", group=self.group, topic=tp[0], partition=tp[1],
                                member=member, epoch=epoch)

    def _on_revoke(self, tps) -> None:
        # Kafka's pattern: commit what was handled of a partition before giving it back.
        handled = {tp: self.pending[tp] for tp in tps if tp in self.pending}
        if handled:
            self.commit(handled)
        for tp in tps:
            member, epoch = self.owners.pop(tp, (self.consumer._group.member_id, None))
            self.pending.pop(tp, None)
            self.history.record(self.process, "revoke", group=self.group, topic=tp[0], partition=tp[1],
                                member=member, epoch=epoch, reason="revoked")

    def _on_lost(self, tps) -> None:
        # The member id has already moved on (it rejoins as a new member): name the one that owned them.
        for tp in tps:
            member, epoch = self.owners.pop(tp, (None, None))
            self.pending.pop(tp, None)
            self.history.record(self.process, "revoke", group=self.group, topic=tp[0], partition=tp[1],
                                member=member, epoch=epoch, lost=True, reason="lost")

    def commit(self, offsets: dict) -> None:
        from bus.errors import INDETERMINATE, BusError

        epoch = self.consumer._group.member_epoch  # <= the epoch the request will carry
        ops = {}
        for tp, offset in sorted(offsets.items()):
            member = self.owners.get(tp, (self.consumer._group.member_id, None))[0]
            ops[tp] = self.history.invoke(self.process, "commit", group=self.group, topic=tp[0],
                                          partition=tp[1], offset=offset, member=member, epoch=epoch)
        try:
            committed = self.consumer.commit(offsets)
        except BusError as exc:
            complete = self.history.unknown if exc.outcome == INDETERMINATE else self.history.fail
            for op_id in ops.values():
                complete(op_id, error=exc.code)
            return  # a fenced member drops its partitions at the next poll(); a timeout is retried
        for tp, op_id in ops.items():
            now = committed.get(tp, offsets[tp])
            self.history.ok(op_id, offset=now, requested=offsets[tp])
            if self.pending.get(tp) == offsets[tp]:
                del self.pending[tp]

    def zombie_commit(self, offsets: dict, epoch: int) -> None:
        """Send ``offsets`` as a hand-made OFFSET_COMMIT with the member ids and the ``epoch`` this process had
        when it polled them, whatever the member has learned since: the request a zombie sends, or one that
        was delayed in the network past the member's eviction. The coordinator must fence it."""
        from bus import wire
        from bus.errors import INDETERMINATE, BusError

        by_member: dict = {}
        for tp, offset in sorted(offsets.items()):
            if tp in self.owners:
                by_member.setdefault(self.owners[tp][0], {})[tp] = offset
        for member, part in by_member.items():
            ops = {tp: self.history.invoke(self.process, "commit", group=self.group, topic=tp[0], partition=tp[1],
                                           offset=offset, member=member, epoch=epoch, zombie=True)
                   for tp, offset in part.items()}
            try:
                result = self.consumer._requester.coordinator(wire.OFFSET_COMMIT, {
                    "group_id": self.group, "member_id": member, "member_epoch": epoch,
                    "offsets": [[t, p, offset, None] for (t, p), offset in part.items()]}, timeout_ms=2_000)
            except BusError as exc:
                complete = self.history.unknown if exc.outcome == INDETERMINATE else self.history.fail
                for op_id in ops.values():
                    complete(op_id, error=exc.code, zombie=True)
                continue
            committed = {(t, p): o for t, p, o in result["committed"]}
            for tp, op_id in ops.items():
                self.history.ok(op_id, offset=committed.get(tp, part[tp]), requested=part[tp], zombie=True)

    def run(self) -> None:
        history, process, group = self.history, self.process, self.group
        started_s, handled = time.monotonic(), 0
        while not self.stop.is_set():
            called_ms = clock_ms()
            records = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
            polled_s, epoch = time.monotonic(), self.consumer._group.member_epoch
            for r in records:
                tp = (r.topic, r.partition)
                owner = self.owners.get(tp)
                fields = {"member": owner[0], "epoch": owner[1]} if owner else {
                    "member": self.consumer._group.member_id, "unowned": True}
                op_id = history.invoke(process, "poll", time_ms=called_ms, group=group, topic=r.topic,
                                       partition=r.partition, offset=r.offset, value=r.value, **fields)
                history.ok(op_id)
                self.pending[tp] = r.offset + 1
            # Handling: a steady pace, so faults land mid-consumption and a pause most likely freezes the
            # member between handling records and committing them (a zombie with work it thinks is its own).
            handled += len(records)
            ahead_s = handled / self.rate - (time.monotonic() - started_s)
            if ahead_s > 0:
                self.stop.wait(ahead_s)
            elif ahead_s < -CATCH_UP_S_MAX:
                started_s += -ahead_s - CATCH_UP_S_MAX
            if self.pending and time.monotonic() - polled_s - max(0.0, ahead_s) > self.session_timeout_s:
                # Frozen past the session while handling: the member may have been evicted, and the client
                # may know it already (then commit() refuses at once, and nothing would test the coordinator).
                self.zombie_commit(dict(self.pending), epoch)
            if self.pending:
                self.commit(dict(self.pending))
        if self.pending:
            self.commit(dict(self.pending))
        self.consumer.close()  # on_revoke: commits what is left and records the revokes


def consume(args) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    history = Journal(args.history)
    worker = GroupConsumer(args.bootstrap, args.topic, args.group, args.process, history,
                           session_timeout_ms=args.session_timeout_ms,
                           heartbeat_interval_ms=args.heartbeat_interval_ms, rate=args.rate,
                           max_records=args.max_records, poll_timeout_ms=args.poll_timeout_ms)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    try:
        worker.run()
    finally:
        history.close()
    return 0


# -- the consumer processes, seen from the run ------------------------------------------------------------


@dataclass
class _Slot:
    slot: int
    incarnation: int = 0
    proc: subprocess.Popen | None = None
    process: str = ""  # history process name of the current incarnation: consumer-<slot>.<incarnation>
    stderr_path: str = ""
    down: bool = False  # killed by the nemesis, not yet restarted


class ConsumerProcesses:
    """The group's consumer processes: started, killed, restarted, paused, resumed and stopped by slot.
    ``killed`` lists (process name, time of death) for ``merge``."""

    def __init__(self, bootstrap: str, run_dir: str, *, topic: str, group: str, count: int,
                 session_timeout_ms: int, heartbeat_interval_ms: int, rate: float, max_records: int,
                 poll_timeout_ms: int = 100):
        self.bootstrap, self.run_dir, self.topic, self.group = bootstrap, run_dir, topic, group
        self.options = ["--session-timeout-ms", str(session_timeout_ms), "--heartbeat-interval-ms",
                        str(heartbeat_interval_ms), "--rate", str(rate), "--max-records", str(max_records),
                        "--poll-timeout-ms", str(poll_timeout_ms)]
        self.slots = [_Slot(i) for i in range(count)]
        self.processes: list[str] = []  # every incarnation ever started, in order
        self.killed: list[tuple[str, float]] = []  # (process name, clock_ms() after it died)
        self.paused: set[int] = set()
        self._lock = threading.Lock()  # the nemesis thread and the run's thread both act on slots
        os.makedirs(run_dir, exist_ok=True)

    def history_path(self, process: str) -> str:
        return os.path.join(self.run_dir, f"{process}.jsonl")

    def start(self) -> ConsumerProcesses:
        for s in self.slots:
            self._spawn(s)
        return self

    def _spawn(self, s: _Slot) -> None:
        from nodes.cluster import REPO_ROOT, _die_with_parent, _popen

        s.process = f"consumer-{s.slot}.{s.incarnation}"
        s.stderr_path = os.path.join(self.run_dir, f"{s.process}.stderr")
        env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(s.stderr_path, "wb") as stderr:
            # Forked by the cluster's spawner thread: it dies with this process, even when the nemesis
            # thread that restarts it is long gone (nodes/cluster.py).
            s.proc = _popen(args=[sys.executable, "-m", "tests.harness.group_workload", "consume",
                                  "--bootstrap", self.bootstrap, "--topic", self.topic, "--group", self.group,
                                  "--process", s.process, "--history", self.history_path(s.process),
                                  *self.options],
                            env=env, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent, cwd=REPO_ROOT)
        self.processes.append(s.process)

    def kill(self, slot: int) -> None:
        with self._lock:
            s = self.slots[slot]
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait(10)
            self.killed.append((s.process, clock_ms()))
            s.down = True
            self.paused.discard(slot)

    def restart(self, slot: int) -> None:
        with self._lock:
            s = self.slots[slot]
            assert s.proc.poll() is not None, f"{s.process} is running"
            s.incarnation += 1
            self._spawn(s)
            s.down = False

    def pause(self, slot: int) -> None:
        with self._lock:
            self.slots[slot].proc.send_signal(signal.SIGSTOP)
            self.paused.add(slot)

    def resume(self, slot: int) -> None:
        with self._lock:
            self.slots[slot].proc.send_signal(signal.SIGCONT)
            self.paused.discard(slot)

    def check_alive(self) -> None:
        """Raise if a consumer the nemesis did not kill has exited."""
        with self._lock:
            for s in self.slots:
                if s.proc is not None and not s.down and s.proc.poll() is not None:
                    raise RuntimeError(f"{s.process} exited with {s.proc.returncode}:\n{self.stderr_tail(s)}")

    @staticmethod
    def stderr_tail(s: _Slot, chars: int = 3_000) -> str:
        try:
            with open(s.stderr_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every consumer (SIGCONT first); each commits, closes and exits 0, or this raises."""
        with self._lock:
            live = [s for s in self.slots if s.proc is not None and s.proc.poll() is None]
            for s in live:
                s.proc.send_signal(signal.SIGCONT)
                s.proc.send_signal(signal.SIGTERM)
            self.paused.clear()
            deadline_s = time.monotonic() + timeout_s
            failed = []
            for s in self.slots:
                try:
                    code = s.proc.wait(max(0.1, deadline_s - time.monotonic()))
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
                    failed.append(f"{s.process} did not stop within {timeout_s} s:\n{self.stderr_tail(s)}")
                    continue
                if code != 0:
                    failed.append(f"{s.process} exited with {code}:\n{self.stderr_tail(s)}")
            if failed:
                raise RuntimeError("\n".join(failed))

    def kill_all(self) -> None:
        with self._lock:
            for s in self.slots:
                if s.proc is not None and s.proc.poll() is None:
                    s.proc.kill()
                    s.proc.wait()


# -- merging the histories --------------------------------------------------------------------------------


def merge(sources: list[list[Event]], killed=(), group: str = GROUP) -> History:
    """One History from several processes' events (each list in its own index order, all on one clock):
    op ids made unique per source, events ordered by time (ties: by source, then index). For each
    (process, time of death) in ``killed``, a revoke of every member that process had, at its death."""
    keyed = []
    for source, events in enumerate(sources):
        for e in events:
            keyed.append((e.time_ms, source, e.index, e))
    next_source = len(sources)
    for process, died_ms in killed:
        members = sorted({e.member for _t, _s, _i, e in keyed
                          if e.process == process and e.f == "assign" and e.member is not None})
        for i, member in enumerate(members):
            death = Event(index=i, op_id=i, type="ok", process=process, f="revoke", group=group, member=member,
                          time_ms=died_ms, extra={"reason": "killed"})
            keyed.append((died_ms, next_source, i, death))
        next_source += 1
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    op_ids: dict[tuple, int] = {}
    merged = []
    for index, (_t, source, _i, e) in enumerate(keyed):
        op_id = op_ids.setdefault((source, e.op_id), len(op_ids))
        merged.append(Event(index=index, op_id=op_id, type=e.type, process=e.process, f=e.f, topic=e.topic,
                            partition=e.partition, value=e.value, offset=e.offset, member=e.member,
                            epoch=e.epoch, group=e.group, time_ms=e.time_ms, extra=e.extra))
    return History(clock_ms=clock_ms, events=merged)


# -- progress ---------------------------------------------------------------------------------------------


class ConsumedProgress(Progress):
    """Progress measured by what the group has committed (records, summed over partitions), for the
    nemesis's gates. The consumers are other processes and never wait at a gate: ``observe`` only counts."""

    def observe(self, consumed: int) -> None:
        with self._cond:
            self.invoked = max(self.invoked, consumed)
            self._cond.notify_all()


class _Monitor(threading.Thread):
    """Reads the group's committed offsets every MONITOR_INTERVAL_S into ``progress`` and ``committed``."""

    def __init__(self, bootstrap: str, group: str, progress: ConsumedProgress):
        super().__init__(name="group-monitor", daemon=True)
        self.bootstrap, self.group, self.progress = bootstrap, group, progress
        self.committed: dict = {}  # tp -> offset, as last read
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        from bus import Admin
        from bus.errors import BusError

        with Admin(self.bootstrap, request_timeout_ms=500) as admin:
            while not self._halt.wait(MONITOR_INTERVAL_S):
                try:
                    self.committed = admin.group_offsets(self.group)
                except BusError:
                    continue  # the coordinator is down (a fault): try again
                self.progress.observe(sum(o for o in self.committed.values() if o is not None))


# -- the run ----------------------------------------------------------------------------------------------


@dataclass
class GroupRunConfig:
    records: int = 40_000  # sends, all unique values, to seeded random partitions
    partitions: int = 12
    nodes: int = 3
    consumers: int = 3  # consumer processes in the group
    seed: int = 0
    consumer_kills: int = 2  # kill -9 a consumer, then a new process in its place
    consumer_pauses: int = 3  # SIGSTOP a consumer for consumer_pause_hold_s, then SIGCONT
    coordinator_kills: int = 1
    kills: int = 0  # kill -9 + restart of a node (the partition owners)
    pauses: int = 0  # SIGSTOP + SIGCONT of a node
    session_timeout_ms: int = 1_500
    heartbeat_interval_ms: int = 200
    rate: float = 800  # records per second each consumer handles at most
    max_records: int = 100  # per poll()
    produce_rate: int = 0  # 0: the topic is filled before the group consumes; else sends/s meanwhile
    consumer_kill_hold_s: tuple = (0.2, 1.0)
    # Past the session timeout and then some: the member is evicted while frozen, and another member is
    # given its partitions before it resumes (what makes a late commit of it a stale one).
    consumer_pause_hold_s: tuple = (2.5, 3.5)
    coordinator_hold_s: tuple = (0.5, 2.0)
    kill_hold_s: tuple = (0.2, 1.0)
    pause_hold_s: tuple = (1.5, 3.0)
    sabotage: str = ""  # the sabotage switches of the cluster's processes (tests/harness/sabotage.py)
    value_bytes: int = 32
    finish_timeout_s: float = 60.0  # after the last fault, for the group to commit every record (then
    # the run is judged as it stands; stats["committed_everything"] says whether it caught up)
    history_path: str | None = None  # save the merged history (JSON lines) here

    def fault_count(self) -> int:
        return self.consumer_kills + self.consumer_pauses + self.coordinator_kills + self.kills + self.pauses


@dataclass
class GroupRunResult:
    config: GroupRunConfig
    report: object  # checker.Report
    history: History
    stats: dict  # what happened, counted from the history (see _stats)
    faults: list  # [(Fault, seconds from start to healed)]
    committed: dict  # {tp: offset} read back from the group at the end
    ends: dict  # {tp: log end offset} at the end
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.config
        s = self.stats
        lines = [f"records={c.records} partitions={c.partitions} nodes={c.nodes} consumers={c.consumers} "
                 f"seed={c.seed} consumer_kills={c.consumer_kills} consumer_pauses={c.consumer_pauses} "
                 f"coordinator_kills={c.coordinator_kills} kills={c.kills} pauses={c.pauses} "
                 f"session_timeout_ms={c.session_timeout_ms} rate={c.rate:g}/consumer "
                 f"produce_rate={c.produce_rate or 'prefill'} sabotage={c.sabotage or '-'}",
                 "group: " + " ".join(f"{k}={v}" for k, v in s.items()),
                 "faults: " + (", ".join(f"{f.kind} {f.target} {f.hold_s:.1f}s (took {t:.1f}s)"
                                         for f, t in self.faults) or "none"),
                 "timings: " + " ".join(f"{k}={v:.1f}s" for k, v in self.timings.items())]
        return "\n".join(lines) + "\n" + self.report.table()


def _stats(history: History, processes: list[str], committed: dict, ends: dict) -> dict:
    """Counts that show what the run went through (not judgements: the checker's table is that)."""
    polls = commits_ok = commits_fail = commits_unknown = lost = killed = assigns = 0
    zombies = {"ok": 0, "fail": 0, "unknown": 0}
    polled: dict = {}
    ops: dict = {}
    for e in history.events():
        if e.f == "poll" and e.type == "ok":
            polls += 1
            tpo = ops.get(e.op_id)
            if tpo is not None:
                polled[tpo] = polled.get(tpo, 0) + 1
        elif e.f == "poll" and e.type == "invoke":
            ops[e.op_id] = (e.topic, e.partition, e.offset)
        elif e.f == "commit" and not e.extra.get("observed") and e.type != "invoke":
            if e.extra.get("zombie"):
                zombies[e.type] += 1
            elif e.type == "ok":
                commits_ok += 1
            elif e.type == "fail":
                commits_fail += 1
            else:
                commits_unknown += 1
        elif e.f == "assign":
            assigns += 1
        elif e.f == "revoke" and e.extra.get("lost"):
            lost += 1
        elif e.f == "revoke" and e.extra.get("reason") == "killed":
            killed += 1
    return {"processes": len(processes), "polled": polls, "redelivered": sum(n - 1 for n in polled.values()),
            "assigns": assigns, "lost_partitions": lost, "killed_members": killed, "commits_ok": commits_ok,
            "commits_failed": commits_fail, "commits_unknown": commits_unknown,
            "zombie_commits_refused": zombies["fail"], "zombie_commits_accepted": zombies["ok"],
            "committed_everything": all(committed.get(tp) == end for tp, end in ends.items())}


def run_groups(config: GroupRunConfig, data_dir: str, log=None) -> GroupRunResult:
    from bus import Admin
    from nodes.cluster import LocalCluster

    log = log or (lambda message: None)
    timings = {}
    started_s = time.monotonic()
    node_ids = list(range(1, config.nodes + 1))
    cluster = LocalCluster(os.path.join(data_dir, "cluster"), config.nodes, **cluster_options(config.sabotage))
    history = History(clock_ms=clock_ms)
    consumers = monitor = nemesis = producer = None
    try:
        cluster.start()
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, config.partitions)
        wait_serving_topic(cluster.bootstrap, TOPIC, config.partitions)
        options = {"linger_ms": 5, "request_timeout_ms": 2_000, "delivery_timeout_ms": 60_000, "retry_backoff_ms": 20}
        producer = ProducerWorker("producer-0", cluster.bootstrap, TOPIC, config.partitions, config.records, history,
                                  seed=config.seed, value_bytes=config.value_bytes, producer_options=options,
                                  flush_timeout_s=70, rate=config.produce_rate)
        producer.start()
        if not config.produce_rate:
            producer.join()
            if producer.error is not None:
                raise RuntimeError(f"filling the topic failed: {producer.error!r}") from producer.error
        timings["start"] = time.monotonic() - started_s

        phase_s = time.monotonic()
        faults = plan(config.seed, node_ids, kills=config.kills, pauses=config.pauses,
                      coordinator_kills=config.coordinator_kills, kill_hold_s=config.kill_hold_s,
                      pause_hold_s=config.pause_hold_s, coordinator_hold_s=config.coordinator_hold_s,
                      consumer_slots=range(config.consumers), consumer_kills=config.consumer_kills,
                      consumer_pauses=config.consumer_pauses, consumer_kill_hold_s=config.consumer_kill_hold_s,
                      consumer_pause_hold_s=config.consumer_pause_hold_s)
        progress = ConsumedProgress(config.records, [f.at_fraction for f in faults])
        consumers = ConsumerProcesses(cluster.bootstrap, os.path.join(data_dir, "consumers"), topic=TOPIC,
                                      group=GROUP, count=config.consumers,
                                      session_timeout_ms=config.session_timeout_ms,
                                      heartbeat_interval_ms=config.heartbeat_interval_ms, rate=config.rate,
                                      max_records=config.max_records).start()
        monitor = _Monitor(cluster.bootstrap, GROUP, progress)
        monitor.start()
        nemesis = Nemesis(cluster, history, faults, progress, log=log, consumers=consumers)
        nemesis.start()

        # Every fault happens while the group consumes (the gates are fractions of the records), then the
        # group must catch up: every record committed.
        deadline_s = None
        ends = None
        last_committed, moved_s = None, time.monotonic()
        with Admin(cluster.bootstrap, request_timeout_ms=2_000) as admin:
            while True:
                if nemesis.error is not None:
                    raise RuntimeError(f"the nemesis failed: {nemesis.error!r}") from nemesis.error
                if producer.error is not None:
                    raise RuntimeError(f"the producer failed: {producer.error!r}") from producer.error
                if nemesis.is_alive() or producer.is_alive():
                    consumers.check_alive()
                    time.sleep(0.1)
                    continue
                if deadline_s is None:
                    timings["faults"] = time.monotonic() - phase_s
                    deadline_s = time.monotonic() + config.finish_timeout_s
                    ends = _end_offsets(admin, config.partitions, deadline_s)
                consumers.check_alive()
                committed = monitor.committed
                if all(committed.get(tp) == end for tp, end in ends.items()):
                    break
                if committed != last_committed:
                    last_committed, moved_s = committed, time.monotonic()
                if time.monotonic() > min(deadline_s, moved_s + STALL_S_MAX):
                    # Judged all the same: e.g. an accepted stale commit moved an offset back after its
                    # partition was consumed to the end, and nobody will commit it again (stats say so).
                    behind = {f"{t}/{p}": (committed.get((t, p)), end) for (t, p), end in ends.items()
                              if committed.get((t, p)) != end}
                    log(f"the group stopped short of committing every record: (committed, end) {behind}")
                    break
                time.sleep(0.1)
        timings["consume"] = time.monotonic() - phase_s
        monitor.stop()
        phase_s = time.monotonic()
        consumers.stop()
        timings["stop"] = time.monotonic() - phase_s

        phase_s = time.monotonic()
        committed = _read_committed(cluster.bootstrap, GROUP)
        for (t, p), offset in sorted(committed.items()):
            history.record("final-read", "commit", group=GROUP, topic=t, partition=p, offset=offset, observed=True)
        records, log_start = drain(cluster.bootstrap, TOPIC, config.partitions)
        history.record_drain(records)
        timings["drain"] = time.monotonic() - phase_s

        phase_s = time.monotonic()
        sources = [history.events()] + [load_journal(consumers.history_path(p)) for p in consumers.processes]
        merged = merge(sources, consumers.killed)
        report = check(merged, log_start=log_start)
        timings["check"] = time.monotonic() - phase_s
        if config.history_path:
            merged.save(config.history_path)
        timings["total"] = time.monotonic() - started_s
        return GroupRunResult(config, report, merged, _stats(merged, consumers.processes, committed, ends),
                              list(nemesis.done), committed, ends, timings)
    finally:
        if nemesis is not None:
            nemesis.stop()
        if monitor is not None and monitor.is_alive():
            monitor.stop()
        if consumers is not None:
            consumers.kill_all()
        cluster.stop()


def _end_offsets(admin, partitions: int, deadline_s: float) -> dict:
    """{(topic, partition): log end offset}, once every partition's node answers."""
    while True:
        parts = admin.describe_topic(TOPIC)["partitions"]
        if all(p["end_offset"] is not None for p in parts):
            return {(TOPIC, p["partition"]): p["end_offset"] for p in parts}
        if time.monotonic() > deadline_s:
            raise TimeoutError(f"log end offsets of {TOPIC} not known: {parts}")
        time.sleep(0.2)


def _read_committed(bootstrap: str, group: str, timeout_s: float = 30.0) -> dict:
    from bus import Admin
    from bus.errors import BusError

    deadline_s = time.monotonic() + timeout_s
    with Admin(bootstrap, request_timeout_ms=2_000) as admin:
        while True:
            try:
                return admin.group_offsets(group)
            except BusError:
                if time.monotonic() > deadline_s:
                    raise
                time.sleep(0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.group_workload")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("consume", help="one group member: poll, handle at a rate, commit; record it all")
    c.add_argument("--bootstrap", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--group", required=True)
    c.add_argument("--process", required=True, help="this process's name in the history")
    c.add_argument("--history", required=True, help="the JSON-lines file to record into")
    c.add_argument("--session-timeout-ms", type=int, required=True)
    c.add_argument("--heartbeat-interval-ms", type=int, required=True)
    c.add_argument("--rate", type=float, required=True, help="records per second handled at most")
    c.add_argument("--max-records", type=int, required=True, help="per poll()")
    c.add_argument("--poll-timeout-ms", type=int, default=100, help="how long a poll() waits for records")
    args = parser.parse_args(argv)
    return consume(args)


if __name__ == "__main__":
    sys.exit(main())
