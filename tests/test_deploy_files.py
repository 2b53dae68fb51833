"""The other deployment files: the NATS stream definition, the container image (Dockerfile,
.dockerignore, health check) and the systemd unit. The image cannot be built here (no container
engine): it is linted by hadolint and its instructions checked against the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from dockerfile_parse import DockerfileParser

from deploy import validate
from kvrelay.config import Config
from kvrelay.jetstream.stream import ensure_stream
from kvrelay.testing.natsserver import NatsCluster, NatsServer, free_port
from kvrelay.wire.names import STREAM_SUBJECTS

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
STREAM_FILE = DEPLOY / "nats" / "stream.json"
PRODUCTION_STREAM_FILE = DEPLOY / "nats" / "stream-production.json"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "kvrelay.service"
UNIT_ENV = DEPLOY / "systemd" / "kvrelay.env"
# jsm.go's io.nats.jetstream.api.v1.stream_configuration schema, which `nats stream add
# --config` validates the file against, requires these.
NATS_CLI_REQUIRED = ("retention", "max_consumers", "max_msgs", "max_bytes", "max_age", "storage",
                     "num_replicas")
NANOSECONDS = 1_000_000_000


# -- NATS stream ---------------------------------------------------------------------------------


def test_stream_file_holds_the_relay_defaults() -> None:
    """stream.json has what `nats stream add --config` requires, set to the relay's defaults."""
    stream = json.loads(STREAM_FILE.read_text())
    config = Config().stream
    assert set(NATS_CLI_REQUIRED) <= set(stream)
    assert stream["name"] == config.name
    assert stream["subjects"] == [STREAM_SUBJECTS]
    assert stream["storage"] == "file"
    assert stream["num_replicas"] == config.stream_replicas
    assert stream["max_bytes"] == config.stream_max_bytes
    assert stream["max_age"] == int(config.stream_max_age * NANOSECONDS)
    assert stream["duplicate_window"] == int(config.stream_duplicate_window * NANOSECONDS)


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=2)
    try:
        yield nc
    finally:
        await nc.close()


async def create_from_file(nc: Any, document: bytes) -> dict[str, Any]:
    """What `nats stream add --config FILE` does: the file's JSON on the JetStream API. Returns
    the server's answer: the stored configuration under "config", or an "error"."""
    name = json.loads(document)["name"]
    reply: dict[str, Any] = json.loads(
        (await nc.request(f"$JS.API.STREAM.CREATE.{name}", document, timeout=5)).data)
    return reply


async def stored_config(nc: Any, name: str) -> dict[str, Any]:
    reply = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=5)).data)
    config: dict[str, Any] = reply["config"]
    return config


async def file_and_relay_streams(url: str, document: bytes) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
    """The server's answer to creating the stream from `document`, and the configuration of the
    stream the relay creates itself."""
    relay_config = Config.load({}, {})
    async with jetstream(url) as nc:
        js = nc.jetstream()
        from_file = await create_from_file(nc, document)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(relay_config.stream.name)
        said = await ensure_stream(js, relay_config.stream, ["kv.dynamo.backend.1.0"])
        assert said.startswith("created"), said
        from_relay = await stored_config(nc, relay_config.stream.name)
        await js.delete_stream(relay_config.stream.name)
    return from_file, from_relay


@pytest.mark.integration
async def test_stream_file_makes_the_stream_the_relay_makes(fresh_nats: NatsServer) -> None:
    """nats-server stores the same stream from stream.json as from the relay's ensure_stream."""
    document = STREAM_FILE.read_bytes()
    answer, from_relay = await file_and_relay_streams(fresh_nats.url, document)
    assert "error" not in answer, answer
    assert answer["config"] == from_relay
    for key, value in json.loads(document).items():
        assert answer["config"][key] == value, key


@pytest.mark.integration
@pytest.mark.parametrize(("key", "value", "refused"), [
    ("max_age", 86400, "max age needs to be >= 100ms"),
    ("duplicate_window", 120, "duplicates window needs to be >= 100ms"),
    ("storage", "memory", None),
    ("max_msgs_per_subject", 1, None),
], ids=["age-in-seconds", "window-in-seconds", "memory", "one-per-subject"])
async def test_stream_comparison_catches_a_wrong_file(fresh_nats: NatsServer, key: str,
                                                      value: Any, refused: str | None) -> None:
    """A stream file unlike the relay's stream is refused by the server or told apart."""
    document = json.dumps({**json.loads(STREAM_FILE.read_text()), key: value}).encode()
    answer, from_relay = await file_and_relay_streams(fresh_nats.url, document)
    if refused is not None:
        assert refused in answer["error"]["description"], answer
    else:
        assert answer["config"][key] == value
        assert answer["config"] != from_relay


