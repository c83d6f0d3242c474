"""X-Forwarded-For and -Proto are believed from `server.trusted_proxies` only, for every handler.

The address and scheme a handler sees are observed directly (a tiny app on the gateway's HTTP
server), and through the gateway's login limiter.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.netutil
import tornado.web
import tornado.websocket
from support import RunningGateway, running_gateway

import settings as settings_module
from handlers.server import make_http_server

LOGIN = "/api/v1/auth/login"
REGISTER = "/api/v1/auth/register"
PASSWORD = "correct horse battery staple"


class Peer(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"ip": self.request.remote_ip, "scheme": self.request.protocol})


class PeerSocket(tornado.websocket.WebSocketHandler):
    def open(self) -> None:
        self.write_message({"ip": self.request.remote_ip, "scheme": self.request.protocol})


@asynccontextmanager
async def serving(trusted: list[str]) -> AsyncIterator[int]:
    """The gateway's HTTP server with `trusted` proxies, serving Peer and PeerSocket; its port."""
    settings = settings_module.load([], {})
    settings.server.trusted_proxies = trusted
    app = tornado.web.Application([(r"/peer", Peer), (r"/ws", PeerSocket)])
    server = make_http_server(app, settings.server)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    try:
        yield int(sockets[0].getsockname()[1])
    finally:
        server.stop()
        await server.close_all_connections()


async def seen(port: int, *headers: tuple[str, str]) -> dict[str, str]:
    """What the handler sees of a request with `headers` (a name may come twice)."""
    request = tornado.httpclient.HTTPRequest(f"http://127.0.0.1:{port}/peer")
    for name, value in headers:
        request.headers.add(name, value)
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request)
    return dict(json.loads(response.body))


async def seen_by_socket(port: int, *headers: tuple[str, str]) -> dict[str, str]:
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers=dict(headers))
    conn = await tornado.websocket.websocket_connect(request)
    message = await conn.read_message()
    conn.close()
    assert isinstance(message, str)
    return dict(json.loads(message))


FORWARDED = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Real-Ip", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
    ("X-Scheme", "https"),
]
PEER = {"ip": "127.0.0.1", "scheme": "http"}


# -- the setting ------------------------------------------------------------------------------


def test_no_proxy_is_trusted_by_default() -> None:
    assert settings_module.load([], {}).server.trusted_proxies == []


def test_trusted_proxies_from_yaml_and_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  trusted_proxies: [10.0.0.0/8, '::1', 192.168.1.7]\n")
    loaded = settings_module.load(["--config", str(config)], {})
    assert loaded.server.trusted_proxies == ["10.0.0.0/8", "::1", "192.168.1.7"]
    environ = {"STOX_TRUSTED_PROXIES": "172.16.0.0/12, 127.0.0.1"}
    assert settings_module.load(["--config", str(config)], environ).server.trusted_proxies == [
        "172.16.0.0/12",
        "127.0.0.1",
    ]


@pytest.mark.parametrize("bad", ["proxy.internal", "10.0.0.0/33", "10.0.0", "1.2.3.4/x", ""])
def test_a_trusted_proxy_that_is_not_an_address_or_network_is_refused(
    tmp_path: Path, bad: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"server": {"trusted_proxies": ["10.0.0.1", bad]}}))
    with pytest.raises(settings_module.SettingsError, match=r"^server\.trusted_proxies\[1\]: "):
        settings_module.load(["--config", str(config)], {})


def test_a_bad_trusted_proxy_in_the_environment_is_refused() -> None:
    environ = {"STOX_TRUSTED_PROXIES": "10.0.0.1, proxy.internal"}
    with pytest.raises(settings_module.SettingsError, match=r"^server\.trusted_proxies\[1\]: "):
        settings_module.load([], environ)


# -- what handlers see ------------------------------------------------------------------------


async def test_without_trusted_proxies_forwarded_headers_change_nothing() -> None:
    async with serving([]) as port:
        assert await seen(port) == PEER
        for header in FORWARDED:
            assert await seen(port, header) == PEER
        assert await seen(port, *FORWARDED) == PEER
        assert await seen_by_socket(port, *FORWARDED) == PEER


async def test_a_peer_outside_the_trusted_networks_is_not_believed() -> None:
    async with serving(["10.0.0.0/8", "::1"]) as port:
        assert await seen(port, *FORWARDED) == PEER
        assert await seen_by_socket(port, *FORWARDED) == PEER


