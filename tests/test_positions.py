"""bus.positions, the consumer's positions, seek epochs and prefetch buffer, driven directly: seeded random
schedules of assignments, seeks, pauses, fetch replies (current and stale epochs, corrupt batches), out of
range answers, resolved resets, records put back and polls, with events landing in the middle of a decode
(the shell lets go of its lock there). After every step: the core's own invariants, and that a record
returned is at its partition's position, was fetched since the partition's last seek, is never a paused
partition's, and that positions move forward except by a seek. The pair over a real cluster is
tests/test_client_inputs.py (turns, pauses, seeks) and tests/test_client_conformance.py."""

from __future__ import annotations

import random

import pytest

from bus.batch import pack_batch, stamp
from bus.errors import CorruptRecord, NodeUnavailable, OffsetOutOfRange
from bus.positions import Positions, decode_runs
from bus.records import Record, TopicPartition
from bus.rotation import take_in_turn

TPS = [TopicPartition("t", p) for p in range(3)]


def stored(base_offset: int, values: list[bytes]) -> bytes:
    """A batch of ``values`` as a node stores and serves it."""
    flat = [field for value in values for field in (None, None, value, None)]
    return bytes(stamp(pack_batch(flat, len(values)), base_offset, 1_000)[0])


class Log:
    """One partition's log on its node: batches (base offset, record count), retention moving its start."""

    def __init__(self, rng: random.Random) -> None:
        self.batches: list[tuple[int, int]] = []
        self.start = self.end = 0
        self.grow(rng)

    def grow(self, rng: random.Random) -> None:
        for _ in range(rng.randint(1, 3)):
            count = rng.randint(1, 6)
            self.batches.append((self.end, count))
            self.end += count

    def retain(self) -> None:
        if len(self.batches) > 1:
            base, count = self.batches.pop(0)
            self.start = base + count

    def chunk(self, offset: int, generation: int, batches_max: int) -> tuple[bytes, int]:
        """What a fetch at ``offset`` gets: whole batches from the one holding it, each record's value
        ``b"generation:offset"`` (so a returned record says which seek generation fetched it), and the next
        offset."""
        data, next_offset = b"", offset
        for base, count in self.batches:
            if base + count > offset and batches_max > 0:
                data += stored(base, [b"%d:%d" % (generation, o) for o in range(base, base + count)])
                next_offset = base + count
                batches_max -= 1
        return data, next_offset


