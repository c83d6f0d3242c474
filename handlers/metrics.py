"""GET /metrics (Prometheus), and the request durations it reports.

Served on the API's port by default, or by a server of its own (`metrics.listen`); with
`metrics.token` set, a scrape must send `Authorization: Bearer <token>` (compared in constant
time). README's *Metrics* lists the families.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any, cast

import tornado.httpserver
import tornado.routing
import tornado.web

from handlers.base import BaseHandler, NotFoundHandler, unauthorized
from handlers.openapi import operation
from settings import Settings
from stox.auth import bearer
from stox.metrics import CONTENT_TYPE, Metrics

UNMATCHED = "unmatched"  # the route label of a request no route matched (the 404 handler's)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsHandler(BaseHandler):
    @operation(
        "Prometheus metrics",
        description=(
            "The text exposition format. Served here when `metrics.listen` is empty; with "
            "`metrics.token` set, send `Authorization: Bearer <metrics.token>` (not a JWT)."
        ),
        answers={200: ("the metric families", {"type": "string"})},
        errors={401: "`unauthorized`: `metrics.token` is set and was not sent"},
        media_type=CONTENT_TYPE,
    )
    async def get(self) -> None:
        expected = cast(str, self.settings["metrics_token"])
        if expected:
            sent = bearer.from_authorization(self.request.headers.get("Authorization")) or ""
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                raise unauthorized()
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(cast(Metrics, self.settings["metrics"]).render())


routes = [(r"/metrics", MetricsHandler)]


def on_api_port(settings: Settings) -> bool:
    """Whether the API's application serves /metrics."""
    return settings.metrics.enabled and not settings.metrics.listen


def request_timer(
    metrics: Metrics, rules: Iterable[tornado.routing.Rule]
) -> Callable[[tornado.web.RequestHandler], None]:
    """A log_function's part that times each request into
    `stox_http_request_duration_seconds`: by the route's name, or its pattern (never the
    path; a handler of several routes, Tornado's static files: its class's name), the method
    (another: "OTHER") and the status class. Children are kept by (handler class, method,
    status class)."""
    patterns: dict[Any, list[str]] = {}
    for rule in rules:
        if isinstance(rule.matcher, tornado.routing.PathMatches):
            pattern = rule.matcher.regex.pattern.removesuffix("$")
            patterns.setdefault(rule.target, []).append(rule.name or pattern)
    routes: dict[Any, str] = {
        target: found[0] if len(found) == 1 else getattr(target, "__name__", str(target))
        for target, found in patterns.items()
    }
    routes[NotFoundHandler] = UNMATCHED
    histogram = metrics.http_request_duration
    children: dict[tuple[Any, str, int], Any] = {}

    def observe(handler: tornado.web.RequestHandler) -> None:
        request = handler.request
        key = (type(handler), request.method or "", handler.get_status() // 100)
        child = children.get(key)
        if child is None:
            cls, method, status = key
            route = routes.get(cls, UNMATCHED)
            method = method if method in METHODS else "OTHER"
            child = children[key] = histogram.labels(route, method, f"{status}xx")
        child.observe(request.request_time())

    return observe


def metrics_server(metrics: Metrics, settings: Settings) -> tornado.httpserver.HTTPServer | None:
    """The server of /metrics alone at `metrics.listen` (a port alone: on `server.host`),
    listening; None when they are served on the API's port (or not at all)."""
    address = settings.metrics.address
    if not settings.metrics.enabled or address is None:
        return None
    host, port = address
    app = tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        metrics=metrics,
        metrics_token=settings.metrics.token,
        max_body_size=settings.server.max_body_size,
        max_drain_size=settings.server.max_drain_size,
    )
    server = tornado.httpserver.HTTPServer(
        app,
        idle_connection_timeout=settings.server.idle_timeout,
        body_timeout=settings.server.body_timeout,
    )
    server.listen(port, host or settings.server.host)
    return server
