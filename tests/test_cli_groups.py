"""`bus group ...` and `bus consume --group` against a real cluster (click's CliRunner, in this process)."""

from __future__ import annotations

import datetime

import pytest
from click.testing import CliRunner

from bus import Consumer, Producer
from bus.cli import main
from tests.conftest import wait_for

TOPIC = "clicks"
PARTITIONS = 3
PER_PARTITION = 30
T0_MS = 1_700_000_000_000
STEP_MS = 60_000  # record o of every partition is stamped T0_MS + o * STEP_MS


@pytest.fixture
def loaded(cluster):
    runner = CliRunner(env={"BUS_BOOTSTRAP": cluster.bootstrap})

    def cli(*args):
        return runner.invoke(main, list(map(str, args)), catch_exceptions=False)

    assert cli("topic", "create", TOPIC, "--partitions", PARTITIONS).exit_code == 0
    with Producer(cluster.bootstrap) as producer:
        for o in range(PER_PARTITION):
            for p in range(PARTITIONS):
                producer.send(TOPIC, b"p%d-o%d" % (p, o), partition=p, timestamp_ms=T0_MS + o * STEP_MS)
        producer.flush()
    return cluster, cli


def partition_rows(output: str) -> dict:
    """partition -> (member, committed, end, lag) from the table `bus group describe` prints."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["topic", "partition"])
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        topic, partition, member, committed, end, lag = line.split()
        rows[int(partition)] = (member, *[None if v == "-" else int(v) for v in (committed, end, lag)])
    return rows


def total_lag(output: str) -> int:
    line = next(line for line in output.splitlines() if line.startswith("total lag:"))
    return int(line.split()[2])


def test_describe_shows_lag_while_consuming_and_zero_when_drained(loaded):
    cluster, cli = loaded
    consumer = Consumer(cluster.bootstrap, topics=[TOPIC], group="readers", auto_offset_reset="earliest",
                        enable_auto_commit=False, session_timeout_ms=3_000, heartbeat_interval_ms=300)
    try:
        got = []
        wait_for(lambda: got.extend(consumer.poll(200, max_records=40 - len(got))) or len(got) >= 40, 10,
                 message="forty records")
        committed = consumer.commit()
        assert sum(committed.values()) == 40
        result = cli("group", "describe", "readers")
        assert result.exit_code == 0, result.output
        assert "state=stable" in result.output and "members=1" in result.output
        rows = partition_rows(result.output)
        member = consumer._group.member_id
        assert rows == {p: (member, committed[(TOPIC, p)], PER_PARTITION, PER_PARTITION - committed[(TOPIC, p)])
                        for p in range(PARTITIONS)}
        assert total_lag(result.output) == PARTITIONS * PER_PARTITION - 40

        # Offsets cannot be reset under a live member; the refusal names it.
        refused = cli("group", "reset-offsets", "readers", "--topic", TOPIC, "--to-earliest")
        assert refused.exit_code == 1 and member in refused.stderr and "live members" in refused.stderr

        wait_for(lambda: got.extend(consumer.poll(200)) or len(got) >= PARTITIONS * PER_PARTITION, 10,
                 message="every record")
        consumer.commit()
        result = cli("group", "describe", "readers")
        assert {p: row[3] for p, row in partition_rows(result.output).items()} == {0: 0, 1: 0, 2: 0}
        assert total_lag(result.output) == 0
    finally:
        consumer.close()

    listed = cli("group", "list")
    assert listed.exit_code == 0 and "readers" in listed.output and "empty" in listed.output


def test_reset_offsets_when_empty_then_delete(loaded):
    cluster, cli = loaded
    for args, expected in [(["--to-earliest"], 0), (["--to-offset", 12], 12), (["--to-offset", 999], PER_PARTITION),
                           (["--to-latest"], PER_PARTITION),
                           (["--to-datetime", datetime.datetime.fromtimestamp((T0_MS + 7 * STEP_MS) / 1000,
                                                                              datetime.UTC).isoformat()], 7)]:
        result = cli("group", "reset-offsets", "staged", "--topic", TOPIC, *args)
        assert result.exit_code == 0, result.output
        assert f"reset {PARTITIONS} partition(s) of group staged" in result.output
        rows = partition_rows(cli("group", "describe", "staged").output)
        assert {p: row[1] for p, row in rows.items()} == {p: expected for p in range(PARTITIONS)}, args
        assert {p: row[3] for p, row in rows.items()} == {p: PER_PARTITION - expected for p in range(PARTITIONS)}

    # A member starts where the reset put the group.
    with Consumer(cluster.bootstrap, topics=[TOPIC], group="staged", auto_offset_reset="earliest") as consumer:
        got = []
        wait_for(lambda: got.extend(consumer.poll(200)) or len(got) >= PARTITIONS * (PER_PARTITION - 7), 10,
                 message="the records after the reset point")
        assert min(r.offset for r in got) == 7

    usage = cli("group", "reset-offsets", "staged", "--topic", TOPIC, "--to-earliest", "--to-latest")
    assert usage.exit_code == 2
    assert cli("group", "delete", "staged").output.strip() == "deleted group staged"
    gone = cli("group", "describe", "staged")
    assert gone.exit_code == 1 and gone.stdout == ""
    assert gone.stderr.strip().splitlines() == ["error: unknown consumer group 'staged'; `bus group list` shows the groups"]
    assert cli("group", "delete", "staged").exit_code == 1
    assert "staged" not in cli("group", "list").output


def test_consume_with_group_commits_on_exit_and_resumes(loaded):
    cluster, cli = loaded
    total = PARTITIONS * PER_PARTITION
    first = cli("consume", TOPIC, "--group", "shell", "--from-beginning", "--max-records", total // 2)
    assert first.exit_code == 0, first.output
    assert len(first.stdout.splitlines()) == total // 2
    assert total_lag(cli("group", "describe", "shell").output) == total - total // 2

    # The group's committed offsets win over --from-beginning: the rest, and only the rest, comes next.
    second = cli("consume", TOPIC, "--group", "shell", "--from-beginning", "--timeout-ms", 1_500)
    assert second.exit_code == 0, second.output
    assert sorted(first.stdout.splitlines() + second.stdout.splitlines()) == sorted(
        "p%d-o%d" % (p, o) for p in range(PARTITIONS) for o in range(PER_PARTITION))
    assert total_lag(cli("group", "describe", "shell").output) == 0

    missing = cli("consume", "nope", "--group", "shell", "--timeout-ms", 100)
    assert missing.exit_code == 1 and "unknown topic 'nope'" in missing.stderr
