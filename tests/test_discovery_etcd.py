"""etcd discovery against a real etcd: registrations written with a lease under Dynamo's
`v1/instances/<namespace>/<component>/<endpoint>/<lease hex>` keys, read back through the v3
JSON gateway, this host's worker picked by its request-plane address."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from etcdserver import EtcdServer

from kvrelay.config import Config
from kvrelay.discovery import DiscoveryError, InstanceId, Source, select_source
from kvrelay.discovery.etcd import prefix_range_end
from kvrelay.testing.natsserver import free_port

REPO = Path(__file__).resolve().parent.parent
ELSEWHERE = "10.99.0.7"  # a worker on another node


def source_for(etcd: str, **flags: Any) -> Source:
    env = {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": etcd}
    config = Config.load(flags, env)
    return select_source(config.discovery, env, own_lease=config.own_lease)


async def discover(etcd: str, **flags: Any) -> InstanceId:
    return await asyncio.wait_for(source_for(etcd, **flags).resolve(), 20)


async def status_says(source: Source, text: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while text not in source.status:
        assert time.monotonic() < deadline, source.status
        await asyncio.sleep(0.02)


def test_prefix_range_end_is_the_next_key() -> None:
    """etcd's prefix range ends at the prefix with its last byte plus one."""
    assert prefix_range_end(b"v1/instances/dynamo/backend/") == b"v1/instances/dynamo/backend0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\x00"


async def test_reads_this_hosts_worker_registration(etcd_server: EtcdServer) -> None:
    """The worker registered from this host wins over one on another node; the ID is its lease."""
    other, ours = etcd_server.grant_lease(), etcd_server.grant_lease()
    etcd_server.register_worker(other, host=ELSEWHERE)
    etcd_server.register_worker(ours, host="127.0.0.1")
    found = await discover(etcd_server.url)
    assert (found.value, found.source) == (ours, "etcd")
    assert found.detail == (f"v1/instances/dynamo/backend/clear_kv_blocks/{ours:x} "
                            "(transport 127.0.0.1:36125)")


async def test_waits_until_the_worker_registers(etcd_server: EtcdServer) -> None:
    """Before the worker registers the source keeps polling; then it returns the new lease."""
    source = source_for(etcd_server.url, discovery_retry_max="0.1")
    resolving = asyncio.ensure_future(source.resolve())
    await status_says(source, "no worker has registered yet")
    lease = etcd_server.grant_lease()
    etcd_server.register_worker(lease, host="127.0.0.1")
    assert (await asyncio.wait_for(resolving, 10)).value == lease


async def test_only_other_hosts_registered_gives_up_naming_them(etcd_server: EtcdServer) -> None:
    """Registrations from elsewhere are not taken; the bounded wait ends saying what it saw."""
    etcd_server.register_worker(etcd_server.grant_lease(), host=ELSEWHERE)
    with pytest.raises(DiscoveryError, match=(
            r"none of the 2 registrations is from this host \(10\.99\.0\.7:36125\)")):
        await discover(etcd_server.url, discovery_timeout="0.5")


async def test_several_workers_on_this_host_need_a_choice(etcd_server: EtcdServer) -> None:
    """Two workers on this host are ambiguous; --discovery-host HOST:PORT picks one."""
    first, second = etcd_server.grant_lease(), etcd_server.grant_lease()
    etcd_server.register_worker(first, host="127.0.0.1", port=36125)
    etcd_server.register_worker(second, host="127.0.0.1", port=36126)
    with pytest.raises(DiscoveryError, match="2 workers registered from this host"):
        await discover(etcd_server.url, discovery_timeout="0.5")
    found = await discover(etcd_server.url, discovery_host="127.0.0.1:36126")
    assert found.value == second


async def test_stale_lease_expiring_settles_the_choice(etcd_server: EtcdServer) -> None:
    """A restarted worker's old registration goes with its lease; the new one is then taken."""
    old, new = etcd_server.grant_lease(), etcd_server.grant_lease()
    etcd_server.register_worker(old, host="127.0.0.1")
    etcd_server.register_worker(new, host="127.0.0.1")
    source = source_for(etcd_server.url, discovery_retry_max="0.1")
    resolving = asyncio.ensure_future(source.resolve())
    await status_says(source, "2 workers registered from this host")
    etcd_server.revoke_lease(old)
    assert (await asyncio.wait_for(resolving, 10)).value == new


async def test_unreachable_etcd_is_named_when_giving_up() -> None:
    """With no etcd answering, the error says which endpoint failed and how."""
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DiscoveryError, match=r"no etcd endpoint answered: 127\.0\.0\.1:\d+: "
                                             r"ConnectError"):
        await discover(dead, discovery_timeout="0.5")


async def test_next_endpoint_used_when_the_first_is_down(etcd_server: EtcdServer) -> None:
    """ETCD_ENDPOINTS lists several; one that answers is enough."""
    lease = etcd_server.grant_lease()
    etcd_server.register_worker(lease, host="127.0.0.1")
    found = await discover(f"127.0.0.1:{free_port()},{etcd_server.url}")
    assert found.value == lease


async def test_record_that_is_not_an_endpoint_is_skipped_and_logged(
        etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """A foreign value under the prefix is logged and skipped, never a crash."""
    etcd_server.put("v1/instances/dynamo/backend/generate/ffff", "not json")
    lease = etcd_server.grant_lease()
    etcd_server.register_worker(lease, host="127.0.0.1")
    assert (await discover(etcd_server.url)).value == lease
    assert "skipping v1/instances/dynamo/backend/generate/ffff" in caplog.text


def test_discover_command_reads_etcd(etcd_server: EtcdServer) -> None:
    """`kvrelay discover` with DYN_DISCOVERY_BACKEND=etcd prints the lease-based ID."""
    lease = etcd_server.grant_lease()
    etcd_server.register_worker(lease, host="127.0.0.1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVRELAY_", "DYN_", "POD_"))}
    env.update(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=etcd_server.url)
    done = subprocess.run([sys.executable, "-m", "kvrelay", "discover"], capture_output=True,
                          text=True, timeout=30, env=env, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    value, source = done.stdout.splitlines()
    assert value == str(lease)
    assert source.startswith("source: etcd (v1/instances/dynamo/backend/")
