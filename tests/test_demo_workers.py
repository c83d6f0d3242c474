"""The demo workers: the pure result functions, and whole workflows run by them over the bus."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from support import RecordingBus, RunningGateway, running_gateway, write_key_pair

import settings as settings_module
from stox import workflow as w
from stox.auth.tokens import TokenAuthority, load_public_key
from stox.bus.base import Event
from stox.demo_workers import DemoWorkers, ServiceToken, enhance, process_images, seo

TIMEOUT = 10.0
FAST: dict[str, Any] = {"min_delay": 0.0, "max_delay": 0.01}
WORKFLOW_ID = "0123456789abcdef0123456789abcdef"


def demo_gateway(
    tmp_path: Path,
    configure: Callable[[settings_module.Settings], None] | None = None,
    **demo_worker_options: Any,
) -> AbstractAsyncContextManager[RunningGateway]:
    """A gateway on a free port running demo workers with the given options."""

    def with_demo_workers(settings: settings_module.Settings) -> None:
        settings.demo_workers = True
        if configure is not None:
            configure(settings)

    return running_gateway(
        tmp_path, with_demo_workers, {"demo_worker_options": demo_worker_options}
    )


async def wait_until_finished(gw: RunningGateway, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Poll the status endpoint until every workflow has left `running`."""
    return await gw.wait_finished(ids, TIMEOUT)


