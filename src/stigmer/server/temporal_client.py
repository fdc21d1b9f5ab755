"""One way to connect to Temporal, for the API and every worker: the configured address and namespace,
TLS and an API key for an external cluster (temporal.tls_* / temporal.api_key), and Stigmer's payload
codec, so that what crosses Temporal is encrypted with Stigmer's key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for temporalio's Client.connect besides the address: namespace, TLS, API key.

    The TLS files are read here, so a missing or unreadable one is a StigmerError naming the file and
    its key before any connection is tried."""
    t = settings.temporal
    options: dict[str, Any] = {"namespace": t.namespace}
    if t.managed:
        return options  # the managed dev server: plaintext on 127.0.0.1, no key (one set is ignored)
    if t.api_key:
        options["api_key"] = t.api_key  # sent as "authorization: Bearer ..."
        # Temporal Cloud's regional endpoints route a request by this header.
        options["rpc_metadata"] = {"temporal-namespace": t.namespace}
    if not t.use_tls:
        if t.api_key:
            options["tls"] = False  # said explicitly: temporalio turns TLS on for an API key otherwise
        return options
    if bool(t.tls_cert) != bool(t.tls_key):
        given, missing = ("temporal.tls_cert", "temporal.tls_key")
        if t.tls_key:
            given, missing = missing, given
        raise StigmerError(
            f"{given} is set but {missing} is not: mTLS needs the client certificate and its private key.",
            hint=f"Set both, or neither: stigmer config set {missing} /path/to/file.pem",
            code=ErrorCode.CONFIG_INVALID,
        )
    if not (t.tls_ca or t.tls_cert or t.tls_server_name):
        options["tls"] = True  # the system's root CAs, no client certificate
        return options
    from temporalio.service import TLSConfig

    options["tls"] = TLSConfig(
        server_root_ca_cert=_read_pem("temporal.tls_ca", t.tls_ca, _CERT) if t.tls_ca else None,
        client_cert=_read_pem("temporal.tls_cert", t.tls_cert, _CERT) if t.tls_cert else None,
        client_private_key=_read_pem("temporal.tls_key", t.tls_key, _KEY) if t.tls_key else None,
        domain=t.tls_server_name or None,  # SNI and the name the certificate is checked against
    )
    return options


MAX_PEM = 1024 * 1024  # a CA bundle of every public root is ~250 KB
_CERT = ("CERTIFICATE", "a certificate")
_KEY = ("PRIVATE KEY", "a private key")


def _read_pem(key: str, value: str, kind: tuple[str, str]) -> bytes:
    marker, what = kind
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # no home folder to expand ~ with
        path = Path(value)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM + 1)
    except FileNotFoundError:
        why = "does not exist"
    except IsADirectoryError:
        why = "is a folder, not a file"
    except PermissionError:
        why = "cannot be read (permission denied)"
    except OSError as e:
        why = f"cannot be read ({e.strerror or e})"
    else:
        if len(data) > MAX_PEM:
            why = f"is larger than {MAX_PEM // 1024} KB, which no PEM file of {what} is"
        elif marker == "PRIVATE KEY" and b"ENCRYPTED" in data:
            why = "holds an encrypted private key; the Temporal client needs it unencrypted"
        elif b"-----BEGIN " not in data or marker.encode() not in data:
            why = f"is not a PEM file with {what} (-----BEGIN ...{marker}-----)"
        else:
            return data
    raise StigmerError(
        f"Cannot use {key} = {path}: the file {why}.",
        hint=f"Fix the file, or set another: stigmer config set {key} /path/to/file.pem",
        code=ErrorCode.CONFIG_INVALID,
    )


async def connect(
    settings: Settings, paths: Paths, *, plugins: list[Any] | None = None, store: Any = None
) -> Any:
    """A connected temporalio Client with Stigmer's payload codec (one attempt; callers retry).

    `store` is where the codec keeps payloads too large for Temporal's history: the API passes its
    Database, a worker "api" (through the API), anything else a payload_store.PayloadStore."""
    from temporalio.client import Client

    from stigmer.executions.codec import data_converter
    from stigmer.executions.payload_store import resolve

    return await Client.connect(
        settings.temporal.address,
        data_converter=data_converter(paths, resolve(store)),
        plugins=plugins or [],
        **client_options(settings),
    )


