"""A local HTTPS stand-in for the Kubernetes API server, for the one thing that cannot run here.

It serves the recorded responses in tests/fixtures/kubernetes/ (a DynamoWorkerMetadata object,
RBAC 403s, 404s, a 410 watch error) over real TLS, with a throwaway CA and server certificate,
so the relay's real httpx client code runs against it: bearer token, CA verification, GET of the
named resource, and a watch stream of newline-delimited JSON events in chunked encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RECORDED = Path(__file__).resolve().parent / "fixtures" / "kubernetes"
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.kvrelay-test-token"
POD = "worker-0"
NAMESPACE = "dynamo"
COLLECTION = f"/apis/nvidia.com/v1alpha1/namespaces/{NAMESPACE}/dynamoworkermetadatas"
REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


def worker_metadata(instance_id: int | None = None) -> dict[str, Any]:
    """The recorded DynamoWorkerMetadata, with another instance ID when asked."""
    cr = recorded("dynamoworkermetadata.json")
    if instance_id is not None:
        for entry in cr["spec"]["data"]["endpoints"].values():
            entry["instance_id"] = instance_id
    return dict(cr)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvrelay-test-ca")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = (directory / "ca.pem", directory / "server.pem",
                                    directory / "server.key")
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


class KubeApi:
    """Holds at most one DynamoWorkerMetadata (`worker-0` in `dynamo`) and serves it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca, cert, key = _certificates(directory)
        self.serviceaccount_dir = directory / "serviceaccount"
        self.serviceaccount_dir.mkdir()
        (self.serviceaccount_dir / "ca.crt").write_bytes(ca.read_bytes())
        (self.serviceaccount_dir / "token").write_text(TOKEN + "\n")
        (self.serviceaccount_dir / "namespace").write_text(NAMESPACE)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(cert, key)
        self.cr: dict[str, Any] | None = None
        self.forbidden: set[str] = set()  # verbs RBAC denies: "get", "watch"
        self.crd_missing = False
        self.expire_next_watch = False
        self.requests: list[str] = []  # "get" | "watch" | "unauthorized"
        self.watching = asyncio.Event()
        self._watchers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._tls)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for queue in self._watchers:
            queue.put_nowait(None)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    def env(self) -> dict[str, str]:
        """What the kubelet and the downward API give a pod, plus Dynamo's backend choice."""
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port),
                "POD_NAME": POD, "POD_NAMESPACE": NAMESPACE, "POD_UID": "5f0c1a2e",
                "DYN_DISCOVERY_BACKEND": "kubernetes"}

    def flags(self) -> dict[str, str]:
        return {"kube_serviceaccount_dir": str(self.serviceaccount_dir)}

    def apply(self, cr: dict[str, Any]) -> None:
        """Create or update the resource, as the worker's server-side apply does."""
        kind = "MODIFIED" if self.cr is not None else "ADDED"
        self.cr = copy.deepcopy(cr)
        for queue in self._watchers:
            queue.put_nowait({"type": kind, "object": self.cr})

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            _, target, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in header_lines if line)}
            url = urlsplit(target)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if headers.get("authorization") != f"Bearer {TOKEN}":
                self.requests.append("unauthorized")
                await self._send(writer, 401, recorded("unauthorized.json"))
            elif url.path == f"{COLLECTION}/{POD}":
                self.requests.append("get")
                await self._get(writer)
            elif url.path == COLLECTION and query.get("watch") in ("true", "1"):
                self.requests.append("watch")
                await self._watch(writer, query)
            else:
                await self._send(writer, 404, recorded("crd-missing.json"))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def _get(self, writer: asyncio.StreamWriter) -> None:
        if "get" in self.forbidden:
            await self._send(writer, 403, recorded("forbidden-get.json"))
        elif self.crd_missing:
            await self._send(writer, 404, recorded("crd-missing.json"))
        elif self.cr is None:
            await self._send(writer, 404, recorded("not-found.json"))
        else:
            await self._send(writer, 200, self.cr)

    async def _watch(self, writer: asyncio.StreamWriter, query: dict[str, str]) -> None:
        if "watch" in self.forbidden:
            await self._send(writer, 403, recorded("forbidden-watch.json"))
            return
        if query.get("fieldSelector") != f"metadata.name={POD}":
            await self._send(writer, 404, recorded("crd-missing.json"))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        if self.expire_next_watch:
            self.expire_next_watch = False
            queue.put_nowait(recorded("watch-expired.json"))
            queue.put_nowait(None)
        elif self.cr is not None:  # no resourceVersion: existing objects arrive as ADDED
            queue.put_nowait({"type": "ADDED", "object": self.cr})
        self._watchers.add(queue)
        self.watching.set()
        try:
            async with asyncio.timeout(float(query.get("timeoutSeconds", "60"))):
                while (event := await queue.get()) is not None:
                    line = json.dumps(event).encode() + b"\n"
                    writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                    await writer.drain()
        except TimeoutError:
            pass
        finally:
            self._watchers.discard(queue)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()
