"""The bookkeeping of one partition's log: its offsets, its size, and its idempotent producers. Pure.

No LMDB here: ``LogStore`` owns the bytes and calls into this to decide where a batch goes and whether it
is a retry of one already stored. Keeping the decisions pure lets the node roll them back exactly when a
transaction fails (map full, disk full), so memory never runs ahead of what is on disk.

Idempotent producing (Kafka's rules): each producer id carries an epoch and a per-partition sequence.
For a batch of producer ``pid`` with ``epoch`` and ``base_sequence``:
- a producer id not seen before must start at sequence 0;
- an older epoch than the one stored is fenced (ProducerFenced);
- a newer epoch must start at sequence 0;
- a batch equal to one of the last ``PRODUCER_BATCHES_KEPT`` stored batches is a retry: it is not written
  again, and the reply carries the offset it was stored at;
- the next sequence after the last stored one is appended; anything else is a gap (OutOfOrderSequence),
  which the producer answers by resending its earlier batches first.
"""

from __future__ import annotations

from bus.errors import OutOfOrderSequence, ProducerFenced
from bus.wire import IDEMPOTENCE_WINDOW_BATCHES

PRODUCER_BATCHES_KEPT = IDEMPOTENCE_WINDOW_BATCHES  # a producer's whole in-flight window (bus/wire.py)

APPEND = "append"
DUPLICATE = "duplicate"


class PartitionLog:
    """Offsets and producer state of one partition. ``next_offset`` is the offset the next record gets."""

    __slots__ = ("name", "db", "start_offset", "next_offset", "size_bytes", "producers")

    def __init__(self, name: str, db=None, start_offset: int = 0, next_offset: int = 0, size_bytes: int = 0,
                 producers: dict | None = None):
        assert 0 <= start_offset <= next_offset, (start_offset, next_offset)
        self.name = name
        self.db = db  # the LMDB handle, carried for LogStore; never used here
        self.start_offset = start_offset  # lowest offset still stored (retention moves it up)
        self.next_offset = next_offset  # one past the last stored record: the log end offset
        self.size_bytes = size_bytes  # bytes of stored batches, for retention by size
        # producer id -> (epoch, ((base_sequence, last_sequence, base_offset), ...) newest last)
        self.producers: dict[int, tuple[int, tuple]] = producers or {}

    def check_sequence(self, producer_id: int, epoch: int, base_sequence: int, record_count: int):
        """Decide what to do with a batch: (APPEND, None) or (DUPLICATE, base_offset); raises on fence/gap."""
        if producer_id < 0:
            return APPEND, None
        entry = self.producers.get(producer_id)
        if entry is None:
            # A new producer starts at sequence 0. Accepting any other first sequence would let a later
            # batch land before an earlier one that is still being retried (e.g. after NOT_OWNER).
            if base_sequence != 0:
                raise OutOfOrderSequence(
                    f"producer {producer_id} is new to partition {self.name} and must start at sequence 0, "
                    f"not {base_sequence}")
            return APPEND, None
        stored_epoch, batches = entry
        if epoch < stored_epoch:
            raise ProducerFenced(f"producer {producer_id} epoch {epoch} is older than {stored_epoch}")
        if epoch > stored_epoch:
            if base_sequence != 0:
                raise OutOfOrderSequence(f"producer {producer_id} new epoch {epoch} must start at sequence 0")
            return APPEND, None
        last_sequence = base_sequence + record_count - 1
        for first, last, base_offset in batches:
            if first == base_sequence and last == last_sequence:
                return DUPLICATE, base_offset
        expected = batches[-1][1] + 1
        if base_sequence != expected:
            raise OutOfOrderSequence(
                f"producer {producer_id} sent sequence {base_sequence}, partition {self.name} expects {expected}")
        return APPEND, None

    def record_append(self, producer_id: int, epoch: int, base_sequence: int, record_count: int,
                      batch_bytes: int) -> tuple:
        """Account for a batch appended at ``next_offset``. Returns an undo token for ``undo``."""
        token = (self.next_offset, self.size_bytes, producer_id, self.producers.get(producer_id))
        base_offset = self.next_offset
        self.next_offset += record_count
        self.size_bytes += batch_bytes
        if producer_id >= 0:
            entry = self.producers.get(producer_id)
            kept = entry[1] if entry is not None and entry[0] == epoch else ()
            batch = (base_sequence, base_sequence + record_count - 1, base_offset)
            self.producers[producer_id] = (epoch, (kept + (batch,))[-PRODUCER_BATCHES_KEPT:])
        return token

    def undo(self, token: tuple) -> None:
        next_offset, size_bytes, producer_id, entry = token
        self.next_offset, self.size_bytes = next_offset, size_bytes
        if producer_id >= 0:
            if entry is None:
                self.producers.pop(producer_id, None)
            else:
                self.producers[producer_id] = entry

    def record_truncate_head(self, new_start_offset: int, dropped_bytes: int) -> None:
        """Retention dropped whole batches below ``new_start_offset``."""
        assert self.start_offset <= new_start_offset <= self.next_offset
        self.start_offset = new_start_offset
        self.size_bytes -= dropped_bytes
        assert self.size_bytes >= 0
