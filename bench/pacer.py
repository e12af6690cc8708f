"""Fixed-rate pacing for latency mode: which records a producer sends now, given the clock.

Every system's latency-mode producer uses the one ``Pacer``, so each offers its load on the same schedule.

This module is pure and must stay so: it is handed the time and never reads a clock, sleeps or sends.
"""

from __future__ import annotations

import statistics
from array import array


class Pacer:
    """Which records a fixed-rate producer sends now.

    Record ``k`` is due at ``start_ns + k * 1e9 / rate_per_s``. Due records are held until the oldest has
    waited ``linger_ns`` or ``batch_records_max`` are due, then sent together, as a client library's linger
    does. The send time a record carries is its *due* time, not the moment the producer got round to it,
    so a producer that falls behind shows up as latency instead of quietly offering less load (coordinated
    omission). The clock is passed in; nothing here sleeps.
    """

    def __init__(self, rate_per_s: float, total: int, linger_ns: int, batch_records_max: int, start_ns: int):
        if rate_per_s <= 0 or total < 0 or linger_ns < 0 or batch_records_max < 1:
            raise ValueError("invalid pacing")
        self.rate_per_s = rate_per_s
        self.total = total  # records to send in all
        self.linger_ns = linger_ns
        self.batch_records_max = batch_records_max
        self.start_ns = start_ns
        self.sent = 0  # records handed out so far; they are 0 .. sent-1
        self.behind_ns = array("q")  # how late each batch was handed out, after it was due to go

    def due_ns(self, k: int) -> int:
        """When record ``k`` is due."""
        return self.start_ns + int(k * 1e9 / self.rate_per_s)

    def _due_count(self, now_ns: int) -> int:
        if now_ns < self.start_ns:
            return 0
        return min(self.total, int((now_ns - self.start_ns) * self.rate_per_s / 1e9) + 1)

    def take(self, now_ns: int) -> range | None:
        """The records to send now, or None if nothing is ready to go yet."""
        if self.sent >= self.total:
            return None
        due = self._due_count(now_ns)
        pending = due - self.sent
        if pending <= 0:
            return None
        go_at = self._go_at()
        if now_ns < go_at:
            return None
        self.behind_ns.append(now_ns - go_at)
        n = min(pending, self.batch_records_max)
        out = range(self.sent, self.sent + n)
        self.sent += n
        return out

    def _go_at(self) -> int:
        """When the batch starting at record ``sent`` must go: linger expired or batch full."""
        last = min(self.total, self.sent + self.batch_records_max) - 1
        return min(self.due_ns(self.sent) + self.linger_ns, self.due_ns(last))

    def next_deadline_ns(self) -> int | None:
        """When ``take`` next returns records (None when all are sent)."""
        if self.sent >= self.total:
            return None
        return self._go_at()

    @property
    def done(self) -> bool:
        return self.sent >= self.total

    @property
    def behind_ns_max(self) -> int:
        """The latest any batch was handed out after it was due to go."""
        return max(self.behind_ns, default=0)

    def lateness(self) -> dict[str, float]:
        """How late the producer handed its batches out, for its report: the worst and the median, in ms. A
        record's lateness counts in its latency, so a system whose producer is late is slower by that much."""
        p50_ns = statistics.median(self.behind_ns) if self.behind_ns else 0
        return {"behind_ms_max": self.behind_ns_max / 1e6, "behind_ms_p50": p50_ns / 1e6}
