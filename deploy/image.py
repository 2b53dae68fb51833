"""Build kvrelay's container image from deploy/Dockerfile and run it for real.

No registry is needed: both bases are made from Debian bookworm's packages (debootstrap, minbase)
and handed to the Dockerfile as build arguments. The image is then run, read-only and as user
65532, against a real nats-server with the synthetic vLLM publisher on loopback, and must relay:

- the runtime image holds the compiled build, and neither pip nor setuptools;
- the relay answers /live and /health (200), its health check passes inside the container;
- the publisher's batches land in JetStream under the configured instance, in order;
- the root filesystem cannot be written;
- SIGTERM drains and the relay exits 0.

    python deploy/image.py [--workdir DIR] [--mirror URL]

Needs root, buildah and debootstrap (Debian packages of the same names). Everything it stores
(the Debian trees, buildah's storage, logs) lives in one temporary directory, removed at the end
unless --workdir names one to keep. Exit 0 when the image works, 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import nats
import nats.js.errors

from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm
from kvrelay.wire.relaybatch import decode_relay_batches, decode_resume_point

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SUITE = "bookworm"  # Debian 12: python3 is 3.11, the Python the image is pinned to
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RUNTIME_PACKAGES = ("python3",)
# The build stage also makes venvs and compiles the per-batch path with mypyc.
BUILD_PACKAGES = ("python3-venv", "python3-dev", "gcc", "libc6-dev")
RUNTIME_BASE = "localhost/kvrelay-base-runtime:bookworm"
BUILD_BASE = "localhost/kvrelay-base-build:bookworm"
IMAGE = "localhost/kvrelay:check"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
USER = "65532:65532"
INSTANCE_ID = 4242
BATCHES = 20
PATH_ENV = "PATH=/opt/kvrelay/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(Exception):
    """The image could not be built or does not work; the message says which and why."""


class Buildah:
    """buildah with its own storage under `root` (vfs, chroot isolation, host network): nothing
    outside that directory is touched."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.base = ["buildah", "--root", str(root / "storage"), "--runroot",
                     str(root / "run"), "--storage-driver", "vfs"]

    def __call__(self, *args: str, check: bool = True) -> str:
        return run([*self.base, *args], self.log, check=check)

    def run_args(self, container: str, *, env: Sequence[str] = (),
                 user: str = USER) -> list[str]:
        """The command prefix that runs a program in `container` as `user`."""
        return [*self.base, "run", "--isolation", "chroot", "--network", "host",
                "--user", user, *(f"--env={e}" for e in env), container, "--"]


def run(command: Sequence[str], log: Path, *, check: bool = True, nice: bool = True) -> str:
    """Run a command (niced: the build is heavy), its output appended to `log`; its stdout."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
    result = subprocess.run(["nice", "-n", "10", *command] if nice else list(command),
                            capture_output=True, text=True, check=False)
    with log.open("a") as out:
        out.write(result.stdout + result.stderr)
    if check and result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-30:]
        raise ImageError(f"{' '.join(command[:6])} ... exited {result.returncode}:\n"
                         + "\n".join(tail))
    return result.stdout.strip()


def debootstrap(target: Path, packages: Sequence[str], mirror: str, log: Path) -> None:
    run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
         str(target), mirror], log)


def commit_tree(buildah: Buildah, tree: Path, name: str) -> None:
    """A base image of a root filesystem tree: `buildah from scratch`, the tree copied into its
    mount, committed (buildah has no import)."""
    container = buildah("from", "scratch")
    mount = buildah("mount", container)
    run(["cp", "-a", f"{tree}/.", mount], buildah.log)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for leftover in (Path(mount) / cache).glob("*.deb"):
            leftover.unlink()
    buildah("umount", container)
    buildah("config", "--env", PATH_ENV.replace("/opt/kvrelay/bin:", ""), "--cmd", "python3",
            container)
    buildah("commit", "--rm", container, name)


def build_base(buildah: Buildah, mirror: str) -> None:
    """The build stage's base: the runtime base plus what makes venvs and compiles C."""
    container = buildah("from", "--pull=never", RUNTIME_BASE)
    sources = f"deb {mirror} {SUITE} main\n"
    run([*buildah.run_args(container, user="0:0"), "sh", "-c",
         f"printf '{sources}' > /etc/apt/sources.list && apt-get update -qq && "
         "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
         f"{' '.join(BUILD_PACKAGES)} && apt-get clean && rm -rf /var/lib/apt/lists/*"],
        buildah.log)
    if HOST_CA_BUNDLE.is_file():
        # Where TLS is inspected on the way to PyPI, the build stage's pip must trust what this
        # host trusts: its CA bundle goes into the build base (never into the runtime image).
        buildah("copy", container, str(HOST_CA_BUNDLE), "/etc/ssl/certs/kvrelay-build-ca.crt")
        buildah("config", "--env", "PIP_CERT=/etc/ssl/certs/kvrelay-build-ca.crt", container)
    buildah("commit", "--rm", container, BUILD_BASE)


