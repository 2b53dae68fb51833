"""The NATS connection of `kvrelay run`, for every command that reads NATS (`tail`, `stats`).

One place for the flags and the nats-py options: the same settings as `run` (kvrelay/config,
section `nats`), read the same way (flag, then `KVRELAY_<FLAG>`, then `NATS_SERVER` for the
URL), turned into nats-py's options by kvrelay/natsio/options.py. A command adds them with
`add_connection_arguments(parser)` and connects with `connection_options(args)`; a failure to
connect is explained by `connection_failure` (a refusal of the credentials or of TLS says so,
and which settings to check, rather than "cannot reach NATS").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any, Final

from kvrelay.config import NatsSettings, Setting, load_nats, settings
from kvrelay.natsio.options import nats_options

# What reaching NATS takes; how the relay publishes (--nats-engine) and its reconnect backoff
# are the relay's own.
CONNECTION_KEYS: Final = ("nats", "nats_user", "nats_password", "nats_token", "nats_nkey_seed",
                          "nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key")


def connection_settings_list() -> list[Setting]:
    """The settings `add_connection_arguments` adds, in the order of `run`'s help."""
    return [s for s in settings() if s.section == "nats" and s.key in CONNECTION_KEYS]


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """`run`'s NATS flags (URL, user and password, token, NKey seed, credentials file, TLS),
    with the same environment variables."""
    for s in connection_settings_list():
        default = s.default if s.default is not None else "-"
        help_text = f"{s.help} [default: {default}; env: {', '.join(s.env_vars)}]"
        parser.add_argument(s.flag, dest=s.key, default=argparse.SUPPRESS, metavar=s.metavar,
                            help=help_text.replace("%", "%%"))


def connection_settings(args: argparse.Namespace,
                        env: Mapping[str, str] | None = None) -> NatsSettings:
    """The NATS settings the flags and the environment give; raises ConfigError."""
    flags = {s.key: getattr(args, s.key, None) for s in connection_settings_list()}
    return load_nats(flags, os.environ if env is None else env)


def connection_options(args: argparse.Namespace | NatsSettings,
                       env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nats-py's connect options for these flags (or settings), exactly as `run` connects."""
    config = args if isinstance(args, NatsSettings) else connection_settings(args, env)
    return {**nats_options(config), "name": "kvrelay-ops"}


class Errors:
    """The errors nats-py reports (`record` is its `error_cb`), kept instead of logged with
    their tracebacks. A server refusing the credentials may close the socket before its
    `-ERR` is read, so one attempt says "refused" and the next "connection reset": every
    error is kept, and a refusal among them wins."""

    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    async def record(self, exc: Exception) -> None:
        self.seen = [*self.seen[-15:], exc]

    @property
    def last(self) -> BaseException | None:
        return self.seen[-1] if self.seen else None


def refused(config: NatsSettings, errors: Errors, command: str) -> str | None:
    """What to fix when NATS refused `command`'s credentials or TLS settings, else None."""
    from kvrelay.publish.common import refusal  # the relay's own judgement; heavy to import

    for error in reversed(errors.seen):
        reason = refusal(error, config, who=f"kvrelay {command}")
        if reason is not None:
            return reason
    return None


def connection_failure(config: NatsSettings, errors: Errors, command: str) -> str:
    """One line saying why `command` could not connect: refused (and what to check), or not
    reached (and the last error, if any)."""
    reason = refused(config, errors, command)
    if reason is not None:
        return f"kvrelay {command}: {reason}"
    error = errors.last
    detail = f" ({error})" if error is not None and str(error) else ""
    return f"kvrelay {command}: cannot reach NATS at {config.redacted_servers()}{detail}"
