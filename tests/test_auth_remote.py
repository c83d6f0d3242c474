"""Remote mode: `python -m stox auth-service` run as a process of its own, and a gateway
pointed at it with services.auth (STOX_AUTH_ADDR), which then starts no AuthService."""

from __future__ import annotations

import asyncio
import datetime
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from support import (
    RunningGateway,
    free_port,
    gateway_settings,
    run_cli,
    running_gateway,
    stox_environ,
    write_key_pair,
)

from settings import Duration, Endpoint, SettingsError
from stox.app import Gateway
from stox.store import make_user_store

SECRET = "test-secret-" + "x" * 32  # the harness's jwt.secret
PASSWORD = "correct horse battery staple"
CHEAP_HASHES = "auth:\n  hash_time_cost: 1\n  hash_memory_cost: 1024\n  hash_parallelism: 1\n"
START_TIMEOUT = 15.0


class AuthServiceProcess:
    """`python -m stox auth-service --port PORT` with its own store under `folder`."""

    def __init__(self, folder: Path, port: int, **env: str) -> None:
        self.folder, self.port = folder, port
        self.config = folder / "auth.yaml"
        self.config.write_text(CHEAP_HASHES)
        self.env = {
            "STOX_STORAGE_URL": f"sqlite:///{folder}/auth.db",
            "STOX_JWT_SECRET": SECRET,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "stox", "auth-service", "--port", str(self.port)]
        with open(self.folder / "auth-service.log", "ab") as log:  # the child keeps its copy
            return subprocess.Popen(
                [*command, "--config", str(self.config)],
                cwd=self.folder,
                env=stox_environ(**self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self) -> None:
        """Start the process and wait until it accepts connections."""
        self.proc = self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the AuthService exited early:\n{self.output()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        pytest.fail(f"the AuthService did not listen on {self.port}:\n{self.output()}")

    def stop(self) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    def output(self) -> str:
        return (self.folder / "auth-service.log").read_text(errors="replace")


@asynccontextmanager
async def auth_service(folder: Path, port: int, **env: str) -> AsyncIterator[AuthServiceProcess]:
    service = AuthServiceProcess(folder, port, **env)
    await service.start()
    try:
        yield service
    finally:
        service.stop()


def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Separate folders (stores, secrets) for the AuthService and the gateway."""
    (tmp_path / "auth").mkdir()
    (tmp_path / "gw").mkdir()
    return tmp_path / "auth", tmp_path / "gw"


def remote(port: int, **extra: Any) -> dict[str, Any]:
    """running_gateway overrides for a gateway using the AuthService on `port`."""
    return {
        "services__auth": Endpoint("127.0.0.1", port),
        "auth__retry_backoff": Duration(0.02),
        **extra,
    }


async def register_and_login(gw: RunningGateway, username: str = "alice") -> str:
    body = {"username": username, "password": PASSWORD}
    registered = await gw.fetch("POST", "/api/v1/auth/register", body)
    assert registered.status == 201, registered.body
    response = await gw.fetch("POST", "/api/v1/auth/login", body)
    assert response.status == 200, response.body
    return str(response.body["access_token"])


async def test_a_gateway_uses_an_auth_service_running_alone(tmp_path: Path) -> None:
    port = free_port()
    auth_dir, gw_dir = folders(tmp_path)
    async with auth_service(auth_dir, port), running_gateway(gw_dir, **remote(port)) as gw:
        assert gw.gateway.auth_server is None  # it started none of its own
        token = await register_and_login(gw)
        profile = await gw.fetch("GET", "/api/v1/auth/profile", token=token)
        assert profile.status == 200 and profile.body["username"] == "alice"
        workflow_id = await gw.upload(token)
        status_path = f"/api/v1/workflow/status?workflow_id={workflow_id}"
        status = await gw.fetch("GET", status_path, token=token)
        assert status.body["owner"] == profile.body["id"]
        assert (await gw.fetch("GET", "/readyz")).body["auth"] == "ok"

    # the user was stored by the service, in its own store
    users = make_user_store(f"sqlite:///{auth_dir}/auth.db")
    await users.open()
    try:
        assert (await users.user_by_name("alice")) is not None
    finally:
        await users.close()


async def test_a_stopped_service_gives_503_and_a_restarted_one_is_used_again(
    tmp_path: Path,
) -> None:
    port = free_port()
    service = AuthServiceProcess(tmp_path, port)
    await service.start()
    try:
        async with running_gateway(tmp_path / "gw", **remote(port)) as gw:
            token = await register_and_login(gw)

            assert service.stop() == 0  # SIGTERM: a clean exit
            for response in (
                await gw.fetch(
                    "POST", "/api/v1/auth/login", {"username": "alice", "password": PASSWORD}
                ),
                await gw.fetch(
                    "POST", "/api/v1/auth/register", {"username": "bob", "password": PASSWORD}
                ),
                await gw.fetch("GET", "/api/v1/auth/profile", token=token),
            ):
                assert response.status == 503, response.body
                assert response.body["error"]["code"] == "auth_unavailable"
                assert response.headers["Retry-After"] == "1"
            ready = await gw.fetch("GET", "/readyz")
            assert ready.status == 503 and ready.body["auth"] == "unavailable"
            # workflow requests verify tokens locally and go on working
            assert (await gw.fetch("GET", "/api/v1/workflow/list", token=token)).status == 200

            await service.start()  # the same port, the same store
            deadline = time.monotonic() + 10
            while True:
                body = {"username": "alice", "password": PASSWORD}
                response = await gw.fetch("POST", "/api/v1/auth/login", body)
                if response.status == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert response.status == 200, response.body
            assert (await gw.fetch("GET", "/readyz")).status == 200
    finally:
        service.stop()


async def test_a_gateway_holding_only_the_public_key_verifies_the_services_tokens(
    tmp_path: Path,
) -> None:
    private, public = write_key_pair(tmp_path, "EdDSA")
    port = free_port()
    keyed = {"STOX_JWT_ALGORITHM": "EdDSA", "STOX_JWT_PRIVATE_KEY_FILE": str(private)}

    def public_key_only(settings: Any) -> None:
        settings.jwt.secret = ""
        settings.jwt.algorithm = "EdDSA"
        settings.jwt.public_key_file = str(public)

    auth_dir, gw_dir = folders(tmp_path)
    async with (
        auth_service(auth_dir, port, STOX_JWT_SECRET="", **keyed),
        running_gateway(gw_dir, public_key_only, **remote(port)) as gw,
    ):
        assert not gw.gateway.tokens.can_issue
        token = await register_and_login(gw)
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        assert gw.gateway.tokens.verify(token).username == "alice"
        assert await gw.upload(token)
        validated = await gw.fetch("POST", "/api/v1/auth/validate", {"token": token})
        assert validated.status == 200 and validated.body["user"]["username"] == "alice"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STOX_ENV": "production"}, "jwt.secret"),
        ({"STOX_ENV": "production", "STOX_JWT_ALGORITHM": "EdDSA"}, "jwt.public_key_file"),
        (
            {"STOX_ENV": "production", "STOX_JWT_ALGORITHM": "RS256"}
            | {"STOX_JWT_PUBLIC_KEY_FILE": "jwt.pub"},  # verifying is not enough to issue
            "jwt.private_key_file",
        ),
        ({"STOX_JWT_ALGORITHM": "EdDSA", "STOX_JWT_PUBLIC_KEY_FILE": "jwt.pub"}, "private_key"),
    ],
)
def test_the_service_refuses_to_start_without_its_signing_key(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    result = run_cli(
        tmp_path,
        "auth-service",
        "--port",
        "0",
        STOX_STORAGE_URL=f"sqlite:///{tmp_path}/a.db",
        **env,
    )
    assert result.returncode == 2
    assert message in result.stderr and "configuration error" in result.stderr


async def test_a_taken_port_stops_the_service_with_an_error(tmp_path: Path) -> None:
    port = free_port()
    async with auth_service(tmp_path, port):
        result = await asyncio.to_thread(
            run_cli,
            tmp_path,
            "auth-service",
            "--port",
            str(port),
            STOX_JWT_SECRET=SECRET,
            STOX_STORAGE_URL=f"sqlite:///{tmp_path}/other.db",
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr


# -- TLS between the gateways and the AuthService -----------------------------------------

SERVER_NAME = "auth.internal"  # the only name in the test certificate; the gateway dials an IP


def write_certificates(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A new self-signed CA and a server certificate it signs for SERVER_NAME, as PEM files
    named after `name`: (ca, certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None
    ) -> x509.CertificateBuilder:
        """A day's certificate for `subject`'s `key`, issued by `issuer` (None: itself)."""
        own = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(own)
            .issuer_name(issuer or own)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        certificate(f"{name} test CA", ca_key, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        certificate(SERVER_NAME, key, ca.subject)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / f"{name}-ca.pem", folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def serving_tls(cert: Path, key: Path) -> dict[str, str]:
    """The AuthService process's environment for TLS."""
    return {"STOX_AUTH_TLS_CERT_FILE": str(cert), "STOX_AUTH_TLS_KEY_FILE": str(key)}


def trusting(ca: Path | None, server_name: str = SERVER_NAME) -> dict[str, Any]:
    """running_gateway overrides for a client trusting `ca` (None: plaintext)."""
    if ca is None:
        return {}
    return {"auth__tls_ca_file": str(ca), "auth__tls_server_name": server_name}


async def test_a_gateway_logs_users_in_through_an_auth_service_serving_tls(
    tmp_path: Path,
) -> None:
    ca, cert, key = write_certificates(tmp_path, "good")
    port = free_port()
    auth_dir, gw_dir = folders(tmp_path)
    async with (
        auth_service(auth_dir, port, **serving_tls(cert, key)) as service,
        running_gateway(gw_dir, **remote(port, **trusting(ca))) as gw,
    ):
        assert gw.gateway.auth.credentials is not None  # not plaintext
        token = await register_and_login(gw)
        profile = await gw.fetch("GET", "/api/v1/auth/profile", token=token)
        assert profile.status == 200 and profile.body["username"] == "alice"
        assert (await gw.fetch("GET", "/readyz")).body["auth"] == "ok"
    assert f"AuthService listening on 127.0.0.1:{port} (TLS)" in service.output()


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("wrong CA", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong name", "Hostname Verification"),  # the certificate does not name 127.0.0.1
        ("plaintext", "Socket closed"),  # the TLS server hangs up on a plaintext client
    ],
)
async def test_a_gateway_that_cannot_make_the_tls_channel_answers_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, client: str, reason: str
) -> None:
    ca, cert, key = write_certificates(tmp_path, "good")
    other_ca, _, _ = write_certificates(tmp_path, "other")
    gateway_tls = {
        "wrong CA": trusting(other_ca),
        "wrong name": trusting(ca, server_name=""),
        "plaintext": trusting(None),
    }[client]
    port = free_port()
    auth_dir, gw_dir = folders(tmp_path)
    async with (
        auth_service(auth_dir, port, **serving_tls(cert, key)),
        running_gateway(gw_dir, **remote(port, **gateway_tls)) as gw,
    ):
        body = {"username": "alice", "password": PASSWORD}
        for response in (
            await gw.fetch("POST", "/api/v1/auth/register", body),
            await gw.fetch("POST", "/api/v1/auth/login", body),
        ):
            assert response.status == 503, response.body
            assert response.body["error"]["code"] == "auth_unavailable"
            assert response.headers["Retry-After"] == "1"
        ready = await gw.fetch("GET", "/readyz")
        assert ready.status == 503 and ready.body["auth"] == "unavailable"
    logged = [r.getMessage() for r in caplog.records if "is unavailable" in r.getMessage()]
    assert logged and f"the AuthService at 127.0.0.1:{port}" in logged[0]
    assert reason in logged[0]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STOX_AUTH_TLS_CERT_FILE": "cert.pem"}, "auth.tls_key_file: tls_cert_file and"),
        (
            {"STOX_AUTH_TLS_CERT_FILE": "missing.pem", "STOX_AUTH_TLS_KEY_FILE": "key.pem"},
            "auth.tls_key_file: cannot read key.pem",
        ),
        (
            {"STOX_AUTH_TLS_CERT_FILE": "auth.yaml", "STOX_AUTH_TLS_KEY_FILE": "auth.yaml"},
            "auth.tls_key_file: auth.yaml is not a PEM file",
        ),
    ],
)
def test_the_service_refuses_tls_settings_it_cannot_use(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    (tmp_path / "auth.yaml").write_text(CHEAP_HASHES)
    result = run_cli(
        tmp_path,
        "auth-service",
        "--port",
        "0",
        STOX_STORAGE_URL=f"sqlite:///{tmp_path}/a.db",
        STOX_JWT_SECRET=SECRET,
        **env,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "configuration error" in result.stderr


def test_a_gateway_refuses_a_ca_file_it_cannot_read(tmp_path: Path) -> None:
    settings = gateway_settings(
        tmp_path, services__auth=Endpoint("127.0.0.1", 1), auth__tls_ca_file="missing.pem"
    )
    with pytest.raises(SettingsError, match=r"auth\.tls_ca_file: cannot read missing\.pem"):
        Gateway(settings, completion_path="/done")
