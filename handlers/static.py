"""The dashboard's files: `/` (index.html with versioned asset URLs) and `/static/…`.

Caching: index.html is revalidated on every load (`Cache-Control: no-cache` + ETag, so a
reload costs a 304), and it names app.js and style.css by `static_url` (`?v=<hash>`), which
may then be cached for a year: a new release changes the hash, hence the URL. The modules
app.js imports are versioned the same way: a module is served with each `from "./x.js"`
naming x.js by its version, and its own version is the hash of what is served, so a change
anywhere below app.js changes app.js's URL too (the imports must not form a cycle). Anything
asked for without a version is revalidated like the page.

Security headers go on every response of these handlers, errors included: a
Content-Security-Policy that allows no inline script or style and no framing, nosniff and
no referrer. The page never builds HTML from strings, so Trusted Types can be required too.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from pathlib import Path
from typing import Any

import tornado.web

from handlers.base import BoundedBody, PathOnlyErrorLog
from handlers.openapi import operation

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"  # installed beside handlers/
YEAR = 365 * 24 * 3600
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
# a module's static import of a sibling module: `from "./x.js"`, or `import "./x.js"`
_SIBLING_IMPORT = re.compile(rb'(?P<head>\b(?:from|import)\s*)"\./(?P<name>[\w-]+\.js)"')


def content_security_policy(protocol: str, host: str) -> str:
    """The page's policy; WebSockets only to the host the page came from."""
    connect = ["'self'"]
    if _HOST.match(host):
        connect.append(f"{'wss' if protocol == 'https' else 'ws'}://{host}")
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            f"connect-src {' '.join(connect)}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        ]
    )


class SecurityHeaders(tornado.web.RequestHandler):
    def set_default_headers(self) -> None:
        super().set_default_headers()
        policy = content_security_policy(self.request.protocol, self.request.host)
        self.set_header("Content-Security-Policy", policy)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")  # for browsers without frame-ancestors
        self.set_header("Cross-Origin-Opener-Policy", "same-origin")


class StaticHandler(SecurityHeaders, PathOnlyErrorLog, BoundedBody, tornado.web.StaticFileHandler):
    """`/static/…`: a year for versioned URLs, revalidation (ETag) for the rest."""

    @classmethod
    def get_content(
        cls, abspath: str, start: int | None = None, end: int | None = None
    ) -> Generator[bytes, None, None]:
        if abspath.endswith(".js"):
            yield cls.module_source(abspath)[start:end]
        else:
            yield from super().get_content(abspath, start, end)

    @classmethod
    def module_source(cls, abspath: str) -> bytes:
        """A module as served: its imports of sibling modules carry their versions."""
        source = b"".join(super().get_content(abspath))
        folder = Path(abspath).parent

        def versioned(match: re.Match[bytes]) -> bytes:
            sibling = folder / match["name"].decode()
            if not sibling.is_file():
                return match[0]  # a missing module: the browser's 404 says so
            # not get_version: Tornado holds its (non-reentrant) lock while versioning this one
            version = cls.get_content_version(str(sibling)).encode()
            return b'%s"./%s?v=%s"' % (match["head"], match["name"], version)

        return _SIBLING_IMPORT.sub(versioned, source)

    def get_content_size(self) -> int:
        assert self.absolute_path is not None
        if self.absolute_path.endswith(".js"):
            return len(self.module_source(self.absolute_path))
        return super().get_content_size()

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        if Path(absolute_path).name == "index.html":
            raise tornado.web.HTTPError(404)  # a template: served rendered at /
        return super().validate_absolute_path(root, absolute_path)

    def set_extra_headers(self, path: str) -> None:
        if "v" in self.request.arguments:
            self.set_header("Cache-Control", f"public, max-age={YEAR}, immutable")
        else:
            self.set_header("Cache-Control", "no-cache")
            self.clear_header("Expires")


class IndexHandler(SecurityHeaders, PathOnlyErrorLog, BoundedBody):
    """`/`: the dashboard page, revalidated on every load."""

    def get_template_path(self) -> str:
        return str(self.settings["static_path"])

    @operation(
        "The dashboard",
        answers={200: ("the dashboard's HTML page", None)},
        media_type="text/html",
        json_errors=False,
    )
    def get(self) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.render("index.html")

    @operation(
        "The dashboard's headers",
        answers={200: ("the page's headers", None)},
        json_errors=False,
    )
    def head(self) -> None:
        self.get()


def app_settings(static_dir: Path) -> dict[str, Any]:
    """Application settings: Tornado routes `/static/…` to StaticHandler from these."""
    return {"static_path": str(static_dir), "static_handler_class": StaticHandler}


routes = [(r"/", IndexHandler)]
