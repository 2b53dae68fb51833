"""Dynamo's etcd discovery backend for `--format dynamo` records, through etcd's JSON gateway.

What Dynamo does (ai-dynamo/dynamo, lib/runtime/src/storage/kv/etcd.rs and
transports/etcd.rs): a bucket is a key prefix, so a record lives at `<bucket>/<key>` (the same
bucket and key the file backend escapes into a file name), written with the process's primary
lease: 10 s TTL, kept alive every TTL/2, revoked when the runtime shuts down. A process that
dies stops keeping the lease alive and etcd deletes its keys when the TTL runs out, which the
router watches as the worker leaving.

The relay does the same with a lease of its own: the one discovery granted when its ID is the
instance ID (`--dynamo-register worker`), else one granted here. It keeps the lease alive every
few seconds and checks each record is still there with its value and lease, writing back any
that is not. A lease that expired anyway (the relay or etcd away for longer than the TTL) is
replaced by a new one and every record written again: the worker's instance ID stays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import msgspec

from kvrelay.discovery.etcd import LEASE_TTL, EtcdGateway, EtcdUnavailable, b64, grant_lease
from kvrelay.dynamo.records import Record

log = logging.getLogger("kvrelay.dynamo")

T = TypeVar("T")


class _KeepAliveResult(msgspec.Struct):
    TTL: str = "0"  # etcd leaves out a zero: the lease is gone


class _KeepAlive(msgspec.Struct):
    result: _KeepAliveResult | None = None


class _Txn(msgspec.Struct):
    succeeded: bool = False


class _Deleted(msgspec.Struct):
    deleted: str = "0"


def etcd_key(bucket: str, key: str) -> str:
    """Where Dynamo's etcd backend keeps `key` of `bucket`."""
    return f"{bucket}/{key}"


class EtcdStore:
    """The records under Dynamo's etcd layout, attached to one lease held by the relay."""

    def __init__(self, gateway: EtcdGateway, *, lease: int | None = None,
                 ttl: int = LEASE_TTL) -> None:
        self.gateway = gateway
        self.lease = lease
        self._ttl = ttl

    @property
    def where(self) -> str:
        return f"etcd at {self.gateway.where}"

    @property
    def ttl(self) -> float:
        return float(self._ttl)

    async def _held_lease(self) -> int:
        if self.lease is None:
            self.lease = await grant_lease(self.gateway, self._ttl)
            log.info("etcd lease %x (%ds TTL) holds the Dynamo discovery records",
                     self.lease, self._ttl)
        return self.lease

    async def put(self, record: Record) -> None:
        lease = await self._held_lease()
        await self.gateway.call("/v3/kv/put", {
            "key": b64(etcd_key(record.bucket, record.key)), "value": b64(record.value),
            "lease": lease})

    async def keep_alive(self, records: Sequence[Record]) -> int:
        """Renew the lease, then write back each record gone, changed or off the lease."""
        lease = await self._held_lease()
        answer = _decode(await self.gateway.call("/v3/lease/keepalive", {"ID": lease}),
                         _KeepAlive, "lease keep-alive")
        if answer.result is None or int(answer.result.TTL) <= 0:
            log.error("etcd lease %x expired (the relay or etcd was away for over %ds): "
                      "taking a new lease and writing every record again", lease, self._ttl)
            self.lease = None
            for record in records:
                await self.put(record)
            return len(records)
        rewritten = 0
        for record in records:
            key = b64(etcd_key(record.bucket, record.key))
            put = {"requestPut": {"key": key, "value": b64(record.value), "lease": lease}}
            answer_txn = _decode(await self.gateway.call("/v3/kv/txn", {
                "compare": [
                    {"key": key, "target": "VALUE", "result": "EQUAL",
                     "value": b64(record.value)},
                    {"key": key, "target": "LEASE", "result": "EQUAL", "lease": lease}],
                "failure": [put]}), _Txn, "transaction")
            rewritten += not answer_txn.succeeded
        return rewritten

    async def delete(self, bucket: str, key: str) -> bool:
        answer = await self.gateway.call("/v3/kv/deleterange",
                                         {"key": b64(etcd_key(bucket, key))})
        return int(_decode(answer, _Deleted, "delete").deleted) > 0

    async def items(self, bucket: str) -> list[tuple[str, bytes]]:
        prefix = etcd_key(bucket, "")
        return [(key[len(prefix):], value)
                for key, value in await self.gateway.range_prefix(prefix)]

    async def close(self) -> None:
        """Revoke the lease: etcd deletes whatever is still attached to it."""
        try:
            if self.lease is not None:
                lease, self.lease = self.lease, None
                try:
                    await self.gateway.call("/v3/lease/revoke", {"ID": lease})
                except EtcdUnavailable as exc:
                    if "lease not found" not in str(exc):
                        raise
                log.info("revoked etcd lease %x", lease)
        finally:
            await self.gateway.aclose()


def _decode(content: bytes, kind: type[T], what: str) -> T:
    try:
        return msgspec.json.decode(content, type=kind)
    except msgspec.DecodeError as exc:
        raise EtcdUnavailable(f"etcd answered a {what} with {content[:200]!r} ({exc})") from None
