"""A real etcd (Debian's etcd-server) on free loopback ports with its own data dir, and
registrations written the way a Dynamo worker writes them."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from kvrelay.testing.natsserver import free_port


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdServer:
    """One etcd member; `url` is its client URL (the v3 JSON gateway lives there too)."""

    def __init__(self, data_dir: Path) -> None:
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd not installed (apt-get install etcd-server)")
        self.data_dir = data_dir
        client, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.log_path = data_dir.parent / "etcd.log"
        self._cmd = [binary, "--name", "kvrelay-test", "--data-dir", str(data_dir),
                     "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                     "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                     "--initial-cluster", f"kvrelay-test={peer_url}", "--log-level", "warn"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=self.url, timeout=5.0)

    def start(self, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._http.get("/health").json().get("health") == "true":
                    return
            except (httpx.TransportError, ValueError):
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._http.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._http.post(path, json=body)
        response.raise_for_status()
        return dict(response.json())

    def grant_lease(self, ttl: int = 10) -> int:
        """A lease, as a Dynamo worker takes one at start; its ID is the worker's instance ID."""
        return int(self._post("/v3/lease/grant", {"TTL": ttl})["ID"])

    def revoke_lease(self, lease: int) -> None:
        """What etcd does when the worker dies and the lease expires: its keys go."""
        self._post("/v3/lease/revoke", {"ID": lease})

    def register_worker(self, lease: int, *, host: str, port: int = 36125,
                        namespace: str = "dynamo", component: str = "backend",
                        endpoints: tuple[str, ...] = ("generate", "clear_kv_blocks")) -> None:
        """The endpoint records a Dynamo worker writes under v1/instances, with its lease."""
        for endpoint in endpoints:
            key = f"v1/instances/{namespace}/{component}/{endpoint}/{lease:x}"
            value = {"type": "Endpoint", "namespace": namespace, "component": component,
                     "endpoint": endpoint, "instance_id": lease,
                     "transport": {"tcp": f"{host}:{port}/{lease:x}/{endpoint}"}}
            self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(json.dumps(value)),
                                      "lease": lease})

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix`, sorted."""
        raw = prefix.encode()
        end = raw[:-1] + bytes([raw[-1] + 1])
        found = self._post("/v3/kv/range", {"key": _b64(prefix),
                                            "range_end": base64.b64encode(end).decode(),
                                            "keys_only": True})
        return sorted(base64.b64decode(kv["key"]).decode() for kv in found.get("kvs", []))

    def get(self, key: str) -> tuple[bytes, int] | None:
        """The value of `key` and the lease it is attached to (0: none), if it exists."""
        found = self._post("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        if not found:
            return None
        return base64.b64decode(found[0].get("value", "")), int(found[0].get("lease", 0))

    def lease_ttl(self, lease: int) -> int:
        """Seconds the lease has left; -1 once it is gone."""
        return int(self._post("/v3/lease/timetolive", {"ID": lease}).get("TTL", 0))

    def delete(self, key: str) -> None:
        self._post("/v3/kv/deleterange", {"key": _b64(key)})

    def put(self, key: str, value: str) -> None:
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
