"""The detail view's history timeline and webhook delivery log (issue 15, items 1 and 2), in
Chromium.

Reuses tests/test_dashboard.py's browser and page fixtures and tests/test_webhooks.py's local
receiver. No workers run: the tests drive each workflow through the API, so what the page
shows is what they made, and each change reaches the page over the WebSocket.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import test_dashboard
from support import Clock, RunningGateway, eventually, running_gateway
from test_dashboard import _reports, dashboard, expect, live
from test_dashboard_pipelines import complete, with_pipelines
from test_webhooks import hooks, receiving

import settings as settings_module
from settings import StepSettings
from stox.auth.tokens import REVIEWER

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page, Route

# test_dashboard.py's fixtures, the same here
chromium = test_dashboard.chromium
browser = test_dashboard.browser
pytestmark = test_dashboard.pytestmark


def two_attempts(settings: settings_module.Settings) -> None:
    for step in settings.pipeline.steps:
        step.max_attempts = 2
        step.backoff = settings_module.Duration(5)


def history_requests(page: Page) -> list[str]:
    """The page's GET /api/v1/workflow/history from now on."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if "/workflow/history?" in r.url else None)
    return seen


async def entries(timeline: Locator) -> list[tuple[str, str]]:
    """Each entry's description and who caused it, oldest first."""
    items = timeline.locator("li.timeline-entry")
    shown = []
    for i in range(await items.count()):
        item = items.nth(i)
        assert await item.locator("time").get_attribute("datetime")
        shown.append(
            (
                await item.locator(".timeline-text").inner_text(),
                await item.locator(".timeline-by").inner_text(),
            )
        )
    return shown


async def expect_last(timeline: Locator, text: str, by: str) -> None:
    last = timeline.locator("li.timeline-entry").last
    await expect(last.locator(".timeline-text")).to_have_text(text)
    await expect(last.locator(".timeline-by")).to_have_text(by)


async def retry(gw: RunningGateway, workflow_id: str) -> None:
    answer = await gw.fetch(
        "POST", "/api/v1/workflow/retry", {"workflow_id": workflow_id}, token=gw.token("alice")
    )
    assert answer.status == 200, answer.body


FAILED = [
    ("Workflow started", "by alice"),
    ("Image processing dispatched", "by alice"),
    ("Image processing completed", "by service demo"),
    ("AI enhancement dispatched", "by service demo"),
    (
        "AI enhancement failed (attempt 1): model timed out; it will be tried again",
        "by service demo",
    ),
    ("AI enhancement dispatched (attempt 2)", "by the sweeper"),
    ("AI enhancement failed (attempt 2): quota exceeded", "by service demo"),
    ("Workflow failed", "by service demo"),
]


async def test_the_timeline_says_who_did_what_and_grows_live(
    browser: Browser, tmp_path: Path
) -> None:
    clock = Clock(time.time())
    async with (
        running_gateway(tmp_path, two_attempts, {"clock": clock}) as gw,
        dashboard(browser, gw) as board,
    ):
        page = board.page
        await live(board)
        report = _reports(gw)
        workflow_id = await gw.upload(gw.token("alice"), name="Brass Desk Lamp")
        await report(workflow_id)
        await report(workflow_id, fail="model timed out")
        clock.advance(6)  # past the backoff: the sweeper dispatches the second attempt
        await gw.gateway.orchestrator.sweep()
        await eventually(lambda: gw_attempt(gw, workflow_id, 2))
        await report(workflow_id, fail="quota exceeded")
        await expect(board.row(workflow_id)).to_have_attribute("data-status", "failed")

        asked = history_requests(page)
        detail = await board.open_detail(workflow_id)
        timeline = detail.get_by_role("region", name="History")
        listed = timeline.get_by_role("list", name="What happened, oldest first")

        await expect(listed.get_by_role("listitem")).to_have_count(len(FAILED))
        assert await entries(timeline) == FAILED
        await expect(timeline.locator(".timeline-body")).not_to_contain_text("null")
        await expect(timeline.locator(".timeline-dropped")).to_have_count(0)
        await expect(detail.get_by_role("region", name="Webhook deliveries")).to_be_hidden()

        # fetched once on opening, then only when the workflow changes: no polling
        await asyncio.sleep(1.2)
        assert len(asked) == 1, asked

        # each change arrives on the WebSocket, and the timeline follows it
        await retry(gw, workflow_id)
        await expect(listed.get_by_role("listitem")).to_have_count(len(FAILED) + 1)
        await expect_last(timeline, "AI enhancement dispatched again", "by alice")
        await report(workflow_id)
        await report(workflow_id)
        await expect(board.row(workflow_id)).to_have_attribute("data-status", "completed")
        await expect(listed.get_by_role("listitem")).to_have_count(len(FAILED) + 5)
        assert await entries(timeline) == [
            *FAILED,
            ("AI enhancement dispatched again", "by alice"),
            ("AI enhancement completed", "by service demo"),
            ("SEO generation dispatched", "by service demo"),
            ("SEO generation completed", "by service demo"),
            ("Workflow completed", "by service demo"),
        ]
        assert 2 <= len(asked) <= 5, asked  # once per change at most, bursts merged

        # closed and opened again: asked again
        await page.keyboard.press("Escape")
        await expect(page.locator("#detail")).to_be_hidden()
        before = len(asked)
        detail = await board.open_detail(workflow_id)
        await expect(listed.get_by_role("listitem")).to_have_count(len(FAILED) + 5)
        assert len(asked) == before + 1


