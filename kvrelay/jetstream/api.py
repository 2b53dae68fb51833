"""JetStream API replies the relay reads, as msgspec Structs.

They live apart from the publisher because the publisher may be compiled with mypyc: a Struct
defined in a compiled module loses its class options (kw_only, gc, ...), and an ack carrying an
error would not decode. Structs belong in modules that stay Python."""

from __future__ import annotations

import msgspec


class ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None
