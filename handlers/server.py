"""The gateway's HTTP server: whose forwarded client addresses it believes, its body limit,
how long a client may take to send a request.

`X-Forwarded-For` (or `X-Real-Ip`) and `X-Forwarded-Proto` (or `X-Scheme`) are believed from
the proxies of `server.trusted_proxies` only. For a request from one of them, the client is
the rightmost X-Forwarded-For entry that is not itself a trusted proxy (the entries left of it
were written by the client and prove nothing), and the scheme is the last X-Forwarded-Proto
value. From anyone else those headers are ignored. Every handler, the WebSocket's included,
sees the result as `request.remote_ip` and `request.protocol`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Iterable
from typing import Protocol, cast

import tornado.httpserver
import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection

from settings import ServerSettings
from stox.logs import redact_tornado_logs

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def make_http_server(
    app: tornado.web.Application, server: ServerSettings
) -> tornado.httpserver.HTTPServer:
    """The server for `app`; Tornado's loggers get their redaction filter too."""
    redact_tornado_logs()
    trusted = TrustedProxies(server.trusted_proxies)
    callback = ForwardedByTrustedProxies(app, trusted) if trusted else app
    # the handlers lift this limit for their own requests and enforce server.max_body_size
    # and server.max_drain_size themselves (handlers.base.BoundedBody); it bounds any other
    return tornado.httpserver.HTTPServer(
        callback,
        max_body_size=server.max_drain_size,
        idle_connection_timeout=server.idle_timeout,  # Tornado's bound on reading headers
        body_timeout=server.body_timeout,
    )


def parse_address(text: str) -> Address | None:
    """An IP address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(network, strict=False) for network in networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client(self, proxy: Address, headers: httputil.HTTPHeaders) -> str:
        """The client a trusted `proxy` forwards for: walk X-Forwarded-For from the right."""
        hops = [
            hop.strip()
            for line in headers.get_list("X-Forwarded-For")
            for hop in line.split(",")
            if hop.strip()
        ]
        if not hops:
            real = parse_address(headers.get("X-Real-Ip", ""))
            return str(proxy if real is None else real)
        client = proxy
        for hop in reversed(hops):
            address = parse_address(hop)
            if client not in self or address is None:
                break
            client = address
        return str(client)


def forwarded_scheme(headers: httputil.HTTPHeaders) -> str | None:
    value = headers.get("X-Forwarded-Proto") or headers.get("X-Scheme") or ""
    scheme = value.split(",")[-1].strip().lower()
    return scheme if scheme in ("http", "https") else None


class _Peer(Protocol):
    """What HTTPServerRequest copies from its connection's context (Tornado's own xheaders
    rewrite the same two attributes)."""

    remote_ip: str
    protocol: str


class ForwardedByTrustedProxies(httputil.HTTPServerConnectionDelegate):
    """Wraps the application: a trusted proxy's requests get its client's address and scheme."""

    def __init__(self, app: httputil.HTTPServerConnectionDelegate, trusted: TrustedProxies) -> None:
        self.app = app
        self.trusted = trusted

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        delegate = self.app.start_request(server_conn, request_conn)
        if not isinstance(request_conn, HTTP1Connection):
            return delegate
        peer = cast(_Peer, request_conn.context)
        proxy = parse_address(peer.remote_ip)
        if proxy is None or proxy not in self.trusted:
            return delegate
        return _Forwarded(delegate, peer, proxy, self.trusted)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


class _Forwarded(httputil.HTTPMessageDelegate):
    """One request from a trusted proxy: the peer reads as the client while it is received."""

    def __init__(
        self,
        delegate: httputil.HTTPMessageDelegate,
        peer: _Peer,
        proxy: Address,
        trusted: TrustedProxies,
    ) -> None:
        self.delegate = delegate
        self.peer = peer
        self.proxy = proxy
        self.trusted = trusted
        self.original = (peer.remote_ip, peer.protocol)

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        self.peer.remote_ip = self.trusted.client(self.proxy, headers)
        self.peer.protocol = forwarded_scheme(headers) or self.peer.protocol
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        try:
            self.delegate.finish()
        finally:
            self._restore()

    def on_connection_close(self) -> None:
        try:
            self.delegate.on_connection_close()
        finally:
            self._restore()

    def _restore(self) -> None:
        """The next request on the connection starts from the peer again."""
        self.peer.remote_ip, self.peer.protocol = self.original
