"""Auth settings: token keys (the HS256 secret or an EdDSA/RS256 key pair) and `auth.*`."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import write_key_pair

from settings import SettingsError, load
from stox.app import make_tokens
from stox.auth.tokens import BadKey, CannotIssue, InvalidToken, TokenAuthority, load_public_key


def keyed_env(
    algorithm: str, private: Path | None = None, public: Path | None = None
) -> dict[str, str]:
    env = {"STOX_JWT_ALGORITHM": algorithm}
    if private:
        env["STOX_JWT_PRIVATE_KEY_FILE"] = str(private)
    if public:
        env["STOX_JWT_PUBLIC_KEY_FILE"] = str(public)
    return env


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
def test_the_private_key_issues_and_the_public_key_verifies(tmp_path: Path, algorithm: str) -> None:
    private, public = write_key_pair(tmp_path, algorithm)
    issuer = make_tokens(load([], keyed_env(algorithm, private=private)), issuing=True)
    verifier = make_tokens(load([], keyed_env(algorithm, public=public)))

    token = issuer.issue("alice", "alice", "admin")

    assert issuer.can_issue and not verifier.can_issue
    assert verifier.verify(token).is_admin
    assert issuer.verify(token).id == "alice"  # the private key's own public half
    with pytest.raises(CannotIssue):
        verifier.issue("alice", "alice", "user")
    with pytest.raises(SettingsError, match=r"jwt\.private_key_file"):
        make_tokens(load([], keyed_env(algorithm, public=public)), issuing=True)


def test_issuing_with_a_key_pair_needs_the_private_key_in_production_too(tmp_path: Path) -> None:
    _, public = write_key_pair(tmp_path, "EdDSA")
    env = {**keyed_env("EdDSA", public=public), "STOX_ENV": "production"}
    assert not make_tokens(load([], env)).can_issue  # a gateway verifies with the public key
    with pytest.raises(SettingsError, match=r"jwt\.private_key_file"):
        make_tokens(load([], env), issuing=True)


def test_an_hs256_secret_is_not_a_key(tmp_path: Path) -> None:
    tokens = make_tokens(load([], {"STOX_JWT_SECRET": "s" * 40}), issuing=True)
    assert tokens.algorithm == "HS256" and tokens.can_issue


def test_a_pair_that_does_not_belong_together_is_refused(tmp_path: Path) -> None:
    private, _ = write_key_pair(tmp_path, "EdDSA", "one")
    _, public = write_key_pair(tmp_path, "EdDSA", "two")
    with pytest.raises(SettingsError, match=r"jwt\.public_key_file: the public key is not"):
        make_tokens(load([], keyed_env("EdDSA", private, public)))


@pytest.mark.parametrize(("algorithm", "key_algorithm"), [("EdDSA", "RS256"), ("RS256", "EdDSA")])
def test_a_key_of_the_wrong_kind_is_refused(
    tmp_path: Path, algorithm: str, key_algorithm: str
) -> None:
    private, public = write_key_pair(tmp_path, key_algorithm)
    with pytest.raises(SettingsError, match=r"jwt\.private_key_file: .* needs an"):
        make_tokens(load([], keyed_env(algorithm, private=private)))
    with pytest.raises(SettingsError, match=r"jwt\.public_key_file: .* needs an"):
        make_tokens(load([], keyed_env(algorithm, public=public)))


def test_a_short_rsa_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    short = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = short.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(BadKey, match="too short"):
        load_public_key(pem, "RS256")


@pytest.mark.parametrize("content", [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nxx\n"])
def test_unreadable_key_files_are_refused_naming_the_setting(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    for setting, env in (
        ("jwt.private_key_file", keyed_env("EdDSA", private=path)),
        ("jwt.public_key_file", keyed_env("EdDSA", public=path)),
    ):
        with pytest.raises(SettingsError, match=setting):
            make_tokens(load([], env))
    with pytest.raises(SettingsError, match=r"jwt\.public_key_file: cannot read"):
        make_tokens(load([], keyed_env("EdDSA", public=tmp_path / "missing.pem")))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STOX_JWT_ALGORITHM": "none"}, "jwt.algorithm"),
        ({"STOX_JWT_ALGORITHM": "HS512"}, "jwt.algorithm"),
        ({"STOX_JWT_ALGORITHM": "EdDSA"}, "jwt.public_key_file: EdDSA needs a key file"),
    ],
)
def test_bad_jwt_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load([], env)


def test_an_authority_takes_one_kind_of_key() -> None:
    with pytest.raises(ValueError):
        TokenAuthority("")
    with pytest.raises(ValueError):
        TokenAuthority(algorithm="EdDSA")
    with pytest.raises(ValueError):
        TokenAuthority("secret", algorithm="none")


def test_a_token_of_the_other_mode_is_refused(tmp_path: Path) -> None:
    """An HS256 gateway refuses EdDSA tokens, and the other way round."""
    private, public = write_key_pair(tmp_path, "EdDSA")
    keyed = make_tokens(load([], keyed_env("EdDSA", private, public)), issuing=True)
    shared = TokenAuthority("s" * 40)
    with pytest.raises(InvalidToken):
        shared.verify(keyed.issue("alice", "alice", "user"))
    with pytest.raises(InvalidToken):
        keyed.verify(shared.issue("alice", "alice", "user"))


def test_the_password_hash_defaults_are_argon2ids_recommended_ones() -> None:
    from argon2.profiles import RFC_9106_LOW_MEMORY

    auth = load([], {}).auth
    assert (auth.hash_time_cost, auth.hash_memory_cost, auth.hash_parallelism) == (
        RFC_9106_LOW_MEMORY.time_cost,
        RFC_9106_LOW_MEMORY.memory_cost,
        RFC_9106_LOW_MEMORY.parallelism,
    )


def test_the_attempt_limit_defaults() -> None:
    auth = load([], {}).auth
    assert (auth.max_login_failures, auth.login_failure_window) == (10, 300.0)
    assert (auth.max_login_failures_per_name, auth.max_login_failures_per_address) == (100, 100)
    assert (auth.max_registrations, auth.registration_window) == (10, 3600.0)


def test_auth_settings_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "auth:\n  timeout: 250ms\n  retries: 1\n  hash_memory_cost: 1024\n"
        "services:\n  auth: auth.internal:50051\n"
    )
    settings = load(["--config", str(config)], {})
    assert settings.auth.timeout == 0.25 and settings.auth.retries == 1
    assert settings.auth.hash_memory_cost == 1024
    assert (settings.services.auth.host, settings.services.auth.port) == ("auth.internal", 50051)
    remote = load([], {"STOX_AUTH_ADDR": "10.0.0.7:7001"}).services.auth
    assert (remote.host, remote.port) == ("10.0.0.7", 7001)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("auth: {timeout: 0s}", "auth.timeout"),
        ("auth: {retries: -1}", "auth.retries"),
        ("auth: {max_login_failures: -1}", "auth.max_login_failures"),
        ("auth: {max_login_failures_per_name: -1}", "auth.max_login_failures_per_name"),
        ("auth: {max_login_failures_per_address: -1}", "auth.max_login_failures_per_address"),
        ("auth: {login_failure_window: 0}", "auth.login_failure_window"),
        ("auth: {max_registrations: -1}", "auth.max_registrations"),
        ("auth: {registration_window: 0}", "auth.registration_window"),
        ("auth: {hash_time_cost: 0}", "auth.hash_time_cost"),
        ("auth: {hash_memory_cost: 16, hash_parallelism: 4}", "auth.hash_memory_cost"),
        ("auth: {hash_pepper: x}", "auth.hash_pepper: unknown setting"),
        ("services: {auth: {host: h, port: 0}}", "services.auth.port"),
        ("services: {auth: nohost}", "services.auth: expected host:port"),
    ],
)
def test_bad_auth_settings_are_refused(tmp_path: Path, yaml_text: str, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SettingsError) as info:
        load(["--config", str(config)], {})
    assert str(info.value).startswith(message), info.value


def test_the_example_config_shows_the_auth_defaults() -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    shown, defaults = load(["--config", str(example)], {}), load([], {})
    assert shown.auth == defaults.auth
    assert shown.jwt == defaults.jwt