class Completions:
    """Records the completion reports the workers publish (`step.completed`)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def handle(self, event: Event) -> None:
        self.events.append(event)


# -- end to end ----------------------------------------------------------------------------


PRODUCTS = [
    {
        "name": "Brass Desk Lamp",
        "description": "A warm light for the study.",
        "images": ["https://img.example/a/lamp-front.jpg?w=800", "uploads/lamp_side.png"],
        "category": "Lighting",
    },
    {"name": "Walnut Cutting Board", "category": "Kitchen", "images": ["board.jpeg"]},
    {
        "name": "Wool Throw",
        "description": "Soft merino wool, woven in Wales. " * 12,  # a long one
        "images": [],
    },
]


async def test_demo_workers_complete_uploaded_workflows_over_the_bus(tmp_path: Path) -> None:
    async with demo_gateway(tmp_path, failure_rate=0.0, **FAST) as gw:
        completions = Completions()
        bus = gw.gateway.bus
        await bus.declare("probe.completions", ["step.completed"], exclusive=True)
        await bus.consume("probe.completions", completions.handle)

        token = gw.token()
        ids = [await gw.upload(token, **product) for product in PRODUCTS]
        docs = await wait_until_finished(gw, ids)

        # each step was reported once, over the bus, by a worker
        reported = sorted(
            (e.payload["workflow_id"], e.payload["step_type"]) for e in completions.events
        )
        assert reported == sorted((i, step) for i in ids for step in STEP_NAMES)
        assert all(e.payload["success"] is True for e in completions.events)

    for workflow_id, product in zip(ids, PRODUCTS, strict=True):
        doc = docs[workflow_id]
        assert doc["status"] == w.COMPLETED
        for step in doc["steps"]:
            assert step["status"] == w.COMPLETED
            assert [a["outcome"] for a in step["attempts"]] == [w.COMPLETED]
        results = {step["name"]: step["result"] for step in doc["steps"]}
        check_plausible(workflow_id, product, results)


STEP_NAMES = ("image_processing", "ai_enhancement", "seo_generation")


def check_plausible(workflow_id: str, product: dict[str, Any], results: dict[str, Any]) -> None:
    name = product["name"]
    images = results["image_processing"]
    sources = product["images"] or [f"{name}.jpg"]
    assert images["count"] == len(sources)
    assert [image["source"] for image in images["images"]] == sources
    for image, source in zip(images["images"], sources, strict=True):
        stem = source.split("?")[0].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        assert image["processed"] == f"processed/{workflow_id[:8]}/{stem}_1200.webp"
        assert image["thumbnail"] == f"processed/{workflow_id[:8]}/{stem}_300.webp"

    ai = results["ai_enhancement"]
    assert name in ai["description"]
    assert len(ai["description"]) > len(product.get("description", ""))  # enhanced, not copied
    assert ai["tags"]
    assert all(isinstance(tag, str) and tag for tag in ai["tags"])
    assert set(name.lower().split()) & set(ai["tags"])

    meta = results["seo_generation"]
    assert name in meta["title"]
    assert len(meta["title"]) <= 60
    assert 0 < len(meta["meta_description"]) <= 160
    assert meta["keywords"] == ai["tags"]
    assert meta["slug"] == "-".join(name.lower().split())


async def test_failing_workers_fail_the_workflow_after_max_attempts(tmp_path: Path) -> None:
    def configure(settings: settings_module.Settings) -> None:
        for step in settings.pipeline.steps:
            step.max_attempts = 2
            step.backoff = settings_module.Duration(0)

    async with demo_gateway(tmp_path, configure, failure_rate=1.0, **FAST) as gw:
        workflow_id = await gw.upload(gw.token(), name="Doomed Mug")
        docs = await wait_until_finished(gw, [workflow_id])

    doc = docs[workflow_id]
    assert doc["status"] == w.FAILED
    first, *rest = doc["steps"]
    assert first["status"] == w.FAILED
    assert first["attempt"] == 2
    assert first["error"] == "simulated outage"
    assert first["attempts"] == [
        {
            "step_id": record["step_id"],
            "attempt": n,
            "outcome": w.FAILED,
            "error": "simulated outage",
            "dispatched_at": record["dispatched_at"],
        }
        for n, record in enumerate(first["attempts"], start=1)
    ]
    assert len(first["attempts"]) == 2
    assert len({record["step_id"] for record in first["attempts"]}) == 2
    assert [step["status"] for step in rest] == [w.PENDING, w.PENDING]


# -- DemoWorkers.handle ----------------------------------------------------------------------


def dispatch_event(step: str, product: dict[str, Any] | None = None) -> Event:
    payload = {
        "event": f"step.{step}",
        "workflow_id": WORKFLOW_ID,
        "occurred_at": w.isoformat(0),
        "step_id": "f" * 32,
        "step_type": step,
        "attempt": 1,
        "deadline": w.isoformat(60),
        "product": product or {"name": "Mug", "images": ["mug.jpg"]},
        "results": {},
        "reply_to": {"http": "http://gw/x", "routing_key": "replies.here"},
    }
    return Event(f"step.{step}", payload, "m" * 32, WORKFLOW_ID)


def workers(bus: RecordingBus, failure_rate: float = 0.0) -> DemoWorkers:
    return DemoWorkers(
        bus,
        [f"q.{name}" for name in STEP_NAMES],
        service_token=lambda: "service-token",
        min_delay=0,
        max_delay=0,
        failure_rate=failure_rate,
        rng=random.Random(7),
    )


async def test_handle_reports_a_result_to_the_reply_routing_key() -> None:
    bus = RecordingBus()
    await workers(bus).handle(dispatch_event("image_processing"))

    (event,) = bus.events
    assert event.routing_key == "replies.here"
    assert event.correlation_id == WORKFLOW_ID
    report = event.payload
    assert report["event"] == "replies.here"
    assert report["workflow_id"] == WORKFLOW_ID
    assert report["step_id"] == "f" * 32
    assert report["step_type"] == "image_processing"
    assert report["success"] is True
    assert report["result"]["count"] == 1
    assert event.headers == {"authorization": "Bearer service-token"}


async def test_handle_reports_failures_and_unknown_steps() -> None:
    bus = RecordingBus()
    await workers(bus, failure_rate=1.0).handle(dispatch_event("ai_enhancement"))
    await workers(bus).handle(dispatch_event("translation"))

    outage, unknown = (e.payload for e in bus.events)
    assert outage["success"] is False
    assert outage["error"] == "simulated outage"
    assert "result" not in outage
    assert unknown["success"] is False
    assert unknown["error"] == "no demo worker for this step"


async def test_start_consumes_every_step_queue() -> None:
    consumed: list[str] = []

    class Bus(RecordingBus):
        async def consume(self, queue: str, handler: Any) -> None:
            consumed.append(queue)

    workers = DemoWorkers(Bus(), ["q.a", "q.b"], service_token=str)
    await workers.start()
    assert consumed == ["q.a", "q.b"]


async def test_a_gateway_that_cannot_issue_tokens_refuses_demo_workers(tmp_path: Path) -> None:
    _, public = write_key_pair(tmp_path, "EdDSA")
    verifier = TokenAuthority(
        algorithm="EdDSA", public_key=load_public_key(public.read_bytes(), "EdDSA")
    )
    workers = DemoWorkers(
        RecordingBus(),
        ["q.a"],
        service_token=ServiceToken(verifier, "demo-workers"),
    )
    with pytest.raises(settings_module.SettingsError, match=r"jwt\.private_key_file"):
        await workers.start()


def test_the_service_token_is_a_service_s_and_renewed_at_half_its_life() -> None:
    tokens = TokenAuthority("s" * 40, expiry=3600)
    token = ServiceToken(tokens, "demo-workers")
    first = token()
    assert token() == first  # cached
    principal = tokens.verify(first)
    assert (principal.role, principal.username) == ("service", "demo-workers")
    token._renew_at = 0.0  # half its life has passed
    assert token() != first


# -- the pure result functions -------------------------------------------------------------


def test_process_images_derives_names_from_the_sources() -> None:
    product = {
        "name": "Lamp",
        "images": ["https://cdn.example/p/front.view.JPG?size=large", "side.png", "/"],
    }
    result = process_images(WORKFLOW_ID, product, {})

    assert result["count"] == 3
    front, side, bare = result["images"]
    assert front == {
        "source": "https://cdn.example/p/front.view.JPG?size=large",
        "processed": "processed/01234567/front.view_1200.webp",
        "thumbnail": "processed/01234567/front.view_300.webp",
        "width": 1200,
        "height": 1200,
    }
    assert side["processed"] == "processed/01234567/side_1200.webp"
    assert bare["processed"] == "processed/01234567/image_1200.webp"  # no stem at all


def test_process_images_without_images_uses_the_product_name() -> None:
    result = process_images(WORKFLOW_ID, {"name": "Mug", "images": []}, {})
    assert result["count"] == 1
    assert result["images"][0]["source"] == "Mug.jpg"
    assert result["images"][0]["thumbnail"] == "processed/01234567/Mug_300.webp"
    assert process_images(WORKFLOW_ID, {"name": "Mug"}, {})["count"] == 1


def test_enhance_builds_on_the_original_description() -> None:
    product = {
        "name": "  Brass Lamp ",
        "description": "A lamp for the desk.",
        "category": "Lighting",
    }
    result = enhance(WORKFLOW_ID, product, {})
    assert result["description"] == (
        "Brass Lamp: A lamp for the desk. Part of our lighting range, chosen for everyday "
        "quality and built to last."
    )
    # category, then name, then description words; no stop words, nothing under 3 letters
    assert result["tags"] == ["lighting", "brass", "lamp", "desk"]


def test_enhance_without_description_or_category() -> None:
    result = enhance(WORKFLOW_ID, {"name": "Mug"}, {})
    assert result["description"].startswith("Meet the Mug. Part of our product range")
    assert result["tags"] == ["mug"]


def test_enhance_keeps_at_most_six_distinct_tags() -> None:
    product = {
        "name": "Red red RED mug",
        "description": "one two three four five six seven eight nine ten",
        "category": "",
    }
    tags = enhance(WORKFLOW_ID, product, {})["tags"]
    assert tags == ["red", "mug", "one", "two", "three", "four"]
    assert len(tags) == len(set(tags)) <= 6


def test_seo_uses_the_enhanced_description_and_tags() -> None:
    product = {"name": "Brass Lamp", "description": "plain", "category": "Lighting"}
    ai = {"description": "A fine brass lamp.", "tags": ["brass", "lamp"]}
    result = seo(WORKFLOW_ID, product, {"ai_enhancement": ai})
    assert result == {
        "title": "Brass Lamp | Lighting",
        "meta_description": "A fine brass lamp.",
        "keywords": ["brass", "lamp"],
        "slug": "brass-lamp",
    }


def test_seo_writes_from_the_copy_a_review_approved() -> None:
    """In the demo's apparel pipeline a review comes between the AI copy and SEO: its result
    (the copy as approved, edited or not) is the one SEO uses."""
    product = {"name": "Wool Scarf", "category": "Apparel"}
    ai = {"description": "A scarf.", "tags": ["scarf"]}
    approved = {"description": "A hand-knitted lambswool scarf.", "tags": ["scarf", "knit"]}
    results = {"image_processing": {"images": []}, "ai_enhancement": ai, "copy_review": approved}
    result = seo(WORKFLOW_ID, product, results)
    assert result["meta_description"] == "A hand-knitted lambswool scarf."
    assert result["keywords"] == ["scarf", "knit"]


def test_seo_without_earlier_results_falls_back_to_the_product() -> None:
    product = {"name": "Oak Shelf", "description": "A shelf of solid oak", "category": ""}
    result = seo(WORKFLOW_ID, product, {})
    assert result["title"] == "Oak Shelf | Shop"
    assert result["meta_description"] == "A shelf of solid oak"
    assert result["keywords"] == ["oak", "shelf", "solid"]


@pytest.mark.parametrize("length", [0, 1, 150, 155, 156, 160, 161, 500, 5000])
def test_seo_meta_description_fits_in_160_characters(length: int) -> None:
    words = ("lorem ipsum dolor sit amet " * 300)[:length]
    result = seo(WORKFLOW_ID, {"name": "X"}, {"ai_enhancement": {"description": words}})
    meta = result["meta_description"]
    assert len(meta) <= 160
    if length <= 155:
        assert meta == words
    else:
        assert meta.endswith("...")
        assert words.startswith(meta[:-3])


def test_seo_meta_description_without_spaces_is_cut_too() -> None:
    text = "x" * 400
    meta = seo(WORKFLOW_ID, {"name": "X"}, {"ai_enhancement": {"description": text}})
    assert meta["meta_description"] == "x" * 152 + "..."


def test_seo_title_is_at_most_60_characters_and_slug_falls_back_to_the_id() -> None:
    result = seo(WORKFLOW_ID, {"name": "!!! " + "é" * 80, "category": "Misc"}, {})
    assert len(result["title"]) == 60
    assert result["slug"] == WORKFLOW_ID[:8]
