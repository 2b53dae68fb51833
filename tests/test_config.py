"""Configuration: precedence of flags, KVRELAY_* and Dynamo variables; validation; the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.config import Config, ConfigError, SourceSpec, env_var, settings
from kvrelay.ops import flagtable
from kvrelay.ops.cli import build_parser


def test_defaults_match_a_vllm_sidecar() -> None:
    """With nothing set, the relay subscribes to vLLM's default PUB port on localhost."""
    config = Config.load({}, {})
    assert config.zmq.sources() == (SourceSpec("tcp://127.0.0.1:5557", False, None, 0),)
    assert (config.discovery.namespace, config.discovery.component,
            config.system.system_port) == ("dynamo", "backend", 9090)
    assert (config.publish.buffer_batches, config.publish.buffer_bytes) == (50_000, 64 << 20)
    assert config.zmq.max_batch_bytes == 4 << 20
    # Unset, it follows a smaller buffer: a batch the buffer cannot hold is never read.
    assert Config.load({}, {"KVRELAY_BUFFER_BYTES": str(1 << 20)}).zmq.max_batch_bytes == 1 << 20


def test_flag_beats_kvrelay_env_beats_dynamo_env() -> None:
    """A flag wins over KVRELAY_<FLAG>, which wins over the Dynamo variable."""
    env = {"KVRELAY_SYSTEM_PORT": "9100", "DYN_SYSTEM_PORT": "9200", "DYN_NAMESPACE": "prod",
           "NATS_SERVER": "nats://nats:4222"}
    assert Config.load({}, env).system.system_port == 9100
    assert Config.load({"system_port": "9300"}, env).system.system_port == 9300
    assert Config.load({}, {"DYN_SYSTEM_PORT": "9200"}).system.system_port == 9200
    assert Config.load({}, env).discovery.namespace == "prod"
    assert Config.load({}, env).nats.servers == "nats://nats:4222"


def test_list_settings_from_env_are_comma_separated() -> None:
    """KVRELAY_ZMQ takes several endpoints, like a repeated --zmq."""
    config = Config.load({}, {"KVRELAY_ZMQ": "tcp://a:1, tcp://b:2"})
    assert [s.endpoint for s in config.zmq.sources()] == ["tcp://a:1", "tcp://b:2"]
    assert [s.dp_rank for s in config.zmq.sources()] == [0, 1]


def test_dp_ranks_expand_like_vllm() -> None:
    """--dp-ranks N gives base port + rank for PUB and replay, inproc gets _dp<rank>."""
    config = Config.load({"zmq": ["tcp://127.0.0.1:5557"], "replay": ["tcp://127.0.0.1:6000"],
                          "dp_ranks": "3", "dp_rank_start": "2"}, {})
    assert config.zmq.sources() == (
        SourceSpec("tcp://127.0.0.1:5557", False, "tcp://127.0.0.1:6000", 2),
        SourceSpec("tcp://127.0.0.1:5558", False, "tcp://127.0.0.1:6001", 3),
        SourceSpec("tcp://127.0.0.1:5559", False, "tcp://127.0.0.1:6002", 4),
    )
    inproc = Config.load({"zmq_bind": ["inproc://kv"], "dp_ranks": "2", "zmq_engine": "libzmq"},
                         {})
    assert [s.endpoint for s in inproc.zmq.sources()] == ["inproc://kv", "inproc://kv_dp1"]


def test_overlapping_dp_layout_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    """5557/5558 with DP 2 puts rank 1's PUB on rank 0's replay port: the relay says so."""
    Config.load({"zmq": ["tcp://127.0.0.1:5557"], "replay": ["tcp://127.0.0.1:5558"],
                 "dp_ranks": "2"}, {})
    assert "also a PUB endpoint" in caplog.text


@pytest.mark.parametrize(("flags", "message"), [
    ({"namespace": "Dynamo"}, "must match"),
    ({"component": "back end"}, "must match"),
    ({"instance_id": str(2**64)}, "unsigned 64-bit"),
    ({"instance_id": "seven"}, "not a valid int"),
    ({"format": "xml"}, "not one of"),
    ({"dp_ranks": "0"}, "at least 1"),
    ({"dp_ranks": "2", "zmq": ["ipc:///tmp/kv"]}, "ipc"),
    ({"zmq": ["tcp://a:1", "tcp://b:2"], "replay": ["tcp://a:3"]}, "one per ZMQ endpoint"),
    ({"zmq": ["tcp://a:1", "tcp://b:2"], "dp_ranks": "2"}, "exactly one"),
    ({"ack_timeout": "0"}, "positive"),
    ({"system_port": "70000"}, "must be a port"),
    ({"nats_tls_cert": "/c.pem"}, "go together"),
    ({"stream": "KV.EVENTS"}, "stream name"),
    ({"snapshot_interval": "-1"}, "0 \\(off\\) or positive"),
    ({"snapshot_events": "-5"}, "0 \\(off\\) or positive"),
    ({"snapshot_bucket": "KV.SNAP"}, "--snapshot-bucket"),
    ({"zmq_heartbeat": "0.05"},
     "--zmq-heartbeat must be 0 \\(off\\) or from 0.1 to 60 seconds \\(got 0.05\\)"),
    ({"zmq_heartbeat": "61"}, "--zmq-heartbeat must be 0 \\(off\\) or from 0.1 to 60"),
    ({"zmq_heartbeat": "-1"}, "--zmq-heartbeat must be 0 \\(off\\) or from 0.1 to 60"),
    ({"max_batch_bytes": "512"}, "--max-batch-bytes must be at least 1024"),
    ({"buffer_bytes": str(1 << 20), "max_batch_bytes": str(2 << 20)},
     "--max-batch-bytes \\(2097152\\) is more than --buffer-bytes \\(1048576\\)"),
])
def test_invalid_values_are_config_errors(flags: dict[str, object], message: str) -> None:
    """Each invalid setting is refused with a message naming the problem."""
    with pytest.raises(ConfigError, match=message):
        Config.load(flags, {})


