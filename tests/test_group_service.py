"""The coordinator's group shell (nodes/group_service.py) without sockets: a real MetaStore, a fake clock.

What the shell adds to the pure state machine (tests/test_groups.py) is checked here: records are on disk
when a handler returns, a restart restores members and offsets, refusals come back as typed errors,
expirations found by ``tick`` are persisted, topic changes reach the groups, wire lists become tuples,
results are msgpack-able, and the fault harness's sabotaged service does what the harness expects.
"""

from __future__ import annotations

import msgpack
import pytest

from bus import wire
from bus.errors import (
    BusError,
    FencedMemberEpoch,
    GroupFull,
    GroupNotEmpty,
    InconsistentAssignor,
    UnknownGroup,
    UnknownMemberId,
)
from nodes import groups as core
from nodes.group_service import GroupService
from nodes.server import MALFORMED
from store import MetaStore
from tests.harness.sabotage import StaleCommitGroupService

SESSION_MS = 1_000


class Shell:
    """A GroupService over a MetaStore in ``path``, driven like the coordinator drives it."""

    def __init__(self, path, topics, now_ms=1_000, service_class=GroupService):
        self.path, self.topics, self.now_ms, self.service_class = path, topics, now_ms, service_class
        self.store = MetaStore(str(path))
        self.service = service_class(self.store, lambda: self.topics, clock_ms=lambda: self.now_ms)
        self.handlers = self.service.handlers()

    def __call__(self, op, **args):
        result = self.handlers[op](args, self.now_ms)
        msgpack.packb(result, use_bin_type=True)  # everything a handler returns must go on the wire
        return result

    def stored(self) -> dict:
        return dict(self.store.items(core.KEY_PREFIX))

    def restart(self) -> Shell:
        self.store.close()
        return Shell(self.path, self.topics, self.now_ms, self.service_class)

    def join(self, group="g", topics=("t",), **kw):
        return self(wire.GROUP_JOIN, group_id=group, client_id="c", topics=list(topics),
                    session_timeout_ms=kw.pop("session_timeout_ms", SESSION_MS), **kw)

    def heartbeat(self, reply, owned, group="g"):
        return self(wire.GROUP_HEARTBEAT, group_id=group, member_id=reply["member_id"],
                    member_epoch=reply["member_epoch"], owned=owned)


@pytest.fixture
def shell(tmp_path):
    s = Shell(tmp_path / "meta", {"t": {"partitions": [1, 2, 3, 1]}})
    yield s
    s.store.close()


def test_join_heartbeat_commit_fetch_persisted_before_reply(shell):
    a = shell.join()
    assert a["member_epoch"] == 1 and sorted(a["assignment"]) == [["t", 0], ["t", 1], ["t", 2], ["t", 3]]
    stored = shell.stored()
    assert core._member_key("g", a["member_id"]) in stored and core.KEY_MEMBER_SEQ in stored

    result = shell(wire.OFFSET_COMMIT, group_id="g", member_id=a["member_id"], member_epoch=a["member_epoch"],
                   offsets=[["t", 0, 5, None], ["t", 3, 7, "meta"]])
    assert result == {"committed": [["t", 0, 5], ["t", 3, 7]], "ignored": []}
    assert shell.stored()[core._offset_key("g", ("t", 3))] == {"offset": 7, "metadata": "meta"}

    # A lower offset is ignored (a late duplicate cannot rewind the group).
    result = shell(wire.OFFSET_COMMIT, group_id="g", member_id=a["member_id"], member_epoch=a["member_epoch"],
                   offsets=[["t", 0, 4, None]])
    assert result == {"committed": [["t", 0, 5]], "ignored": [["t", 0]]}

    fetched = shell(wire.OFFSET_FETCH, group_id="g", partitions=[["t", 0], ["t", 1]])
    assert fetched == {"offsets": [["t", 0, 5, None], ["t", 1, None, None]]}
    assert shell(wire.OFFSET_FETCH, group_id="g")["offsets"] == [["t", 0, 5, None], ["t", 3, 7, "meta"]]
    assert shell(wire.OFFSET_FETCH, group_id="nobody")["offsets"] == []

    # A second member: the first is asked to revoke half, and the partitions move once it stops reporting them.
    b = shell.join()
    a2 = shell.heartbeat(a, a["assignment"])
    assert len(a2["revoke"]) == 2
    kept = [tp for tp in a["assignment"] if tp not in a2["revoke"]]
    a3 = shell.heartbeat(a2, kept)
    assert sorted(a3["assignment"]) == sorted(kept) and a3["member_epoch"] == a3["group_epoch"]
    b2 = shell.heartbeat(b, [])
    assert sorted(b2["assignment"]) == sorted(a2["revoke"])
    assert shell(wire.GROUP_LIST) == {"groups": [{"group_id": "g", "state": "stable", "group_epoch": 2,
                                                  "members": 2}]}


