"""Requests a node holds until something happens to their partitions, or their deadline passes.

Kafka calls it the purgatory: a long-poll fetch waits for data (a consumer's for the high watermark to
move, a follower's for an append), an acks=all produce waits for the high watermark to pass its batches.
This module owns only the bookkeeping: which waiting request touches which partition and when each
expires; what completing one means is the caller's (``try_complete`` replies and returns True when it
could, ``expire`` replies with what there is). No sockets, no clocks: time arrives as ``now_s``.
"""

from __future__ import annotations

from typing import Callable, Iterable


class Delayed:
    __slots__ = ("tps", "deadline_s", "try_complete", "expire")

    def __init__(self, tps: tuple, deadline_s: float, try_complete: Callable[[], bool], expire: Callable[[], None]):
        self.tps = tps  # the partitions whose changes may complete it
        self.deadline_s = deadline_s
        self.try_complete = try_complete
        self.expire = expire


class Purgatory:
    def __init__(self):
        self._ops: dict[int, Delayed] = {}
        self._by_tp: dict[tuple, set[int]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._ops)

    def add(self, tps: Iterable[tuple], deadline_s: float, try_complete, expire) -> None:
        self._seq += 1
        op = self._ops[self._seq] = Delayed(tuple(tps), deadline_s, try_complete, expire)
        for tp in op.tps:
            self._by_tp.setdefault(tp, set()).add(self._seq)

    def check(self, tp: tuple) -> None:
        """Something happened to ``tp``: complete what now can be."""
        for key in sorted(self._by_tp.get(tp, ())):
            op = self._ops.get(key)
            if op is not None and op.try_complete():
                self._remove(key)

    def expire(self, now_s: float) -> None:
        for key in [k for k, op in self._ops.items() if op.deadline_s <= now_s]:
            op = self._ops.get(key)
            if op is not None:
                self._remove(key)
                op.expire()

    def expire_all(self, tp: tuple | None = None) -> None:
        """Answer now what waits on ``tp`` (or everything): its partition went away or the node stops."""
        keys = sorted(self._ops) if tp is None else sorted(self._by_tp.get(tp, ()))
        for key in keys:
            op = self._ops.get(key)
            if op is not None:
                self._remove(key)
                op.expire()

    def next_deadline_s(self) -> float | None:
        return min((op.deadline_s for op in self._ops.values()), default=None)

    def _remove(self, key: int) -> None:
        op = self._ops.pop(key)
        for tp in op.tps:
            waiting = self._by_tp.get(tp)
            if waiting is not None:
                waiting.discard(key)
                if not waiting:
                    del self._by_tp[tp]
