"""Helpers for the core integration tests: child Python processes, consuming everything, checking logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bus import Consumer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn_python(code: str, *args, **kwargs) -> subprocess.Popen:
    """A child ``python -c code args...`` (stdout and stderr piped unless given)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=child_env(), **kwargs)


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[bytes, bytes]:
    """Wait for a child (killing it past the deadline) and assert it succeeded."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child did not finish within {timeout_s} s:\n{err.decode(errors='replace')}")
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{err.decode(errors='replace')}"
    return out, err


def consume_all(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 30.0,
                **consumer_args) -> list:
    """Every record of ``topic`` from the beginning, waiting until ``expected`` arrived (then a short check
    that nothing more comes)."""
    records = []
    with Consumer(bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100, **consumer_args) as consumer:
        consumer.assign([(topic, p) for p in range(partitions)])
        deadline_s = time.monotonic() + timeout_s
        while len(records) < expected:
            assert time.monotonic() < deadline_s, f"only {len(records)} of {expected} records within {timeout_s} s"
            records += consumer.poll(timeout_ms=500)
        records += consumer.poll(timeout_ms=200)  # nothing beyond what was expected
    return records


def check_partition_offsets(records) -> dict:
    """Assert each partition's records have consecutive offsets from 0; return {partition: count}."""
    by_partition: dict[int, list] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record.offset)
    for partition, offsets in by_partition.items():
        assert offsets == list(range(len(offsets))), f"partition {partition}: offsets not 0..n-1 in order"
    return {p: len(o) for p, o in by_partition.items()}


