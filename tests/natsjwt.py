"""Decentralized NATS auth minted locally: an operator, its accounts and users as signed
NATS JWT v2 tokens (ed25519 via `nkeys`), the nats-server configuration that trusts them, and
user credentials files in the standard layout.

Claim shapes follow nats-io/jwt v2: `nats.limits` flattens the NATS, account and JetStream
limits, -1 meaning unlimited; an account gets JetStream when a storage limit is not 0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import nkeys

UNLIMITED = {"subs": -1, "data": -1, "payload": -1}
ACCOUNT_LIMITS = {**UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
                  "leaf": -1}
JETSTREAM_LIMITS = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_keys(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(keys: nkeys.KeyPair) -> str:
    return bytes(keys.public_key).decode()


def signed_jwt(issuer: nkeys.KeyPair, subject: nkeys.KeyPair, name: str,
               nats_claims: dict[str, Any]) -> str:
    """A NATS JWT v2 for `subject`, signed with ed25519 by `issuer` (itself for an operator)."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": public(issuer), "name": name,
                              "sub": public(subject), "nats": {**nats_claims, "version": 2}}
    # jti: an id from the content (nats-io/jwt hashes with SHA-512/256; servers only compare it)
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims = {"jti": base64.b32encode(digest).rstrip(b"=").decode(), **claims}
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signing_input = f"{header}.{_b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64url(issuer.sign(signing_input.encode()))}"


def creds_file(path: Path, account: nkeys.KeyPair, name: str) -> tuple[Path, str]:
    """A new user of `account` in the standard .creds layout; returns the file and its seed."""
    user = new_keys(nkeys.PREFIX_BYTE_USER)
    token = signed_jwt(account, user, name, {"pub": {}, "sub": {}, **UNLIMITED, "type": "user"})
    seed = bytes(user.seed).decode()
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n")
    return path, seed


class Operator(NamedTuple):
    config: str  # nats-server configuration trusting the operator and preloading its accounts
    account: nkeys.KeyPair  # the JetStream-enabled account the relay's user belongs to


def operator_mode() -> Operator:
    """An operator, its system account and a JetStream account, as nats-server configuration."""
    operator = new_keys(nkeys.PREFIX_BYTE_OPERATOR)
    system = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    account = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    accounts = {
        public(system): signed_jwt(operator, system, "SYS",
                                   {"limits": ACCOUNT_LIMITS, "type": "account"}),
        public(account): signed_jwt(operator, account, "KVRELAY", {
            "limits": {**ACCOUNT_LIMITS, **JETSTREAM_LIMITS}, "type": "account"}),
    }
    operator_jwt = signed_jwt(operator, operator, "kvrelay-test-operator",
                              {"system_account": public(system), "type": "operator"})
    preload = "\n".join(f"  {key}: {token}" for key, token in accounts.items())
    return Operator(f"operator: {operator_jwt}\nsystem_account: {public(system)}\n"
                    f"resolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n", account)
