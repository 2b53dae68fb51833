"""One worker's state in a KvIndex, the types its answers use, and the sequence rules' helper."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from msgspec import UNSET

from kvrelay.router.store import BlockStore
from kvrelay.wire.schema import RelayEvent, Removed, Resync, Stored

WorkerKey = tuple[int, int]
"""(instance_id, dp_rank)"""
Tier = tuple[str, int]
"""(medium, group_idx); events without them are GPU, group 0."""
DEFAULT_TIER: Final[Tier] = ("GPU", 0)
VLLM_TAGS: Final = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # (epoch, seq) at or before the last one applied: skipped
    COVERED = "covered"  # at or below a restored snapshot's stream sequence: skipped


class Gap(NamedTuple):
    """Batches of a worker missing on the consumer's side: the relay did not announce them."""

    worker: WorkerKey
    previous: tuple[int, int]  # (epoch, seq) last applied
    current: tuple[int, int]  # (epoch, seq) of the batch that showed the gap

    @property
    def epoch_back(self) -> bool:
        return self.current[0] < self.previous[0]

    @property
    def missed(self) -> tuple[int, int] | None:
        """Seq range missed in the current epoch; None when the epoch went back."""
        if self.epoch_back:
            return None
        start = self.previous[1] + 1 if self.current[0] == self.previous[0] else 0
        return start, self.current[1] - 1

    def describe(self) -> str:
        instance, rank = self.worker
        what = (f"seq {self.missed[0]}..{self.missed[1]} of epoch {self.current[0]} missing"
                if self.missed is not None else "epoch went back")
        return (f"worker {instance} rank {rank}: {what} (last epoch {self.previous[0]} seq "
                f"{self.previous[1]}, now epoch {self.current[0]} seq {self.current[1]})")


class WorkerStatus(NamedTuple):
    """A read-only view of one worker's state and counters."""

    worker: WorkerKey
    epoch: int | None
    seq: int | None
    exact: bool
    blocks: int  # over every tier
    batches: int
    events: int
    resyncs: dict[str, int]  # by reason, as the relay announced them
    gaps: int  # found on this side
    duplicates: int
    unknown_events: int
    unreadable_events: int  # unknown events under a vLLM tag: treated as a loss
    unmatched_removes: int  # removes of blocks the index did not hold
    last_ts: float  # of the last batch applied: vLLM's clock and the relay's
    last_relay_ts: float
    unkeyed_blocks: int  # stored without a token key: parent not held keyed, or tokens short


@dataclass(slots=True, eq=False)
class Worker:
    key: WorkerKey
    slot: int
    bit: int
    tiers: dict[Tier, BlockStore] = field(default_factory=dict)  # blocks, parents, keys
    sizes: dict[Tier, set[int]] = field(default_factory=dict)  # block sizes of keyed blocks
    epoch: int | None = None
    seq: int | None = None
    covered: int = 0  # stream sequence a restored snapshot is complete up to
    exact: bool = False
    batches: int = 0
    events: int = 0
    resyncs: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    unknown_events: int = 0
    unreadable_events: int = 0
    unmatched_removes: int = 0
    last_ts: float = 0.0
    last_relay_ts: float = 0.0
    unkeyed_blocks: int = 0


def tier_of(event: Stored | Removed) -> Tier:
    group = event.group_idx
    return (event.medium or "GPU", group if type(group) is int else 0)


def announced(events: Iterable[RelayEvent], first: int, last: int) -> bool:
    """Whether the batch's resync ranges together cover seqs first..last."""
    ranges = sorted((e.missed_from, e.missed_to) for e in events if isinstance(e, Resync)
                    and e.missed_from is not UNSET and e.missed_to is not UNSET)
    for start, end in ranges:
        if start > first:
            return False
        first = max(first, end + 1)
        if first > last:
            return True
    return False


