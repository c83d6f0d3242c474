"""What a MongoDB storage URL says, without loading PyMongo (settings check URLs early)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

SCHEMES = ("mongodb://", "mongodb+srv://")
EXAMPLE = "mongodb://…"
DEFAULT_DATABASE = "stox"


def database_from_url(url: str) -> str:
    """The database named in the URL path (`mongodb://host/NAME?opts`), else `stox`."""
    _, _, rest = url.partition("://")
    _, slash, path = rest.partition("/")
    name = unquote(path.partition("?")[0]) if slash else ""
    return name or DEFAULT_DATABASE


def data_folder(url: str) -> Path | None:
    """A server keeps the data: no folder of ours."""
    return None
