"""A TLS-terminating TCP proxy in front of a plaintext gRPC server (the Temporal dev server), and the
certificates it needs, made on the spot: a stand-in for an external Temporal cluster behind TLS or mTLS.

The proxy speaks TLS to the client (ALPN h2, as gRPC requires; optionally requiring a client certificate
signed by a given CA) and forwards the decrypted bytes, untouched, to the upstream port. It runs an
asyncio loop in a thread, on a free port of 127.0.0.1, and records every handshake it refused so that a
test can tell "the client gave up" from "the proxy turned the client away".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


# -- certificates ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA that signs certificates for the test; its certificate is also written as a PEM bundle."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: Path

    @classmethod
    def create(cls, folder: Path, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        pem = folder / f"{name}.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name=name, cert=cert, key=key, pem=pem)

    def issue(self, folder: Path, name: str, *, hosts: Sequence[str] = (), client: bool = False) -> Issued:
        """A leaf certificate: for a server (SANs `hosts`, IPs or DNS names) or for a client (mTLS)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(cert=folder / f"{name}.pem", key=folder / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        issued.key.chmod(0o600)
        return issued


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs: the trusted CA, a server certificate for 127.0.0.1 and localhost, a
    client certificate for mTLS, and a second CA that has signed none of them."""

    ca: Authority
    server: Issued
    client: Issued
    other_ca: Authority

    @classmethod
    def create(cls, folder: Path) -> Pki:
        ca = Authority.create(folder, "test-ca")
        return cls(
            ca=ca,
            server=ca.issue(folder, "server", hosts=("127.0.0.1", "localhost")),
            client=ca.issue(folder, "client", client=True),
            other_ca=Authority.create(folder, "other-ca"),
        )


# -- the proxy -------------------------------------------------------------------------------------------
@dataclass
class TlsProxy:
    """TLS on 127.0.0.1:`port` in front of plaintext `upstream` (host, port); mTLS when `client_ca`.

    TLS runs over memory BIOs rather than asyncio's own SSL transport, because asyncio drops the alert a
    refused handshake produces: a real server (Go's crypto/tls, in Temporal) sends "certificate
    required" or "unknown CA", and the client's error should be the one it meets in the field."""

    upstream: tuple[str, int]
    server: Issued
    client_ca: Path | None = None
    port: int = 0
    refused: list[str] = field(default_factory=list)  # handshakes the proxy turned away, and why
    forwarded: int = 0  # handshakes that succeeded and were forwarded
    _context: ssl.SSLContext | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _make_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server.cert, self.server.key)
        ctx.set_alpn_protocols(["h2"])  # gRPC clients (tonic, in Temporal's core) insist on h2
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(self.client_ca))
        return ctx

    def start(self) -> TlsProxy:
        self._context = self._make_context()
        self._loop = asyncio.new_event_loop()
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="tls-proxy", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    def _run(self, started: Future[None]) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as e:  # noqa: BLE001 - handed to the thread that called start()
            started.set_exception(e)
            return
        started.set_result(None)
        self._loop.run_forever()
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._context is not None
        tls = _Tls(self._context, reader, writer)
        try:
            why = await tls.handshake()
            if why is not None:
                self.refused.append(why)
                await tls.linger()
                return
            self.forwarded += 1
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            pipes = [
                asyncio.ensure_future(tls.decrypt_to(up_writer)),
                asyncio.ensure_future(tls.encrypt_from(up_reader)),
            ]
            try:
                # When either side is done, so is the connection.
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                up_writer.close()
        except (OSError, ssl.SSLError):
            pass  # one side went away
        except asyncio.CancelledError:
            pass  # stop(): ended quietly (3.11's start_server logs a handler that ends cancelled)
        finally:
            writer.close()

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            if server is not None:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each closes its sockets

        with contextlib.suppress(RuntimeError):  # the loop already stopped
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Tls:
    """The server side of one TLS connection over memory BIOs; every output (alerts included) is sent."""

    def __init__(self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.reader, self.writer = reader, writer

    async def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _receive(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> str | None:
        """None once established; else why it failed (after the alert went to the client)."""
        while True:
            try:
                self.obj.do_handshake()
                await self.flush()
                return None
            except ssl.SSLWantReadError:
                await self.flush()
                if not await self._receive():
                    return "the client closed the connection during the handshake"
            except ssl.SSLError as e:
                await self.flush()  # the alert: "certificate required", "unknown CA", ...
                return f"{e.reason or e}"

    async def linger(self) -> None:
        """After an alert: close our side and wait for the client's, so that the alert is read. Closing
        at once with the client's bytes unread would reset the connection, and the alert be lost."""
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            self.writer.write_eof()
            async with asyncio.timeout(2):
                while await self.reader.read(65536):
                    pass

    async def decrypt_to(self, up: asyncio.StreamWriter) -> None:
        while True:
            try:
                while chunk := self.obj.read(65536):
                    up.write(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return  # close_notify
            await up.drain()
            await self.flush()  # reading may answer (TLS 1.3 key updates)
            if not await self._receive():
                return

    async def encrypt_from(self, up: asyncio.StreamReader) -> None:
        while data := await up.read(65536):
            self.obj.write(data)
            await self.flush()
