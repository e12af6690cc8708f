"""Fast tests of the bench's parts: the arithmetic, the pacer, the raw ceiling, the peers, the bus as a system,
the report, the producer/consumer fast paths the bench's speed work added, and ``bus bench`` where the bench
or its extra is not installed.

Each system test runs a tiny real workload over real processes and then checks that no child process is
left behind. A peer whose server is not installed must say how to install it (PeerUnavailable), which is
tested instead of skipping.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from array import array

import psutil
import pytest

from bench import BusOptions, bus_system, make_bus_system, nats_peer, peer, raw, redis_peer, report
from bench.harness import round_order, run_interleaved, showing_progress
from bench.pacer import Pacer
from bench.results import (
    MODES,
    BenchConfig,
    ClientReport,
    PeerUnavailable,
    Result,
    System,
    expected_per_partition,
    figure_notes,
    latency_result,
    median_of_runs,
    ratio,
    ratios,
    record_partition,
    split,
)
from bench.runner import PROGRESS_BAR_CELLS, ProgressBar, progress_line
from bench.stats import longest_gaps, percentiles, steadiness, throughput, timeline
from bus.cli import bench_not_installed
from tests.core_helpers import child_env


def wait_for(cond, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return cond()


def stray_children() -> list[str]:
    """Child processes of this test process, except multiprocessing's own resource tracker (lives as long as we do)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "resource_tracker" in cmd:
                continue
            out.append(f"{p.pid} {p.status()} {cmd}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture
def no_strays():
    yield
    assert wait_for(lambda: not stray_children(), 5.0), f"processes left running: {stray_children()}"


def tiny(tmp_path, **kw) -> BenchConfig:
    base = dict(
        records=2000,
        record_bytes=100,
        sync="none",
        batch_bytes=20_000,  # 200 records a batch: several batches even in a tiny run
        latency_rate=2000,
        latency_seconds=0.5,
        linger_ms=2,
        data_dir=str(tmp_path),
        timeout_s=30,
    )
    base.update(kw)
    return BenchConfig(**base).validate()


def check_sane(r: Result, cfg: BenchConfig, mode: str) -> None:
    assert r.mode == mode
    assert r.records_per_s > 0 and r.mb_per_s > 0 and r.elapsed_s > 0
    assert r.bytes == r.records * cfg.record_bytes
    assert sum(n for _, n in r.timeline) == r.records
    assert r.server_rss_mb and r.server_rss_mb > 0
    assert r.server_anon_mb is not None and 0 < r.server_anon_mb <= r.server_rss_mb
    if mode == "consume":
        assert r.records == cfg.records and r.p50_ms is None
        return
    assert 0 < r.p50_ms <= r.p99_ms <= r.p999_ms <= r.max_ms < 10_000
    if mode == "produce":
        assert r.records == cfg.records and r.latency_kind == "ack" and r.latency_samples == cfg.records
    else:
        assert r.records == cfg.latency_records(cfg.latency_rate) == r.latency_samples
        assert r.latency_kind == "end_to_end" and r.target_rate == cfg.latency_rate


def run_all_modes(system, cfg: BenchConfig) -> list[Result]:
    results = [system.run(mode, cfg) for mode in ("produce", "consume", "latency")]
    for r, mode in zip(results, ("produce", "consume", "latency")):
        check_sane(r, cfg, mode)
    return results


# ---------------------------------------------------------------------------------------------- arithmetic


def test_percentiles_on_known_data():
    values = list(range(1000, 0, -1))  # 1..1000, unsorted
    assert percentiles(values) == [500, 990, 999, 1000]  # 99.9% of 1000 is rank 999 exactly
    assert percentiles(list(range(1, 101))) == [50, 99, 100, 100]
    assert percentiles([7.0]) == [7.0, 7.0, 7.0, 7.0]
    assert percentiles([3, 1, 2]) == [2, 3, 3, 3]
    ten = [float(i) for i in range(1, 11)]
    assert percentiles(ten) == [5.0, 10.0, 10.0, 10.0]  # a small sample's tail is its maximum
    assert percentiles([]) == [None, None, None, None]
    assert percentiles([5, 1], qs=[0]) == [1]


def test_weighted_percentiles_equal_expanded():
    values, counts = [10, 1, 5, 100], [3, 990, 6, 1]
    expanded = [v for v, c in zip(values, counts) for _ in range(c)]
    qs = [0, 1, 50, 99, 99.1, 99.9, 100]
    assert percentiles(values, counts, qs) == percentiles(expanded, qs=qs)
    assert percentiles([1, 2], [0, 0]) == [None] * 4
    with pytest.raises(ValueError):
        percentiles([1], [1, 2])
    with pytest.raises(ValueError):
        percentiles([1], qs=[101])


def test_throughput_ratio_and_median():
    assert throughput(1000, 100_000, 0.5) == (2000.0, 0.2)
    assert throughput(5, 5, 0) == (0.0, 0.0)

    def res(system, mode, rps, p99=None, **kw):
        return Result(system, mode, 100, 10_000, 1.0, rps, rps / 1e4, p99_ms=p99, **kw)

    raw_p, bus_p = res("raw", "produce", 1000.0), res("bus", "produce", 250.0)
    raw_l, bus_l = res("raw", "latency", 10.0, p99=2.0), res("bus", "latency", 10.0, p99=8.0)
    assert ratio(bus_p, raw_p) == 0.25
    assert ratio(bus_l, raw_l) == 0.25  # latency: raw p99 / p99, higher is better in both
    assert ratios([raw_p, bus_p, bus_l, res("nats", "consume", 3.0)]) == [1.0, 0.25, None, None]
    with pytest.raises(ValueError):
        ratio(bus_p, raw_l)

    runs = [res("bus", "produce", x, p99=x / 100, timeline=[(0.0, int(x))]) for x in (300.0, 100.0, 200.0)]
    m = median_of_runs(runs)
    assert m.records_per_s == 200.0 and m.p99_ms == 2.0 and m.runs == 3
    assert m.timeline == [(0.0, 200)]  # the series are the median run's
    assert sorted(m.records_per_s_runs) == [100.0, 200.0, 300.0]
    with pytest.raises(ValueError):
        median_of_runs([raw_p, bus_p])


def test_timeline_bins_every_event():
    start = 1_000_000_000
    t = [start + int(x * 1e9) for x in (0.0, 0.05, 0.5, 1.99, 2.0)]
    series, bin_s = timeline(t, [1, 2, 3, 4, 5], start, start + 2_000_000_000)
    assert bin_s == 0.01 and sum(n for _, n in series) == 15
    assert series[0] == (0.0, 1) and series[-1] == (2.0, 5)


def test_partitioning_is_known_in_advance():
    assert split(10, 3) == [4, 3, 3]
    per_producer = [7, 5]
    counts = [0, 0, 0]
    for j, n in enumerate(per_producer):
        for k in range(n):
            counts[record_partition(k, j, 3)] += 1
    assert expected_per_partition(per_producer, 3) == counts


def test_pacer_lingers_then_sends_due_records():
    ms = 1_000_000
    p = Pacer(rate_per_s=1000, total=10, linger_ns=5 * ms, batch_records_max=4, start_ns=0)
    assert p.take(0) is None and p.next_deadline_ns() == 3 * ms  # the batch fills (4 due) before linger ends
    assert p.take(3 * ms) == range(0, 4)
    assert p.next_deadline_ns() == 7 * ms
    assert p.take(7 * ms - 1) is None
    assert p.take(7 * ms) == range(4, 8)
    assert p.take(20 * ms) == range(8, 10) and p.behind_ns_max == 11 * ms
    assert p.done and p.take(30 * ms) is None and p.next_deadline_ns() is None
    # Each hand-out's lateness (0, 0, 11 ms after it was due to go): the worst, and the median for the report.
    assert p.lateness() == {"behind_ms_max": 11.0, "behind_ms_p50": 0.0}
    q = Pacer(rate_per_s=100, total=3, linger_ns=2 * ms, batch_records_max=100, start_ns=0)
    assert q.take(0) is None and q.take(2 * ms) == range(0, 1)  # linger: the oldest waited 2 ms
    assert q.due_ns(2) == 20 * ms


def test_config_is_validated():
    with pytest.raises(ValueError):
        BenchConfig(record_bytes=4).validate()
    with pytest.raises(ValueError):
        BenchConfig(sync="sometimes").validate()
    with pytest.raises(ValueError):
        BenchConfig(partitions=1, consumers=2).validate()


# ---------------------------------------------------------------------------------------------- systems


def test_raw_ceiling_tiny_workload(tmp_path, no_strays):
    cfg = tiny(tmp_path)
    produce, consume, latency = run_all_modes(raw.SYSTEM, cfg)
    assert produce.latency_samples == cfg.records
    assert list(tmp_path.iterdir()) == []  # scratch directories are removed


def test_interleaved_runs_alternate_systems(tmp_path):
    calls = []

    def fake(name):
        def run(cfg, *rest):
            calls.append(name)
            return Result(name, "produce", 1, 1, 1.0, float(len(calls)), 1.0)

        return System(name, run, run, run)

    out = run_interleaved([fake("raw"), fake("bus")], "produce", tiny(tmp_path), runs=3)
    assert calls == ["raw", "bus", "bus", "raw", "raw", "bus"]  # reversed every other round
    assert [(r.system, r.runs, r.records_per_s) for r in out] == [("raw", 3, 4.0), ("bus", 3, 3.0)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_round_order_moves_every_system_between_odd_and_even_runs(count):
    systems = [System(f"s{i}", None, None, None) for i in range(count)]
    sequence = [s.name for i in range(4) for s in round_order(systems, i)]  # the runs, one after another
    for s in systems:
        places = [i for i, name in enumerate(sequence) if name == s.name]
        assert len(places) == 4 and all((a - b) % 2 == 1 for a, b in zip(places[1:], places)), places


def test_progress_reaches_the_harness_while_clients_run(tmp_path, no_strays):
    seen = []
    cfg = tiny(tmp_path, records=3001, producers=2)
    with showing_progress(seen.append):
        result = raw.SYSTEM.run("produce", cfg)
    assert result.records == 3001
    assert seen and seen == sorted(seen) and seen[-1] == 3001  # never backwards; all of it at the end


def test_progress_bar_draws_in_place_and_wipes_itself():
    assert progress_line("produce  bus  run 1/3", 500, 2_000, 1234.5) == (
        "  produce  bus  run 1/3  [######..................] 500 / 2,000 records  1,234/s")
    assert "[" + "#" * PROGRESS_BAR_CELLS + "]" in progress_line("x", 5_000, 2_000, 0.0)  # capped at full
    out = io.StringIO()
    bar = ProgressBar(out, "consume  raw  run 2/3", 100)
    for done in (0, 40, 100, 10):  # 10: a second phase (a consume run loads, then reads)
        bar(done)
    bar.clear()
    lines = out.getvalue().split("\r")
    assert "40 / 100 records" in lines[2] and "100 / 100 records" in lines[3]
    assert lines[-2].strip() == "" and lines[-1] == ""  # wiped: blanks, then back to the line's start


def test_raw_ceiling_partitions_and_fsync(tmp_path, no_strays):
    cfg = tiny(tmp_path, sync="always", partitions=2, producers=2, consumers=2, records=3001)
    run_all_modes(raw.SYSTEM, cfg)


def test_raw_array_len_reads_msgpack_headers():
    import msgpack

    for n in (0, 1, 15, 16, 65535, 65536):
        assert raw.array_len(msgpack.packb([b"x"] * n)) == n


def peer_tiny_workload_or_hint(system, server: str, library_hint: str, cfg: BenchConfig) -> None:
    """Run the tiny workload if the peer is installed; otherwise it must refuse with the install command."""
    if peer.find_exe(server) is None:
        with pytest.raises(PeerUnavailable, match=f"{server} not installed: apt-get install {server}"):
            system.run_produce(cfg)
        return
    try:
        system.check()
    except PeerUnavailable as e:  # the server is there but the Python client library is not
        assert library_hint in str(e)
        with pytest.raises(PeerUnavailable, match=library_hint):
            system.run_latency(cfg)
        return
    run_all_modes(system, cfg)


def test_redis_tiny_workload_or_install_hint(tmp_path, no_strays):
    peer_tiny_workload_or_hint(redis_peer.REDIS, "redis-server", "pip install redis hiredis", tiny(tmp_path))


def test_nats_tiny_workload_or_install_hint(tmp_path, no_strays):
    peer_tiny_workload_or_hint(nats_peer.NATS, "nats-server", "pip install nats-py", tiny(tmp_path))


def test_missing_peers_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(peer, "find_exe", lambda name: None)
    cfg = tiny(tmp_path)
    with pytest.raises(PeerUnavailable, match=r"redis-server not installed: apt-get install redis-server"):
        redis_peer.REDIS.run_produce(cfg)
    with pytest.raises(PeerUnavailable, match=r"nats-server not installed: apt-get install nats-server"):
        nats_peer.NATS.run_latency(cfg, 100)
    monkeypatch.setattr(peer, "find_exe", lambda name: "/usr/bin/" + name)  # servers there, libraries not
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "nats", None)
    with pytest.raises(PeerUnavailable, match=r"redis-py not installed: pip install redis hiredis"):
        redis_peer.REDIS.run_consume(cfg)
    with pytest.raises(PeerUnavailable, match=r"nats-py not installed: pip install nats-py"):
        nats_peer.NATS.run_produce(cfg)


# ---------------------------------------------------------------------------------------------- report


def sample_results() -> list[Result]:
    cdf = [(50, 1.0), (99, 4.0), (99.9, 9.0), (100, 12.0)]
    return [
        Result("raw", "produce", 1000, 100_000, 0.01, 100_000.0, 10.0, 0.2, 0.9, 1.1, 1.2, "ack", 1000, 55.0, 40.5,
               timeline=[(0.0, 600), (0.01, 400)], timeline_bin_s=0.01, latency_cdf=cdf),
        Result("redis", "produce", 1000, 100_000, 0.04, 25_000.0, 2.5, 3.0, 12.5, 150.0, 1234.5, "ack", 1000, 98.0,
               12.0, notes=["hiredis not installed"]),
        Result("raw", "latency", 500, 50_000, 1.0, 500.0, 0.05, 0.5, 2.0, 3.0, 3.0, "end_to_end", 500, 5.0, 30.0,
               target_rate=500, latency_cdf=cdf),
        Result("nats", "latency", 500, 50_000, 1.0, 500.0, 0.05, 1.0, 8.0, 9.0, 9.5, "end_to_end", 500, None, None,
               target_rate=500, runs=3),
    ]  # fmt: skip


def test_table_is_aligned_and_shows_ratios():
    text = report.format_table(sample_results(), legend=False)
    lines = text.splitlines()
    header, rule, *rows = lines[:6]
    assert header.split()[:3] == ["system", "mode", "records/s"]
    widths = [len(w) for w in rule.split("  ")]
    assert len(widths) == len(report.COLUMNS)
    # every column ends at the same place on every line (right-aligned numbers)
    ends = [sum(widths[: i + 1]) + 2 * i for i in range(len(widths))]
    for line in rows:
        for end, name in zip(ends[2:9], report.COLUMNS[2:9]):
            assert line[end - 1] != " ", (name, line)
    assert "100,000" in rows[0] and "1.00x" in rows[0]
    assert "0.25x" in rows[1] and "1,234" in rows[1]
    assert "latency@500/s" in rows[2]
    assert "(median of 3)" in rows[3] and "0.25x" in rows[3]  # raw p99 2.0 / nats p99 8.0
    assert "redis produce: hiredis not installed" in text
    assert "ratio:" in report.format_table(sample_results())


def test_json_round_trip(tmp_path):
    path = tmp_path / "bench.json"
    report.write_json(str(path), sample_results(), meta={"command": "bus bench"})
    data = json.loads(path.read_text())
    assert data["meta"]["command"] == "bus bench" and data["machine"]["cpus"] >= 1
    assert [d["ratio"] for d in data["results"]] == [1.0, 0.25, 1.0, 0.25]
    back = report.load_json(str(path))
    assert back == sample_results()


def test_plot_or_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401

        report.plot(str(path), sample_results())
        assert path.stat().st_size > 1000
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(report.PlotUnavailable, match=r"pip install 'bus\[plot\]'"):
        report.plot(str(path), sample_results())


def test_a_latency_result_says_when_its_producer_handed_records_out_late():
    """A record's latency runs from its due time, so a late producer makes its system look slower: the result
    carries the producers' median lateness, with a note past LATENCY_PRODUCER_LATE_P50_MS_MAX."""
    cfg = BenchConfig(records=10, record_bytes=100)

    def run(late_ms: float) -> Result:
        consumer = ClientReport(1_000, 2_000_000_000, 10, latencies_ns=array("q", [1_000_000] * 10))
        producer = ClientReport(1_000, 2_000_000_000, 10)
        producer.extra.update(behind_ms_max=late_ms, behind_ms_p50=late_ms)
        return latency_result("sys", cfg, 5.0, [consumer], [producer], None)

    punctual, late = run(0.1), run(0.8)
    assert punctual.producer_late_p50_ms == 0.1 and figure_notes(punctual) == []
    assert late.producer_late_p50_ms == 0.8
    assert figure_notes(late) == ["a producer handed its records out 0.80 ms late at the median (its records' "
                                  "latency includes that)"]
    # Of a median of runs, one note, the median's; the table prints it.
    median = median_of_runs([punctual, late, late])
    assert median.producer_late_p50_ms == 0.8 and len(figure_notes(median)) == 1
    assert "sys latency: a producer handed its records out 0.80 ms late" in report.format_table([median])


def test_client_report_events():
    r = ClientReport(0, 0, 0)
    r.add_event(5, 2)
    assert list(r.events_t_ns) == [5] and list(r.events_n) == [2]


# ---------------------------------------------------------------------------------------------- the bus as a system


def test_steadiness_compares_the_last_third_with_the_first():
    def res(counts):
        series = [(i * 0.1, n) for i, n in enumerate(counts)]
        return Result("bus", "produce", sum(counts), 0, 1.0, 1.0, 1.0, timeline=series)

    assert steadiness(res([100] * 30)) == 1.0
    assert steadiness(res([100] * 10 + [100] * 10 + [50] * 10)) == pytest.approx(0.5, abs=0.1)
    assert steadiness(res([0, 100, 100, 100, 100, 100, 100, 100, 5])) == 1.0  # start-up and flush bins don't count
    assert steadiness(res([100] * 5)) is None  # too short to say


def test_runner_options_are_checked():
    from bench import runner

    assert runner.parse_list("raw, nats", runner.PEER_NAMES, "peer") == ["raw", "nats"]
    assert runner.parse_list("none", runner.PEER_NAMES, "peer") == []
    with pytest.raises(ValueError, match="unknown mode latncy"):
        runner.parse_list("produce,latncy", MODES, "mode")
    assert runner.exit_status({"redis produce": "boom"}) == 0  # a peer may fail without failing the bench
    assert runner.exit_status({"bus send_many produce": "boom"}) == 1
    assert runner.exit_status({"bus R=3 acks=all failover": "boom"}) == 1
    assert runner.exit_status({"raw latency": "boom"}) == 1
    assert runner.exit_status({"busy produce": "boom"}) == 0  # only the bus's own names
    with pytest.raises(ValueError):
        BusOptions(acks=2).validate()
    assert runner.parse_counts("1, 3,3", "f") == [1, 3] and runner.parse_acks("1,all") == [1, "all"]
    for bad in ("0", "x", "", "1,-2"):
        with pytest.raises(ValueError):
            runner.parse_counts(bad, "f")
    with pytest.raises(ValueError, match="unknown acks 2"):
        runner.parse_acks("1,2")


def test_replication_options_make_one_system_each_on_the_same_cluster():
    from bench import runner
    from bench.bus_system import system_name

    variants = runner.bus_variants(BusOptions(), [1, 3], [1, "all"])
    assert [(b.replication_factor, b.acks, b.node_count) for b in variants] == [
        (1, 1, 3), (1, "all", 3), (3, 1, 3), (3, "all", 3)]  # all on enough nodes for the largest
    assert [system_name(b) for b in variants] == [
        "bus R=1 acks=1", "bus R=1 acks=all", "bus R=3 acks=1", "bus R=3 acks=all"]
    assert system_name(BusOptions(replication_factor=3, min_insync_replicas=3, acks="all", send_many=True,
                                  nodes=3)) == "bus send_many R=3 M=3 acks=all"
    assert [b.node_count for b in runner.bus_variants(BusOptions(nodes=5), [2], [1])] == [5]
    assert BusOptions().node_count == 1  # the default is one node and one replica, as before replication
    with pytest.raises(ValueError, match="needs at least as many nodes"):
        runner.bus_variants(BusOptions(nodes=2), [3], [1])
    with pytest.raises(ValueError, match="min_insync_replicas"):
        BusOptions(replication_factor=2, min_insync_replicas=3, nodes=2).validate()
    assert make_bus_system(BusOptions()).run_failover is None  # one replica: nothing to fail over to
    assert make_bus_system(BusOptions(replication_factor=2, nodes=2)).run_failover is not None
    with pytest.raises(Exception, match="no failover mode"):
        make_bus_system(BusOptions()).run("failover", BenchConfig())


def test_longest_gaps_around_each_kill():
    s = 1_000_000_000
    acks = [0, 1 * s, 2 * s, 6 * s, 7 * s, 8 * s, 9 * s, 13 * s, 14 * s]
    # Kill at 2.5 s: acks stop from 2 s to 6 s. Kill at 8.5 s: from 8 s... then 9 s, then 9 -> 13 s is longer.
    assert longest_gaps(list(reversed(acks)), [int(2.5 * s), int(8.5 * s)], 15 * s) == [
        (2 * s, 6 * s, False), (9 * s, 13 * s, False)]
    # The window of a kill runs to the next kill: a pause caused by the restart later in it counts.
    assert longest_gaps(acks, [int(0.5 * s)], 15 * s) == [(2 * s, 6 * s, False)]
    # No acknowledgement after the kill: the gap is open, to the end of the window (a lower bound).
    assert longest_gaps([0, s], [int(1.5 * s)], 5 * s) == [(s, 5 * s, True)]
    assert longest_gaps([0, s], [int(1.5 * s), 3 * s], 5 * s) == [(s, 3 * s, True), (s, 5 * s, True)]
    # Nothing acknowledged before the kill: the gap starts at the kill.
    assert longest_gaps([4 * s], [s], 5 * s) == [(s, 4 * s, False)]
    assert longest_gaps([], [], 5 * s) == []
    with pytest.raises(ValueError):
        longest_gaps([0], [2, 1], 5)


def test_kill_notes_pool_every_run():
    from bench.failover import kill_notes

    ms = 1_000_000

    def run(*gaps_ms):
        cycles = [{"node": 1, "kill_ns": 0, "elected_ns": (g - 100) * ms, "gap_from_ns": -10 * ms,
                   "gap_to_ns": (g - 10) * ms, "gap_open": False} for g in gaps_ms]
        return Result("bus R=3 acks=all", "failover", 1, 1, 1.0, 1.0, 1.0, config={"failover": cycles})

    notes = kill_notes([run(3000, 3100), run(2900, 4000)])
    assert notes[0] == "all 4 kills of 2 runs: longest ack gap p50 3,050 ms, p99 4,000 ms, max 4,000 ms"
    assert notes[1] == "kill -> new leader in the metadata: p50 2.95 s, max 3.90 s"
    assert notes[2] == "kill -> acknowledged again (the end of its longest gap): p50 3.04 s, max 3.99 s"
    assert kill_notes([Result("bus", "failover", 1, 1, 1.0, 1.0, 1.0)]) == []


def test_a_failed_failover_says_where_it_was_and_what_the_cluster_logged():
    from bench.failover import Killer, failure_context

    class Cluster:
        nodes = {2: None, 1: None}

        def log_tail(self, name, lines):
            return "" if name == "node-2" else f"{name}: last words\n"

    killer = Killer(Cluster(), "tcp://x", "t", 3, None, None)
    killer.done, killer.cycles = 1, [{"node": 1, "kill_ns": 5}, {"node": 2, "kill_ns": 9}]
    text = failure_context(Cluster(), killer)
    assert text.splitlines()[0] == "after 1 kill(s); the last: {'node': 2, 'kill_ns': 9}"
    assert "--- coordinator (last 15 lines) ---\ncoordinator: last words" in text
    assert text.index("node-1: last words") < text.index("--- node-2") and "(nothing)" in text


def test_replicated_rows_are_compared_with_fewer_replicas_of_the_same_run():
    from bench.results import replication_pairs, replication_ratio

    def res(r, acks, mode="produce", rps=100.0, p99=None, send_many=False):
        system = f"bus{' send_many' if send_many else ''} R={r} acks={acks}"
        config = {"bus": {"replication_factor": r, "acks": acks, "send_many": send_many}}
        return Result(system, mode, 1, 1, 1.0, rps, 1.0, p50_ms=p99, p99_ms=p99, config=config)

    raw_p = Result("raw", "produce", 1, 1, 1.0, 500.0, 1.0)
    r1, r1all, r3 = res(1, 1, rps=200.0), res(1, "all", rps=180.0), res(3, "all", rps=90.0)
    bulk1, bulk3 = res(1, 1, rps=400.0, send_many=True), res(3, 1, rps=100.0, send_many=True)
    lat1, lat3 = res(1, "all", "latency", p99=2.0), res(3, "all", "latency", p99=3.0)
    pairs = replication_pairs([raw_p, r1, r1all, r3, bulk1, bulk3, lat1, lat3])
    assert [(a.system, b.system) for a, b in pairs] == [
        ("bus R=3 acks=all", "bus R=1 acks=all"),  # the same acks when there is one
        ("bus send_many R=3 acks=1", "bus send_many R=1 acks=1"),  # send_many with send_many
        ("bus R=3 acks=all", "bus R=1 acks=all")]
    assert replication_ratio(r3, r1all) == 0.5 and replication_ratio(lat3, lat1) == 1.5  # latency: p99 over p99
    assert [b.system for _, b in replication_pairs([r1, r3])] == ["bus R=1 acks=1"]  # else any acks
    assert replication_pairs([raw_p, r3]) == []  # nothing with fewer replicas to compare with
    text = report.format_table([raw_p, r1all, r3, lat1, lat3], legend=False)
    assert "  bus R=3 acks=all produce: 0.50x the records/s of bus R=1 acks=all" in text
    assert ("  bus R=3 acks=all latency: p99 1.50x, p50 1.50x (end to end; above 1 is slower) of bus R=1 acks=all"
            in text)
    data = report.to_json([r1all, r3])
    assert data["results"][1]["replication_ratio"] == 0.5
    assert data["results"][1]["replication_base"] == "bus R=1 acks=all"
    assert "replication_ratio" not in data["results"][0]


# ---------------------------------------------------------------------------------------------- values, compression


def zstd_ratio(values: list[bytes]) -> float:
    """Uncompressed over compressed, the values packed together as one batch (what the bus compresses)."""
    import zstandard

    blob = b"".join(values)
    return len(blob) / len(zstandard.ZstdCompressor(level=3).compress(blob))


@pytest.mark.parametrize("size", [32, 100, 1000, 4000])
def test_values_are_deterministic_distinct_and_exactly_their_size(size):
    from bench.values import VALUE_KINDS, value_pool

    for kind in VALUE_KINDS:
        pool = value_pool(kind, size, 1024, seed=7)
        assert pool == value_pool(kind, size, 1024, seed=7)  # the same in every run and every process
        assert pool != value_pool(kind, size, 1024, seed=8)
        assert {len(v) for v in pool} == {size}
        assert len(set(pool)) == len(pool)  # no batch repeats a value
    for v in value_pool("json", size, 50, seed=7):
        assert isinstance(json.loads(v), dict) and v.startswith(b"{")


def test_json_values_look_like_events_and_compress_like_them():
    from bench.values import value_pool

    pool = value_pool("json", 1000, 1024, seed=7)
    record = json.loads(pool[3])
    assert {"ts", "type", "seq", "event_id", "user", "session", "page", "items"} <= set(record)
    assert record["seq"] == 3 and record["user"]["name"] and record["session"]["device"]["os"]
    assert [json.loads(v)["ts"] for v in pool[:50]] == sorted(json.loads(v)["ts"] for v in pool[:50])
    assert len({json.loads(v)["type"] for v in pool}) > 5
    # Realistic: keys and vocabularies compress, ids and numbers do not; far from a constant's ~100x.
    assert 3.0 < zstd_ratio(pool) < 8.0, zstd_ratio(pool)
    assert zstd_ratio(value_pool("random", 1000, 1024, seed=7)) < 1.01  # opaque bytes: nothing to gain
    small = json.loads(value_pool("json", 100, 1, seed=7)[0])
    assert {"ts", "type"} <= set(small) and "items" not in small  # what fits, in order


def test_a_pool_holds_a_batch_of_distinct_values_in_whole_chunks():
    from bench.values import POOL_CHUNK_RECORDS, pool_records

    assert POOL_CHUNK_RECORDS == 1024 == bus_system.SEND_MANY_RECORDS == bus_system.ACK_CHUNK_RECORDS
    assert pool_records(1000, 1 << 20) == 2048  # 1,049 records a batch, in whole chunks
    assert pool_records(100, 1 << 20) == 11 * 1024
    assert pool_records(1000, 20_000) == 1024  # never fewer than one chunk
    cfg = BenchConfig(values="json", record_bytes=200, batch_bytes=300_000)
    assert len(cfg.client_values(0)) == 2048 and cfg.client_values(0) != cfg.client_values(1)  # each producer its own
    assert [t for t in cfg.latency_tails(1)] == [v[8:] for v in cfg.client_values(1)]
    with pytest.raises(ValueError, match="record_bytes >= 32"):
        BenchConfig(values="json", record_bytes=31).validate()
    with pytest.raises(ValueError, match="values must be one of random, json"):
        BenchConfig(values="xml").validate()


def bus_result(mode="produce", rps=100.0, codec=None, stored=None, r=1, acks=1, send_many=False, client="sync",
               poll_order="fair"):
    opts = BusOptions(replication_factor=r, acks=acks, compression=codec, send_many=send_many, nodes=r, client=client,
                      poll_order=poll_order)
    config = {"bus": {**dataclasses.asdict(opts), "nodes": r}}
    return Result(bus_system.system_name(opts), mode, 1000, 1_000_000, 1.0, rps, 1.0, p99_ms=2.0 * rps / 100,
                  stored_bytes=stored, config=config)


def test_compression_makes_one_system_each_named_only_when_it_compresses():
    from bench import runner

    assert runner.parse_compressions("none, lz4,zstd,lz4") == [None, "lz4", "zstd"]
    assert runner.parse_compressions("none") == [None]  # one system without compression, not none at all
    for bad in ("", "gzip", "none,snappy"):
        with pytest.raises(ValueError):
            runner.parse_compressions(bad)
    with pytest.raises(ValueError, match="compression"):
        BusOptions(compression="none").validate()  # None is no compression; "none" is the command's word
    variants = runner.bus_variants(BusOptions(), [1, 3], ["all"], [None, "zstd"])
    assert [bus_system.system_name(b) for b in variants] == [
        "bus R=1 acks=all", "bus R=1 acks=all zstd", "bus R=3 acks=all", "bus R=3 acks=all zstd"]
    assert bus_system.system_name(BusOptions(send_many=True, compression="lz4")) == "bus send_many R=1 acks=1 lz4"
    assert bus_system.is_bus("bus R=1 acks=1 zstd")
    assert runner.exit_status({"bus R=1 acks=1 zstd produce": "boom"}) == 1


def test_compressed_rows_are_compared_with_the_same_bus_uncompressed():
    from bench.results import compression_pairs, replication_pairs, stored_per_record, stored_ratio

    none, lz4, zstd = (bus_result(rps=100.0, stored=1_000_000), bus_result(rps=110.0, codec="lz4", stored=320_000),
                       bus_result(rps=80.0, codec="zstd", stored=200_000))
    bulk_zstd = bus_result(rps=300.0, codec="zstd", stored=190_000, send_many=True)  # no uncompressed send_many
    r3_zstd = bus_result(rps=50.0, codec="zstd", stored=600_000, r=3)
    lat_none, lat_zstd = bus_result("latency", rps=100.0), bus_result("latency", rps=150.0, codec="zstd")
    results = [none, lz4, zstd, bulk_zstd, r3_zstd, lat_none, lat_zstd]
    assert [(a.system, b.system) for a, b in compression_pairs(results)] == [
        ("bus R=1 acks=1 lz4", "bus R=1 acks=1"), ("bus R=1 acks=1 zstd", "bus R=1 acks=1"),
        ("bus R=1 acks=1 zstd", "bus R=1 acks=1")]  # the latency pair; send_many and R=3 have no plain row
    assert stored_ratio(zstd, none) == 0.2 and stored_ratio(lat_zstd, lat_none) is None
    assert stored_per_record(zstd) == 200.0 and stored_per_record(lat_none) is None
    # Replicas are compared within one compression: R=3 zstd with R=1 zstd, never with R=1 uncompressed.
    assert [(a.system, b.system) for a, b in replication_pairs(results)] == [
        ("bus R=3 acks=1 zstd", "bus R=1 acks=1 zstd")]

    text = report.format_table(results, legend=False)
    assert "  bus R=1 acks=1 zstd produce: 0.80x the records/s of bus R=1 acks=1" in text
    assert "  bus R=1 acks=1 zstd latency: p99 1.50x (end to end; above 1 is slower) of bus R=1 acks=1" in text
    rows = report.storage_rows(results)
    assert rows[0] == report.STORAGE_COLUMNS
    assert rows[1:4] == [("bus R=1 acks=1", "1.0", "1,000", "-", "-", "-"),
                         ("bus R=1 acks=1 lz4", "0.3", "320", "0.32x", "1.10x", "-"),
                         ("bus R=1 acks=1 zstd", "0.2", "200", "0.20x", "0.80x", "-")]
    assert rows[4][1:4] == ("0.2", "190", "-") and len(rows) == 6  # the latency rows stored nothing
    assert "on disk after each produce run:" in text
    assert "on disk" not in report.format_table([lat_none], legend=False)

    data = report.to_json(results)["results"]
    assert data[2]["compression_base"] == "bus R=1 acks=1" and data[2]["stored_ratio"] == 0.2
    assert data[2]["compression_ratio"] == 0.8 and data[2]["stored_bytes_per_record"] == 200.0
    assert data[2]["stored_bytes"] == 200_000 and "compression_base" not in data[0]
    assert "stored_bytes_per_record" not in data[5]


def test_median_of_runs_takes_the_median_of_stored_bytes():
    runs = [bus_result(rps=x, stored=s) for x, s in ((1.0, 300), (3.0, 100), (2.0, 200))]
    assert median_of_runs(runs).stored_bytes == 200


def test_bus_tiny_workload_as_a_group_and_by_assign(tmp_path, no_strays):
    cfg = tiny(tmp_path, sync="always", partitions=3, producers=2, consumers=2, records=3001)
    for group in (True, False):
        produce, consume, latency = run_all_modes(make_bus_system(BusOptions(nodes=2, group=group)), cfg)
        assert consume.config["bus"]["group"] is group and consume.server_rss_mb > 0
        assert produce.config["client_rss_peak_mb"] > 0
        # What the 3 partitions on 2 nodes hold: the random values and a little framing; LMDB's files hold more.
        payload = cfg.records * cfg.record_bytes
        assert payload < produce.stored_bytes < 1.1 * payload and produce.disk_bytes >= produce.stored_bytes
        assert consume.stored_bytes is None and latency.stored_bytes is None  # produce mode only
    bulk = make_bus_system(BusOptions(send_many=True)).run("produce", cfg)
    check_sane(bulk, cfg, "produce")
    assert bulk.system == "bus send_many R=1 acks=1"  # the bench's defaults, said in every row
    assert bulk.config["bus"]["replication_factor"] == 1 and bulk.config["bus"]["nodes"] == 1
    assert list(tmp_path.iterdir()) == []


def test_bus_against_a_running_cluster(tmp_path, no_strays):
    from nodes.cluster import LocalCluster

    with LocalCluster(str(tmp_path / "cluster"), 1) as cluster:
        cfg = tiny(tmp_path / "scratch")
        system = make_bus_system(BusOptions(bootstrap=cluster.bootstrap, group=False))
        r = system.run("produce", cfg)
        assert r.records == cfg.records and r.server_cpu_pct is None and r.server_rss_mb is None
        assert r.server_anon_mb is None and r.stored_bytes is None  # its nodes are not the bench's to read
        assert any("external cluster" in n for n in r.notes)
        from bus import Admin

        with Admin(cluster.bootstrap) as admin:
            assert admin.list_topics() == {}  # the bench's topic is deleted afterwards


# ---------------------------------------------------------------------------------------------- hot paths
# The bench's speed-ups in the producer and consumer must not change what they do.


def test_send_many_stores_what_send_would(tmp_path):
    from bus import Admin, Consumer, Producer
    from bus.errors import RecordTooLarge
    from nodes.cluster import LocalCluster

    values = [b"v%05d" % i + b"." * (i % 300) for i in range(5_000)]
    with LocalCluster(str(tmp_path / "cluster"), 1) as cluster:
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic("many", 3)
        # Small batches and a small buffer: the values span many batches, and send_many waits for room.
        with Producer(cluster.bootstrap, batch_bytes=10_000, buffer_bytes=40_000, linger_ms=1) as producer:
            futures = producer.send_many("many", values[:2_500])
            futures += producer.send_many("many", iter(values[2_500:4_000]), partition=2)
            futures += [producer.send("many", v) for v in values[4_000:]]
            metas = [f.get(30) for f in futures]
            with pytest.raises(RecordTooLarge):  # the per-record path: values before the big one go
                producer.send_many("many", [b"ok", b"x" * (2 << 20)], partition=0)
            assert producer.send_many("many", []) == []
        assert [m.partition for m in metas[2_500:4_000]] == [2] * 1_500
        by_partition: dict = {}
        for m, v in zip(metas, values):
            by_partition.setdefault(m.partition, []).append((m.offset, v))
        for runs in by_partition.values():  # each partition's offsets are dense and in send order
            assert [o for o, _ in runs] == sorted(o for o, _ in runs)
        with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
            consumer.assign([("many", p) for p in range(3)])
            got = []
            deadline = time.monotonic() + 30
            while len(got) < len(values) + 1 and time.monotonic() < deadline:
                got += consumer.poll(timeout_ms=200)
        stored = {(r.partition, r.offset): r.value for r in got}
        assert stored[(0, max(o for (p, o) in stored if p == 0))] == b"ok"
        for m, v in zip(metas, values):
            assert stored[(m.partition, m.offset)] == v


def test_consumer_runs_honour_positions_and_seeks(tmp_path):
    from bus import Admin, Consumer, Producer
    from nodes.cluster import LocalCluster

    with LocalCluster(str(tmp_path / "cluster"), 1) as cluster:
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic("seeks", 1)
        with Producer(cluster.bootstrap, batch_bytes=2_000, linger_ms=0) as producer:
            for i in range(1_000):
                producer.send("seeks", b"%d" % i, headers=[("i", b"%d" % i)] if i % 7 == 0 else None)
            producer.flush(30)
        with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
            consumer.assign([("seeks", 0)])

            def take(n):
                out, deadline = [], time.monotonic() + 30
                while len(out) < n and time.monotonic() < deadline:
                    out += consumer.poll(timeout_ms=200, max_records=n - len(out))
                return out

            first = take(10)  # part of a run: the rest stays buffered
            assert [r.offset for r in first] == list(range(10))
            assert consumer.position(("seeks", 0)) == 10
            consumer.seek(("seeks", 0), 500)  # into the middle of data fetched before the seek
            mid = take(5)
            assert [r.offset for r in mid] == list(range(500, 505)) and mid[0].value == b"500"
            consumer.seek(("seeks", 0), 3)  # backwards, into records already returned
            back = take(997)
            assert [r.offset for r in back] == list(range(3, 1_000))
            assert [r.value for r in back] == [b"%d" % i for i in range(3, 1_000)]
            assert back[4].headers == [("i", b"7")] and back[5].headers is None  # offset 7 has one, 8 none
            assert all(r.topic == "seeks" and r.partition == 0 and r.timestamp_ms > 0 for r in back)
            assert consumer.poll(timeout_ms=100) == []


# ---------------------------------------------------------------------------------------------- not installed

BUS = [sys.executable, "-m", "bus.cli"]
BENCH_INSTALL = "pip install -e '.[bench]'"


def env_without(tmp_path, module: str) -> dict:
    """The environment of a child ``python`` in which ``import module`` fails as it does when the module is
    not installed: a package of that name first on PYTHONPATH whose import raises ModuleNotFoundError."""
    hiding = tmp_path / "hiding"
    (hiding / module).mkdir(parents=True)
    message = f"No module named {module!r}"
    (hiding / module / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name={module!r})\n")
    env = child_env()
    env["PYTHONPATH"] = str(hiding) + os.pathsep + env["PYTHONPATH"]
    return env


def bus_bench(tmp_path, env, *args) -> subprocess.CompletedProcess:
    # From tmp_path, not the checkout: ``python -m`` puts its working directory first on sys.path.
    return subprocess.run([*BUS, "bench", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("module", ["psutil", "bench"])
def test_bench_not_installed_is_one_line_saying_how_to_install(tmp_path, module):
    done = bus_bench(tmp_path, env_without(tmp_path, module), "--records", "100", "--runs", "1")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert output.strip().splitlines() == [
        f"error: bus bench needs the bench extra (no module named {module!r}): {BENCH_INSTALL}"
    ], output
    assert "Traceback" not in output


def test_bench_help_needs_no_extra(tmp_path):
    done = bus_bench(tmp_path, env_without(tmp_path, "psutil"), "--help")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Usage: ") and "--latency-rate" in done.stdout and "--peers" in done.stdout
    assert done.stderr == ""


def test_only_the_bench_and_its_extra_count_as_not_installed():
    def missing(name):
        return ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in ("psutil", "redis", "hiredis", "nats", "nats.js.api", "bench"):
        assert bench_not_installed(missing(name)), name
    # Anything else missing is a bug (a misspelt module of the bench, a broken install): its traceback stays.
    for name in ("bench.harnes", "msgpack", "psutilx", "natsort"):
        assert not bench_not_installed(missing(name)), name
    assert not bench_not_installed(ModuleNotFoundError("no name"))


def test_aio_and_drain_order_rows_are_named_and_compared_with_their_base_in_the_same_run():
    aio = BusOptions(client="aio", replication_factor=3, acks="all", nodes=3)
    assert bus_system.system_name(aio) == "bus aio R=3 acks=all"
    assert bus_system.system_name(BusOptions(poll_order="drain")) == "bus R=1 acks=1 drain"
    with pytest.raises(ValueError, match="send_many"):
        BusOptions(client="aio", send_many=True).validate()
    with pytest.raises(ValueError, match="poll_order"):
        BusOptions(poll_order="random").validate()
    rows = [bus_result(rps=100.0), bus_result(rps=80.0, client="aio"), bus_result("consume", rps=200.0),
            bus_result("consume", rps=150.0, client="aio"), bus_result("consume", rps=205.0, poll_order="drain"),
            bus_result(rps=300.0, r=3, acks=1)]
    rows[0].config["client_cpu_us_per_record"], rows[1].config["client_cpu_us_per_record"] = 1.0, 1.25
    table = report.format_table(rows)
    assert "bus aio R=1 acks=1 produce: 0.80x the records/s of bus R=1 acks=1 (client CPU per record 1.25x)" in table
    assert "bus aio R=1 acks=1 consume: 0.75x the records/s of bus R=1 acks=1" in table
    assert "bus R=1 acks=1 consume: 0.98x the records/s of bus R=1 acks=1 drain" in table
    assert "bus R=3 acks=1 produce: 3.00x the records/s of bus R=1 acks=1" in table  # aio rows not in that pairing
    assert runner_command_line(aio=True, drain_order=False) == "bus bench --aio --no-drain-order"


def runner_command_line(**options):
    from bench import runner

    return runner.command_line(options)
