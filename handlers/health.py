"""Liveness and readiness (store, bus and the AuthService)."""

from __future__ import annotations

from typing import cast

from handlers import responses
from handlers.base import BaseHandler
from handlers.openapi import operation
from stox.auth.client import AuthClient
from stox.bus.base import EventBus
from stox.store.base import WorkflowStore
from stox.version import commit, version


class HealthHandler(BaseHandler):
    @operation("Liveness", answers={200: ("the process serves", responses.HealthSchema())})
    async def get(self) -> None:
        self.write_json(200, {"status": "ok", "version": version(), "commit": commit()})


class ReadyHandler(BaseHandler):
    """Ready when the store answers, the bus is connected and the AuthService is serving."""

    @operation(
        "Readiness of the store, the bus and the AuthService",
        answers={
            200: ("ready", responses.ReadySchema()),
            503: ("not ready: which part is not", responses.ReadySchema()),
        },
    )
    async def get(self) -> None:
        store = cast(WorkflowStore, self.settings["store"])
        bus = cast(EventBus, self.settings["bus"])
        checks: dict[str, str] = {}
        try:
            await store.ping()
            checks["store"] = "ok"
        except Exception as exc:  # any failure means "not ready", whatever its kind
            checks["store"] = f"unavailable: {type(exc).__name__}"
        checks["bus"] = "ok" if bus.connected else "disconnected"
        auth = cast(AuthClient, self.settings["auth"])
        checks["auth"] = "ok" if await auth.check() else "unavailable"
        ready = all(value == "ok" for value in checks.values())
        self.write_json(
            200 if ready else 503, {"status": "ready" if ready else "unready", **checks}
        )


routes = [
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
]
