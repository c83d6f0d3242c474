"""`python -m stox user create NAME [--role admin] [--password-stdin]` (issue 3)."""

from __future__ import annotations

import asyncio
import getpass as getpass_module
import json
from pathlib import Path
from typing import Any

import pytest
from support import run_cli, running_gateway

from stox import __main__ as cli
from stox.auth.accounts import Accounts, BadCredentials
from stox.auth.passwords import Passwords
from stox.store import make_user_store

PASSWORD = "correct horse battery staple"
CHEAP_HASHES = "auth:\n  hash_time_cost: 1\n  hash_memory_cost: 1024\n  hash_parallelism: 1\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CHEAP_HASHES + f"storage:\n  url: sqlite:///{tmp_path}/stox.db\n")
    return path


def authenticate(config: Path, username: str, password: str) -> dict[str, Any]:
    """Log in against the store the configuration names, as the AuthService would."""
    url = f"sqlite:///{config.parent}/stox.db"

    async def check() -> dict[str, Any]:
        store, passwords = make_user_store(url), Passwords(1, 1024, 1)
        await store.open()
        await passwords.start()
        try:
            return await Accounts(store, passwords).authenticate(username, password)
        finally:
            passwords.close()
            await store.close()

    return asyncio.run(check())


def test_create_an_admin_reading_the_password_from_stdin(tmp_path: Path, config: Path) -> None:
    result = run_cli(
        tmp_path,
        "user",
        "create",
        "root",
        "--role",
        "admin",
        "--password-stdin",
        "--config",
        str(config),
        input=PASSWORD + "\n",
    )
    assert result.returncode == 0, result.stderr
    profile = json.loads(result.stdout)
    assert profile["username"] == "root" and profile["role"] == "admin"
    assert set(profile) == {"id", "username", "role", "created_at"}
    assert PASSWORD not in result.stdout + result.stderr
    assert authenticate(config, "root", PASSWORD) == profile


def test_a_user_by_default(tmp_path: Path, config: Path) -> None:
    args = ("user", "create", "alice", "--password-stdin", "--config", str(config))
    result = run_cli(tmp_path, *args, input=PASSWORD + "\r\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["role"] == "user"
    assert authenticate(config, "alice", PASSWORD)["role"] == "user"
    again = run_cli(tmp_path, *args, input=PASSWORD + "\n")
    assert again.returncode == 1 and "already exists" in again.stderr


@pytest.mark.parametrize(
    ("name", "password", "field"),
    [("alice", "short", "password"), ("Alice", PASSWORD, "username"), ("a", PASSWORD, "username")],
)
def test_bad_input_exits_2_naming_the_field(
    tmp_path: Path, config: Path, name: str, password: str, field: str
) -> None:
    args = ("user", "create", name, "--password-stdin", "--config", str(config))
    result = run_cli(tmp_path, *args, input=password + "\n")
    assert result.returncode == 2
    assert field in result.stderr
    assert password not in result.stderr


def test_a_role_other_than_user_or_admin_is_refused(tmp_path: Path, config: Path) -> None:
    args = ("user", "create", "svc", "--role", "service", "--password-stdin")
    result = run_cli(tmp_path, *args, input=PASSWORD + "\n")
    assert result.returncode == 2 and result.stdout == ""


def test_the_password_is_prompted_for_twice(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter([PASSWORD, PASSWORD, PASSWORD, "something else entirely"])
    prompts: list[str] = []

    def getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(getpass_module, "getpass", getpass)
    assert cli.main(["user", "create", "alice", "--config", str(config)]) == 0
    assert prompts == ["Password: ", "Password again: "]
    assert json.loads(capsys.readouterr().out)["username"] == "alice"

    assert cli.main(["user", "create", "bob", "--config", str(config)]) == 1
    assert "differ" in capsys.readouterr().err
    with pytest.raises(BadCredentials):
        authenticate(config, "bob", PASSWORD)  # not created


async def test_a_reviewer_created_on_the_command_line_logs_in_as_a_reviewer(
    tmp_path: Path, config: Path
) -> None:
    args = ("user", "create", "rita", "--role", "reviewer", "--password-stdin")
    result = run_cli(tmp_path, *args, "--config", str(config), input=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["role"] == "reviewer"

    # a gateway on the same store: rita's login token has the role, and reads as a reviewer's
    async with running_gateway(tmp_path) as gw:
        body = {"username": "rita", "password": PASSWORD}
        login = await gw.fetch("POST", "/api/v1/auth/login", body)
        assert login.status == 200, login.body
        token = login.body["access_token"]
        assert gw.gateway.tokens.verify(token).role == "reviewer"
        profile = await gw.fetch("GET", "/api/v1/auth/profile", token=token)
        assert profile.status == 200 and profile.body["role"] == "reviewer"
        workflow_id = await gw.upload(gw.token("alice"))
        seen = await gw.fetch(
            "GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", token=token
        )
        assert seen.status == 200, seen.body  # another user's workflow, as reviewers see them
