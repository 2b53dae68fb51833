"""Every setting of `kvrelay run`, its default, its environment variable and its validation.

The configuration is a frozen msgspec Struct of sections (kvrelay/config/sections.py), one per
component, and each component is given only its own. The command line is built from the
sections' fields (cli.py only parses), and a value is taken from, in order: the flag,
`KVRELAY_<FLAG>`, the Dynamo variable named in the field (so a relay beside a Dynamo worker
picks up the worker's settings), then the default. Invalid values raise ConfigError, which the
CLI turns into exit code 2.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import msgspec

from kvrelay.config.sections import (
    DiscoverySettings,
    DynamoSettings,
    NatsSettings,
    PublishSettings,
    SnapshotSettings,
    SourceSpec,
    StreamSettings,
    SystemSettings,
    ZmqSettings,
    offset_endpoint,
)
from kvrelay.config.settings import ConfigError, Setting, env_var, section_settings

__all__ = [
    "Config", "ConfigError", "DiscoverySettings", "DynamoSettings", "NatsSettings",
    "PublishSettings", "Setting", "SnapshotSettings", "SourceSpec", "StreamSettings",
    "SystemSettings", "ZmqSettings", "env_var", "load_nats", "offset_endpoint", "settings",
]

SECRETS = (("nats", "nats_password"), ("nats", "nats_token"))


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The whole configuration of one relay, validated; build it with `Config.load`."""

    zmq: ZmqSettings = msgspec.field(default_factory=ZmqSettings)
    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    discovery: DiscoverySettings = msgspec.field(default_factory=DiscoverySettings)
    publish: PublishSettings = msgspec.field(default_factory=PublishSettings)
    stream: StreamSettings = msgspec.field(default_factory=StreamSettings)
    dynamo: DynamoSettings = msgspec.field(default_factory=DynamoSettings)
    snapshot: SnapshotSettings = msgspec.field(default_factory=SnapshotSettings)
    system: SystemSettings = msgspec.field(default_factory=SystemSettings)

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None,
             env: Mapping[str, str] | None = None) -> Config:
        """Merge flags (keyed by flag name with underscores; None = not given), environment
        and defaults, then validate."""
        flags = flags or {}
        env = env or {}
        unknown = set(flags) - {s.key for s in settings()}
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        values: dict[str, dict[str, Any]] = {name: {} for name in cls.__struct_fields__}
        for s in settings():
            _take(s, flags, env, values[s.section])
        buffer_bytes = values["publish"].get("buffer_bytes")
        if "max_batch_bytes" not in values["zmq"] and buffer_bytes is not None:
            # Not given: the default, or all of a smaller buffer.
            values["zmq"]["max_batch_bytes"] = min(buffer_bytes, _MAX_BATCH_BYTES)
        sections: dict[str, Any] = {}
        for name, kind in _SECTIONS:
            try:
                sections[name] = kind(**values[name])
            except (TypeError, ValueError) as exc:  # a section's own cross-field check
                raise ConfigError(str(exc)) from None
        config = cls(**sections)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError for any value that cannot work, across sections too."""
        for s in settings():
            s.check(getattr(getattr(self, s.section), s.field))
        self.zmq.sources()  # validates the ZMQ layout
        if self.zmq.max_batch_bytes > self.publish.buffer_bytes:
            raise ConfigError(
                f"--max-batch-bytes ({self.zmq.max_batch_bytes}) is more than --buffer-bytes "
                f"({self.publish.buffer_bytes}): a batch that large could never be buffered")
        if self.publish.format == "dynamo":
            self._validate_dynamo()

    @property
    def own_lease(self) -> bool:
        """Whether the relay registers the worker in etcd itself (`--format dynamo
        --dynamo-register worker`), so the lease it takes is the instance ID."""
        return self.publish.format == "dynamo" and self.dynamo.dynamo_register == "worker"

    def dynamo_backend(self) -> str:
        """Where `--format dynamo` writes its discovery records: "file" or "etcd"."""
        return self.discovery.backend or "file"

    def _validate_dynamo(self) -> None:
        if self.dynamo_backend() not in ("file", "etcd"):
            raise ConfigError(
                f"--format dynamo registers in Dynamo's file or etcd discovery backend; "
                f"--discovery-backend (DYN_DISCOVERY_BACKEND) is "
                f"{self.discovery.discovery_backend!r}")
        if self.dynamo_backend() == "etcd" and not self.discovery.etcd_endpoint_list():
            raise ConfigError("--format dynamo with --discovery-backend etcd needs "
                              "--etcd-endpoints (ETCD_ENDPOINTS)")
        try:
            importlib.import_module("xxhash")
        except ImportError:
            raise ConfigError("--format dynamo needs the xxhash package: "
                              "pip install 'kvrelay[dynamo]'") from None

    def redacted(self) -> dict[str, Any]:
        """The configuration for logs: secrets masked, credentials in URLs removed."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        for section, name in SECRETS:
            if out[section][name]:
                out[section][name] = "***"
        out["nats"]["servers"] = self.nats.redacted_servers()
        return out


_MAX_BATCH_BYTES: int = ZmqSettings().max_batch_bytes
_SECTIONS: tuple[tuple[str, type[msgspec.Struct]], ...] = tuple(
    (f.name, f.default_factory)
    for f in msgspec.structs.fields(Config))
_SETTINGS: tuple[Setting, ...] = tuple(
    s for name, kind in _SECTIONS for s in section_settings(name, kind))


def _take(s: Setting, flags: Mapping[str, Any], env: Mapping[str, str],
          into: dict[str, Any]) -> None:
    """Put the value `s` is given (flag first, then its environment variables) in `into`."""
    given = flags.get(s.key)
    if given is not None and given != [] and given != ():
        into[s.field] = s.parse(given, s.flag)
        return
    for var in s.env_vars:
        if env.get(var, "") != "":
            into[s.field] = s.parse(env[var], var)
            return


def load_nats(flags: Mapping[str, Any], env: Mapping[str, str]) -> NatsSettings:
    """The NATS section alone, from flags and environment as `Config.load` reads them, for
    commands that only connect to NATS (`tail`, `stats`): the rest of the environment, a
    worker's DYN_* variables among it, is not theirs to validate."""
    values: dict[str, Any] = {}
    for s in settings():
        if s.section == "nats":
            _take(s, flags, env, values)
    try:
        section = NatsSettings(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    for s in settings():
        if s.section == "nats":
            s.check(getattr(section, s.field))
    return section


def settings() -> tuple[Setting, ...]:
    """Every setting, section by section, in the order of the help and the settings table."""
    return _SETTINGS
