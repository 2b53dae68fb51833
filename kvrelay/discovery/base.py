"""What every discovery source shares: the result, the error, the interface and the pacing of
retries while a worker has not registered yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

log = logging.getLogger("kvrelay.discovery")

LOG_EVERY = 30.0  # seconds between "still waiting" lines when the reason does not change


class InstanceId(NamedTuple):
    """The worker instance ID the relay publishes under, and how it was found."""

    value: int
    source: str  # "explicit" | "kubernetes" | "etcd" | "etcd-lease" | "pod-name-hash" | ...
    detail: str
    lease: int | None = None  # the etcd lease the ID is, when the relay holds it


class DiscoveryError(Exception):
    """The configured source cannot give an ID; the message says why and what to fix."""


class Source(ABC):
    """One way of learning the worker's instance ID.

    `target` names what the source reads (for logs and /health); `status` says what it is
    doing right now, e.g. "waiting for DynamoWorkerMetadata dynamo/worker-0 (HTTP 404)".
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self.status = f"reading {self.target}"

    @property
    @abstractmethod
    def target(self) -> str:
        """What this source reads, e.g. "DynamoWorkerMetadata dynamo/worker-0"."""

    @abstractmethod
    async def resolve(self) -> InstanceId:
        """The ID, waiting (bounded) while the worker has not registered; DiscoveryError when
        the source cannot give one."""


class Pacing:
    """Bounded retries with a doubling backoff, logged without flooding.

    Each source calls `wait(reason)` after an attempt that found nothing yet; it sleeps the
    next step, or raises DiscoveryError once `timeout` seconds have passed since the start.
    """

    def __init__(self, source: Source, timeout: float, retry_max: float,
                 first_delay: float = 0.1) -> None:
        self._source = source
        self._timeout = timeout
        self._retry_max = retry_max
        self._delay = min(first_delay, retry_max)
        self._start = time.monotonic()
        self._deadline = self._start + timeout
        self._logged_reason: str | None = None
        self._logged_at = 0.0

    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def waiting(self, reason: str) -> None:
        """Record (and log, unless just logged) why the source is still waiting."""
        self._source.status = f"waiting for {self._source.target} ({reason})"
        now = time.monotonic()
        if reason != self._logged_reason or now - self._logged_at >= LOG_EVERY:
            log.info("discovery: waiting for %s: %s (giving up in %.0fs)",
                     self._source.target, reason, self.remaining())
            self._logged_reason, self._logged_at = reason, now

    def give_up(self, reason: str) -> DiscoveryError:
        return DiscoveryError(
            f"{self._source.target}: not found within {self._timeout:g}s ({reason}); "
            "raise --discovery-timeout, or pass --instance-id")

    async def wait(self, reason: str) -> None:
        """Sleep the next backoff step; DiscoveryError once the deadline has passed."""
        self.waiting(reason)
        remaining = self.remaining()
        if remaining <= 0:
            raise self.give_up(reason)
        await asyncio.sleep(min(self._delay, remaining))
        self._delay = min(self._delay * 2, self._retry_max)