def build(buildah: Buildah, workdir: Path, mirror: str) -> dict[str, float]:
    """The image, from Debian packages to `IMAGE`; seconds per step."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    tree = workdir / "rootfs"
    debootstrap(tree, RUNTIME_PACKAGES, mirror, buildah.log)
    commit_tree(buildah, tree, RUNTIME_BASE)
    shutil.rmtree(tree)
    build_base(buildah, mirror)
    timings["bases"] = time.monotonic() - started
    started = time.monotonic()
    buildah("bud", "--isolation", "chroot", "--network", "host", "--pull=never",
            "--build-arg", f"BUILD_IMAGE={BUILD_BASE}",
            "--build-arg", f"PYTHON_IMAGE={RUNTIME_BASE}",
            "-f", str(DOCKERFILE), "-t", IMAGE, str(REPO))
    timings["image"] = time.monotonic() - started
    return timings


def image_size(buildah: Buildah) -> str:
    """The image's size as `buildah images` reports it."""
    for image in json.loads(buildah("images", "--json")):
        if any(name.endswith(IMAGE.split("/", 1)[1]) for name in image.get("names") or []):
            return str(image["size"])
    raise ImageError(f"{IMAGE} is not in the store after the build")


# -- running it --------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(mount: str) -> Iterator[None]:
    """The container's root, mounted read-only where buildah runs it (a read-only bind mount of
    the container's mount point, as `docker run --read-only` does)."""
    # buildah run binds these over files it creates first: they must exist before / is locked.
    for placeholder in ("run/.containerenv", "etc/hosts", "etc/resolv.conf", "etc/hostname"):
        (Path(mount) / placeholder).touch()
    subprocess.run(["mount", "--bind", mount, mount], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", mount], check=True)
        yield
    finally:
        subprocess.run(["umount", mount], check=False)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def wait_for(condition: object, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError):
            if callable(condition) and condition():
                return
        if time.monotonic() > deadline:
            raise ImageError(f"timed out after {within:g} s waiting for {what}")
        time.sleep(0.2)


async def stored_batches(url: str, subject: str, expected: int) -> list[int]:
    """The seqs of the RelayBatches stored under `subject` (a message may hold a pack), once
    `expected` have arrived."""
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=2)
    try:
        js = nc.jetstream()
        info = await js.stream_info("KV_EVENTS", subjects_filter=subject)
        sub = await js.pull_subscribe(subject, stream="KV_EVENTS")
        messages = await sub.fetch(int(info.state.messages), timeout=10)
        batches = [b for m in messages for b in decode_relay_batches(m.data)]
        if {b.instance_id for b in batches} != {INSTANCE_ID}:
            raise ImageError(f"batches under another instance: {batches[0].instance_id}")
        return [b.seq for b in batches]
    finally:
        await nc.close()


async def stored_count(url: str, subject: str) -> int:
    """Batches stored under `subject`: the last one's seq + 1 (they arrive in order from 0,
    a message holding one batch or a pack)."""
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=2)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            last = await nc.jetstream().get_last_msg("KV_EVENTS", subject)
            return decode_resume_point(last.data or b"").seq + 1
        return 0
    finally:
        await nc.close()


EXIT_MARK = "kvrelay-image-exit-status "


def wrapped(command: str) -> list[str]:
    """`command` under sh, printing its exit status last: buildah 1.28's run can fail while
    cleaning up after its command (it cannot remove its mount points from a read-only root) and
    then exits 2 whatever the command did, so the status is read from the output instead."""
    return ["sh", "-c", f'{command}; echo "{EXIT_MARK}$?"']


def status_of(output: str) -> int | None:
    marks = [line for line in output.splitlines() if line.startswith(EXIT_MARK)]
    return int(marks[-1][len(EXIT_MARK):]) if marks else None