def test_invalid_env_value_names_the_variable() -> None:
    """A bad environment value says which variable held it."""
    with pytest.raises(ConfigError, match="KVRELAY_MAX_IN_FLIGHT"):
        Config.load({}, {"KVRELAY_MAX_IN_FLIGHT": "many"})


def test_invalid_dynamo_variable_is_named_not_the_flag() -> None:
    """A bad value from a Dynamo variable names that variable, not the flag nobody gave."""
    with pytest.raises(ConfigError, match=r"^DYN_NAMESPACE must match"):
        Config.load({}, {"DYN_NAMESPACE": "Bad NS"})
    with pytest.raises(ConfigError, match=r"^--namespace must match"):
        Config.load({"namespace": "Bad NS"}, {"DYN_NAMESPACE": "fine"})


def test_each_section_holds_only_its_own_settings() -> None:
    """Every setting lives in exactly one section, and each flag names exactly one setting."""
    keys = [s.key for s in settings()]
    assert len(keys) == len(set(keys))
    config = Config.load({"zmq": ["tcp://a:1"], "stream": "S", "nats": "nats://n:1"}, {})
    assert (config.zmq.connect, config.stream.name, config.nats.servers) == (
        ("tcp://a:1",), "S", "nats://n:1")
    with pytest.raises(ConfigError, match="unknown settings: nope"):
        Config.load({"nope": 1}, {})


def test_redacted_masks_secrets() -> None:
    """Config dumps never show passwords, tokens or credentials in URLs."""
    config = Config.load({"nats": "nats://u:url-pa55word@host:4222", "nats_password": "pw",
                          "nats_token": "s3cr3t-t0ken", "nats_user": "u"}, {})
    text = repr(config.redacted())
    assert "url-pa55word" not in text
    assert "'pw'" not in text
    assert "s3cr3t-t0ken" not in text


def test_help_documents_every_flag_with_default_and_env(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`kvrelay run --help` names each flag, its default and its environment variable."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--zmq", "--zmq-bind", "--replay", "--dp-ranks", "--nats", "--namespace",
                 "--component", "--instance-id", "--format", "--system-port", "--drain-timeout"):
        assert flag in text
    assert "KVRELAY_SYSTEM_PORT" in text
    assert "DYN_SYSTEM_PORT" in text
    assert "default: 9090" in text


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--no-such-flag"], "unrecognized arguments"),
    (["run", "--namespace", "Bad!"], "must match"),
    (["run", "--format", "xml"], "invalid choice"),
])
def test_cli_errors_exit_2(args: list[str], message: str) -> None:
    """Unknown flags and invalid values exit with code 2 and a clear message."""
    done = subprocess.run([sys.executable, "-m", "kvrelay", *args], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert message in done.stderr


def test_manual_flag_table_is_generated_from_config() -> None:
    """docs/configuration.md's settings table is what `python -m kvrelay.ops.flagtable` writes."""
    assert flagtable.PAGE.parts[-2:] == ("docs", "configuration.md")
    page = flagtable.PAGE.read_text()
    assert flagtable.render(page) == page
    for s in settings():
        assert f"| `{s.flag}` | `{env_var(s.key)}`" in page


def test_flagtable_check_passes_on_the_manual_and_fails_on_drift(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--check` exits 0 on the committed page and 1, rewriting nothing, when a row drifts."""
    assert flagtable.main(["--check"]) == 0
    page = tmp_path / "configuration.md"
    stale = flagtable.PAGE.read_text().replace("| `--log-level` |", "| `--log-lvl` |")
    page.write_text(stale)
    monkeypatch.setattr(flagtable, "PAGE", page)
    assert flagtable.main(["--check"]) == 1
    assert page.read_text() == stale
    assert flagtable.main([]) == 0
    assert flagtable.render(page.read_text()) == page.read_text()


def test_stale_flag_table_is_rewritten_and_the_rest_kept() -> None:
    """Regenerating replaces only the table: a stale row goes, the text around it stays."""
    stale = "intro\n\n| flag | environment | default | meaning |\n|---|---|---|---|\n" \
            "| `--gone` | `KVRELAY_GONE` | - | removed |\n\nafter\n"
    fresh = flagtable.render(stale)
    assert "--gone" not in fresh
    assert fresh.startswith("intro\n\n| flag |")
    assert fresh.endswith("|\n\nafter\n")
    assert flagtable.render(fresh) == fresh