def explain_connect_error(settings: Settings, exc: BaseException) -> StigmerError:
    """A failed connection to Temporal as one line: what happened, and which setting to fix.

    temporalio raises a RuntimeError with the gRPC core's text for every failure; it is read here.
    A code that is not retryable (a certificate that is not trusted, a refused key) means trying
    again will not help: callers that retry while Temporal starts can stop at once."""
    if isinstance(exc, StigmerError):
        return exc  # client_options' own: a TLS file that cannot be used
    t = settings.temporal
    at = f"Temporal at {t.address}"
    text = " ".join(str(exc).split())
    status = getattr(getattr(exc, "status", None), "name", "")  # temporalio.service.RPCError

    def error(message: str, code: ErrorCode, hint: str = "") -> StigmerError:
        return StigmerError(message, code=code, hint=hint)

    def fix(key: str, value: str) -> str:
        return f"stigmer config set {key} {value}"

    # Our own TLS files, refused by the client before a byte was sent.
    if "KeyMismatch" in text or "InconsistentKeys" in text:
        return error(
            f"{at}: the private key in temporal.tls_key does not belong to the certificate in "
            "temporal.tls_cert; set temporal.tls_key to that certificate's key.",
            ErrorCode.CONFIG_INVALID,
            fix("temporal.tls_key", "/path/to/client.key"),
        )
    if "PrivateKeyParseError" in text or ("private key" in text.lower() and "parse" in text.lower()):
        return error(
            f"{at}: temporal.tls_key ({t.tls_key}) holds no private key the Temporal client can read "
            "(an unencrypted PKCS#8, PKCS#1 or SEC1 PEM); fix temporal.tls_key.",
            ErrorCode.CONFIG_INVALID,
            fix("temporal.tls_key", "/path/to/client.key"),
        )
    # The server's certificate, refused by us.
    if "InvalidCertificate" in text or "certificate verify failed" in text.lower():
        if "NotValidForName" in text:
            presented = ", ".join(
                re.findall(r'(?:DnsName|IpAddress)\(\\?"?([^"\\)]+)', text.partition("presented:")[2])[:4]
            )
            name = t.tls_server_name or t.address.rpartition(":")[0]
            return error(
                f"{at}: its TLS certificate is not valid for {name}"
                + (f" (it names {presented})" if presented else "")
                + "; set temporal.tls_server_name to a name it holds, or use that name in temporal.address.",
                ErrorCode.CONFIG_INVALID,
                fix("temporal.tls_server_name", "NAME"),
            )
        if "Expired" in text or "NotValidYet" in text:
            return error(
                f"{at}: its TLS certificate has expired or is not valid yet (or this machine's clock is "
                "wrong); the server's certificate must be renewed.",
                ErrorCode.NOT_RUNNING,
            )
        trusted_by = f"the CA(s) in temporal.tls_ca ({t.tls_ca})" if t.tls_ca else "the system's root CAs"
        return error(
            f"{at}: its TLS certificate is not trusted: it is not signed by {trusted_by}; set "
            "temporal.tls_ca to the PEM file of the CA that signed it.",
            ErrorCode.CONFIG_INVALID,
            fix("temporal.tls_ca", "/path/to/ca.pem"),
        )
    if t.use_tls and re.search(r"InvalidMessage|CorruptMessage|InvalidContentType|wrong version", text):
        files = ", ".join(t.tls_files)  # temporal.tls false is refused while any of them is set
        return error(
            f"{at} does not speak TLS (it answered in plaintext); set temporal.tls to false"
            + (f" (after unsetting {files})" if files else "")
            + ", or fix temporal.address.",
            ErrorCode.CONFIG_INVALID,
            "".join(f'stigmer config set {name} ""\n' for name in t.tls_files) + fix("temporal.tls", "false"),
        )
    # Our credentials, refused by the server.
    alert = re.search(r"received fatal alert: (\w+)", text)
    mtls = "set temporal.tls_cert and temporal.tls_key"
    if alert:
        name = alert.group(1)
        if name == "CertificateRequired" and not t.tls_cert:
            return error(
                f"{at} requires a client certificate (mTLS) and none is configured; {mtls}.",
                ErrorCode.ACCESS_DENIED,
                fix("temporal.tls_cert", "/path/to/client.pem")
                + "\n"
                + fix("temporal.tls_key", "/path/to/client.key"),
            )
        if name in _CLIENT_CERT_ALERTS:
            if t.tls_cert:
                return error(
                    f"{at} refused the client certificate in temporal.tls_cert ({name}): it must be "
                    "signed by a CA the server trusts, and be valid now.",
                    ErrorCode.ACCESS_DENIED,
                    fix("temporal.tls_cert", "/path/to/client.pem"),
                )
            return error(
                f"{at} refused the TLS connection ({name}); if it requires a client certificate, {mtls}.",
                ErrorCode.ACCESS_DENIED,
            )
        return error(f"{at} refused the TLS handshake ({name}).", ErrorCode.NOT_RUNNING)
    if status == "UNAUTHENTICATED" or "code: Unauthenticated" in text:
        if t.api_key:
            return error(
                f"{at} refused the API key in temporal.api_key (wrong, expired or revoked); set a valid one.",
                ErrorCode.UNAUTHORIZED,
                "stigmer config set temporal.api_key KEY   (or the environment variable TEMPORAL_API_KEY)",
            )
        return error(
            f"{at} requires credentials; set temporal.api_key (Temporal Cloud), or temporal.tls_cert "
            "and temporal.tls_key (mTLS).",
            ErrorCode.UNAUTHORIZED,
        )
    if status == "PERMISSION_DENIED" or "code: PermissionDenied" in text:
        given = "temporal.api_key" if t.api_key else "temporal.tls_cert" if t.tls_cert else "no credentials"
        return error(
            f"{at} denied access to namespace {t.namespace} ({given}); check temporal.namespace and "
            "that these credentials are allowed on it.",
            ErrorCode.ACCESS_DENIED,
        )
    if status == "NOT_FOUND" or ("code: NotFound" in text and "amespace" in text):
        return error(
            f"{at} has no namespace {t.namespace}; fix temporal.namespace.",
            ErrorCode.NOT_FOUND,
            fix("temporal.namespace", "NAME"),
        )
    closed = re.search(
        r"(?i)broken ?pipe|connection ?reset|unexpected ?eof|close_notify|connection closed", text
    )
    # A server that refuses a client certificate sends an alert and closes; when the connection is
    # reset before the alert is read (or the client drops the request first), only "broken pipe" or
    # "connection closed" is left to go by.
    if closed and t.use_tls and t.tls_cert:
        return error(
            f"{at} closed the TLS connection at once; it may not accept the client certificate in "
            "temporal.tls_cert (it must be signed by a CA the server trusts).",
            ErrorCode.NOT_RUNNING,
        )
    if closed and t.use_tls:
        return error(
            f"{at} closed the TLS connection at once; if it requires a client certificate (mTLS), {mtls}.",
            ErrorCode.NOT_RUNNING,
        )
    if closed and not t.use_tls:
        return error(
            f"{at} closed the connection; if it requires TLS, set temporal.tls to true (and "
            "temporal.tls_ca for a private CA).",
            ErrorCode.NOT_RUNNING,
            fix("temporal.tls", "true"),
        )
    return error(
        f"{at} cannot be reached: {_reason(text)}.",
        ErrorCode.NOT_RUNNING,
        "Check that Temporal runs there, and temporal.address: stigmer config get temporal.address",
    )


# TLS alerts a server sends when it does not accept (or did not get) a client certificate.
_CLIENT_CERT_ALERTS = frozenset(
    {
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "AccessDenied",
    }
)


def _reason(text: str) -> str:
    """The gRPC core's long error, in a few words."""
    for pattern, reason in (
        (r"ConnectionRefused|[Cc]onnection refused", "connection refused"),
        (r"dns error|failed to lookup|[Nn]ame or service not known|nodename nor servname", "host not found"),
        (r"[Tt]imed? ?out|[Dd]eadline", "timed out"),
        (r"not healthy|Unavailable", "it is not ready (yet)"),
        (r"NetworkUnreachable|[Nn]etwork is unreachable|[Nn]o route to host", "network unreachable"),
    ):
        if re.search(pattern, text):
            return reason
    text = text.removeprefix("Failed client connect: ")
    return text if len(text) <= 200 else text[:197] + "..."
