"""`python -m stox token` (docs/architecture.md#settings-and-the-command-line): tokens the gateway
built from the same settings accepts."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

import jwt
import pytest
from support import report, run_cli, running_gateway, write_key_pair

from settings import PipelineSettings, StepSettings, load
from stox.app import make_tokens
from stox.auth import secret
from stox.auth.tokens import InvalidToken, TokenAuthority

SECRET = "cli-secret-" + "z" * 40


def printed_token(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return lines[0]


def authority(**environ: str) -> TokenAuthority:
    """The TokenAuthority a gateway started with these variables would use."""
    return make_tokens(load([], environ))


def test_a_user_token(tmp_path: Path) -> None:
    token = printed_token(run_cli(tmp_path, "token", "--user", "alice", STOX_JWT_SECRET=SECRET))

    principal = authority(STOX_JWT_SECRET=SECRET).verify(token)

    assert principal.id == "alice"
    assert principal.username == "alice"
    assert principal.role == "user"
    assert not principal.is_admin
    assert not (tmp_path / secret.SECRET_FILE).exists()  # a configured secret is used as is


def test_an_admin_token(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "token", "--user", "root", "--role", "admin", STOX_JWT_SECRET=SECRET)
    principal = authority(STOX_JWT_SECRET=SECRET).verify(printed_token(result))
    assert principal.id == "root"
    assert principal.role == "admin" and principal.is_admin


def test_a_service_token(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "token", "--service", "imgsvc", STOX_JWT_SECRET=SECRET)
    principal = authority(STOX_JWT_SECRET=SECRET).verify(printed_token(result))
    assert principal.role == "service"
    assert principal.id == "service:imgsvc"
    assert principal.username == "imgsvc"


def test_the_token_carries_the_configured_expiry(tmp_path: Path) -> None:
    token = printed_token(
        run_cli(tmp_path, "token", "--user", "alice", "--expires-in", "120", STOX_JWT_SECRET=SECRET)
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    assert (claims["iss"], claims["aud"]) == ("stox", "stox")


def test_a_token_made_with_another_secret_is_refused(tmp_path: Path) -> None:
    token = printed_token(run_cli(tmp_path, "token", "--user", "alice", STOX_JWT_SECRET=SECRET))
    with pytest.raises(InvalidToken):
        authority(STOX_JWT_SECRET="another-" + SECRET).verify(token)


def test_without_a_secret_the_generated_one_is_shared(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/data/x.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    first = printed_token(run_cli(elsewhere, "token", "--user", "alice", STOX_STORAGE_URL=url))
    secret_file = tmp_path / "data" / secret.SECRET_FILE
    assert secret_file.exists()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    kept = secret_file.read_text()
    second = printed_token(run_cli(tmp_path, "token", "--service", "seo", STOX_STORAGE_URL=url))

    assert secret_file.read_text() == kept  # reused, not regenerated
    assert not (elsewhere / secret.SECRET_FILE).exists()  # beside the data, not in the cwd
    gateway = authority(STOX_STORAGE_URL=url)
    assert gateway.verify(first).id == "alice"
    assert gateway.verify(second).id == "service:seo"


def test_a_configuration_error_exits_2(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "token", "--user", "alice", STOX_PORT="x")
    assert result.returncode == 2
    assert "server.port" in result.stderr
    assert result.stdout == ""


def test_production_without_a_secret_prints_no_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    result = run_cli(
        tmp_path, "token", "--user", "alice", STOX_ENV="production", STOX_STORAGE_URL=url
    )
    assert result.returncode == 2
    assert "jwt.secret" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / secret.SECRET_FILE).exists()


def test_a_public_key_alone_prints_no_token(tmp_path: Path) -> None:
    _, public = write_key_pair(tmp_path, "EdDSA")
    result = run_cli(
        tmp_path,
        "token",
        "--user",
        "alice",
        STOX_JWT_ALGORITHM="EdDSA",
        STOX_JWT_PUBLIC_KEY_FILE=str(public),
    )
    assert result.returncode == 2
    assert "jwt.private_key_file" in result.stderr
    assert result.stdout == ""


def test_a_private_key_signs_the_token(tmp_path: Path) -> None:
    private, public = write_key_pair(tmp_path, "RS256")
    env = {"STOX_JWT_ALGORITHM": "RS256", "STOX_JWT_PRIVATE_KEY_FILE": str(private)}
    token = printed_token(run_cli(tmp_path, "token", "--service", "seo", **env))
    verifier = authority(STOX_JWT_ALGORITHM="RS256", STOX_JWT_PUBLIC_KEY_FILE=str(public))
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert verifier.verify(token).role == "service"


@pytest.mark.parametrize(
    "args",
    [
        ["token"],
        ["token", "--user", "a", "--service", "b"],
        ["token", "--user", "a", "--role", "service"],
        ["token", "--user", "a", "--role", "root"],
        [],
    ],
)
def test_bad_command_lines_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(tmp_path, *args, STOX_JWT_SECRET=SECRET)
    assert result.returncode == 2
    assert result.stdout == ""


async def test_a_reviewer_token_decides_another_users_review(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "token", "--user", "rita", "--role", "reviewer", STOX_JWT_SECRET=SECRET
    )
    token = printed_token(result)
    principal = authority(STOX_JWT_SECRET=SECRET).verify(token)
    assert principal.id == "rita" and principal.role == "reviewer"
    assert principal.can_review_any and not principal.is_admin

    def reviewed(settings: Any) -> None:
        settings.pipelines = {
            "checked": PipelineSettings(
                steps=[StepSettings(name="draft"), StepSettings(name="check", kind="review")]
            )
        }

    async with running_gateway(tmp_path, reviewed, jwt__secret=SECRET) as gw:
        alice = gw.token("alice")
        upload = {"name": "Mug", "pipeline": "checked"}
        workflow_id = (await gw.fetch("POST", "/api/v1/workflow/upload", upload, token=alice)).body[
            "workflow_id"
        ]
        draft = (await gw.status(workflow_id))["steps"][0]
        assert (await report(gw, workflow_id, draft)).status == 200
        review = (await gw.status(workflow_id))["steps"][1]
        assert review["status"] == "waiting"
        body = {"workflow_id": workflow_id, "step_id": review["step_id"], "decision": "approve"}
        answer = await gw.fetch("POST", "/api/v1/workflow/review", body, token=token)
        assert answer.status == 200, answer.body
        assert answer.body["status"] == "completed"
        assert (await gw.status(workflow_id))["steps"][1]["review"]["by"] == "rita"
