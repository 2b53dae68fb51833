"""How kvrelay connects to NATS: the options every command and both outputs share."""

from __future__ import annotations

import ssl
from typing import Any

from kvrelay.config import NatsSettings


def nats_options(config: NatsSettings) -> dict[str, Any]:
    """Connection options shared by the relay and the operator commands."""
    options: dict[str, Any] = {
        "servers": [s.strip() for s in config.servers.split(",") if s.strip()],
        "name": "kvrelay",
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": config.reconnect_wait_max,
        "connect_timeout": 2,
        # Find a dead or frozen server in seconds, not nats-py's default two minutes.
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    if config.nats_user:
        options["user"] = config.nats_user
        options["password"] = config.nats_password or ""
    if config.nats_token:
        options["token"] = config.nats_token
    if config.nats_nkey_seed:
        options["nkeys_seed"] = config.nats_nkey_seed
    if config.nats_creds:
        options["user_credentials"] = config.nats_creds
    if config.nats_tls_ca or config.nats_tls_cert:
        context = ssl.create_default_context(cafile=config.nats_tls_ca)
        if config.nats_tls_cert:
            context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
        options["tls"] = context
    return options
