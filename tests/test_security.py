"""NATS authentication and TLS: the relay connects with the right settings, and exits with a
clear message and code 2 on settings the server refuses; secrets never reach the logs.

A throwaway CA, server and client certificates are made per run with `cryptography`; each
nats-server is started from a configuration file with TLS and an authorization block. For
credentials files, an operator, its accounts and users are minted per test with `nkeys` and
their JWTs signed here, so the server runs in operator mode with nothing taken from outside.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import nats
import nats.errors
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import (
    ANY_PORT,
    COMP,
    NS,
    RelayProcess,
    as_output,
    last_seq,
    new_instance_id,
    plain,
    read_stream,
    subject_of,
)
from nats.aio.client import Client
from natsjwt import creds_file, new_keys, operator_mode

from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm
from kvrelay.wire.schema import Resync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Procs = Callable[[list[str]], RelayProcess]
PASSWORD = "pw-Zq81-never-logged"
TOKEN = "tok-Hh27-never-logged"


class Pki(NamedTuple):
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str,
          usage: x509.ObjectIdentifier) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and a client certificate, and an unrelated second CA."""
    out = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("kvrelay test CA")
    other, _ = _ca("some other CA")
    server, server_key = _leaf(ca, ca_key, "nats", ExtendedKeyUsageOID.SERVER_AUTH)
    client, client_key = _leaf(ca, ca_key, "kvrelay", ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM),
             "server.pem": server.public_bytes(serialization.Encoding.PEM),
             "server-key.pem": _key_pem(server_key),
             "client.pem": client.public_bytes(serialization.Encoding.PEM),
             "client-key.pem": _key_pem(client_key),
             "other-ca.pem": other.public_bytes(serialization.Encoding.PEM)}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return Pki(out / "ca.pem", out / "server.pem", out / "server-key.pem", out / "client.pem",
               out / "client-key.pem", out / "other-ca.pem")


def server_with(tmp_path: Path, config: str) -> NatsServer:
    conf = tmp_path / "nats.conf"
    conf.write_text(config)
    server = NatsServer(tmp_path / "nats", name="secured", extra_args=["-c", str(conf)])
    server.start()
    return server


def tls_block(pki: Pki) -> str:
    return (f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
            f'ca_file: "{pki.ca}", verify: true, timeout: 2 }}\n')


def relay_args(server: NatsServer, *extra: str) -> list[str]:
    return ["--nats", server.url, "--zmq", f"tcp://127.0.0.1:{free_port()}", "--instance-id",
            str(new_instance_id()), "--namespace", NS, "--component", COMP, *extra]


