"""Webhook deliveries over HTTP: which events go where, the signature, the address policy.

What is delivered, when it is tried again and when it is given up are the domain's rules
(`stox.workflow.add_deliveries`, `delivery_attempted`): deliveries live in the workflow's
document, written with the transition that made their event, so a restart loses none. Here
is the I/O: the POST, signed as Stripe signs (`Stox-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<body>">`), with `Stox-Delivery: <id>` to deduplicate on (a delivery
may arrive twice: at least once, never lost), within `webhooks.timeout`.

Addresses: a delivery goes only to a host in `webhooks.allowed_hosts`, and a name is
resolved as it connects (no second lookup to rebind): an address that is loopback,
link-local, private or otherwise not global is refused unless it, or a network holding it,
is listed too.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import tornado.httpclient
import tornado.netutil

from settings import WebhookSettings
from stox.codec import dumps
from stox.workflow import Workflow

log = logging.getLogger(__name__)

CALLBACK_EVENTS = frozenset({"workflow.completed", "workflow.failed", "workflow.cancelled"})
SIGNATURE, DELIVERY = "Stox-Signature", "Stox-Delivery"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(OSError):
    """Every address the host resolves to is one the policy refuses."""


def signature(secret: str, body: bytes, at: int) -> str:
    """The Stox-Signature header's value for `body` sent at `at` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256)
    return f"t={at},v1={mac.hexdigest()}"


class AddressPolicy:
    """The hosts a delivery may name, and the addresses it may reach."""

    def __init__(self, allowed_hosts: list[str]) -> None:
        self.names = set()
        self.networks: list[Network] = []
        for host in allowed_hosts:
            try:
                self.networks.append(ipaddress.ip_network(host, strict=False))
            except ValueError:
                self.names.add(host.lower().rstrip("."))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        try:
            return self.address_listed(ipaddress.ip_address(host))
        except ValueError:
            return host in self.names

    def address_listed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)

    def address_allowed(self, address: str) -> bool:
        parsed = ipaddress.ip_address(address.split("%")[0])
        return parsed.is_global or self.address_listed(parsed)


class PolicyResolver(tornado.netutil.Resolver):
    """Resolves as the default resolver does, then drops the addresses the policy refuses."""

    def initialize(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self.inner = tornado.netutil.DefaultLoopResolver()

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        found = await self.inner.resolve(host, port, family)
        kept = [(fam, addr) for fam, addr in found if self.policy.address_allowed(addr[0])]
        if not kept:
            refused = ", ".join(sorted({addr[0] for _, addr in found}))
            raise AddressRefused(f"{host} resolves only to refused addresses ({refused})")
        return kept


class Webhooks:
    """The configured endpoints and callbacks: what each new event is delivered to, and the
    sending of one delivery."""

    def __init__(self, settings: WebhookSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.policy = AddressPolicy(settings.allowed_hosts)
        self.secrets = {endpoint.url: endpoint.secret for endpoint in settings.endpoints}
        self.client = tornado.httpclient.AsyncHTTPClient(
            force_instance=True, resolver=PolicyResolver(policy=self.policy)
        )

    @property
    def retry_for(self) -> float:
        return float(self.settings.retry_for)

    def callback_refusal(self, url: str) -> str | None:
        """Why an upload may not ask for deliveries to `url`; None when it may."""
        if not self.settings.callback_secret:
            return "this gateway takes no callback_url (webhooks.callback_secret)"
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError:
            return "expected an http:// or https:// URL"
        if parts.scheme not in ("http", "https") or not host:
            return "expected an http:// or https:// URL"
        if parts.username is not None or parts.password is not None:
            return "expected a URL without credentials"
        if not self.policy.host_allowed(host):
            return f"host {host!r} is not in webhooks.allowed_hosts"
        return None

    def targets(
        self, workflow: Workflow, entries: list[dict[str, Any]]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """(url, signer, outbox entry) of each delivery that new `entries` make."""
        found = []
        for entry in entries:
            event = entry["routing_key"]
            for endpoint in self.settings.endpoints:
                if event in endpoint.events:
                    found.append((endpoint.url, "endpoint", entry))
            if workflow.callback_url is not None and event in CALLBACK_EVENTS:
                found.append((workflow.callback_url, "callback", entry))
        return found

    async def send(self, delivery: dict[str, Any]) -> str | None:
        """POST one delivery; None when it was taken (2xx), else what went wrong."""
        secret = (
            self.settings.callback_secret
            if delivery["signer"] == "callback"
            else self.secrets.get(delivery["url"])
        )
        if not secret:
            return "its endpoint is no longer configured"
        if not self.policy.host_allowed(urllib.parse.urlsplit(delivery["url"]).hostname or ""):
            return "its host is no longer in webhooks.allowed_hosts"
        body = dumps(delivery["payload"])
        headers = {
            "Content-Type": "application/json",
            SIGNATURE: signature(secret, body, int(self.clock())),
            DELIVERY: delivery["id"],
            "User-Agent": "stox-webhooks",
        }
        timeout = float(self.settings.timeout)
        request = tornado.httpclient.HTTPRequest(
            delivery["url"],
            method="POST",
            body=body,
            headers=headers,
            connect_timeout=timeout,
            request_timeout=timeout,
            follow_redirects=False,
        )
        try:
            response = await self.client.fetch(request, raise_error=False)
        except AddressRefused as exc:
            return f"refused: {exc}"
        except tornado.httpclient.HTTPClientError as exc:  # 599: a timeout, a broken stream
            return f"no answer: {exc.message}"
        except OSError as exc:
            return f"could not connect: {exc}"
        if 200 <= response.code < 300:
            return None
        return f"answered {response.code}"

    def close(self) -> None:
        self.client.close()
