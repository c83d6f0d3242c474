"""Signing keys: the HS256 secret (configured, or generated once and kept beside the data,
mode 0600), or an EdDSA/RS256 key pair read from PEM files."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from settings import JWTSettings, SettingsError
from stox import store as stores
from stox.auth.tokens import BadKey, load_private_key, load_public_key

SECRET_FILE = "stox.secret"


def key_pair(jwt: JWTSettings, *, issuing: bool) -> dict[str, Any]:
    """`private_key` and `public_key` from the configured files (either may be None).

    `issuing`: the caller signs tokens (the AuthService, the token command), so the private
    key is required, in every environment.
    """
    if issuing and not jwt.private_key_file:
        raise SettingsError(
            f"jwt.private_key_file: required to issue {jwt.algorithm} tokens "
            "(set STOX_JWT_PRIVATE_KEY_FILE where the AuthService runs)"
        )
    keys: dict[str, Any] = {"private_key": None, "public_key": None}
    for name, path, loader in (
        ("private_key", jwt.private_key_file, load_private_key),
        ("public_key", jwt.public_key_file, load_public_key),
    ):
        if not path:
            continue
        try:
            keys[name] = loader(Path(path).expanduser().read_bytes(), jwt.algorithm)
        except OSError as exc:
            raise SettingsError(f"jwt.{name}_file: cannot read {path}: {exc.strerror}") from None
        except BadKey as exc:
            raise SettingsError(f"jwt.{name}_file: {path}: {exc}") from None
    return keys


def data_dir(storage_url: str) -> Path:
    """The folder of the store's file; the working directory for other stores."""
    return stores.data_folder(storage_url) or Path.cwd()


def load_or_create(folder: Path) -> str:
    path = folder / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # Written in full under a private name, then linked into place: the secret file never
    # exists empty or half-written, so a process starting at the same moment reads either
    # nothing (and races to link its own) or the whole secret.
    temp = folder / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(8)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        try:
            os.link(temp, path)
        except FileExistsError:  # another process made it first: use theirs
            return path.read_text().strip()
    finally:
        temp.unlink(missing_ok=True)
    return secret
