"""``bus bench`` end to end on a tiny workload: the command runs every system that is installed, prints the
ratio table and writes JSON with a positive throughput for every row.

A peer that is not installed must be named in one clear line saying how to install it (asserted, never
skipped); the second test forces that case by hiding the peers' servers.
"""

from __future__ import annotations

import json
import time

import psutil
from click.testing import CliRunner

from bench import nats_peer, peer, redis_peer
from bench.results import PeerUnavailable
from bus.cli import main

TINY = [
    "--records", "2000",
    "--record-bytes", "100",
    "--batch-bytes", "20000",  # 200 records a batch: several batches even here
    "--runs", "1",
    "--latency-rate", "2000",
    "--latency-seconds", "0.5",
    "--linger-ms", "1",
]  # fmt: skip
SMOKE_SECONDS_MAX = 30.0
INSTALL_HINTS = {
    "redis": "redis-server not installed: apt-get install redis-server",
    "nats": "nats-server not installed: apt-get install nats-server",
}


def stray_children() -> list[str]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "resource_tracker" not in cmd and "cluster-spawner" not in cmd:
                out.append(f"{p.pid} {cmd}")
        except psutil.NoSuchProcess:
            pass
    return out


def wait_no_strays(timeout_s: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while stray_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return stray_children()


def table_rows(output: str) -> dict[tuple[str, str], str]:
    """{(system, mode): row} from the printed table (the block under the dashed rule)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("system ") and "records/s" in line)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        system = "bus send_many" if line.startswith("bus send_many") else line.split()[0]
        mode = line[len(system) :].split()[0]
        rows[(system, mode)] = line
    return rows


def installed(system) -> bool:
    try:
        system.check()
        return True
    except PeerUnavailable:
        return False


def test_bench_command_tiny_workload(tmp_path):
    out_json = tmp_path / "bench.json"
    started = time.monotonic()
    result = CliRunner().invoke(
        main, ["bench", *TINY, "--peers", "raw,redis,nats", "--json", str(out_json), "--data-dir", str(tmp_path)]
    )
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert elapsed < SMOKE_SECONDS_MAX, f"smoke bench took {elapsed:.1f} s"

    rows = table_rows(result.output)
    expected = {("raw", m) for m in ("produce", "consume", "latency@2,000/s")}
    expected |= {("bus", m) for m in ("produce", "consume", "latency@2,000/s")} | {("bus send_many", "produce")}
    for name, system in (("redis", redis_peer.REDIS), ("nats", nats_peer.NATS)):
        if installed(system):
            expected |= {(name, m) for m in ("produce", "consume", "latency@2,000/s")}
        else:
            assert f"{name}: not run: " in result.output  # one clear line, then the bench goes on
    assert expected <= set(rows), (sorted(expected - set(rows)), result.output)
    assert "1.00x" in rows[("raw", "produce")]
    assert "run 1/1" in result.output  # progress was shown while it ran

    data = json.loads(out_json.read_text())
    assert data["machine"]["cpus"] >= 1 and "bench" in data["meta"]["command"]
    by_key = {(r["system"], r["mode"]): r for r in data["results"]}
    for system, mode in {(s, m.split("@")[0]) for s, m in expected}:
        r = by_key[(system, mode)]
        assert r["records_per_s"] > 0 and r["mb_per_s"] > 0, r
        assert r["records"] == (2000 if mode != "latency" else 1000)
    assert by_key[("bus", "produce")]["ratio"] > 0
    assert by_key[("bus", "latency")]["p99_ms"] > 0
    assert list(tmp_path.glob("bus-bench-*")) == []  # every run's scratch space is removed
    assert wait_no_strays() == []


def test_missing_peers_are_named_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(peer, "find_exe", lambda name: None)  # as if neither server were installed
    result = CliRunner().invoke(
        main,
        ["bench", *TINY, "--peers", "raw,redis,nats", "--modes", "produce", "--no-send-many",
         "--data-dir", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name, hint in INSTALL_HINTS.items():
        assert f"{name}: not run: {hint}" in result.output
    rows = table_rows(result.output)
    assert set(rows) == {("raw", "produce"), ("bus", "produce")}
    assert wait_no_strays() == []


def test_bad_options_are_usage_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--peers", "raw,kafka"])
    assert result.exit_code == 2 and "unknown peer kafka" in result.output
    result = runner.invoke(main, ["bench", "--partitions", "1", "--consumers", "2"])
    assert result.exit_code == 2 and "consumers must be <= partitions" in result.output
