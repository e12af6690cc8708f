"""Properties of nodes/assignors.py: validity, balance, stickiness and determinism, driven by hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.assignors import ASSIGNOR_NAMES, assign, range_assign, subscribed_partitions

TOPICS = ["a", "b", "c", "d"]
topic_partitions_st = st.dictionaries(st.sampled_from(TOPICS), st.integers(0, 12), min_size=1)
member_ids_st = st.lists(st.text("mnxyz0123", min_size=1, max_size=4), min_size=1, max_size=8, unique=True)


@st.composite
def group_input(draw, same_subscription: bool):
    topic_partitions = draw(topic_partitions_st)
    ids = draw(member_ids_st)
    if same_subscription:
        topics = draw(st.frozensets(st.sampled_from(TOPICS + ["missing"]), min_size=1))
        members = {m: topics for m in ids}
    else:
        members = {m: draw(st.frozensets(st.sampled_from(TOPICS + ["missing"]), min_size=0)) for m in ids}
    return members, topic_partitions


def owner_of(assignment) -> dict:
    return {tp: m for m, tps in assignment.items() for tp in tps}


def check_valid(members, topic_partitions, assignment) -> None:
    assert set(assignment) == set(members)
    owners = owner_of(assignment)
    assert sum(len(tps) for tps in assignment.values()) == len(owners), "a partition assigned twice"
    assert set(owners) == set(subscribed_partitions(members, topic_partitions))
    for tp, m in owners.items():
        assert tp[0] in members[m]


def sizes(assignment) -> list[int]:
    return [len(tps) for tps in assignment.values()]


@pytest.mark.parametrize("name", ASSIGNOR_NAMES)
@settings(max_examples=150, deadline=None)
@given(data=group_input(same_subscription=False))
def test_every_subscribed_partition_to_exactly_one_subscriber(name, data):
    members, topic_partitions = data
    check_valid(members, topic_partitions, assign(name, members, topic_partitions, {}))


@pytest.mark.parametrize("name", ASSIGNOR_NAMES)
@settings(max_examples=150, deadline=None)
@given(data=group_input(same_subscription=True))
def test_equal_subscriptions_are_balanced(name, data):
    members, topic_partitions = data
    result = assign(name, members, topic_partitions, {})
    check_valid(members, topic_partitions, result)
    assert max(sizes(result)) - min(sizes(result)) <= 1


@pytest.mark.parametrize("name", ASSIGNOR_NAMES)
@settings(max_examples=100, deadline=None)
@given(data=group_input(same_subscription=False), current_seed=st.randoms(use_true_random=False))
def test_deterministic_whatever_the_input_order(name, data, current_seed):
    members, topic_partitions = data
    first = assign(name, members, topic_partitions, {})
    # The same input built in another insertion order must give the same answer.
    ids = list(members)
    current_seed.shuffle(ids)
    shuffled_members = {m: frozenset(sorted(members[m], reverse=True)) for m in ids}
    topics = list(topic_partitions)
    current_seed.shuffle(topics)
    shuffled_topics = {t: topic_partitions[t] for t in topics}
    assert assign(name, shuffled_members, shuffled_topics, {}) == first
    # And a previous assignment fed back in, in any order, gives the same again.
    current = {m: set(first[m]) for m in reversed(ids)}
    again = assign(name, members, topic_partitions, current)
    assert again == assign(name, shuffled_members, shuffled_topics, dict(reversed(list(current.items()))))


@settings(max_examples=100, deadline=None)
@given(data=group_input(same_subscription=False))
def test_sticky_keeps_a_valid_assignment_as_it_is(data):
    members, topic_partitions = data
    first = assign("sticky", members, topic_partitions, {})
    assert assign("sticky", members, topic_partitions, first) == first


def moved(before, after) -> int:
    """Partitions whose owner changed (a departed owner counts as a change)."""
    b, a = owner_of(before), owner_of(after)
    return sum(1 for tp in a if b.get(tp) != a[tp])


@settings(max_examples=200, deadline=None)
@given(data=group_input(same_subscription=True), history=st.lists(st.booleans(), max_size=6),
       joiner=st.text("pq", min_size=5, max_size=5), pick=st.integers(0, 100))
def test_sticky_moves_few_partitions_on_one_join_or_leave(data, history, joiner, pick):
    members, topic_partitions = data
    topics = next(iter(members.values()))
    # Reach a realistic "current" through a few earlier membership changes.
    current = assign("sticky", members, topic_partitions, {})
    for i, join in enumerate(history):
        if join or len(members) == 1:
            members = {**members, f"h{i}": topics}
        else:
            members = {m: t for m, t in members.items() if m != sorted(members)[i % len(members)]}
        current = assign("sticky", members, topic_partitions, current)
    total = len(subscribed_partitions(members, topic_partitions))

    joined = {**members, joiner: topics}
    after_join = assign("sticky", joined, topic_partitions, current)
    assert moved(current, after_join) <= math.ceil(total / len(joined)) + 1
    assert max(sizes(after_join)) - min(sizes(after_join)) <= 1

    if len(members) > 1:
        leaver = sorted(members)[pick % len(members)]
        remaining = {m: t for m, t in members.items() if m != leaver}
        after_leave = assign("sticky", remaining, topic_partitions, current)
        assert moved(current, after_leave) <= math.ceil(total / len(remaining)) + 1
        assert max(sizes(after_leave)) - min(sizes(after_leave)) <= 1


def test_range_gives_contiguous_ranges():
    members = {"m1": frozenset({"t"}), "m2": frozenset({"t"}), "m3": frozenset({"t"})}
    result = range_assign(members, {"t": 7})
    assert result == {"m1": frozenset({("t", 0), ("t", 1), ("t", 2)}),
                      "m2": frozenset({("t", 3), ("t", 4)}),
                      "m3": frozenset({("t", 5), ("t", 6)})}


def test_range_spreads_leftovers_across_topics():
    members = {"m1": frozenset({"a", "b"}), "m2": frozenset({"a", "b"})}
    result = assign("range", members, {"a": 1, "b": 1})
    assert sizes(result) == [1, 1]


def test_roundrobin_skips_members_not_subscribed():
    members = {"m1": frozenset({"a"}), "m2": frozenset({"a", "b"})}
    result = assign("roundrobin", members, {"a": 2, "b": 2})
    assert result == {"m1": frozenset({("a", 0)}), "m2": frozenset({("a", 1), ("b", 0), ("b", 1)})}


def test_sticky_drops_partitions_no_longer_subscribed_or_existing():
    members = {"m1": frozenset({"a"}), "m2": frozenset({"a"})}
    current = {"m1": {("a", 0), ("a", 5), ("gone", 0)}, "m2": {("a", 0), ("a", 1)}}
    result = assign("sticky", members, {"a": 3}, current)
    assert result["m1"] >= {("a", 0)} and result["m2"] >= {("a", 1)}
    check_valid(members, {"a": 3}, result)


def test_unknown_assignor_is_a_value_error():
    with pytest.raises(ValueError):
        assign("cooperative-magic", {"m": frozenset({"a"})}, {"a": 1}, {})


def test_no_members_no_assignment():
    assert assign("sticky", {}, {"a": 3}, {}) == {}
