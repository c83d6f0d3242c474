"""Simulated image, AI and SEO services for `--demo-workers`.

They take dispatch events from the step queues, work a short random while, and report over
the bus (`step.completed`) exactly as a real service does, with a service token the gateway
issues them, so the demo exercises the same completion path. A small share of attempts
fail, so retries show on the dashboard.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Any

from settings import SettingsError
from stox import tracecontext
from stox.auth.tokens import SERVICE, CannotIssue, TokenAuthority
from stox.bus.base import Event, EventBus
from stox.logs import event_log_fields
from stox.workflow import isoformat

log = logging.getLogger(__name__)

STOP_WORDS = frozenset(
    ["a", "an", "and", "the", "of", "for", "with", "in", "on", "to", "by", "from", "is", "are"]
)


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS]


def _tags(product: dict[str, Any], limit: int = 6) -> list[str]:
    seen: list[str] = []
    for word in _words(
        f"{product.get('category', '')} {product['name']} {product.get('description', '')}"
    ):
        if len(word) > 2 and word not in seen:
            seen.append(word)
    return seen[:limit]


def process_images(workflow_id: str, product: dict[str, Any], _: dict[str, Any]) -> dict[str, Any]:
    images = product.get("images") or [f"{product['name']}.jpg"]
    processed = []
    for source in images:
        stem = PurePosixPath(source.split("?")[0]).stem or "image"
        base = f"processed/{workflow_id[:8]}/{stem}"
        processed.append(
            {
                "source": source,
                "processed": f"{base}_1200.webp",
                "thumbnail": f"{base}_300.webp",
                "width": 1200,
                "height": 1200,
            }
        )
    return {"images": processed, "count": len(processed)}


def enhance(workflow_id: str, product: dict[str, Any], _: dict[str, Any]) -> dict[str, Any]:
    name = product["name"].strip()
    category = product.get("category") or "product"
    original = (product.get("description") or "").strip()
    description = (
        f"{name}: {original.rstrip('.')}. " if original else f"Meet the {name}. "
    ) + f"Part of our {category.lower()} range, chosen for everyday quality and built to last."
    return {"description": description, "tags": _tags(product)}


def seo(workflow_id: str, product: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    name = product["name"].strip()
    category = product.get("category") or "Shop"
    # the copy of the last upstream step that has one: the AI's, or a review's approved edit
    copy: dict[str, Any] = {}
    for result in results.values():
        if isinstance(result, dict) and "description" in result:
            copy = result
    enhanced = copy.get("description") or product.get("description", "")
    keywords = copy.get("tags") or _tags(product)
    meta = enhanced if len(enhanced) <= 155 else enhanced[:152].rsplit(" ", 1)[0] + "..."
    slug = "-".join(_words(name)) or workflow_id[:8]
    return {
        "title": f"{name} | {category}"[:60],
        "meta_description": meta,
        "keywords": keywords,
        "slug": slug,
    }


WORKERS: dict[str, Callable[[str, dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "image_processing": process_images,
    "ai_enhancement": enhance,
    "seo_generation": seo,
}


class ServiceToken:
    """A service token issued by the gateway itself, renewed at half its lifetime."""

    def __init__(self, tokens: TokenAuthority, name: str) -> None:
        self.tokens = tokens
        self.name = name
        self._token = ""
        self._renew_at = 0.0

    def __call__(self) -> str:
        now = time.time()
        if now >= self._renew_at:
            self._token = self.tokens.issue(f"service:{self.name}", self.name, SERVICE)
            self._renew_at = now + self.tokens.expiry / 2
        return self._token


class DemoWorkers:
    """Consume the step `queues`; `service_token()` gives the token each report carries."""

    def __init__(
        self,
        bus: EventBus,
        queues: Sequence[str],
        *,
        service_token: Callable[[], str],
        min_delay: float = 0.3,
        max_delay: float = 1.5,
        failure_rate: float = 0.08,
        rng: random.Random | None = None,
    ) -> None:
        self.bus = bus
        self.queues = list(queues)
        self.service_token = service_token
        self.min_delay, self.max_delay = min_delay, max_delay
        self.failure_rate = failure_rate
        self.rng = rng or random.Random()

    async def start(self) -> None:
        try:
            self.service_token()  # a gateway that cannot issue tokens cannot run them
        except CannotIssue as exc:
            raise SettingsError(
                f"--demo-workers: they report with a service token this gateway cannot issue "
                f"({exc}); give it jwt.private_key_file"
            ) from None
        for queue in self.queues:
            await self.bus.consume(queue, self.handle)

    async def handle(self, event: Event) -> None:
        payload = event.payload
        step = payload["step_type"]
        await asyncio.sleep(self.rng.uniform(self.min_delay, self.max_delay))
        reply_key = payload["reply_to"]["routing_key"]
        report: dict[str, Any] = {
            "event": reply_key,
            "workflow_id": payload["workflow_id"],
            "occurred_at": isoformat(time.time()),
            "step_id": payload["step_id"],
            "step_type": step,
        }
        work = WORKERS.get(step)
        if work is None or self.rng.random() < self.failure_rate:
            reason = "no demo worker for this step" if work is None else "simulated outage"
            report.update(success=False, error=reason)
        else:
            report.update(
                success=True,
                result=work(payload["workflow_id"], payload["product"], payload["results"]),
            )
        await self.bus.publish(
            Event(
                routing_key=reply_key,
                payload=report,
                message_id=uuid.uuid4().hex,
                correlation_id=payload["workflow_id"],
                timestamp=time.time(),
                # with the dispatch's traceparent, the report's span joins the workflow's trace
                headers={
                    "authorization": f"Bearer {self.service_token()}",
                    **tracecontext.headers(payload),
                },
            )
        )
        log.debug(
            "demo %s reported %s for %s",
            step,
            report["success"],
            payload["workflow_id"],
            extra=event_log_fields(payload),
        )
