"""Container health check: exit 0 when the relay's /live answers 200, 1 otherwise.

It reads the system host and port the way `kvrelay run` does (flags aside: KVRELAY_*, then the
Dynamo variables, then the defaults), so moving the port by environment moves the check too.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from kvrelay.config import Config, ConfigError

WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def live_url(env: dict[str, str]) -> str:
    """The /live URL of the relay configured by `env`."""
    config = Config.load({}, env)
    host = WILDCARD_HOSTS.get(config.system.system_host, config.system.system_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.system.system_port}/live"


def main() -> int:
    try:
        url = live_url(dict(os.environ))
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