class Schedule:
    """The core, the partitions' logs, the fetches and resets in flight, and what a user has seen."""

    def __init__(self, seed: int) -> None:
        self.rng = rng = random.Random(seed)
        self.reset = rng.choice(["earliest", "latest", "none"])
        self.grouped = rng.random() < 0.5
        self.core = Positions(self.reset, prefetch_bytes_max=rng.choice([200, 1_000, 100_000]))
        self.logs = {tp: Log(rng) for tp in TPS}
        # The seek generation of each partition: up on every move of its position other than by handing records
        # out (a seek, a reset, records put back, a reassignment), never by the core's other epochs.
        self.generation = dict.fromkeys(TPS, 0)
        self.fetches: list[tuple[TopicPartition, int, int, int]] = []  # (tp, offset, epoch, generation) in flight
        self.resets: list[tuple[TopicPartition, str | int, int]] = []  # (tp, spec, epoch) in flight
        self.returned = 0
        self.stale = 0  # replies the core dropped as stale
        self.during_decode = 0  # events that landed in the middle of a decode
        self.errors: list[BaseException] = []
        # Set while a poll is on: (out, {tp: [(index in out, expected next offset or None, generation)]}).
        self.polling: tuple[list[Record], dict[TopicPartition, list[tuple[int, int | None, int]]]] | None = None
        self.paused_during: dict[TopicPartition, int] = {}  # tp paused during this poll's decode -> index in out
        self.calm = False  # draining: no events during decodes, no records put back

    # -- the user's events -----------------------------------------------------------------------------

    def moved(self, tp: TopicPartition) -> None:
        """``tp``'s position was moved by something other than a poll: a new seek generation."""
        self.generation[tp] += 1
        if self.polling is not None:
            out, segments = self.polling
            segments.setdefault(tp, []).append((len(out), self.core.states[tp].position if tp in self.core.states
                                                else None, self.generation[tp]))

    def assign(self) -> None:
        wanted = self.rng.sample(TPS, self.rng.randint(0, len(TPS)))
        positions = {tp: self.rng.randint(0, self.logs[tp].end) for tp in wanted if self.rng.random() < 0.5}
        before = set(self.core.states)
        self.core.assign(wanted, positions)
        for tp in before - set(wanted):
            self.moved(tp)  # gone: whatever comes back later is a new generation
            # A partition assigned again starts again at epoch 0 (bus/group_member.py counts on it), so a fetch
            # asked before it left can match it again: then it is the same question (the same partition and
            # offset) as a new fetch would ask, with the same answer; this schedule forgets those. Resets still
            # out are kept: their answers must not resolve another spec (Positions.resolved).
            self.fetches = [f for f in self.fetches if f[0] != tp]
        for tp in set(wanted) - before:
            self.moved(tp)

    def seek(self) -> None:
        if not self.core.states:
            return
        tp = self.rng.choice(sorted(self.core.states))
        log = self.logs[tp]
        target = self.rng.choice([self.rng.randint(max(0, log.start - 2), log.end + 2), "earliest", "latest"])
        self.core.seek([tp], target)
        self.moved(tp)

    def pause_or_resume(self) -> None:
        if not self.core.states:
            return
        tps = self.rng.sample(sorted(self.core.states), self.rng.randint(1, len(self.core.states)))
        if self.rng.random() < 0.5:
            self.core.pause(tps)
            if self.polling is not None:
                for tp in tps:
                    self.paused_during.setdefault(tp, len(self.polling[0]))
        else:
            self.core.resume(tps)

    # -- the fetcher's events --------------------------------------------------------------------------

    def issue_fetches(self) -> None:
        wanted = self.core.fetchable()
        assert not set(wanted) & self.core.paused, "a paused partition is fetched"
        for tp, (offset, epoch) in wanted.items():
            assert tp in self.core.states and self.core.states[tp].epoch == epoch
            self.fetches.append((tp, offset, epoch, self.generation[tp]))

    def answer_fetch(self) -> None:
        if not self.fetches:
            return
        i = self.rng.randrange(len(self.fetches))
        tp, offset, epoch, generation = self.fetches[i] if self.rng.random() < 0.2 else self.fetches.pop(i)
        log = self.logs[tp]
        roll = self.rng.random()
        if roll < 0.05:
            self.core.fetch_error(tp, epoch, NodeUnavailable("the node went away"))
        elif not log.start <= offset <= log.end:
            if self.core.out_of_range(tp, epoch, offset, log.start, log.end):
                self.moved(tp)
        else:
            data, next_offset = log.chunk(offset, generation, self.rng.randint(1, 3))
            if data and roll < 0.1:
                data = data[:-1] + bytes([data[-1] ^ 0x01])  # a flipped bit in transit: a corrupt batch
            if not self.core.fetched([(tp, epoch, offset, data, next_offset, log.end)]) and data:
                self.stale += 1

    def ask_resets(self) -> None:
        self.resets += self.core.pending_resets()

    def answer_reset(self) -> None:
        if not self.resets:
            return
        tp, spec, epoch = self.resets.pop(self.rng.randrange(len(self.resets)))
        log = self.logs[tp]
        offset = log.start if spec == "earliest" else log.end if spec == "latest" else \
            self.rng.randint(log.start, log.end)
        state = self.core.states.get(tp)
        wanted = None if state is None else state.reset
        if self.core.resolved(tp, spec, epoch, offset):
            assert wanted == spec and self.core.states[tp].position == offset, (tp, spec, wanted)

    def log_changes(self) -> None:
        log = self.logs[self.rng.choice(TPS)]
        log.grow(self.rng) if self.rng.random() < 0.8 else log.retain()

    # -- poll() ----------------------------------------------------------------------------------------

    def aged(self, build, records_max):
        """The shell decodes and builds Records with its lock let go: any event may land meanwhile."""
        if not self.calm and self.rng.random() < 0.3:
            self.during_decode += 1
            self.rng.choice([self.seek, self.pause_or_resume, self.assign, self.answer_fetch, self.answer_reset,
                             self.issue_fetches])()
        return build()

    def poll(self) -> None:
        error = self.core.take_error(self.grouped)
        if error is not None:
            assert isinstance(error, (CorruptRecord, OffsetOutOfRange, NodeUnavailable)), error
            self.errors.append(error)
            return
        core = self.core
        paused_before = set(core.paused)
        out: list[Record] = []
        segments = {tp: [(0, s.position, self.generation[tp])] for tp, s in core.states.items()}
        self.polling, self.paused_during = (out, segments), {}
        want = self.rng.randint(1, 40)
        try:
            taken = take_in_turn(core.ready, want, lambda tp, n: core.take_from(tp, out, n, self.aged))
        finally:
            self.polling = None
        core.wake_fetcher = False
        assert taken == len(out) <= want
        self.check_returned(out, segments, paused_before)
        self.returned += len(out)
        # Records put back (a deserializer refused one; bus.aio's cancel).
        if out and not self.calm and self.rng.random() < 0.1:
            back = out[self.rng.randrange(len(out)):]
            first: dict[TopicPartition, int] = {}
            for r in back:
                first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
            core.unread(first)
            for tp, offset in first.items():
                if tp in core.states:
                    assert core.states[tp].position == offset
                    self.moved(tp)

    def check_returned(self, out: list[Record], segments, paused_before: set[TopicPartition]) -> None:
        by_tp: dict[TopicPartition, list[tuple[int, Record]]] = {}
        for i, r in enumerate(out):
            by_tp.setdefault(TopicPartition(r.topic, r.partition), []).append((i, r))
        for tp, got in by_tp.items():
            assert tp not in paused_before, f"{tp} was paused and returned {got}"
            assert got[-1][0] < self.paused_during.get(tp, len(out)), f"{tp} returned after its pause: {got}"
            # Each record at the position: the offset after the previous one's, or where the last move put it.
            expected: dict[int, tuple[int | None, int]] = {}
            for i, r in got:
                index, position, generation = max(s for s in segments[tp] if s[0] <= i)
                next_offset, _ = expected.get(index, (position, generation))
                assert r.offset == next_offset, (tp, r.offset, next_offset, segments[tp])
                # Fetched since the last seek: an older generation's bytes are never returned.
                assert r.value == b"%d:%d" % (generation, r.offset), (tp, r.value, generation)
                expected[index] = (r.offset + 1, generation)
            state = self.core.states.get(tp)
            last_index = max(s[0] for s in segments[tp])
            if state is not None and last_index in expected:
                assert state.position == expected[last_index][0], (tp, state.position, expected)

    # -- the schedule ----------------------------------------------------------------------------------

    def step(self) -> None:
        before = {tp: s.position for tp, s in self.core.states.items()}
        generations = dict(self.generation)
        action = self.rng.choices(
            [self.assign, self.seek, self.pause_or_resume, self.issue_fetches, self.answer_fetch, self.ask_resets,
             self.answer_reset, self.log_changes, self.poll],
            [1, 2, 2, 8, 12, 3, 4, 6, 12])[0]
        action()
        self.core.check_invariants()
        for tp, position in before.items():
            state = self.core.states.get(tp)
            if state is not None and position is not None and state.position is not None \
                    and self.generation[tp] == generations[tp]:
                assert state.position >= position, f"{tp} went back from {position} to {state.position} unsought"

    def drain(self) -> None:
        """Everything assigned, resumed and sought where needed, then fetched and polled to the logs' ends:
        the core makes progress."""
        self.calm = True
        before = set(self.core.states)
        self.core.assign(TPS)
        self.core.resume(TPS)
        for tp in set(TPS) - before:
            self.moved(tp)
        for _ in range(2_000):
            if all(self.core.states[tp].position == self.logs[tp].end for tp in TPS):
                return
            for tp in TPS:
                state = self.core.states[tp]
                # No position and none coming (auto_offset_reset "none"), or one past the end (sought there):
                # the user seeks.
                if state.reset in (None, "none") and (state.fetch_offset is None
                                                      or state.fetch_offset > self.logs[tp].end):
                    self.core.seek([tp], "earliest")
                    self.moved(tp)
            self.ask_resets()
            while self.resets:
                self.answer_reset()
            self.issue_fetches()
            while self.fetches:
                tp, offset, epoch, generation = self.fetches.pop()
                data, next_offset = self.logs[tp].chunk(offset, generation, 2)
                if not self.logs[tp].start <= offset <= self.logs[tp].end:
                    if self.core.out_of_range(tp, epoch, offset, self.logs[tp].start, self.logs[tp].end):
                        self.moved(tp)
                else:
                    self.core.fetched([(tp, epoch, offset, data, next_offset, self.logs[tp].end)])
            self.core.check_invariants()
            self.poll()
            self.core.check_invariants()
        raise AssertionError({tp: (s.position, self.logs[tp].end) for tp, s in self.core.states.items()})