async def test_older_entries_are_counted_and_a_reviewer_is_told_quietly(
    browser: Browser, tmp_path: Path
) -> None:
    async with running_gateway(tmp_path, storage__history_limit=3) as gw:
        workflow_id = await gw.upload(gw.token("alice"), name="Oak Wall Shelf")
        await _reports(gw)(workflow_id)  # 4 entries: the oldest is dropped

        async with dashboard(browser, gw) as board:
            await live(board)
            detail = await board.open_detail(workflow_id)
            timeline = detail.get_by_role("region", name="History")
            await expect(timeline.locator(".timeline-dropped")).to_have_text(
                "1 older entry not shown."
            )
            assert await entries(timeline) == [
                ("Image processing dispatched", "by alice"),
                ("Image processing completed", "by service demo"),
                ("AI enhancement dispatched", "by service demo"),
            ]

        # a reviewer sees everyone's workflows, but the history is the owner's and admins'
        token = gw.token("rita", REVIEWER)
        async with dashboard(browser, gw, user="rita", token=token) as board:
            await live(board)
            detail = await board.open_detail(workflow_id)
            timeline = detail.get_by_role("region", name="History")
            await expect(timeline).to_contain_text(
                "The history of this workflow is only shown to its owner and to admins."
            )
            await expect(timeline).to_have_attribute("data-state", "forbidden")
            await expect(timeline.locator(".step-error")).to_have_count(0)
            await expect(timeline.locator("li")).to_have_count(0)
            await expect(detail.get_by_role("region", name="Webhook deliveries")).to_be_hidden()


async def test_the_delivery_log_shows_each_attempt_live(browser: Browser, tmp_path: Path) -> None:
    clock = Clock(time.time())
    async with (
        receiving() as receiver,
        running_gateway(tmp_path, hooks(receiver), {"clock": clock}) as gw,
        dashboard(browser, gw) as board,
    ):
        await live(board)
        receiver.answers = [500]
        report = _reports(gw)
        workflow_id = await gw.upload(gw.token("alice"), name="Linen Apron")
        detail = await board.open_detail(workflow_id)
        log = detail.get_by_role("region", name="Webhook deliveries")
        for _ in range(3):
            await report(workflow_id)
        await expect(board.row(workflow_id)).to_have_attribute("data-status", "completed")

        # the first attempt was refused: pending, with the error and the next try
        delivery = log.get_by_role("listitem")
        await expect(delivery).to_have_count(1)
        await expect(delivery).to_have_attribute("data-status", "pending")
        await expect(delivery.locator(".delivery-head")).to_have_text(
            f"workflow.completed to {receiver.url}"
        )
        facts = delivery.locator(".delivery-facts")
        await expect(facts.locator("dt")).to_have_text(
            ["Status", "Attempts", "Last error", "Next try"]
        )
        await expect(facts.locator("dd").nth(0)).to_have_text("Pending")
        await expect(facts.locator("dd").nth(1)).to_have_text("1")
        await expect(facts.locator("dd").nth(2)).to_have_text("answered 500")
        await expect(facts.locator("dd").nth(3).locator("time")).to_have_attribute(
            "datetime", (await gw_delivery(gw, workflow_id))["next_at"]
        )
        timeline = detail.get_by_role("region", name="History")
        await expect_last(
            timeline,
            f"Webhook to {receiver.url} not taken: answered 500; it will be tried again",
            "by the webhook relay",
        )

        # 10 s later the sweeper sends it again, and it is taken: the log follows
        clock.advance(11)
        await gw.gateway.orchestrator.sweep()
        await expect(delivery).to_have_attribute("data-status", "delivered")
        await expect(facts.locator("dt")).to_have_text(["Status", "Attempts", "Delivered"])
        await expect(facts.locator("dd").nth(0)).to_have_text("Delivered")
        await expect(facts.locator("dd").nth(1)).to_have_text("2")
        await expect_last(timeline, f"Webhook to {receiver.url} delivered", "by the webhook relay")
        assert len(receiver.received) == 2
        for section in (timeline, log):
            await expect(section).not_to_contain_text("null")
            await expect(section).not_to_contain_text("undefined")


