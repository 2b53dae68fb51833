"""One bound on what ingest holds: the buffer's batches and those the sequencers hold while a
resume or a replay is under way, in batches and in payload bytes (`--buffer-batches`,
`--buffer-bytes`).

Each holder charges the budget for every batch it keeps and releases it when the batch goes on
or is dropped. Past the bound the oldest batch anywhere (by the time it was read) is dropped by
its holder, counted and announced as that holder does (`overflow`), until the budget holds
again. One batch alone is always kept: none is larger than `--buffer-bytes`, since
`--max-batch-bytes` is not.
"""

from __future__ import annotations

from typing import Protocol


class Holder(Protocol):
    """Something that keeps batches against the budget."""

    def oldest(self) -> float | None:
        """When its oldest batch was read (None: it holds none)."""

    def drop_oldest(self) -> None:
        """Drop its oldest batch: released from the budget, counted, announced."""


class Budget:
    """Batches and payload bytes held by every holder together, and their bounds."""

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.batches = 0
        self.nbytes = 0
        self._holders: list[Holder] = []

    def join(self, holder: Holder) -> None:
        """`holder` charges this budget, and gives up its oldest when the budget is over."""
        self._holders.append(holder)

    def charge(self, size: int) -> None:
        """One batch of `size` bytes more; past the bound the oldest batches go."""
        self.batches += 1
        self.nbytes += size
        if self.batches > self.max_batches or self.nbytes > self.max_bytes:
            self._make_room()

    def release(self, batches: int, size: int) -> None:
        """`batches` of `size` bytes in all are no longer held."""
        self.batches -= batches
        self.nbytes -= size

    def _make_room(self) -> None:
        while self.batches > 1 and (self.batches > self.max_batches
                                    or self.nbytes > self.max_bytes):
            oldest: Holder | None = None
            oldest_at = 0.0
            for holder in self._holders:
                at = holder.oldest()
                if at is not None and (oldest is None or at < oldest_at):
                    oldest, oldest_at = holder, at
            if oldest is None:
                return
            oldest.drop_oldest()