def test_restart_restores_members_and_offsets(shell):
    a = shell.join()
    shell(wire.OFFSET_COMMIT, group_id="g", member_id=a["member_id"], member_epoch=a["member_epoch"],
          offsets=[["t", 1, 42, None]])
    before = shell(wire.GROUP_DESCRIBE, group_id="g")
    shell.now_ms += SESSION_MS - 1  # just inside the session: a restart must not evict
    restarted = shell.restart()
    try:
        after = restarted(wire.GROUP_DESCRIBE, group_id="g")
        assert after["members"] == before["members"] and after["offsets"] == before["offsets"]
        assert after["group_epoch"] == before["group_epoch"]
        # The member's session starts afresh at the restart: a heartbeat a whole session later still counts.
        restarted.now_ms += SESSION_MS
        again = restarted.heartbeat(a, a["assignment"])
        assert again["member_epoch"] == a["member_epoch"] and again["revoke"] == []
        assert restarted(wire.OFFSET_FETCH, group_id="g", partitions=[["t", 1]])["offsets"] == [["t", 1, 42, None]]
    finally:
        restarted.store.close()
        shell.store = MetaStore(str(shell.path))  # for the fixture's close


def test_refusals_are_typed_errors(shell, monkeypatch):
    a = shell.join()
    with pytest.raises(UnknownMemberId):
        shell(wire.GROUP_HEARTBEAT, group_id="g", member_id="nobody", member_epoch=1, owned=[])
    with pytest.raises(FencedMemberEpoch):
        shell(wire.OFFSET_COMMIT, group_id="g", member_id=a["member_id"], member_epoch=a["member_epoch"] + 1,
              offsets=[["t", 0, 1, None]])
    with pytest.raises(GroupNotEmpty, match=a["member_id"]):
        shell(wire.GROUP_RESET_OFFSETS, group_id="g", offsets=[["t", 0, 0]])
    with pytest.raises(GroupNotEmpty):
        shell(wire.GROUP_DELETE, group_id="g")
    with pytest.raises(UnknownGroup):
        shell(wire.GROUP_DESCRIBE, group_id="nope")
    with pytest.raises(UnknownGroup):
        shell(wire.GROUP_DELETE, group_id="nope")
    with pytest.raises(InconsistentAssignor):
        shell.join(assignor="range")
    monkeypatch.setattr(core, "MEMBERS_PER_GROUP_MAX", 1)
    with pytest.raises(GroupFull):
        shell.join()
    # A refused request changed nothing.
    assert [m["member_id"] for m in shell(wire.GROUP_DESCRIBE, group_id="g")["members"]] == [a["member_id"]]


@pytest.mark.parametrize("op, args", [
    (wire.GROUP_JOIN, {"group_id": "g"}),  # no session timeout
    (wire.GROUP_JOIN, {"group_id": "g", "topics": "t", "session_timeout_ms": 100}),
    (wire.GROUP_HEARTBEAT, {"group_id": "g", "member_id": "m", "member_epoch": 0, "owned": [["t"]]}),
    (wire.GROUP_HEARTBEAT, {"group_id": "g", "member_id": "m", "member_epoch": 0, "owned": 5}),
    (wire.OFFSET_COMMIT, {"group_id": "g", "member_id": "m", "member_epoch": 0, "offsets": [["t", 0, 1]]}),
    (wire.OFFSET_FETCH, {"group_id": "g", "partitions": [["t", 0, 1]]}),
    (wire.GROUP_RESET_OFFSETS, {"group_id": "g", "offsets": [["t", 0, -1]]}),
    (wire.GROUP_RESET_OFFSETS, {"group_id": 7, "offsets": []}),
    (wire.GROUP_DESCRIBE, {}),
])
def test_malformed_arguments_are_refused_without_change(shell, op, args):
    before = shell.stored()
    with pytest.raises((BusError,) + MALFORMED):  # the coordinator answers all of these INVALID_REQUEST
        shell(op, **args)
    assert shell.stored() == before