async def gw_attempt(gw: RunningGateway, workflow_id: str, attempt: int) -> bool:
    doc = await gw.status(workflow_id)
    step = doc["steps"][doc["current_step"]]
    return bool(step["status"] == "dispatched" and step["attempt"] == attempt)


async def gw_delivery(gw: RunningGateway, workflow_id: str) -> dict[str, str]:
    answer = await gw.fetch(
        "GET", f"/api/v1/workflow/deliveries?workflow_id={workflow_id}", token=gw.token("alice")
    )
    assert answer.status == 200, answer.body
    [delivery] = answer.body["deliveries"]
    return dict(delivery)


async def decide(gw: RunningGateway, workflow_id: str, decision: str, **more: str) -> None:
    review = next(s for s in (await gw.status(workflow_id))["steps"] if s["name"] == "copy_review")
    assert review["status"] == "waiting", review
    body = {"workflow_id": workflow_id, "step_id": review["step_id"], "decision": decision}
    answer = await gw.fetch(
        "POST", "/api/v1/workflow/review", {**body, **more}, token=gw.token("rita", REVIEWER)
    )
    assert answer.status == 200, answer.body


async def test_the_timeline_says_who_approved_and_who_rejected(
    browser: Browser, tmp_path: Path
) -> None:
    steps = [
        StepSettings("image_processing"),
        StepSettings("ai_enhancement"),
        StepSettings(
            "copy_review",
            kind="review",
            after=["image_processing", "ai_enhancement"],
            on_reject="ai_enhancement",
        ),
    ]
    async with (
        running_gateway(tmp_path, with_pipelines(apparel=steps)) as gw,
        dashboard(browser, gw) as board,
    ):
        await live(board)
        workflow_id = await gw.upload(gw.token("alice"), name="Wool Scarf", pipeline="apparel")
        await complete(gw, workflow_id, "image_processing")
        await complete(gw, workflow_id, "ai_enhancement")
        detail = await board.open_detail(workflow_id)
        timeline = detail.get_by_role("region", name="History")
        await expect_last(timeline, "Copy review waiting for review", "by service demo")

        await decide(gw, workflow_id, "reject", reason="too long")
        await expect(timeline.locator("li.timeline-entry")).to_have_count(8)
        await complete(gw, workflow_id, "ai_enhancement")
        await decide(gw, workflow_id, "approve")
        await expect(board.row(workflow_id)).to_have_attribute("data-status", "completed")
        await expect_last(timeline, "Workflow completed", "by rita")
        shown = await entries(timeline)
        assert ("Rejected by rita (Copy review): too long", "by rita") in shown, shown
        assert ("AI enhancement dispatched again", "by rita") in shown, shown
        assert shown[-2] == ("Approved by rita (Copy review)", "by rita"), shown


async def test_another_workflow_opened_while_the_first_is_asked_about_shows_its_own(
    browser: Browser, tmp_path: Path
) -> None:
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw) as board:
        page = board.page
        await live(board)
        slow = await gw.upload(gw.token("alice"), name="Slow Lamp")
        other = await gw.upload(gw.token("alice"), name="Quick Mug")
        await _reports(gw)(other)

        async def held(route: Route) -> None:
            await asyncio.sleep(1)
            await route.continue_()

        await page.route(f"**/workflow/history?workflow_id={slow}", held)
        await board.open_detail(slow)
        await page.evaluate("id => { location.hash = `#/workflow/${id}`; }", other)
        timeline = page.locator(f'#detail[data-workflow-id="{other}"]').get_by_role(
            "region", name="History"
        )
        await expect(timeline.locator("li.timeline-entry")).to_have_count(4)
        await asyncio.sleep(1.2)  # the first answer came meanwhile: not shown
        await expect(timeline.locator("li.timeline-entry")).to_have_count(4)
        await expect_last(timeline, "AI enhancement dispatched", "by service demo")