@pytest.mark.parametrize(
    ("headers", "ip"),
    [
        ([("X-Forwarded-For", "203.0.113.9")], "203.0.113.9"),
        ([("X-Real-Ip", "203.0.113.7")], "203.0.113.7"),
        ([("X-Forwarded-For", "2001:db8::5")], "2001:db8::5"),
        # walked from the right: what the client wrote itself comes first, and is passed over
        ([("X-Forwarded-For", "198.51.100.1, 203.0.113.9")], "203.0.113.9"),
        ([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9")], "203.0.113.9"),
        # nginx's $proxy_add_x_forwarded_for appends its peer to what the client sent: a
        # forged hop left of it counts for nothing, even one naming a trusted proxy
        ([("X-Forwarded-For", "203.0.113.5, 10.0.0.7, 198.51.100.2")], "198.51.100.2"),
        (
            [("X-Forwarded-For", "127.0.0.1, 198.51.100.2"), ("X-Real-Ip", "127.0.0.1")],
            "198.51.100.2",
        ),
        # trusted proxies in the chain are skipped; when every hop is one, the first counts
        ([("X-Forwarded-For", "203.0.113.9, 10.1.2.3")], "203.0.113.9"),
        ([("X-Forwarded-For", "10.0.0.1, 10.1.2.3")], "10.0.0.1"),
        # X-Forwarded-For goes before X-Real-Ip
        ([("X-Real-Ip", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9")], "203.0.113.9"),
        # what is not an address is not believed, nor anything left of it
        ([("X-Forwarded-For", "nonsense, 203.0.113.9")], "203.0.113.9"),
        ([("X-Forwarded-For", "203.0.113.9, nonsense")], "127.0.0.1"),
        ([("X-Forwarded-For", "")], "127.0.0.1"),
        ([("X-Real-Ip", "nonsense")], "127.0.0.1"),
    ],
)
async def test_a_trusted_proxy_s_forwarded_address_is_believed(
    headers: list[tuple[str, str]], ip: str
) -> None:
    async with serving(["127.0.0.1", "10.0.0.0/8"]) as port:
        assert (await seen(port, *headers))["ip"] == ip


@pytest.mark.parametrize(
    ("headers", "scheme"),
    [
        ([("X-Forwarded-Proto", "https")], "https"),
        ([("X-Scheme", "https")], "https"),
        ([("X-Forwarded-Proto", "http, https")], "https"),
        ([("X-Forwarded-Proto", "HTTPS")], "https"),
        ([("X-Forwarded-Proto", "gopher")], "http"),
        ([], "http"),
    ],
)
async def test_a_trusted_proxy_s_forwarded_scheme_is_believed(
    headers: list[tuple[str, str]], scheme: str
) -> None:
    async with serving(["127.0.0.0/8"]) as port:
        assert (await seen(port, *headers))["scheme"] == scheme


async def test_a_trusted_proxy_s_forwarded_address_reaches_the_websocket() -> None:
    async with serving(["127.0.0.1"]) as port:
        assert await seen_by_socket(port, *FORWARDED) == {"ip": "203.0.113.9", "scheme": "https"}


async def test_each_request_on_a_kept_alive_connection_is_taken_on_its_own() -> None:
    async with serving(["127.0.0.1"]) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            answers = []
            for extra in ("X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n", ""):
                writer.write(f"GET /peer HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                answers.append(json.loads(await reader.readexactly(length)))
        finally:
            writer.close()
            await writer.wait_closed()
    assert answers == [{"ip": "203.0.113.9", "scheme": "https"}, PEER]


# -- through the gateway: the login limiter ---------------------------------------------------


async def login(
    gw: RunningGateway,
    username: str,
    password: str,
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> int:
    """Log in from `source` (a local address to connect from; default 127.0.0.1)."""
    request = tornado.httpclient.HTTPRequest(
        gw.base_url + LOGIN,
        method="POST",
        body=json.dumps({"username": username, "password": password}),
        headers=headers,
        network_interface=source,
    )
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code


async def register(gw: RunningGateway, *names: str) -> None:
    for name in names:
        body = {"username": name, "password": PASSWORD}
        assert (await gw.fetch("POST", REGISTER, body)).status == 201


async def test_rotating_forwarded_addresses_do_not_escape_the_login_limit(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        await register(gw, "alice")
        for i in range(10):
            forged = {"X-Forwarded-For": f"10.0.{i}.1", "X-Real-Ip": f"10.1.{i}.1"}
            assert await login(gw, "alice", "wrong password", forged) == 401
        forged = {"X-Forwarded-For": "10.9.9.9", "X-Real-Ip": "10.9.9.9"}
        assert await login(gw, "alice", PASSWORD, forged) == 429


async def test_failures_spoofed_as_another_address_do_not_lock_it_out(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        await register(gw, "alice", "bob")
        spoofed = {"X-Forwarded-For": "127.0.0.2", "X-Real-Ip": "127.0.0.2"}
        for _ in range(10):
            assert await login(gw, "alice", "wrong password", spoofed) == 401
        # bob, really at 127.0.0.2, is not held to the failures sent in its name
        assert await login(gw, "bob", PASSWORD, source="127.0.0.2") == 200


@pytest.mark.parametrize(
    ("trusted", "address"), [([], "127.0.0.1"), (["127.0.0.1"], "203.0.113.9")]
)
async def test_the_login_limiter_counts_the_address_the_server_believes(
    tmp_path: Path, trusted: list[str], address: str
) -> None:
    async with running_gateway(tmp_path, server__trusted_proxies=trusted) as gw:
        await register(gw, "alice")
        auth = gw.gateway.auth
        addresses: list[str] = []
        real_login = auth.login

        async def spy(username: str, password: str, address: str) -> dict[str, Any]:
            addresses.append(address)
            return await real_login(username, password, address)

        auth.login = spy  # type: ignore[method-assign]
        forwarded = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
        assert await login(gw, "alice", "wrong password", forwarded) == 401
        assert await login(gw, "alice", PASSWORD, forwarded) == 200
    assert addresses == [address, address]
