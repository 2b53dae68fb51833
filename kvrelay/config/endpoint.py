"""ZMQ endpoints as the relay reads them: checked when the configuration is, used by ingest."""

from __future__ import annotations

from typing import NamedTuple


class Endpoint(NamedTuple):
    transport: str  # "tcp" or "ipc"
    host: str  # tcp: a host name or address, "" for every interface
    port: int
    path: str  # ipc


def parse_endpoint(endpoint: str, bind: bool) -> Endpoint:
    """tcp://HOST:PORT (HOST may be * when binding, [v6] in brackets) or ipc://PATH."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"{endpoint!r} is not a ZMQ endpoint (tcp://HOST:PORT or ipc://PATH)")
    if scheme == "ipc":
        if not rest:
            raise ValueError(f"{endpoint!r}: ipc:// needs a path")
        return Endpoint("ipc", "", 0, rest)
    if scheme != "tcp":
        raise ValueError(f"{endpoint!r}: only tcp:// and ipc:// are read natively; "
                         "use --zmq-engine libzmq for other transports")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r}: tcp:// needs HOST:PORT with a port from 1 to 65535")
    if ";" in host:
        raise ValueError(f"{endpoint!r}: a source address is not supported natively; "
                         "use --zmq-engine libzmq")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = "" if host in ("*", "") else host
    if not host and not bind:
        raise ValueError(f"{endpoint!r}: connecting needs a host, not *")
    return Endpoint("tcp", host, int(port), "")
