"""The dashboard's files over HTTP: security headers, caching, and nothing inline (CSP)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support import RunningGateway

from handlers.static import StaticHandler, content_security_policy

STATIC = Path(__file__).resolve().parent.parent / "static"
YEAR = 365 * 24 * 3600


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for part in policy.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


def assert_security_headers(headers: object, port: int) -> None:
    policy = directives(headers["Content-Security-Policy"])  # type: ignore[index]
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'", f"ws://127.0.0.1:{port}"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["require-trusted-types-for"] == ["'script'"]
    assert "unsafe" not in headers["Content-Security-Policy"]  # type: ignore[index]
    assert headers["X-Content-Type-Options"] == "nosniff"  # type: ignore[index]
    assert headers["Referrer-Policy"] == "no-referrer"  # type: ignore[index]
    assert headers["X-Frame-Options"] == "DENY"  # type: ignore[index]


class Assets(HTMLParser):
    """The URLs a page loads, and anything inline it carries."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name, _ in attrs:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"<{tag} {name}=…>")
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            self._in_script = True
            if not values.get("src"):
                self.inline.append("<script> without src")
        for name in ("src", "href"):
            url = values.get(name)
            if url and url.startswith("/static/"):
                self.urls.append(url)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script text")


async def test_the_page_is_revalidated_and_names_its_assets_by_version(gw: RunningGateway) -> None:
    response = await gw.fetch("GET", "/")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["Cache-Control"] == "no-cache"
    assert_security_headers(response.headers, gw.port)

    etag = response.headers["Etag"]
    again = await gw.fetch("GET", "/", headers={"If-None-Match": etag})
    assert again.status == 304

    page = Assets()
    page.feed(response.body)
    assert page.inline == []
    assert sorted(re.sub(r"\?v=[0-9a-f]{16,}$", "", url) for url in page.urls) == [
        "/static/app.js",
        "/static/favicon.svg",
        "/static/style.css",
    ]


async def test_versioned_assets_are_cached_for_a_year(gw: RunningGateway) -> None:
    page = Assets()
    page.feed((await gw.fetch("GET", "/")).body)
    types = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
    for url in page.urls:
        response = await gw.fetch("GET", url)
        assert response.status == 200, url
        assert response.headers["Cache-Control"] == f"public, max-age={YEAR}, immutable"
        name = url.split("?")[0].rsplit("/", 1)[-1]
        assert response.headers["Content-Type"].startswith(types[name])
        assert_security_headers(response.headers, gw.port)


async def test_every_module_is_imported_by_a_versioned_url(gw: RunningGateway) -> None:
    """From app.js down, each import names its module by version: none is revalidated on a
    reload, and every module of static/ is reached."""
    page = Assets()
    page.feed((await gw.fetch("GET", "/")).body)
    todo = [url for url in page.urls if url.startswith("/static/app.js?v=")]
    reached = set()
    while todo:
        url = todo.pop()
        response = await gw.fetch("GET", url)
        assert response.status == 200, url
        assert response.headers["Cache-Control"] == f"public, max-age={YEAR}, immutable"
        assert int(response.headers["Content-Length"]) == len(response.body.encode()), url
        reached.add(url.split("?")[0])
        for name, version in re.findall(
            r'from "\./([\w-]+\.js)(\?v=[0-9a-f]{16,})?"', response.body
        ):
            assert version, f"{url} imports {name} without a version"
            todo.append(f"/static/{name}{version}")
    assert reached == {f"/static/{path.name}" for path in STATIC.glob("*.js")}


def test_a_change_in_an_imported_module_changes_the_importers_version(tmp_path: Path) -> None:
    (tmp_path / "b.js").write_text("export const b = 1;\n")
    (tmp_path / "a.js").write_text('import { b } from "./b.js";\nexport const a = b;\n')
    a, b = str(tmp_path / "a.js"), str(tmp_path / "b.js")
    version = StaticHandler.get_content_version(a)

    served = b"".join(StaticHandler.get_content(a)).decode()
    b_version = StaticHandler.get_content_version(b)
    assert served == f'import {{ b }} from "./b.js?v={b_version}";\nexport const a = b;\n'
    assert b"".join(StaticHandler.get_content(a, 7, 10)) == served.encode()[7:10]  # ranges

    (tmp_path / "b.js").write_text("export const b = 2;\n")
    assert StaticHandler.get_content_version(a) != version


async def test_unversioned_assets_are_revalidated(gw: RunningGateway) -> None:
    response = await gw.fetch("GET", "/static/model.js")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-cache"
    assert "Expires" not in response.headers
    again = await gw.fetch(
        "GET", "/static/model.js", headers={"If-None-Match": response.headers["Etag"]}
    )
    assert again.status == 304


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/static/index.html", 404),  # a template, only served rendered
        ("/static/missing.js", 404),
        ("/static/../settings.py", 403),
    ],
)
async def test_what_is_not_an_asset_is_refused_with_the_same_headers(
    gw: RunningGateway, path: str, status: int
) -> None:
    response = await gw.fetch("GET", path)
    assert response.status == status
    assert_security_headers(response.headers, gw.port)


async def test_head_of_the_page(gw: RunningGateway) -> None:
    response = await gw.fetch("HEAD", "/")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    ("protocol", "host", "expected"),
    [
        ("http", "gw.example:8080", "connect-src 'self' ws://gw.example:8080"),
        ("https", "gw.example", "connect-src 'self' wss://gw.example"),
        ("http", "[::1]:8080", "connect-src 'self' ws://[::1]:8080"),
        ("http", "evil.example; script-src *", "connect-src 'self';"),  # never echoed
        ("http", "", "connect-src 'self';"),
    ],
)
def test_the_policy_names_only_the_page_host_for_websockets(
    protocol: str, host: str, expected: str
) -> None:
    assert expected in content_security_policy(protocol, host) + ";"


# Under `require-trusted-types-for 'script'` these throw; the page must never need them.
FORBIDDEN_JS = re.compile(
    r"\.innerHTML|\.outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
    r"setAttribute\(\s*[\"']style|\.style\.|setTimeout\(\s*[\"'`]"
)


@pytest.mark.parametrize("name", sorted(p.name for p in STATIC.glob("*.js")))
def test_scripts_build_no_markup_from_strings(name: str) -> None:
    source = (STATIC / name).read_text()
    assert FORBIDDEN_JS.findall(source) == []