@pytest.mark.parametrize("seed", range(60))
def test_a_seeded_schedule_keeps_every_invariant_and_reads_to_the_end(seed):
    schedule = Schedule(seed)
    for _ in range(600):
        schedule.step()
    schedule.drain()
    assert schedule.core.chunk_bytes == 0


def test_the_schedules_reach_the_cases_they_are_for():
    """The seeds above do exercise stale replies, corrupt batches, out of range and pauses mid-decode."""
    corrupt = out_of_range = returned = stale = during_decode = 0
    for seed in range(60):
        schedule = Schedule(seed)
        for _ in range(600):
            schedule.step()
        corrupt += sum(isinstance(e, CorruptRecord) for e in schedule.errors)
        out_of_range += sum(isinstance(e, OffsetOutOfRange) for e in schedule.errors)
        returned += schedule.returned
        stale += schedule.stale
        during_decode += schedule.during_decode
    assert corrupt > 20 and out_of_range > 20 and returned > 2_000 and stale > 500 and during_decode > 100, (
        corrupt, out_of_range, returned, stale, during_decode)


def _core_with(tp: TopicPartition, batches: list[bytes], prefetch_bytes_max: int = 10_000) -> Positions:
    core = Positions("earliest", prefetch_bytes_max)
    core.assign([tp], {tp: 0})
    assert core.fetchable() == {tp: (0, 0)}
    data = b"".join(batches)
    assert core.fetched([(tp, 0, 0, data, 12, 12)])
    return core