def nkey_pair(tmp_path: Path, name: str = "user") -> tuple[Path, str]:
    """A user NKey: the seed file the relay reads and the public key the server trusts."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path / f"{name}.nk"
    path.write_bytes(seed + b"\n")
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


async def connects(proc: RelayProcess) -> None:
    """Ready (NATS connected, stream verified), then a clean stop."""
    await proc.healthy(within=15)
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.exited(15) == 0, proc.output()


async def refused(proc: RelayProcess, *phrases: str) -> None:
    """Exits 2 at start saying why, instead of retrying forever."""
    assert await proc.exited(15) == 2, proc.output()
    for phrase in phrases:
        assert phrase in proc.output(), proc.output()


async def test_tls_with_client_certificate_and_password(
        tmp_path: Path, pki: Pki, relay_procs: Procs) -> None:
    """TLS verified both ways plus user/password: the right settings connect."""
    server = server_with(tmp_path, tls_block(pki) + (
        f'authorization {{ user: relay, password: "{PASSWORD}" }}\n'))
    try:
        await connects(relay_procs(relay_args(
            server, "--nats-tls-ca", str(pki.ca), "--nats-tls-cert", str(pki.client_cert),
            "--nats-tls-key", str(pki.client_key), "--nats-user", "relay", "--nats-password",
            PASSWORD)))
        await refused(relay_procs(relay_args(
            server, "--nats-tls-ca", str(pki.ca), "--nats-tls-cert", str(pki.client_cert),
            "--nats-tls-key", str(pki.client_key), "--nats-user", "relay", "--nats-password",
            "wrong")), "NATS refused the relay's credentials", "--nats-password")
        await refused(relay_procs(relay_args(
            server, "--nats-tls-ca", str(pki.other_ca), "--nats-tls-cert",
            str(pki.client_cert), "--nats-tls-key", str(pki.client_key), "--nats-user", "relay",
            "--nats-password", PASSWORD)), "TLS with NATS failed", "certificate verify failed")
        await refused(relay_procs(relay_args(
            server, "--nats-tls-ca", str(pki.ca), "--nats-user", "relay", "--nats-password",
            PASSWORD)), "TLS with NATS failed")
    finally:
        server.stop()


async def test_token(tmp_path: Path, relay_procs: Procs) -> None:
    """Token auth: the right token connects, a wrong one exits 2 saying so."""
    server = server_with(tmp_path, f'authorization {{ token: "{TOKEN}" }}\n')
    try:
        await connects(relay_procs(relay_args(server, "--nats-token", TOKEN)))
        await refused(relay_procs(relay_args(server, "--nats-token", "nope")),
                      "NATS refused the relay's credentials", "check --nats-token")
        await refused(relay_procs(relay_args(server)),
                      "NATS refused the relay's credentials", "the relay sent none")
    finally:
        server.stop()


async def test_nkey(tmp_path: Path, relay_procs: Procs) -> None:
    """NKey auth: the trusted user's seed connects, another seed exits 2 saying so."""
    seed, public = nkey_pair(tmp_path)
    stranger, _ = nkey_pair(tmp_path, "stranger")
    server = server_with(tmp_path, f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    try:
        await connects(relay_procs(relay_args(server, "--nats-nkey-seed", str(seed))))
        await refused(relay_procs(relay_args(server, "--nats-nkey-seed", str(stranger))),
                      "NATS refused the relay's credentials")
    finally:
        server.stop()


async def test_unreachable_nats_is_not_a_refusal(relay_procs: Procs) -> None:
    """No server at all is an outage, not a misconfiguration: the relay stays up, not ready."""
    proc = relay_procs(["--nats", f"nats://127.0.0.1:{free_port()}", "--zmq",
                        f"tcp://127.0.0.1:{free_port()}", "--instance-id", "7"])
    with pytest.raises(AssertionError, match="not healthy"):
        await proc.healthy(within=3)
    assert proc.proc.poll() is None, proc.output()


async def test_secrets_never_logged(tmp_path: Path, pki: Pki, relay_procs: Procs) -> None:
    """A whole run with every secret setting given: no log line (debug included) shows a
    secret, and the logged configuration masks them."""
    seed, public = nkey_pair(tmp_path)
    server = server_with(tmp_path, tls_block(pki) + (
        f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n'))
    url_password = "url-Kk90-never-logged"
    try:
        proc = relay_procs([
            "--nats", f"nats://relay:{url_password}@127.0.0.1:{server.port}",
            "--zmq", f"tcp://127.0.0.1:{free_port()}", "--instance-id", "9",
            "--log-level", "debug", "--nats-user", "relay", "--nats-password", PASSWORD,
            "--nats-token", TOKEN, "--nats-nkey-seed", str(seed), "--nats-tls-ca", str(pki.ca),
            "--nats-tls-cert", str(pki.client_cert), "--nats-tls-key", str(pki.client_key)])
        await connects(proc)  # the server takes the NKey; the other secrets ride along
    finally:
        server.stop()
    output = proc.output()
    assert "configuration: {" in output
    assert "'nats_password': '***'" in output
    assert "'nats_token': '***'" in output
    secrets = [PASSWORD, TOKEN, url_password, seed.read_text().strip(),
               pki.client_key.read_text().splitlines()[1]]
    leaked = [secret for secret in secrets if secret in output]
    assert leaked == [], output


# -- credentials files (decentralized JWT auth) ----------------------------------------------------

def creds_args(server: NatsServer, creds: Path, zmq: str, instance: int) -> list[str]:
    return ["--nats", server.url, "--zmq", zmq, "--instance-id", str(instance), "--namespace",
            NS, "--component", COMP, "--nats-creds", str(creds), "--log-level", "debug"]


async def test_operator_mode_refuses_clients_without_credentials(tmp_path: Path) -> None:
    """The minted operator configuration is in force: a client with no credentials is refused,
    one with the relay's credentials file gets JetStream."""
    trust = operator_mode()
    creds, _ = creds_file(tmp_path / "relay.creds", trust.account, "relay")
    server = server_with(tmp_path, trust.config)
    try:
        anonymous = Client()
        try:
            with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
                await anonymous.connect(server.url, allow_reconnect=False, connect_timeout=2)
        finally:
            await anonymous.close()  # a refused connect leaves its socket open
        nc = await nats.connect(server.url, user_credentials=str(creds),
                                allow_reconnect=False, connect_timeout=2)
        try:
            info = await nc.jetstream().account_info()
        finally:
            await nc.close()
    finally:
        server.stop()
    assert info.limits.max_streams == -1


async def test_credentials_file(tmp_path: Path, relay_procs: Procs) -> None:
    """--nats-creds: the relay connects with a user JWT of a trusted account, gets ready and
    stores vLLM's batches in JetStream; the seed never reaches the log, debug included."""
    trust = operator_mode()
    creds, seed = creds_file(tmp_path / "relay.creds", trust.account, "relay")
    server = server_with(tmp_path, trust.config)
    instance = new_instance_id()
    sent: dict[int, list[Any]] = {}
    try:
        with SyntheticVllm(ANY_PORT) as vllm:
            proc = relay_procs(creds_args(server, creds, vllm.address, instance))
            await proc.healthy(within=15)
            nc = await nats.connect(server.url, user_credentials=str(creds),
                                    connect_timeout=2, max_reconnect_attempts=2)
            try:
                deadline = time.monotonic() + 15
                while await last_seq(nc, subject_of(instance)) is None:  # ZMQ's slow joiner
                    assert time.monotonic() < deadline, proc.output()
                    events = vllm.factory.next_events()
                    sent[vllm.publish(events)] = msgspec.msgpack.decode(
                        msgspec.msgpack.encode(events))
                    await asyncio.sleep(0.1)
                got = await read_stream(nc, subject_of(instance), 1)
            finally:
                await nc.close()
            proc.proc.send_signal(signal.SIGTERM)
            assert await proc.exited(15) == 0, proc.output()
    finally:
        server.stop()
    for received in got:
        batch = received.batch
        assert (batch.instance_id, batch.epoch) == (instance, 0)
        assert [plain(e) for e in batch.events if not isinstance(e, Resync)] == [
            as_output(e) for e in sent[batch.seq]]
    output = proc.output()
    assert "'nats_creds': " in output  # the configuration was logged, the path with it
    assert seed not in output, output


async def test_credentials_file_of_untrusted_account(tmp_path: Path, relay_procs: Procs) -> None:
    """A user JWT signed by an account the operator never signed: exit 2 naming --nats-creds,
    the seed kept out of the log."""
    trust = operator_mode()
    stranger = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    creds, seed = creds_file(tmp_path / "stranger.creds", stranger, "relay")
    server = server_with(tmp_path, trust.config)
    try:
        proc = relay_procs(creds_args(server, creds, f"tcp://127.0.0.1:{free_port()}",
                                      new_instance_id()))
        await refused(proc, "NATS refused the relay's credentials", "--nats-creds")
    finally:
        server.stop()
    assert seed not in proc.output(), proc.output()
