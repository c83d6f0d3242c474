"""The signing secret: configured, or generated once and kept beside the data (mode 0600)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_FILE = "stox.secret"


def data_dir(storage_url: str) -> Path:
    """The folder of the SQLite file; the working directory for other stores."""
    if storage_url.startswith("sqlite:///") and ":memory:" not in storage_url:
        return Path(storage_url.removeprefix("sqlite:///")).expanduser().resolve().parent
    return Path.cwd()


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
