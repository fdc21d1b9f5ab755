"""An external Temporal behind TLS, mTLS or an API key (temporal.tls*, temporal.api_key).

The settings are checked like every other (refused with the key named, secrets never shown); the client
options carry them to temporalio; and a real Temporal dev server behind a TLS-terminating proxy, with a
CA made here, shows that the right certificates connect and do real work, and that each wrong one ends
in one clear line naming the setting to fix.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity, workflow

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.server.specs import temporal_argv, temporal_binary
from stigmer.server.temporal_client import client_options, explain_connect_error
from tests.conftest import run_cli
from tests.doubles.archives import free_port
from tests.doubles.tls_proxy import Issued, Pki, TlsProxy

API_KEY = "tmprl-test-key-do-not-print"
MTLS = "set temporal.tls_cert and temporal.tls_key"


def settings(paths: Paths, address: str = "temporal.example.com:7233", **keys: str) -> Settings:
    """Settings for an external Temporal at `address`, with temporal.<key> values from the environment."""
    env = {"STIGMER_TEMPORAL_MANAGED": "false", "STIGMER_TEMPORAL_ADDRESS": address}
    env.update({f"STIGMER_TEMPORAL_{key.upper()}": value for key, value in keys.items()})
    return store.load(paths, env)


def mtls(pki: Pki, client: Issued | None = None) -> dict[str, str]:
    client = client or pki.client
    return {"tls_ca": str(pki.ca.pem), "tls_cert": str(client.cert), "tls_key": str(client.key)}


async def _connect(s: Settings) -> Any:
    from temporalio.client import Client

    return await Client.connect(s.temporal.address, **client_options(s))


def connect_error(s: Settings) -> StigmerError:
    """The StigmerError a connection with these settings ends in (it must fail)."""

    async def attempt() -> StigmerError:
        try:
            await _connect(s)
        except Exception as e:  # noqa: BLE001 - the point: every failure is explained
            return explain_connect_error(s, e)
        raise AssertionError("connected, but should not have")

    error = asyncio.run(asyncio.wait_for(attempt(), 30))
    assert "\n" not in error.message, error.message  # one line
    return error


# -- the settings -----------------------------------------------------------------------------------------
def test_defaults_are_plaintext_without_credentials(isolated_home: Paths) -> None:
    s = store.defaults(isolated_home)
    assert s.temporal.tls == "auto" and s.temporal.use_tls is False and s.temporal.api_key == ""
    assert client_options(s) == {"namespace": "default"}


def test_tls_and_api_key_are_refused_with_the_managed_dev_server(isolated_home: Paths) -> None:
    with pytest.raises(StigmerError) as e:
        store.load(isolated_home, {"STIGMER_TEMPORAL_TLS_CA": "/etc/ca.pem"})
    assert e.value.code is ErrorCode.CONFIG_INVALID
    assert "temporal.managed" in e.value.message and "temporal.tls_ca" in e.value.message
    # An API key exported for Temporal Cloud (TEMPORAL_API_KEY) must not break a local server: ignored.
    s = store.load(isolated_home, {"TEMPORAL_API_KEY": API_KEY})
    assert "api_key" not in client_options(s) and "tls" not in client_options(s)
    r = run_cli("config", "set", "temporal.tls_cert", "/etc/client.pem")
    assert r.returncode == 3 and "temporal.managed" in r.stderr and "plaintext" in r.stderr
    assert (
        not isolated_home.config_file.exists()
        or "/etc/client.pem" not in isolated_home.config_file.read_text()
    )


def test_cert_without_key_and_contradictions_are_refused(isolated_home: Paths, pki: Pki) -> None:
    with pytest.raises(StigmerError, match=r"^temporal.tls_key is set but temporal.tls_cert is not"):
        client_options(settings(isolated_home, tls_key=str(pki.client.key)))
    # One key at a time with `config set` (the pair is checked when the client is made).
    assert run_cli("config", "set", "temporal.managed", "false").returncode == 0
    assert run_cli("config", "set", "temporal.address", "t.example.com:7233").returncode == 0
    assert run_cli("config", "set", "temporal.tls_cert", str(pki.client.cert)).returncode == 0
    s = store.load(isolated_home, {})
    with pytest.raises(StigmerError) as e:
        client_options(s)
    assert e.value.code is ErrorCode.CONFIG_INVALID
    assert e.value.message.startswith("temporal.tls_cert is set but temporal.tls_key is not")
    assert run_cli("config", "set", "temporal.tls_key", str(pki.client.key)).returncode == 0
    s = store.load(isolated_home, {})
    assert s.temporal.use_tls and s.temporal.tls_key == str(pki.client.key)
    assert f"tls_key: '{pki.client.key}'" in isolated_home.config_file.read_text()
    # TLS turned off while TLS files are set.
    r = run_cli("config", "set", "temporal.tls", "false")
    assert r.returncode == 3 and "contradicts temporal.tls_cert, temporal.tls_key" in r.stderr, r.stderr
    with pytest.raises(StigmerError, match=r"temporal.tls .*contradicts temporal.tls_ca"):
        settings(isolated_home, tls="false", tls_ca="/etc/ca.pem")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("temporal.tls_ca", "certs/ca.pem", "absolute path"),
        ("temporal.tls", "maybe", "auto, true or false"),
        ("temporal.tls_server_name", "https://temporal.example.com", "host name"),
        ("temporal.tls_server_name", "temporal.example.com:7233", "no scheme or port"),
    ],
)
def test_values_are_bounded(isolated_home: Paths, key: str, value: str, expected: str) -> None:
    r = run_cli("config", "set", key, value)
    assert r.returncode == 3 and expected in r.stderr, r.stderr


def test_tls_setting_takes_yaml_booleans_and_auto(isolated_home: Paths) -> None:
    isolated_home.home.mkdir(parents=True)
    temporal = "backend:\n  local:\n    temporal:\n      managed: false\n      address: t.example.com:7233\n"
    for written, expected in (("true", True), ("false", False), ("auto", "auto"), ('"on"', True)):
        isolated_home.config_file.write_text(temporal + f"      tls: {written}\n")
        assert store.load(isolated_home, {}).temporal.tls == expected
    isolated_home.config_file.write_text(temporal + "      tls: 1.5\n")
    with pytest.raises(StigmerError, match="auto, true or false"):
        store.load(isolated_home, {})


def test_api_key_is_a_secret_with_temporal_s_own_variable(isolated_home: Paths) -> None:
    assert run_cli("config", "set", "temporal.managed", "false").returncode == 0
    r = run_cli("config", "set", "temporal.api_key", API_KEY)
    assert r.returncode == 0 and API_KEY not in r.stdout + r.stderr
    assert API_KEY not in run_cli("config", "list").stdout
    assert API_KEY not in run_cli("config", "list", "--json").stdout
    assert API_KEY not in run_cli("config", "get", "temporal.api_key").stdout
    s = store.load(isolated_home, {})
    assert s.temporal.api_key == API_KEY and s.temporal.use_tls  # auto: an API key means Temporal Cloud
    # Temporal's own variable, as TEMPORAL_SERVICE_ADDRESS is read for the address.
    s = store.load(isolated_home, {"TEMPORAL_API_KEY": "from-env"})
    assert s.temporal.api_key == "from-env" and s.source("temporal.api_key") == "env"


def test_client_options_carry_the_api_key_and_tls(isolated_home: Paths) -> None:
    s = settings(isolated_home, api_key=API_KEY, namespace="ns.acct")
    options = client_options(s)
    assert options["api_key"] == API_KEY and options["tls"] is True  # system roots, as Temporal Cloud
    assert options["namespace"] == "ns.acct"
    assert options["rpc_metadata"] == {"temporal-namespace": "ns.acct"}
    # tls false said explicitly: an API key over plaintext (a TLS-terminating sidecar), as asked.
    assert client_options(settings(isolated_home, api_key=API_KEY, tls="false"))["tls"] is False
    assert client_options(settings(isolated_home, tls="true")) == {"namespace": "default", "tls": True}


def test_client_options_read_the_pem_files(isolated_home: Paths, pki: Pki) -> None:
    from temporalio.service import TLSConfig

    s = settings(isolated_home, tls_server_name="localhost", **mtls(pki))
    tls = client_options(s)["tls"]
    assert isinstance(tls, TLSConfig) and tls.domain == "localhost"
    assert tls.server_root_ca_cert == pki.ca.pem.read_bytes()
    assert tls.client_cert == pki.client.cert.read_bytes()
    assert tls.client_private_key == pki.client.key.read_bytes()
    assert "api_key" not in client_options(s)


def test_unusable_files_are_named_with_their_key(isolated_home: Paths, pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello")
    encrypted = tmp_path / "enc.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    cases = [
        ({"tls_ca": str(tmp_path / "missing.pem")}, "temporal.tls_ca", "does not exist"),
        ({"tls_ca": str(tmp_path)}, "temporal.tls_ca", "is a folder"),
        ({"tls_ca": str(not_pem)}, "temporal.tls_ca", "not a PEM file with a certificate"),
        ({**mtls(pki), "tls_cert": str(pki.client.key)}, "temporal.tls_cert", "not a PEM file"),
        ({**mtls(pki), "tls_key": str(pki.client.cert)}, "temporal.tls_key", "with a private key"),
        ({**mtls(pki), "tls_key": str(encrypted)}, "temporal.tls_key", "encrypted"),
    ]
    for keys, key, why in cases:
        with pytest.raises(StigmerError) as e:
            client_options(settings(isolated_home, **keys))
        assert e.value.code is ErrorCode.CONFIG_INVALID
        assert key in e.value.message and why in e.value.message, e.value.message
        assert explain_connect_error(store.defaults(isolated_home), e.value) is e.value
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.pem"
        locked.write_bytes(pki.ca.pem.read_bytes())
        locked.chmod(0)
        with pytest.raises(StigmerError, match="temporal.tls_ca .*permission denied"):
            client_options(settings(isolated_home, tls_ca=str(locked)))


def test_refused_credentials_are_explained(isolated_home: Paths) -> None:
    """What Temporal Cloud answers to a wrong API key (the dev server checks none)."""
    unauthenticated = RuntimeError(
        "Failed client connect: `get_system_info` call error after connection: Status { code: "
        'Unauthenticated, message: "Request unauthorized.", metadata: MetadataMap { headers: {} } }'
    )
    s = settings(isolated_home, "ns.acct.tmprl.cloud:7233", api_key=API_KEY)
    error = explain_connect_error(s, unauthenticated)
    assert error.code is ErrorCode.UNAUTHORIZED and not error.code.retryable
    assert "refused the API key in temporal.api_key" in error.message and API_KEY not in str(error)
    error = explain_connect_error(settings(isolated_home, "t.example.com:7233"), unauthenticated)
    assert "requires credentials" in error.message and "temporal.api_key" in error.message
    denied = RuntimeError('Failed client connect: Status { code: PermissionDenied, message: "no" }')
    error = explain_connect_error(s, denied)
    assert error.code is ErrorCode.ACCESS_DENIED and "namespace default" in error.message
    refused = RuntimeError(
        "Failed client connect: Server connection error: tonic::transport::Error(Transport, ConnectError("
        'ConnectError("tcp connect error", 127.0.0.1:1, Os { code: 111, kind: ConnectionRefused }))))'
    )
    error = explain_connect_error(s, refused)
    assert error.code is ErrorCode.NOT_RUNNING and error.code.retryable
    assert error.message == "Temporal at ns.acct.tmprl.cloud:7233 cannot be reached: connection refused."


# -- a real Temporal behind TLS ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The real Temporal dev server, plaintext on a free port of 127.0.0.1: the port."""
    folder = tmp_path_factory.mktemp("temporal")
    port = free_port()
    argv = temporal_argv(
        temporal_binary(Paths(folder / "home")),
        port=port,
        ui_port=0,
        http_port=free_port(),
        metrics_port=free_port(),
        db_file=folder / "temporal.db",
        namespace="default",
    )
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        asyncio.run(_wait_ready(f"127.0.0.1:{port}", process))
        yield port
    finally:
        with_group = os.getpgid(process.pid) if process.poll() is None else None
        if with_group is not None:
            os.killpg(with_group, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(with_group, signal.SIGKILL)
                process.wait(5)


async def _wait_ready(address: str, process: subprocess.Popen[bytes]) -> None:
    from temporalio.client import Client

    deadline = time.monotonic() + 60
    while True:
        try:
            client = await Client.connect(address)
            await client.count_workflows()  # the frontend answers, not only the port
            return
        except RuntimeError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def mtls_proxy(pki: Pki, dev_server: int) -> Iterator[TlsProxy]:
    """TLS requiring a client certificate signed by the test CA."""
    with TlsProxy(("127.0.0.1", dev_server), pki.server, client_ca=pki.ca.pem) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def tls_proxy(pki: Pki, dev_server: int) -> Iterator[TlsProxy]:
    """TLS with a server certificate only (as Temporal Cloud with API keys)."""
    with TlsProxy(("127.0.0.1", dev_server), pki.server) as proxy:
        yield proxy


def test_mtls_with_the_right_ca_and_certificate_connects(
    isolated_home: Paths, pki: Pki, mtls_proxy: TlsProxy
) -> None:
    async def call(s: Settings) -> tuple[str, int]:
        client = await _connect(s)
        described = await client.workflow_service.describe_namespace(_describe("default"))
        return described.namespace_info.name, (await client.count_workflows()).count

    before = mtls_proxy.forwarded
    name, count = asyncio.run(call(settings(isolated_home, mtls_proxy.address, **mtls(pki))))
    assert name == "default" and count >= 0
    assert mtls_proxy.forwarded > before  # through the proxy, over mTLS
    # The certificate names localhost too: the name to check can differ from the address's host.
    s = settings(isolated_home, mtls_proxy.address, tls_server_name="localhost", **mtls(pki))
    assert asyncio.run(call(s))[0] == "default"


def _describe(namespace: str) -> Any:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest

    return DescribeNamespaceRequest(namespace=namespace)


def test_api_key_goes_over_tls(isolated_home: Paths, pki: Pki, tls_proxy: TlsProxy) -> None:
    """The dev server checks no key; this shows the key rides along with TLS and a private CA."""

    async def call() -> int:
        client = await _connect(s)
        return int((await client.count_workflows()).count)

    s = settings(isolated_home, tls_proxy.address, tls_ca=str(pki.ca.pem), api_key=API_KEY)
    assert asyncio.run(call()) >= 0


def test_a_server_certificate_from_another_ca_is_not_trusted(
    isolated_home: Paths, pki: Pki, mtls_proxy: TlsProxy
) -> None:
    error = connect_error(
        settings(isolated_home, mtls_proxy.address, **{**mtls(pki), "tls_ca": str(pki.other_ca.pem)})
    )
    assert error.code is ErrorCode.CONFIG_INVALID and not error.code.retryable
    assert "its TLS certificate is not trusted" in error.message
    assert f"temporal.tls_ca ({pki.other_ca.pem})" in error.message
    assert "set temporal.tls_ca" in error.message
    # No CA given: the system's roots do not know the test CA either.
    error = connect_error(settings(isolated_home, mtls_proxy.address, tls="true"))
    assert "not signed by the system's root CAs" in error.message and "temporal.tls_ca" in error.message


def test_a_wrong_server_name_is_explained(isolated_home: Paths, pki: Pki, mtls_proxy: TlsProxy) -> None:
    s = settings(isolated_home, mtls_proxy.address, tls_server_name="temporal.example.com", **mtls(pki))
    error = connect_error(s)
    assert "not valid for temporal.example.com" in error.message
    assert "127.0.0.1, localhost" in error.message and "temporal.tls_server_name" in error.message


def test_no_client_certificate_when_mtls_is_required(
    isolated_home: Paths, pki: Pki, mtls_proxy: TlsProxy
) -> None:
    refused = len(mtls_proxy.refused)
    error = connect_error(settings(isolated_home, mtls_proxy.address, tls_ca=str(pki.ca.pem)))
    at = f"Temporal at {mtls_proxy.address}"
    assert (error.code, error.message) in (
        (ErrorCode.ACCESS_DENIED, f"{at} requires a client certificate (mTLS) and none is configured; {MTLS}."),
        # When the client drops the request before it reads the alert (~1 in 30 here; real servers too).
        (ErrorCode.NOT_RUNNING, f"{at} closed the TLS connection at once; if it requires a client certificate (mTLS), {MTLS}."),
    )  # fmt: skip
    _eventually(lambda: len(mtls_proxy.refused) > refused)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in mtls_proxy.refused[-1]  # the proxy turned it away


def test_a_client_certificate_the_server_does_not_trust(
    isolated_home: Paths, pki: Pki, mtls_proxy: TlsProxy, tmp_path: Path
) -> None:
    stranger = pki.other_ca.issue(tmp_path, "stranger", client=True)
    error = connect_error(settings(isolated_home, mtls_proxy.address, **mtls(pki, stranger)))
    if error.code is not ErrorCode.NOT_RUNNING:  # the alert was read (see just above)
        assert error.code is ErrorCode.ACCESS_DENIED
        assert "refused the client certificate in temporal.tls_cert (UnknownCA)" in error.message
    assert "the client certificate in temporal.tls_cert" in error.message, error.message
    # A key that is not the certificate's is caught before anything is sent.
    s = settings(isolated_home, mtls_proxy.address, **{**mtls(pki), "tls_key": str(stranger.key)})
    error = connect_error(s)
    assert error.code is ErrorCode.CONFIG_INVALID
    assert "temporal.tls_key does not belong to the certificate in temporal.tls_cert" in error.message


def test_tls_on_one_side_only(isolated_home: Paths, pki: Pki, dev_server: int, mtls_proxy: TlsProxy) -> None:
    # TLS to the plaintext dev server.
    error = connect_error(settings(isolated_home, f"127.0.0.1:{dev_server}", tls_ca=str(pki.ca.pem)))
    assert error.code is ErrorCode.CONFIG_INVALID
    assert error.message.endswith(
        "does not speak TLS (it answered in plaintext); set temporal.tls to false (after unsetting "
        "temporal.tls_ca), or fix temporal.address."
    )
    # Plaintext to the TLS proxy.
    error = connect_error(settings(isolated_home, mtls_proxy.address))
    assert "closed the connection; if it requires TLS, set temporal.tls to true" in error.message


def test_a_worker_and_a_client_do_real_work_over_mtls(
    isolated_home: Paths, pki: Pki, dev_server: int, mtls_proxy: TlsProxy
) -> None:
    """A workflow and its activity, started, run and answered through the mTLS proxy only."""
    from temporalio.client import Client
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker

    s = settings(isolated_home, mtls_proxy.address, **mtls(pki))
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    workflow_id = f"shout-{uuid.uuid4().hex[:8]}"

    async def run() -> tuple[str, str]:
        client = await _connect(s)
        async with Worker(
            client,
            task_queue=queue,
            workflows=[Shout],
            activities=[shout],
            workflow_runner=UnsandboxedWorkflowRunner(),
        ):
            result = await client.execute_workflow(
                "Shout", "over tls", id=workflow_id, task_queue=queue,
                execution_timeout=timedelta(seconds=60),
            )  # fmt: skip
        # Seen from the server itself, without the proxy: the workflow really ran there.
        plain = await Client.connect(f"127.0.0.1:{dev_server}")
        described = await plain.get_workflow_handle(workflow_id).describe()
        return result, described.status.name if described.status else ""

    before = mtls_proxy.forwarded
    result, status = asyncio.run(asyncio.wait_for(run(), 120))
    assert result == "OVER TLS!" and status == "COMPLETED"
    assert mtls_proxy.forwarded > before


@activity.defn(name="shout")
async def shout(text: str) -> str:
    return text.upper() + "!"


@workflow.defn(name="Shout", sandboxed=False)
class Shout:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(shout, text, start_to_close_timeout=timedelta(seconds=30))


def _eventually(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
