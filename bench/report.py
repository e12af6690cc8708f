"""Showing bench results: the plain-text table, the JSON file and the optional plot.

``format_table(results)`` is what ``bus bench`` prints: one row per (system, mode), numbers right-aligned,
every latency in milliseconds, the ratio to the raw ceiling of the same mode; then the replicated and the
compressed rows against the same bus on fewer replicas or uncompressed, what each bus produce run left on
disk (``storage_rows``), and the notes that qualify a figure (a peer that cannot fsync, data on tmpfs, a
producer that fell behind).
``write_json(path, results)`` writes everything, including the series, for later comparison;
``plot(path, results)`` draws the latency distributions and throughput over time with matplotlib, which
is imported only here and only when asked for.

This module only formats: it never runs anything and never changes a Result.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from .results import (
    BenchError,
    Result,
    compression_pairs,
    figure_notes,
    ratios,
    replication_pairs,
    replication_ratio,
    stored_per_record,
    stored_ratio,
    variant_pairs,
)
from .stats import MB

COLUMNS = (
    "system", "mode", "records/s", "MB/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "ratio", "srv cpu%", "srv rss MB",
    "srv anon MB",
)  # fmt: skip
LEFT_ALIGNED = {"system", "mode"}
LEGEND = (
    "latency: produce = batch sent -> acked (per record); latency = end to end at the target rate; consume: none;\n"
    "failover = the longest wait between acknowledgements around each leader kill (one sample per kill).\n"
    "bus rows: R = replicas of each partition, M = min_insync_replicas when given, acks = the producer's, then its\n"
    "compression if any (lz4, zstd: each batch's payload compressed whole).\n"
    "ratio: fraction of the raw ceiling in the same mode (records/s; latency mode: raw p99 / p99). "
    f"MB = {MB:,} bytes of record payload. srv anon: the servers' resident memory less file-backed pages "
    "(a memory-mapped log's, which the kernel reclaims).\n"
    "on disk: the bytes of record batches the nodes store after a produce run (headers included, over every "
    "replica),\nper record, and over the same bus's uncompressed in the same run; LMDB MB: the nodes' files."
)
STORAGE_COLUMNS = ("system", "stored MB", "B/record", "stored vs none", "records/s vs none", "LMDB MB")
PLOT_HINT = "matplotlib not installed: pip install 'bus[plot]'"


class PlotUnavailable(BenchError):
    """``--plot`` was asked for but matplotlib is not installed."""


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1:
        return f"{x:.3f}"
    if x < 10:
        return f"{x:.2f}"
    if x < 100:
        return f"{x:.1f}"
    return f"{x:,.0f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    """The table's cells as strings, header first."""
    rows = [COLUMNS]
    for r, q in zip(results, ratios(results)):
        mode = r.mode if r.target_rate is None else f"{r.mode}@{r.target_rate:,.0f}/s"
        if r.mode == "failover":
            mode += f" x{r.latency_samples} kills"
        if r.runs > 1:
            mode += f" (median of {r.runs})"
        rows.append(
            (
                r.system,
                mode,
                _num(r.records_per_s, ",.0f"),
                _num(r.mb_per_s, ",.1f"),
                _ms(r.p50_ms),
                _ms(r.p99_ms),
                _ms(r.p999_ms),
                _ms(r.max_ms),
                "-" if q is None else f"{q:.2f}x",
                _num(r.server_cpu_pct, ".0f"),
                _num(r.server_rss_mb, ",.1f"),
                _num(r.server_anon_mb, ",.1f"),
            )
        )
    return rows