def test_tick_persists_evictions_and_describe_gives_the_reason(shell):
    a = shell.join()
    key = core._member_key("g", a["member_id"])
    assert shell.service.next_deadline_ms() == shell.now_ms + SESSION_MS + 1
    shell.service.tick(shell.now_ms + SESSION_MS)  # 1 ms before: still alive
    assert key in shell.stored()
    shell.service.tick(shell.now_ms + SESSION_MS + 1)
    assert key not in shell.stored()
    described = shell(wire.GROUP_DESCRIBE, group_id="g")
    assert described["state"] == "empty" and described["members"] == []
    assert [(e["member_id"], e["reason"]) for e in described["evictions"]] == [(a["member_id"], "session_timeout")]
    assert shell.service.next_deadline_ms() is None
    # Now empty: offsets may be reset and the group deleted.
    shell(wire.GROUP_RESET_OFFSETS, group_id="g", offsets=[["t", 0, 3]])
    assert shell(wire.OFFSET_FETCH, group_id="g")["offsets"] == [["t", 0, 3, None]]
    shell(wire.GROUP_DELETE, group_id="g")
    assert shell.stored() == {core.KEY_MEMBER_SEQ: 1}


def test_metadata_changes_reach_pattern_subscribers(shell):
    a = shell(wire.GROUP_JOIN, group_id="g", client_id="c", pattern=r"orders\..*", session_timeout_ms=SESSION_MS)
    assert a["assignment"] == []
    shell.topics["orders.eu"] = {"partitions": [1, 2]}
    shell.service.metadata_changed(shell.now_ms)
    assert sorted(shell.heartbeat(a, [])["assignment"]) == [["orders.eu", 0], ["orders.eu", 1]]
    del shell.topics["orders.eu"]
    shell.service.metadata_changed(shell.now_ms)
    assert shell.heartbeat(a, [["orders.eu", 0], ["orders.eu", 1]])["assignment"] == []


@pytest.mark.parametrize("sabotaged", [False, True])
def test_sabotage_switch_accepts_stale_epoch_commits(tmp_path, sabotaged):
    # The harness's sabotaged coordinator runs StaleCommitGroupService (tests/harness/sabotage.py).
    s = Shell(tmp_path / "meta", {"t": {"partitions": [1, 2]}},
              service_class=StaleCommitGroupService if sabotaged else GroupService)
    try:
        a = s.join()
        s.now_ms += SESSION_MS + 1
        s.service.tick(s.now_ms)  # a is evicted: its id and epoch are stale now
        b = s.join()
        stale = dict(group_id="g", member_id=a["member_id"], member_epoch=a["member_epoch"], offsets=[["t", 0, 9, None]])
        if sabotaged:
            assert s(wire.OFFSET_COMMIT, **stale)["committed"] == [["t", 0, 9]]
            assert s(wire.OFFSET_FETCH, group_id="g", partitions=[["t", 0]])["offsets"] == [["t", 0, 9, None]]
            s = s.restart()  # and it was persisted like any commit
            assert s(wire.OFFSET_FETCH, group_id="g", partitions=[["t", 0]])["offsets"] == [["t", 0, 9, None]]
        else:
            with pytest.raises(UnknownMemberId):
                s(wire.OFFSET_COMMIT, **stale)
            with pytest.raises(FencedMemberEpoch):
                s(wire.OFFSET_COMMIT, group_id="g", member_id=b["member_id"], member_epoch=b["member_epoch"] + 3,
                  offsets=[["t", 0, 9, None]])
    finally:
        s.store.close()