@pytest.mark.integration
async def test_relay_accepts_a_stream_made_from_the_file(fresh_nats: NatsServer) -> None:
    """A stream pre-created from the file is taken as it is by the relay, not recreated."""
    config = Config.load({"nats": fresh_nats.url}, {})
    async with jetstream(fresh_nats.url) as nc:
        created = (await create_from_file(nc, STREAM_FILE.read_bytes()))["config"]
        said = await ensure_stream(nc.jetstream(), config.stream, ["kv.dynamo.backend.42.0"])
        assert said.startswith(f"using JetStream stream {config.stream.name}"), said
        assert await stored_config(nc, config.stream.name) == created


def test_production_stream_differs_only_in_replicas_and_size() -> None:
    """stream-production.json is stream.json with 3 replicas and room for more, nothing else."""
    base = json.loads(STREAM_FILE.read_text())
    production = json.loads(PRODUCTION_STREAM_FILE.read_text())
    assert production["num_replicas"] == 3
    assert production["max_bytes"] > base["max_bytes"]
    changed = {k for k in base.keys() | production.keys() if base.get(k) != production.get(k)}
    assert changed == {"num_replicas", "max_bytes"}


@pytest.mark.integration
async def test_production_stream_runs_on_a_three_node_cluster(tmp_path: Path) -> None:
    """A 3-node JetStream cluster stores the production stream with 3 replicas, and the relay
    takes that stream as it is."""
    with NatsCluster(tmp_path) as cluster:
        nc = await nats.connect(servers=cluster.urls.split(","), connect_timeout=2,
                                max_reconnect_attempts=5)
        try:
            deadline = time.monotonic() + 60
            answer: dict[str, Any] = {"error": "not asked yet"}
            while "error" in answer:  # JetStream elects its meta leader first
                assert time.monotonic() < deadline, answer
                with contextlib.suppress(nats.errors.TimeoutError):
                    answer = await create_from_file(nc, PRODUCTION_STREAM_FILE.read_bytes())
                if "error" in answer:
                    await asyncio.sleep(0.5)
            assert answer["config"]["num_replicas"] == 3
            info = await nc.jetstream().stream_info("KV_EVENTS")
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2  # the leader and two followers
            config = Config.load({"nats": cluster.urls}, {})
            said = await ensure_stream(nc.jetstream(), config.stream, ["kv.dynamo.backend.1.0"])
            assert said.startswith(f"using JetStream stream {config.stream.name}"), said
        finally:
            await nc.close()


# -- container image ---------------------------------------------------------------------------


