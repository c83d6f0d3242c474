"""The dashboard's files: `/` (index.html with versioned asset URLs) and `/static/…`.

Caching: index.html is revalidated on every load (`Cache-Control: no-cache` + ETag, so a
reload costs a 304), and it names app.js and style.css by `static_url` (`?v=<hash>`), which
may then be cached for a year: a new release changes the hash, hence the URL. Anything asked
for without a version (the modules app.js imports) is revalidated like the page.

Security headers go on every response of these handlers, errors included: a
Content-Security-Policy that allows no inline script or style and no framing, nosniff and
no referrer. The page never builds HTML from strings, so Trusted Types can be required too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import tornado.web

from handlers.base import BoundedBody, PathOnlyErrorLog

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"  # installed beside handlers/
YEAR = 365 * 24 * 3600
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


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

    def get(self) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.render("index.html")

    def head(self) -> None:
        self.get()


def app_settings(static_dir: Path) -> dict[str, Any]:
    """Application settings: Tornado routes `/static/…` to StaticHandler from these."""
    return {"static_path": str(static_dir), "static_handler_class": StaticHandler}


routes = [(r"/", IndexHandler)]