def run_in(buildah: Buildah, container: str, command: str, *, env: Sequence[str] = ()
           ) -> tuple[int | None, str]:
    """(exit status, output) of a shell command run in the container as USER."""
    result = subprocess.run([*buildah.run_args(container, env=env), *wrapped(command)],
                            capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    return status_of(output), output


def check_contents(buildah: Buildah, container: str) -> None:
    """The compiled build, and no pip or setuptools anywhere Python would find them."""
    status, version = run_in(buildah, container, "kvrelay --version")
    if status != 0 or "(compiled)" not in version:
        raise ImageError(f"the image does not run the compiled build: {version!r}")
    for module in ("pip", "setuptools"):
        for python in ("python", "python3", "/usr/bin/python3"):
            status, _ = run_in(buildah, container, f"{python} -c 'import {module}'")
            if status == 0:
                raise ImageError(f"the runtime image ships {module} ({python} imports it)")
    print(f"ok   contents: {version.splitlines()[0]}, no pip, no setuptools", flush=True)


def relay_pid(system_port: int) -> int | None:
    """The host PID of the relay process listening on `system_port` (a container runtime
    signals the container's main process: the relay itself)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
            if b"run" in command and any(c.endswith(b"kvrelay") for c in command) and (
                    f"KVRELAY_SYSTEM_PORT={system_port}".encode() in environ):
                return int(proc.name)
    return None


def exercise(buildah: Buildah, workdir: Path) -> None:
    """Run the image against nats-server and the synthetic publisher; raise on any failure."""
    container = buildah("from", "--pull=never", IMAGE)
    check_contents(buildah, container)
    mount = buildah("mount", container)
    relay_log = workdir / "relay.log"
    system_port, pub, replay = free_port(), free_port(), free_port()
    env = [PATH_ENV, f"KVRELAY_ZMQ=tcp://127.0.0.1:{pub}",
           f"KVRELAY_REPLAY=tcp://127.0.0.1:{replay}", "KVRELAY_TOPIC=kv-events",
           f"KVRELAY_INSTANCE_ID={INSTANCE_ID}", "KVRELAY_SYSTEM_HOST=127.0.0.1",
           f"KVRELAY_SYSTEM_PORT={system_port}", "DYN_NAMESPACE=image", "DYN_COMPONENT=check"]
    subject = f"kv.image.check.{INSTANCE_ID}.0"
    (workdir / "nats").mkdir(exist_ok=True)
    with NatsServer(workdir / "nats") as server, read_only(mount), \
            SyntheticVllm(f"tcp://*:{pub}", replay_endpoint=f"tcp://*:{replay}",
                          topic=b"kv-events") as vllm, relay_log.open("wb") as out:
        status, said = run_in(buildah, container, "id -u; touch /opt/kvrelay/probe")
        if status == 0 or "Read-only file system" not in said:
            raise ImageError(f"the container's root filesystem is writable: {said}")
        if said.split()[0] != USER.split(":")[0]:
            raise ImageError(f"the container runs as uid {said.split()[0]}, not {USER}")
        relay = subprocess.Popen(
            [*buildah.run_args(container, env=[*env, f"NATS_SERVER={server.url}"]),
             *wrapped("kvrelay run")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            def ready() -> bool:
                if relay.poll() is not None:
                    raise ImageError(f"the relay exited:\n{relay_log.read_text()[-3000:]}")
                return http_get(system_port, "/health")[0] == 200

            wait_for(ready, "/health to answer 200", 60)
            status, body = http_get(system_port, "/live")
            if status != 200:
                raise ImageError(f"/live answered {status}: {body}")
            status, said = run_in(buildah, container, "python /opt/kvrelay/healthcheck.py",
                                  env=env)
            if status != 0:
                raise ImageError(f"the image's health check failed: {said}")

            def arrived() -> bool:
                if asyncio.run(stored_count(server.url, subject)) == 0:
                    vllm.publish_next()
                    return False
                return True

            wait_for(arrived, "the first batch in JetStream", 30)
            while vllm.seq < BATCHES:
                vllm.publish_next()
            wait_for(lambda: asyncio.run(stored_count(server.url, subject)) >= BATCHES,
                     f"{BATCHES} batches in JetStream", 30)
            seqs = asyncio.run(stored_batches(server.url, subject, BATCHES))
            if seqs != list(range(BATCHES)):
                raise ImageError(f"JetStream holds seqs {seqs}, not 0..{BATCHES - 1}")
            print(f"ok   relayed: {BATCHES} batches on {subject}, in order; /health: "
                  f"{http_get(system_port, '/health')[1].strip()!r}", flush=True)
            pid = relay_pid(system_port)
            if pid is None:
                raise ImageError("the relay's process is not to be found")
            os.kill(pid, signal.SIGTERM)
            relay.wait(timeout=30)
            code = status_of(relay_log.read_text())
            if code != 0:
                raise ImageError(f"after SIGTERM the relay exited {code}:\n"
                                 + relay_log.read_text()[-3000:])
            print(f"ok   read-only root, uid {USER.split(':')[0]}, SIGTERM drained, exit 0",
                  flush=True)
        finally:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
    buildah("umount", container)
    buildah("rm", container)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, help="keep the trees, storage and logs here")
    parser.add_argument("--mirror", default=os.environ.get("DEBIAN_MIRROR", DEFAULT_MIRROR),
                        help="Debian mirror for debootstrap and apt (env DEBIAN_MIRROR)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        print(f"FAIL needs {' and '.join(missing)} (Debian packages of the same names)")
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvrelay-image-"))
    workdir.mkdir(parents=True, exist_ok=True)
    buildah = Buildah(workdir / "buildah", workdir / "build.log")
    try:
        timings = build(buildah, workdir, args.mirror)
        print(f"ok   built {IMAGE} from Debian {SUITE} packages: bases "
              f"{timings['bases']:.0f} s, image {timings['image']:.0f} s, "
              f"{image_size(buildah)}", flush=True)
        exercise(buildah, workdir)
    except ImageError as exc:
        kept = f"\n(full log: {buildah.log})" if args.workdir else ""
        print(f"FAIL {exc}{kept}")
        return 1
    finally:
        if args.workdir is None:
            # vfs layers hold files owned by other users; buildah takes its own store apart.
            buildah("rm", "--all", check=False)
            buildah("rmi", "--all", "--force", check=False)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