def aligned(rows: Sequence[Sequence[str]], columns: Sequence[str], indent: str = "") -> list[str]:
    """``rows`` (header first) as lines of aligned cells, a dashed rule under the header; the ``system`` and
    ``mode`` columns left-aligned, the numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if name in LEFT_ALIGNED else c.rjust(w) for c, w, name in zip(row, widths, columns)]
        return (indent + "  ".join(cells)).rstrip()

    return [line(rows[0]), indent + "  ".join("-" * w for w in widths)] + [line(row) for row in rows[1:]]


def storage_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    """What each produce run with a stored-bytes figure left on disk (``STORAGE_COLUMNS``, header first):
    stored MB, bytes per record, and for a compressed row its stored bytes and records/s over the same bus
    uncompressed in the same run (``compression_pairs``). Just the header when no result has the figure."""
    against = {id(r): base for r, base in compression_pairs(results)}
    rows = [STORAGE_COLUMNS]
    for r in results:
        if r.stored_bytes is None:
            continue
        base = against.get(id(r))
        q = stored_ratio(r, base) if base is not None else None
        speed = replication_ratio(r, base) if base is not None else None
        rows.append((r.system, f"{r.stored_bytes / MB:,.1f}", _num(stored_per_record(r), ",.0f"),
                     "-" if q is None else f"{q:.2f}x", "-" if speed is None else f"{speed:.2f}x",
                     "-" if r.disk_bytes is None else f"{r.disk_bytes / MB:,.1f}"))
    return rows


def format_table(results: Sequence[Result], legend: bool = True) -> str:
    """The results as an aligned plain-text table, then the comparisons within the run, what the produce
    runs left on disk, and each result's notes."""
    out = aligned(table_rows(results), COLUMNS)
    pairs = replication_lines(results)
    if pairs:
        out += ["", "against fewer replicas (same run):", *pairs]
    pairs = compression_lines(results)
    if pairs:
        out += ["", "against no compression (same run):", *pairs]
    pairs = variant_lines(variant_pairs(results, "client", "sync"))
    if pairs:
        out += ["", "bus.aio against the sync client (same run):", *pairs]
    pairs = variant_lines([(fair, drain) for drain, fair in variant_pairs(results, "poll_order", "fair")])
    if pairs:
        out += ["", "fair polling against the draining order (same run):", *pairs]
    stored = storage_rows(results)
    if len(stored) > 1:
        out += ["", "on disk after each produce run:", *aligned(stored, STORAGE_COLUMNS, "  ")]
    notes = [f"  {r.system} {r.mode}: {n}" for r in results for n in figure_notes(r)]
    if notes:
        out += ["", "notes:", *notes]
    if legend:
        out += ["", LEGEND]
    return "\n".join(out)


def replication_lines(results: Sequence[Result]) -> list[str]:
    """One line per replicated bus row: its figure over the same bus's on fewer replicas in the same run."""
    out = []
    for r, base in replication_pairs(results):
        q = replication_ratio(r, base)
        if q is None:
            continue
        if r.mode == "latency":
            p50 = f", p50 {r.p50_ms / base.p50_ms:.2f}x" if r.p50_ms is not None and base.p50_ms else ""
            what = f"p99 {q:.2f}x{p50} (end to end; above 1 is slower)"
        else:
            what = f"{q:.2f}x the records/s"
        out.append(f"  {r.system} {r.mode}: {what} of {base.system}")
    return out


def compression_lines(results: Sequence[Result]) -> list[str]:
    """One line per compressed bus row: its figure over the same bus's uncompressed in the same run."""
    out = []
    for r, base in compression_pairs(results):
        q = replication_ratio(r, base)
        if q is None:
            continue
        what = f"p99 {q:.2f}x (end to end; above 1 is slower)" if r.mode == "latency" else f"{q:.2f}x the records/s"
        out.append(f"  {r.system} {r.mode}: {what} of {base.system}")
    return out


def variant_lines(pairs: Sequence[tuple[Result, Result]]) -> list[str]:
    """One line per (row, base) pair of throughput rows: the row's records/s over the base's."""
    out = []
    for r, base in pairs:
        q = replication_ratio(r, base)
        if q is not None and r.mode != "latency":
            cpu, base_cpu = r.config.get("client_cpu_us_per_record"), base.config.get("client_cpu_us_per_record")
            per_record = f" (client CPU per record {cpu / base_cpu:.2f}x)" if cpu and base_cpu else ""
            out.append(f"  {r.system} {r.mode}: {q:.2f}x the records/s of {base.system}{per_record}")
    return out


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, for the JSON file."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Runnable processes averaged over 1, 5 and 15 minutes when the file is written: above the CPU count,
        # something else shared the machine while the figures were taken.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import psutil

        info["memory_mb"] = round(psutil.virtual_memory().total / MB)
    except ImportError:
        pass
    return info


