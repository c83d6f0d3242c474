"""Tornado handlers; each module exports `routes`, joined in `handlers.routes`.

`make_app` builds the tornado.web.Application that serves them for a started Gateway;
`completion_path` is where services report, the path of the route named STEP_COMPLETED.
"""

from __future__ import annotations

import functools
from typing import Any

import tornado.httpserver
import tornado.routing
import tornado.web

from handlers import auth, health, metrics, openapi, pipelines, static, stats, workflow, ws
from handlers.base import NotFoundHandler
from handlers.workflow import STEP_COMPLETED
from stox.app import Gateway
from stox.codec import dumps
from stox.logs import log_request

routes: list[Any] = [
    *auth.routes,
    *health.routes,
    *workflow.routes,
    *pipelines.routes,
    *stats.routes,
    *ws.routes,
    *openapi.routes,
    *metrics.routes,  # on the API's port unless metrics.listen moves it (or it is off)
    *static.routes,  # `/`; `/static/…` comes from its app_settings
]


def path_of(name: str) -> str:
    """The path of the route named `name` (one without arguments): what the application's
    `reverse_url(name)` answers, known before there is an application."""
    for route in routes:
        if isinstance(route, tornado.routing.URLSpec) and route.name == name:
            path = route.reverse()
            assert path is not None  # a route without arguments reverses to its path
            return path
    raise KeyError(f"no route named {name!r}")


def completion_path() -> str:
    """The path services report step completions to (the dispatches' `reply_to.http`)."""
    return path_of(STEP_COMPLETED)


def served(with_metrics: bool) -> list[Any]:
    """The routes of the API's application: `routes`, /metrics only `with_metrics`."""
    return routes if with_metrics else [r for r in routes if r not in metrics.routes]


@functools.cache
def openapi_document(with_metrics: bool = True) -> bytes:
    """The OpenAPI document of the routes served (`served`), built and encoded once."""
    return dumps(openapi.build(served(with_metrics)))


def make_app(gateway: Gateway) -> tornado.web.Application:
    """The application serving `routes` with the gateway's parts (read back by the handlers'
    typed properties)."""
    settings = gateway.settings
    with_metrics = gateway.metrics is not None and metrics.on_api_port(settings)
    app = tornado.web.Application(
        served(with_metrics),
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        **static.app_settings(static.STATIC_DIR),
        orchestrator=gateway.orchestrator,
        tokens=gateway.tokens,
        auth=gateway.auth,
        store=gateway.store,
        bus=gateway.bus,
        hub=gateway.hub,
        uploads=gateway.uploads,
        openapi=openapi_document(with_metrics),
        metrics=gateway.metrics,
        metrics_token=settings.metrics.token,
        max_body_size=settings.server.max_body_size,
        max_drain_size=settings.server.max_drain_size,
        allowed_origins=settings.allowed_origins,
        websocket_send_buffer=settings.websocket.kernel_send_buffer,
        websocket_ping_interval=settings.websocket.ping_interval,
        websocket_ping_timeout=settings.websocket.ping_timeout,
    )
    if gateway.metrics is not None:  # set here: the routes, static ones too, are known now
        timed = metrics.request_timer(gateway.metrics, app.wildcard_router.rules)

        def log_function(handler: tornado.web.RequestHandler) -> None:
            timed(handler)
            log_request(handler)

        app.settings["log_function"] = log_function
    return app


def metrics_server(gateway: Gateway) -> tornado.httpserver.HTTPServer | None:
    """The metrics' own server, listening, when `metrics.listen` asks for one."""
    if gateway.metrics is None:
        return None
    return metrics.metrics_server(gateway.metrics, gateway.settings)