def hadolint(dockerfile: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "hadolint"
    return subprocess.run([str(binary if binary.is_file() else "hadolint"), "--no-color", "-"],
                          input=dockerfile, capture_output=True, text=True, timeout=60,
                          check=False)


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in deploy/Dockerfile."""
    result = hadolint(DOCKERFILE.read_text())
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize(("change", "rule"), [
    (lambda d: d + "USER root\n", "DL3002"),
    (lambda d: d.replace("COPY deploy/healthcheck.py", "ADD deploy/healthcheck.py"), "DL3020"),
    (lambda d: d.replace("WORKDIR /src", "RUN cd /src"), "DL3003"),
], ids=["root-user", "add-not-copy", "cd-instead-of-workdir"])
def test_hadolint_catches_mistakes(change: Any, rule: str) -> None:
    """hadolint fails a Dockerfile with a known mistake, naming the rule."""
    result = hadolint(change(DOCKERFILE.read_text()))
    assert result.returncode != 0
    assert rule in result.stdout


def instructions() -> list[tuple[str, str]]:
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    return [(i["instruction"], i["value"]) for i in parser.structure
            if i["instruction"] != "COMMENT"]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_image_bases_are_pinned_by_version() -> None:
    """The bases are pinned to one Python 3.11 release on one Debian: the build on the full
    image (its C compiler compiles the hot path), the runtime on the slim one."""
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    build, runtime = parser.parent_images
    assert re.fullmatch(r"python:3\.11\.\d+-bookworm", build), build
    assert runtime == build.replace("-bookworm", "-slim-bookworm")


def test_runtime_image_gets_no_pip() -> None:
    """The runtime venv is made without pip and the base's pip and setuptools are removed."""
    steps = instructions()
    build_run = " ".join(v for op, v in steps[:steps.index(final_stage()[0])] if op == "RUN")
    assert "-m venv --without-pip /opt/kvrelay" in build_run
    assert "--python /opt/kvrelay/bin/python install" in build_run
    removed = " ".join(v for op, v in final_stage() if op == "RUN")
    for package in ("pip", "setuptools", "wheel"):
        assert f"/usr/local/lib/python3.11/site-packages/{package}" in removed


def test_compiled_check_reads_the_installed_package() -> None:
    """The image's compiled-build check runs with -P, so the source tree in the working
    directory cannot shadow the installed package."""
    (check,) = [v for op, v in instructions() if op == "RUN" and "kvrelay.build()" in v]
    assert re.search(r"/opt/kvrelay/bin/python -P -c .import kvrelay", check), check


def test_ci_builds_and_runs_the_image() -> None:
    """CI installs buildah and debootstrap and runs deploy/image.py, which fails on a broken
    image (a skipped image check would let one through)."""
    ci = (REPO / ".ci" / "run").read_text()
    for package in ("buildah", "debootstrap", "prometheus"):
        assert f"missing+=({package})" in ci, package
    assert "\npython deploy/image.py\n" in ci
    assert ci.index("missing+=(buildah)") < ci.index("python deploy/image.py")


def test_image_check_reads_the_command_status_not_buildahs() -> None:
    """A command's exit status inside the image is read from its output, whatever buildah's
    own exit status (buildah fails its clean-up on a read-only root)."""
    from deploy import image

    done = subprocess.run(image.wrapped("(exit 3)"), capture_output=True, text=True, check=False)
    assert image.status_of(done.stdout + "\npanic: runtime error\n") == 3
    assert image.status_of("no mark") is None


def test_image_runs_the_relay_as_a_numeric_non_root_user() -> None:
    """The image runs `kvrelay run` as a numeric non-root user, with port and health check."""
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    stage = final_stage()
    ops = dict(stage)
    user = [value for op, value in stage if op == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    assert ops["EXPOSE"] == str(Config().system.system_port)
    assert json.loads(ops["ENTRYPOINT"]) == ["kvrelay", "run"]
    command = json.loads(ops["HEALTHCHECK"].split("CMD", 1)[1])
    copied = [value.split() for op, value in stage if op == "COPY"]
    assert ["deploy/healthcheck.py", command[-1]] in copied
    assert parser.envs["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "VOLUME" not in ops
    assert any(op == "RUN" and '[nkeys,dynamo]"' in value and "KVRELAY_COMPILE=1" in value
               for op, value in instructions())


def build_context() -> set[str]:
    """The repository files `docker build .` sends, after .dockerignore (last match wins, a
    pattern on a directory covers what is inside)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keep = line.startswith("!")
            rules.append((keep, line.lstrip("!").rstrip("/")))
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    sent = set()
    for path in listed:
        parents = [path] + ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
        included = True
        for keep, pattern in rules:
            if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
                   for p in parents):
                included = keep
        if included:
            sent.add(path)
    return sent


def test_build_context_is_just_what_the_image_needs() -> None:
    """.dockerignore sends the package, its metadata and the health check, nothing else."""
    sent = build_context()
    for op, value in instructions():
        if op == "COPY" and not value.startswith("--from"):
            for source in value.split()[:-1]:
                assert any(p == source or p.startswith(source + "/") for p in sent), source
    assert {p.split("/")[0] for p in sent} == {"pyproject.toml", "setup.py", "README.md", "kvrelay",
                                               "deploy"}
    assert [p for p in sent if p.startswith("deploy/")] == ["deploy/healthcheck.py"]


@contextlib.contextmanager
def relay_on(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A relay process whose NATS is absent (it stays up, live but not ready)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVRELAY_", "DYN_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrelay", "run", "--system-host", "127.0.0.1", "--system-port",
         str(port), "--nats", f"nats://127.0.0.1:{free_port()}"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KVRELAY_", "DYN_"))}
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")],
                          env={**base, **env}, capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.mark.integration
async def test_healthcheck_follows_the_relay_port_settings() -> None:
    """The health check finds the relay on the port its environment names; fails elsewhere."""
    port = free_port()
    with relay_on(port):
        env = {"KVRELAY_SYSTEM_HOST": "127.0.0.1"}
        deadline = time.monotonic() + 15
        while healthcheck({**env, "KVRELAY_SYSTEM_PORT": str(port)}).returncode != 0:
            assert time.monotonic() < deadline, "relay never answered /live"
            await asyncio.sleep(0.1)
        assert healthcheck({**env, "DYN_SYSTEM_PORT": str(port)}).returncode == 0
        elsewhere = healthcheck({**env, "KVRELAY_SYSTEM_PORT": str(free_port()),
                                 "DYN_SYSTEM_PORT": str(port)})
        assert elsewhere.returncode == 1
        assert "/live" in elsewhere.stderr
    assert healthcheck({"KVRELAY_SYSTEM_PORT": "99999"}).returncode == 1


# -- systemd -------------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values, in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def seconds(span: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "": 1.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min|)", span)
    assert match, span
    return float(match.group(1)) * units[match.group(2)]


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze (Debian package systemd) not installed")


def verify(unit_text: str, tmp_path: Path) -> str:
    """systemd-analyze verify's diagnostics for the unit, with ExecStart pointed at this
    environment's kvrelay (verify refuses a missing binary); empty when clean."""
    kvrelay = Path(sys.executable).parent / "kvrelay"
    path = tmp_path / "kvrelay.service"
    path.write_text(unit_text.replace("/opt/kvrelay/bin/kvrelay", str(kvrelay)))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    return (result.stdout + result.stderr + ("" if result.returncode == 0 else
                                             f"exit {result.returncode}")).strip()


@needs_systemd
def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    """systemd-analyze verify has nothing to say about the unit."""
    assert verify(UNIT.read_text(), tmp_path) == ""


@needs_systemd
@pytest.mark.parametrize(("change", "said"), [
    (lambda u: u.replace("Restart=on-failure", "Restart=sometimes"), "restart specifier"),
    (lambda u: u.replace("KillSignal=SIGTERM", "KillSignall=SIGTERM"), "Unknown key"),
    (lambda u: u.replace("/opt/kvrelay/bin/kvrelay", "/opt/kvrelay/bin/kvrelayd"),
     "is not executable"),
], ids=["bad-value", "misspelled-key", "missing-binary"])
def test_systemd_verify_catches_mistakes(tmp_path: Path, change: Any, said: str) -> None:
    """A broken unit draws a diagnostic from systemd-analyze verify."""
    assert said in verify(change(UNIT.read_text()), tmp_path)


@needs_systemd
def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    """systemd's own exposure score rates the unit OK or better."""
    path = tmp_path / "kvrelay.service"
    shutil.copy(UNIT, path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    level = re.search(r"Overall exposure level for kvrelay\.service: ([\d.]+) (\w+)",
                      result.stdout + result.stderr)
    assert level, result.stdout + result.stderr
    assert level.group(2) in {"PERFECT", "SAFE", "OK"}, level.group(0)


def test_systemd_unit_stops_after_the_drain() -> None:
    """The unit drains on SIGTERM past the relay's drain, restarts on failure, runs as no one."""
    unit = unit_settings(UNIT.read_text())
    settings = env_file(UNIT_ENV)
    config = Config.load({}, settings)
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    assert seconds(unit["Service.TimeoutStopSec"][0]) > (
        config.publish.drain_timeout + validate.CLOSE_SECONDS)
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.RestartPreventExitStatus"] == ["2"]
    assert unit["Service.DynamicUser"] == ["yes"]
    assert unit["Service.EnvironmentFile"] == ["/etc/kvrelay/kvrelay.env"]
    assert unit["Service.ExecStart"][0].endswith("kvrelay run")


def test_systemd_unit_stops_after_vllm() -> None:
    """The unit starts before vLLM's and so stops after it (systemd stops in reverse order),
    and starting vLLM's unit starts the relay: vLLM's last events are still read and drained."""
    unit = unit_settings(UNIT.read_text())
    assert "vllm.service" in unit["Unit.Before"][0].split()
    assert "vllm.service" not in " ".join(unit.get("Unit.After", [])).split()
    assert "vllm.service" in unit["Install.WantedBy"][0].split()
    assert "vllm.service" in UNIT.read_text().split("[Unit]")[0]  # the name is documented


@needs_systemd
def test_systemd_unit_verifies_beside_vllm(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing in the unit loaded beside a vllm.service."""
    (tmp_path / "vllm.service").write_text(
        "[Unit]\nDescription=vLLM\n[Service]\nExecStart=/bin/sleep infinity\n")
    kvrelay = Path(sys.executable).parent / "kvrelay"
    (tmp_path / "kvrelay.service").write_text(
        UNIT.read_text().replace("/opt/kvrelay/bin/kvrelay", str(kvrelay)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "kvrelay.service"),
                             str(tmp_path / "vllm.service")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_environment_file_holds_real_settings() -> None:
    """The example environment file holds only settings the relay reads, values it accepts."""
    settings = env_file(UNIT_ENV)
    assert set(settings) <= validate.known_environment()
    config = Config.load({}, settings)
    assert [s.replay for s in config.zmq.sources()] == [settings["KVRELAY_REPLAY"]]
