"""The dashboard on pipelines with parallel branches and review steps (issue 14), in Chromium.

Reuses tests/test_dashboard.py's browser and page fixtures. The services' reports are driven
from the test (with what the demo workers would make), so each state is seen for as long as
the test looks at it; the review test uses the demo workers themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import test_dashboard
from support import RunningGateway, report, running_gateway
from test_dashboard import dashboard, demo_workers, expect, live, upload_via_form

import settings as settings_module
from settings import PipelineSettings, StepSettings
from stox.demo_workers import WORKERS

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator

# test_dashboard.py's fixtures, the same here
chromium = test_dashboard.chromium
browser = test_dashboard.browser
pytestmark = test_dashboard.pytestmark

REVIEW_PATH = "/api/v1/workflow/review"


def with_pipelines(**pipelines: list[StepSettings]) -> Any:
    def configure(settings: settings_module.Settings) -> None:
        settings.pipelines = {name: PipelineSettings(steps) for name, steps in pipelines.items()}

    return configure


def fork_join() -> list[StepSettings]:
    """image_processing ∥ ai_enhancement, then seo_generation."""
    return [
        StepSettings("image_processing"),
        StepSettings("ai_enhancement"),
        StepSettings("seo_generation", after=["image_processing", "ai_enhancement"]),
    ]


async def complete(gw: RunningGateway, workflow_id: str, name: str) -> None:
    """Report step `name` done, with what the demo worker would have made of it."""
    doc = await gw.status(workflow_id)
    step = next(s for s in doc["steps"] if s["name"] == name)
    assert step["status"] == "dispatched", step
    results = {s["name"]: s["result"] for s in doc["steps"] if s["result"] is not None}
    result = WORKERS[name](workflow_id, doc["product"], results)
    answer = await report(gw, workflow_id, step, result=result, token=gw.service_token("demo"))
    assert answer.status == 200, answer.body


async def states(scope: Locator, selector: str) -> dict[str, str]:
    found = await scope.locator(selector).evaluate_all(
        "els => els.map(e => [e.dataset.step, e.dataset.state])"
    )
    return dict(found)


async def test_parallel_branches_run_side_by_side_and_join(
    browser: Browser, tmp_path: Path
) -> None:
    async with (
        running_gateway(tmp_path, with_pipelines(fork=fork_join())) as gw,
        dashboard(browser, gw) as board,
    ):
        page = board.page
        await live(board)
        pipeline = page.get_by_label("Pipeline", exact=True)
        await expect(pipeline).to_have_value("default")  # the default preselected
        options = await pipeline.locator("option").evaluate_all("os => os.map(o => o.value)")
        assert options == ["default", "fork"]
        await pipeline.select_option("fork")
        await expect(page.locator("#product-pipeline-hint")).to_have_text(
            "Image processing and AI enhancement at once, then SEO generation"
        )
        await upload_via_form(page, name="Linen Shirt", category="Apparel")
        await expect(board.rows).to_have_count(1)
        await expect(pipeline).to_have_value("default")  # the form is reset for the next
        row = board.rows.first
        workflow_id = await row.get_attribute("data-workflow-id")
        assert workflow_id
        doc = await gw.status(workflow_id)
        version = doc["pipeline"]["version"]
        assert doc["pipeline"]["name"] == "fork"
        await expect(row.locator(".wf-meta")).to_contain_text(f"fork · v{version}")

        # both branches at once: in the row, one stage of two; in the detail, side by side
        chip_states = 'li.step[data-state="running"]'
        await expect(row.locator(chip_states)).to_have_count(2)
        stage = row.locator("li.step-stage")
        await expect(stage.locator("li.step")).to_have_count(2)
        detail = await board.open_detail(workflow_id)
        await expect(detail).to_contain_text(f"fork · v{version}")
        first = detail.locator('li.stage[data-stage="1"]')
        await expect(first).to_have_attribute("data-parallel", "true")
        cards = first.locator("li.step-card")
        await expect(cards).to_have_count(2)
        assert await states(first, "li.step-card") == {
            "image_processing": "running",
            "ai_enhancement": "running",
        }
        boxes = [await cards.nth(i).bounding_box() for i in range(2)]
        assert boxes[0] and boxes[1]
        assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2 and boxes[1]["x"] > boxes[0]["x"], boxes
        join = detail.locator('li.stage[data-stage="2"] li.step-card')
        await expect(join).to_have_attribute("data-step", "seo_generation")
        await expect(join).to_have_attribute("data-state", "pending")
        await expect(join.locator(".step-after")).to_have_text(
            "after Image processing and AI enhancement"
        )

        # one branch done: the join still waits for the other
        await complete(gw, workflow_id, "image_processing")
        done = first.locator('li.step-card[data-step="image_processing"]')
        await expect(done).to_have_attribute("data-state", "completed")
        await expect(first.locator('[data-step="ai_enhancement"]')).to_have_attribute(
            "data-state", "running"
        )
        await expect(join).to_have_attribute("data-state", "pending")
        assert (await gw.status(workflow_id))["steps"][2]["status"] == "pending"

        await complete(gw, workflow_id, "ai_enhancement")
        await expect(join).to_have_attribute("data-state", "running")
        await complete(gw, workflow_id, "seo_generation")
        await expect(row).to_have_attribute("data-status", "completed")
        await expect(join).to_contain_text("Linen Shirt | Apparel")  # the SEO title
        await expect(row.locator('li.step[data-state="completed"]')).to_have_count(3)


async def test_the_owner_edits_the_seo_title_and_approves(browser: Browser, tmp_path: Path) -> None:
    steps = [*fork_join(), StepSettings("copy_review", kind="review", after=["seo_generation"])]
    options = demo_workers(
        configure=with_pipelines(apparel=steps), failure_rate=0.0, min_delay=0.05, max_delay=0.1
    )
    async with running_gateway(tmp_path, **options) as gw, dashboard(browser, gw) as board:
        page = board.page
        await live(board)
        token = gw.token("alice")
        waiting = await gw.upload(
            token, name="Linen Apron", category="Kitchen", pipeline="apparel", description="Washed."
        )
        plain = await gw.upload(token, name="Stoneware Mug", category="Kitchen")
        await expect(board.row(plain)).to_have_attribute("data-status", "completed")

        # the filter narrows the list to the workflow waiting for a person
        await expect(page.locator('[data-count="review"]')).to_have_text("1")
        await page.get_by_role("radio", name="Needs review").check()
        await expect(board.rows).to_have_count(1)
        await expect(board.row(waiting)).to_be_visible()
        await expect(page).to_have_title("(1 running, 1 to review) Stox")
        chip = board.row(waiting).locator('li.step[data-step="copy_review"]')
        await expect(chip).to_have_attribute("data-state", "review")
        await expect(chip).to_contain_text("Copy review: needs review")

        detail = await board.open_detail(waiting)
        panel = detail.locator("form.review-panel")
        await expect(panel).to_have_attribute("data-step", "copy_review")
        doc = await gw.status(waiting)
        ai, seo = doc["steps"][1]["result"], doc["steps"][2]["result"]
        await expect(panel.get_by_label("Enhanced description")).to_have_value(ai["description"])
        await expect(panel.get_by_label("Tags")).to_have_value(", ".join(ai["tags"]))
        await expect(panel.get_by_label("Meta description")).to_have_value(seo["meta_description"])
        title = panel.get_by_label("SEO title")
        await expect(title).to_have_value(seo["title"])
        await title.fill("Linen Apron, washed soft | Kitchen")
        await expect(page.locator("#review-copy_review-f2-hint")).to_contain_text("34/60")
        await title.press("Enter")  # Approve is the form's submit

        message = page.locator("#review-message")
        await expect(message).to_have_text("Approved Copy review with your edits.")
        await expect(message).to_be_focused()
        await expect(board.row(waiting)).to_be_hidden()  # no longer needs review
        await expect(page.locator('[data-count="review"]')).to_have_text("0")
        await expect(panel).to_have_count(0)
        await page.get_by_role("radio", name="All").check()
        await expect(board.row(waiting)).to_have_attribute("data-status", "completed")

        final = await gw.status(waiting)
        review = final["steps"][3]
        assert review["status"] == "completed"
        assert review["result"]["title"] == "Linen Apron, washed soft | Kitchen"
        assert review["result"]["description"] == ai["description"]  # sent as shown
        assert review["result"]["tags"] == ai["tags"]
        assert review["review"]["decision"] == "approved" and review["review"]["by"] == "alice"
        card = detail.locator('li.step-card[data-step="copy_review"]')
        await expect(card).to_have_attribute("data-state", "completed")
        await expect(card).to_contain_text("Linen Apron, washed soft | Kitchen")
        await expect(card.locator(".review-note")).to_contain_text("Approved by alice")


async def test_a_rejection_runs_the_named_step_again(browser: Browser, tmp_path: Path) -> None:
    steps = [
        StepSettings("image_processing"),
        StepSettings("ai_enhancement"),
        StepSettings(
            "copy_review",
            kind="review",
            after=["image_processing", "ai_enhancement"],
            on_reject="ai_enhancement",
        ),
        StepSettings("seo_generation", after=["copy_review"]),
    ]
    async with (
        running_gateway(tmp_path, with_pipelines(apparel=steps)) as gw,
        dashboard(browser, gw) as board,
    ):
        page = board.page
        await live(board)
        workflow_id = await gw.upload(gw.token("alice"), name="Wool Scarf", pipeline="apparel")
        await complete(gw, workflow_id, "image_processing")
        await complete(gw, workflow_id, "ai_enhancement")
        first_ai = (await gw.status(workflow_id))["steps"][1]

        detail = await board.open_detail(workflow_id)
        panel = detail.locator("form.review-panel")
        await expect(panel).to_be_visible()
        # not the SEO fields: they are not upstream of this review
        await expect(panel.get_by_label("SEO title")).to_have_count(0)
        await expect(panel.get_by_label("Enhanced description")).to_have_value(
            first_ai["result"]["description"]
        )
        await expect(panel.locator(f"#{'review-copy_review-reason-hint'}")).to_contain_text(
            "Rejecting runs AI enhancement again"
        )
        reject = panel.get_by_role("button", name="Reject")
        await reject.click()  # no reason: refused in the page
        reason = panel.get_by_label("Reason for rejecting")
        await expect(reason).to_be_focused()
        await expect(page.locator("#review-copy_review-reason-error")).to_contain_text(
            "Give a reason"
        )

        # a 409 (someone decided first, say) is shown beside the panel
        async def conflict(route: Any) -> None:
            await route.fulfill(
                status=409,
                content_type="application/json",
                body='{"error": {"code": "not_allowed", "message": "the step is completed"}}',
            )

        await page.route(f"**{REVIEW_PATH}", conflict)
        await reason.fill("Too generic: say it is hand-knitted.")
        await reject.click()
        message = page.locator("#review-message")
        await expect(message).to_have_text("Not possible now: the step is completed")
        await expect(message).to_have_attribute("data-tone", "error")
        await page.unroute(f"**{REVIEW_PATH}")

        await reject.click()
        await expect(message).to_have_text(
            "Rejected: AI enhancement runs again, then the review waits again."
        )
        ai_card = detail.locator('li.step-card[data-step="ai_enhancement"]')
        await expect(ai_card).to_have_attribute("data-state", "running")  # dispatched again
        review_card = detail.locator('li.step-card[data-step="copy_review"]')
        await expect(review_card).to_have_attribute("data-state", "pending")
        await expect(review_card).to_contain_text(
            "Attempt 1: rejected by alice — Too generic: say it is hand-knitted."
        )
        await expect(panel).to_have_count(0)
        again = await gw.status(workflow_id)
        assert again["steps"][1]["status"] == "dispatched"
        assert again["steps"][1]["step_id"] != first_ai["step_id"]
        assert again["steps"][0]["status"] == "completed"  # the other branch is not redone

        await complete(gw, workflow_id, "ai_enhancement")
        await expect(review_card).to_have_attribute("data-state", "review")  # waits again
        await expect(panel).to_be_visible()
        await expect(page.locator('[data-count="review"]')).to_have_text("1")
        waiting = (await gw.status(workflow_id))["steps"][2]
        assert waiting["status"] == "waiting"
        await expect(panel).to_have_attribute("data-step-id", waiting["step_id"])


async def test_the_demos_apparel_pipeline_writes_seo_from_the_approved_copy(
    browser: Browser, tmp_path: Path
) -> None:
    """`make demo` (`--demo`): apparel is offered; the copy approved in review, edited, is
    what the demo's SEO step writes from."""

    def demo(settings: settings_module.Settings) -> None:
        settings.pipelines = settings_module.load(["--demo"], {}).pipelines

    options = demo_workers(configure=demo, failure_rate=0.0, min_delay=0.05, max_delay=0.1)
    async with running_gateway(tmp_path, **options) as gw, dashboard(browser, gw) as board:
        page = board.page
        await live(board)
        await page.get_by_label("Pipeline", exact=True).select_option("apparel")
        await expect(page.locator("#product-pipeline-hint")).to_have_text(
            "Image processing and AI enhancement at once, then Copy review (review), "
            "then SEO generation"
        )
        await upload_via_form(page, name="Wool Scarf", category="Apparel")
        row = board.rows.first
        await expect(row).to_contain_text("Copy review: needs review")
        workflow_id = await row.get_attribute("data-workflow-id")
        assert workflow_id
        detail = await board.open_detail(workflow_id)
        copy = "A hand-knitted lambswool scarf."
        await detail.get_by_label("Enhanced description").fill(copy)
        await detail.get_by_role("button", name="Approve").click()
        await expect(row).to_have_attribute("data-status", "completed")
        seo = detail.locator('li.step-card[data-step="seo_generation"]')
        await expect(seo).to_contain_text(copy)  # its meta description
        final = await gw.status(workflow_id)
        assert final["steps"][3]["result"]["meta_description"] == copy