def to_json(results: Sequence[Result], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything measured, as one JSON-ready dict (each result with its ``ratio`` to raw)."""
    against = {id(r): base for r, base in replication_pairs(results)}
    plain = {id(r): base for r, base in compression_pairs(results)}
    items = []
    for r, q in zip(results, ratios(results)):
        d = r.to_dict()
        d["ratio"] = q
        base = against.get(id(r))
        if base is not None:  # the same bus on fewer replicas, in the same run (replication_ratio)
            d["replication_base"] = base.system
            d["replication_ratio"] = replication_ratio(r, base)
        if r.stored_bytes is not None:
            d["stored_bytes_per_record"] = stored_per_record(r)
        base = plain.get(id(r))
        if base is not None:  # the same bus uncompressed, in the same run
            d["compression_base"] = base.system
            d["compression_ratio"] = replication_ratio(r, base)  # records/s (latency mode: p99) over base's
            d["stored_ratio"] = stored_ratio(r, base)
        items.append(d)
    return {"format": 1, "machine": machine_info(), "meta": meta or {}, "results": items}


def write_json(path: str, results: Sequence[Result], meta: dict[str, Any] | None = None) -> None:
    """Write ``to_json`` to ``path`` (replaced atomically, so a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(to_json(results, meta), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path: str) -> list[Result]:
    """Results back from a file written by ``write_json`` (to compare runs or re-plot)."""
    with open(path) as f:
        data = json.load(f)
    fields = set(Result.__dataclass_fields__)
    out = []
    for d in data["results"]:
        d = {k: v for k, v in d.items() if k in fields}
        d["timeline"] = [tuple(x) for x in d.get("timeline", [])]
        d["latency_cdf"] = [tuple(x) for x in d.get("latency_cdf", [])]
        out.append(Result(**d))
    return out


def plot(path: str, results: Sequence[Result]) -> None:
    """Draw latency by percentile (left) and throughput over time (right) into ``path`` (e.g. a .png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(PLOT_HINT) from None

    fig, (lat_ax, tput_ax) = plt.subplots(1, 2, figsize=(14, 5.5))
    # One colour per system, one line style per mode, the same in both panels.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    systems = list(dict.fromkeys(r.system for r in results))
    colour = {name: palette[i % len(palette)] for i, name in enumerate(systems)}
    style = {"produce": "-", "consume": ":", "latency": "--"}

    def line_kw(r: Result) -> dict[str, Any]:
        return {"color": colour[r.system], "linestyle": style.get(r.mode, "-"), "label": f"{r.system} {r.mode}"}

    # Latency by percentile on an inverse-tail axis: 90, 99, 99.9 ... equally spaced, as HdrHistogram plots.
    drawn = False
    for r in results:
        points = [(q, v) for q, v in r.latency_cdf if q < 100 and v is not None]
        if not points:
            continue
        xs = [1 / (1 - q / 100) for q, _ in points]
        lat_ax.plot(xs, [v for _, v in points], marker=".", **line_kw(r))
        if r.max_ms is not None:
            lat_ax.plot([xs[-1]], [r.max_ms], marker="x", color=colour[r.system])
        drawn = True
    ticks = [0, 50, 90, 99, 99.9, 99.99, 99.999]
    lat_ax.set_xscale("log")
    lat_ax.set_xticks([1 / (1 - q / 100) for q in ticks], [f"p{q:g}" for q in ticks])
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency ms (x: max)")
    lat_ax.set_title("latency by percentile (produce: ack; latency: end to end)")
    lat_ax.grid(True, which="both", alpha=0.3)
    if drawn:
        lat_ax.legend(fontsize="small")

    # Throughput per bin; log scale, since the systems differ by orders of magnitude. Empty bins are gaps.
    drawn = False
    for r in results:
        if not r.timeline or r.timeline_bin_s <= 0:
            continue
        xs = [t for t, _ in r.timeline]
        ys = [n / r.timeline_bin_s if n > 0 else float("nan") for _, n in r.timeline]
        tput_ax.step(xs, ys, where="post", **line_kw(r))
        drawn = True
    tput_ax.set_yscale("log")
    tput_ax.set_xlabel("seconds from start")
    tput_ax.set_ylabel("records/s")
    tput_ax.set_title("throughput over time")
    tput_ax.grid(True, which="both", alpha=0.3)
    if drawn:
        tput_ax.legend(fontsize="small")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
