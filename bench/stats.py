"""The bench's pure statistics: percentiles, throughput, the throughput timeline, its steadiness, and the
longest waits between acknowledgements around a fault.

Every figure the bench reports for any system is computed here, from plain numbers, the same way:
nearest-rank ``percentiles`` (exact on small samples, never interpolated), ``throughput`` in records/s and
MB/s, the records-per-bin ``timeline`` and ``steadiness`` (how the last third of a run compares with its
first), and ``longest_gaps`` (failover mode: the longest wait between acknowledgements around each leader
kill). results.py and failover.py build a ``Result`` from these.

This module must never run, time or start anything: no processes, no clocks, no files.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from fractions import Fraction
from itertools import accumulate
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Result

MB = 1_000_000  # MB/s is decimal megabytes of record payload per second

# The percentiles the table shows, in percent; 100 is the maximum.
REPORTED_PERCENTILES = (50, 99, 99.9, 100)
# Timeline bin widths to choose from (seconds): the smallest giving at most TIMELINE_BINS_MAX bins.
TIMELINE_BIN_CHOICES_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TIMELINE_BINS_MAX = 200


def percentiles(
    values: Sequence[float], counts: Sequence[int] | None = None, qs: Iterable[float] = REPORTED_PERCENTILES
) -> list[float | None]:
    """Nearest-rank percentiles: the ``q``th is the smallest sample with at least ``q``% of samples <= it.

    Never interpolates, so every answer is a latency that was observed, and on a small sample the tail
    percentiles honestly collapse to the maximum (p99.9 of 10 samples is the largest). ``counts[i]`` says
    how many records ``values[i]`` stands for (a batch ack covers all its records). The rank is computed in
    exact arithmetic: 99.9% of 1000 is rank 999, not 1000 as a float product would give. Empty -> Nones.
    """
    qs = list(qs)
    if counts is None:
        ordered = sorted(values)
        n = len(ordered)
        if n == 0:
            return [None] * len(qs)
        return [ordered[_rank(q, n) - 1] for q in qs]
    if len(counts) != len(values):
        raise ValueError("values and counts differ in length")
    pairs = sorted((v, c) for v, c in zip(values, counts) if c > 0)
    if any(c < 0 for c in counts):
        raise ValueError("counts must be >= 0")
    cumulative = list(accumulate(c for _, c in pairs))
    if not cumulative:
        return [None] * len(qs)
    total = cumulative[-1]
    return [pairs[bisect_left(cumulative, _rank(q, total))][0] for q in qs]


def _rank(q: float, n: int) -> int:
    """1-based nearest rank of percentile ``q`` among ``n`` samples."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    return max(1, math.ceil(Fraction(str(q)) * n / 100))


def throughput(records: int, payload_bytes: int, elapsed_s: float) -> tuple[float, float]:
    """(records/s, MB/s); zero when nothing measurable elapsed."""
    if elapsed_s <= 0:
        return 0.0, 0.0
    return records / elapsed_s, payload_bytes / elapsed_s / MB


def timeline(
    events_t_ns: Sequence[int], events_n: Sequence[int], start_ns: int, end_ns: int
) -> tuple[list[tuple[float, int]], float]:
    """Records completed per time bin from ``start_ns`` to ``end_ns``: ([(bin start s, records)], bin width s)."""
    span_s = max(0.0, (end_ns - start_ns) / 1e9)
    bin_s = next((b for b in TIMELINE_BIN_CHOICES_S if span_s / b <= TIMELINE_BINS_MAX), TIMELINE_BIN_CHOICES_S[-1])
    bins = [0] * (int(span_s / bin_s) + 1)
    bin_ns = bin_s * 1e9
    for t, n in zip(events_t_ns, events_n):
        i = min(len(bins) - 1, max(0, int((t - start_ns) / bin_ns)))
        bins[i] += n
    return [(round(i * bin_s, 6), n) for i, n in enumerate(bins)], bin_s


def steadiness(result: Result, bins_min: int = 9) -> float | None:
    """Throughput in the last third of a run over that in the first third (1.0: flat; None: too short).

    Taken over the middle 90 % of the timeline (and never its first and last bins), so that start-up and the
    final flush do not count. A figure well below 1.0 means each record costs more as the log grows."""
    series = result.timeline
    if len(series) < bins_min:
        return None
    trim = max(1, len(series) // 20)
    middle = [n for _, n in series[trim : len(series) - trim]]
    third = len(middle) // 3
    first, last = sum(middle[:third]), sum(middle[-third:])
    return last / first if first > 0 else None


def longest_gaps(times_ns: Sequence[int], marks_ns: Sequence[int], end_ns: int) -> list[tuple[int, int, bool]]:
    """Around each mark (a leader kill), the longest wait between acknowledgements: ``(from_ns, to_ns, open)``.

    Mark ``i``'s window runs from the last acknowledgement at or before it (the mark itself if there is none)
    to the next mark (``end_ns`` after the last), so what its restart costs later in the window counts too.
    The gap is the longest interval between consecutive acknowledgements in the window. ``open`` is True when
    no acknowledgement followed the mark within its window: the gap then runs to the window's end and is
    only a lower bound. ``times_ns`` need not be sorted; ``marks_ns`` must be increasing.
    """
    if any(b <= a for a, b in zip(marks_ns, marks_ns[1:])):
        raise ValueError("marks must be increasing")
    times = sorted(times_ns)
    out = []
    for i, mark in enumerate(marks_ns):
        window_end = marks_ns[i + 1] if i + 1 < len(marks_ns) else max(end_ns, mark)
        before = bisect_right(times, mark) - 1
        last = bisect_right(times, window_end)
        prev = times[before] if before >= 0 else mark
        best = (prev, prev)
        for t in times[before + 1 : last]:
            if t - prev > best[1] - best[0]:
                best = (prev, t)
            prev = t
        if last <= before + 1:  # nothing acknowledged after the mark in its window
            out.append((best[0], window_end, True))
        else:
            out.append((best[0], best[1], False))
    return out