def _take(core: Positions, n: int) -> list[Record]:
    out: list[Record] = []
    take_in_turn(core.ready, n, lambda tp, k: core.take_from(tp, out, k, lambda build, records_max: build()))
    return out


def test_a_batchs_bytes_leave_the_buffer_when_its_last_record_is_handed_out():
    """The buffer bounds the bytes not yet read: a partly read chunk's read batches no longer count, so the
    fetcher may ask for more before the chunk's last record is out."""
    tp = TPS[0]
    batches = [stored(base, [b"%d" % o for o in range(base, base + 4)]) for base in (0, 4, 8)]
    core = _core_with(tp, batches, prefetch_bytes_max=sum(map(len, batches)))
    assert core.chunk_bytes == sum(map(len, batches)) and core.fetchable() == {}  # full
    assert [r.offset for r in _take(core, 3)] == [0, 1, 2]
    assert core.chunk_bytes == sum(map(len, batches))  # the first batch's last record is not out yet
    assert core.states[tp].runs[-1][:4] == [3, None, 0, 1]  # kept as columns, built when its turn comes
    assert [r.offset for r in _take(core, 2)] == [3, 4]
    assert core.chunk_bytes == len(batches[1]) + len(batches[2])  # the first batch is read
    assert core.fetchable() == {tp: (12, 0)}  # room again, with two thirds of the chunk still to read
    core.check_invariants()
    assert [r.offset for r in _take(core, 10)] == list(range(5, 12))
    assert core.chunk_bytes == 0
    core.check_invariants()


def test_a_reply_for_an_older_epoch_or_offset_is_dropped():
    tp = TPS[0]
    core = Positions("earliest", 10_000)
    core.assign([tp], {tp: 0})
    core.seek([tp], 4)
    assert core.fetchable() == {tp: (4, 1)}
    old = stored(0, [b"a", b"b", b"c", b"d", b"e", b"f"])
    assert not core.fetched([(tp, 0, 0, old, 6, 6)])  # asked before the seek
    assert not core.fetched([(tp, 1, 0, old, 6, 6)])  # not at the fetch offset
    assert not core.out_of_range(tp, 0, 0, 0, 6) and not core.resolved(tp, "earliest", 0, 0)
    assert core.chunk_bytes == 0 and not core.ready
    assert core.fetched([(tp, 1, 4, old, 6, 6)])
    assert [(r.offset, r.value) for r in _take(core, 10)] == [(4, b"e"), (5, b"f")]
    core.check_invariants()


def test_an_answer_asked_before_a_reassignment_does_not_resolve_another_spec():
    """A partition assigned again starts again at epoch 0: a seek_to_beginning's answer still out when it left
    carries the epoch its seek_to_end has now, and must not give it the beginning."""
    tp = TPS[0]
    core = Positions("none", 10_000)
    core.assign([tp], {tp: 5})
    core.seek([tp], "earliest")
    assert core.pending_resets() == [(tp, "earliest", 1)]
    core.assign([])
    core.assign([tp], {tp: 5})
    core.seek([tp], "latest")
    assert core.pending_resets() == [(tp, "latest", 1)]
    assert not core.resolved(tp, "earliest", 1, 0)  # the old question's answer
    assert core.position(tp) is None
    assert core.resolved(tp, "latest", 1, 9) and core.position(tp) == 9
    core.check_invariants()


def test_a_seek_of_a_partition_not_assigned_changes_nothing():
    a, b = TPS[0], TPS[1]
    core = Positions("earliest", 10_000)
    core.assign([a], {a: 3})
    with pytest.raises(Exception, match="not assigned"):
        core.seek([a, b], 7)
    assert core.states[a].position == 3 and core.states[a].epoch == 0


def test_the_checks_catch_broken_bookkeeping():
    """check_invariants() is not vacuous: each broken rule is caught."""
    tp = TPS[0]
    batches = [stored(base, [b"x"] * 4) for base in (0, 4, 8)]
    for sabotage in (lambda c: setattr(c, "chunk_bytes", c.chunk_bytes + 1),
                     lambda c: c.ready.pop(tp),
                     lambda c: c.paused.add(TPS[2]),
                     lambda c: setattr(c.states[tp], "held_bytes", c.states[tp].held_bytes - 1),
                     lambda c: c.states[tp].read_batches.appendleft((1, 0)),
                     lambda c: setattr(c.states[tp], "position", None),
                     lambda c: setattr(c.states[tp], "fetch_offset", 0)):
        core = _core_with(tp, batches)
        _take(core, 2)
        core.check_invariants()
        sabotage(core)
        with pytest.raises(AssertionError):
            core.check_invariants()



def test_the_rest_of_a_batch_kept_as_columns_is_built_as_decoded_at_once():
    """Keys, values, headers and timestamps of the records built later equal those of a whole decode, with
    and without each column (None columns: no record has one), from a fetch offset inside the batch too."""
    tp = TPS[0]
    rows = [(1_000 + i if i % 2 else None, b"k%d" % i if i % 3 else None, b"v%d" % i if i != 4 else None,
             [("h", b"%d" % i)] if i % 4 == 1 else None) for i in range(7)]
    plain = [(None, None, b"v%d" % i, None) for i in range(7)]
    for shape in (rows, plain):
        data = bytes(stamp(pack_batch([f for row in shape for f in row], len(shape)), 0, 5_000)[0])
        for fetched_offset in (0, 2):
            whole = decode_runs(tp, fetched_offset, data, 0, 100)[0][0][1]
            core = Positions("earliest", 10_000)
            core.assign([tp], {tp: fetched_offset})
            assert core.fetched([(tp, 0, fetched_offset, data, 7, 7)])
            got = _take(core, 1) + _take(core, 2) + _take(core, 100)
            assert got == whole and [r.offset for r in got] == list(range(fetched_offset, 7))
            core.check_invariants()
