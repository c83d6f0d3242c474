"""The dashboard's search, bulk actions and owners (issue 15, items 3, 4 and 6), in Chromium.

Reuses tests/test_dashboard.py's browser and page fixtures. No workers run: the tests drive
each workflow's state through the API, so what the page shows is what they made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import test_dashboard
from support import Clock, RunningGateway, running_gateway
from test_dashboard import _reports, dashboard, expect, live
from test_dashboard_pipelines import fork_join, with_pipelines

import settings as settings_module
from stox.auth.tokens import ADMIN, REVIEWER, USER

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

# test_dashboard.py's fixtures, the same here
chromium = test_dashboard.chromium
browser = test_dashboard.browser
pytestmark = test_dashboard.pytestmark

DAY = 86_400


async def cancel(gw: RunningGateway, workflow_id: str, token: str) -> None:
    answer = await gw.fetch(
        "POST", "/api/v1/workflow/cancel", {"workflow_id": workflow_id}, token=token
    )
    assert answer.status == 200, answer.body


def list_requests(page: Page) -> list[str]:
    """The query strings of the page's GET /api/v1/workflow/list from now on."""
    seen: list[str] = []
    page.on(
        "request",
        lambda r: seen.append(r.url.split("?", 1)[1]) if "/workflow/list?" in r.url else None,
    )
    return seen


async def shown_names(board: test_dashboard.Dashboard) -> list[str]:
    return list(await board.rows.locator(".wf-open").all_inner_texts())


# -- search ----------------------------------------------------------------------------------------


async def test_a_search_shows_the_servers_list_and_live_changes_that_match(
    browser: Browser, tmp_path: Path
) -> None:
    async with running_gateway(tmp_path) as gw:
        token = gw.token("alice")
        lamp = await gw.upload(token, name="Vintage Lamp", category="Lighting")
        fillers = [
            await gw.upload(token, name=f"Filler {n:03d}", category="Bulk") for n in range(102)
        ]
        shirt = await gw.upload(token, name="Linen Shirt", category="Apparel")
        await gw.upload(token, name="Oak Shelf", category="Home")
        apron = await gw.upload(token, name="Canvas Apron", category="Kitchen Linen")

        async with dashboard(browser, gw) as board:
            page = board.page
            await live(board)
            await expect(board.rows).to_have_count(100)  # the snapshot: the lamp is older
            asked = list_requests(page)
            search = page.get_by_label("Search", exact=True)
            await expect(page.get_by_label("Search by Pipeline")).to_be_hidden()  # only one

            # older than the snapshot: only the server's filtered list can show it
            await search.fill("vintage")
            await search.press("Enter")
            await expect(board.rows).to_have_count(1)
            await expect(board.row(lamp)).to_be_visible()
            assert any("q=vintage" in query for query in asked), asked

            # any case, the name or the category
            await search.fill("LINEN")
            await search.press("Enter")
            await expect(board.rows).to_have_count(2)
            assert await shown_names(board) == ["Canvas Apron", "Linen Shirt"]
            await expect(page.locator('[data-count="all"]')).to_have_text("2")

            # live: a change of a matching row shows; a new match appears, another does not
            await cancel(gw, shirt, token)
            await expect(board.row(shirt)).to_have_attribute("data-status", "cancelled")
            tote = await gw.upload(token, name="Linen Tote", category="Bags")
            await gw.upload(token, name="Wool Scarf", category="Accessories")
            await expect(board.row(tote)).to_be_visible()
            await expect(board.rows).to_have_count(3)
            assert await shown_names(board) == ["Linen Tote", "Canvas Apron", "Linen Shirt"]

            # with the status filter: the row that no longer matches leaves
            await page.get_by_role("radio", name="Running").check()
            await expect(board.rows).to_have_count(2)
            await expect(board.row(shirt)).to_have_count(0)
            assert any("status=running" in q and "q=LINEN" in q for q in asked), asked
            await cancel(gw, apron, token)
            await expect(board.row(apron)).to_have_count(0)
            await expect(board.rows).to_have_count(1)
            await page.get_by_role("radio", name="All").check()

            # paged by the cursor with the same filters: 102 fillers, 100 a page
            await search.fill("filler")
            await search.press("Enter")
            await expect(board.rows).to_have_count(100)
            older = page.get_by_role("button", name="Load older")
            await older.click()
            await expect(board.rows).to_have_count(102)
            await expect(older).to_be_hidden()
            assert [
                await board.rows.nth(i).get_attribute("data-workflow-id") for i in (0, 101)
            ] == [
                fillers[-1],
                fillers[0],
            ]
            assert any("cursor=" in q and "q=filler" in q for q in asked), asked

            await page.get_by_role("button", name="Clear").click()
            await expect(search).to_have_value("")
            await expect(board.row(tote)).to_be_visible()
            await expect(page.locator('[data-count="all"]')).to_have_text(
                "108"
            )  # every one loaded by now


async def test_a_search_shows_no_more_than_the_servers_pages(
    browser: Browser, tmp_path: Path
) -> None:
    """Workflows loaded before the search, older than its last page, wait for its next page:
    the list never shows a gap the server's next page would fill."""
    async with running_gateway(tmp_path) as gw:
        token = gw.token("alice")
        for n in range(230):
            await gw.upload(token, name=f"Thing {n:03d}", category="Common" if n % 4 else "Rare")
        async with dashboard(browser, gw) as board:
            page = board.page
            await live(board)
            older = page.get_by_role("button", name="Load older")
            await older.click()
            await expect(board.rows).to_have_count(200)  # 30 are still to load
            search = page.get_by_label("Search", exact=True)
            await search.fill("common")  # 150 of the 200 loaded match, 22 more are older
            await search.press("Enter")
            await expect(page.locator("#list-summary")).to_have_text(
                "Showing 100 that match, newest first."
            )
            await expect(board.rows).to_have_count(100)
            await older.click()
            await expect(board.rows).to_have_count(172)
            await expect(board.rows.last.locator(".wf-open")).to_have_text("Thing 001")
            await expect(older).to_be_hidden()


async def test_the_search_matches_as_the_server_does(browser: Browser, tmp_path: Path) -> None:
    """model.js matchesSearch, which keeps live changes in a search, on the server's rules."""
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw, user=None) as board:
        found = await board.page.evaluate(
            """async () => {
              const { matchesSearch, NO_SEARCH } = await import("/static/model.js");
              const { ownerLabel } = await import("/static/search.js");
              const w = {
                id: "a", owner: "u1", created_at: "2026-12-04T10:00:00.250000Z",
                product: { name: "Linen Shirt", category: "Apparel" },
              };
              const on = (doc, search) => matchesSearch(doc, { ...NO_SEARCH, ...search });
              const named = { ...w, pipeline: { name: "apparel", version: "x", steps: [] } };
              return [
                on(w, { q: "LINEN" }), on(w, { q: "parel" }), on(w, { q: "shirts" }),
                on(w, { pipeline: "default" }), on(named, { pipeline: "default" }),
                on(named, { pipeline: "apparel" }),
                on(w, { createdAfter: "2026-12-04T10:00:00.250Z" }),
                on(w, { createdAfter: "2026-12-04T10:00:00.251Z" }),
                on(w, { createdBefore: "2026-12-04T10:00:00.250Z" }),
                on(w, { createdBefore: "2026-12-04T10:00:00.251Z" }),
                on(w, { owner: "u1" }), on(w, { owner: "u2" }),
                // a row's owner: the name, else (stored before names were) the id
                ownerLabel({ ...w, owner_name: "alice" }), ownerLabel(w),
              ];
            }"""
        )
        assert found == [
            *(True, True, False),  # any case, the name or the category, a part only
            *(True, False, True),  # no pipeline stored: the default
            *(True, False),  # created_after: inclusive
            *(False, True),  # created_before: exclusive
            *(True, False),
            *("alice", "u1"),
        ]


async def test_the_pipeline_choice_narrows_the_list(browser: Browser, tmp_path: Path) -> None:
    async with (
        running_gateway(tmp_path, with_pipelines(fork=fork_join())) as gw,
        dashboard(browser, gw) as board,
    ):
        page = board.page
        token = gw.token("alice")
        plain = await gw.upload(token, name="Plain Mug")
        forked = await gw.upload(token, name="Forked Mug", pipeline="fork")
        await expect(board.rows).to_have_count(2)
        choice = page.get_by_label("Search by Pipeline")
        options = await choice.locator("option").evaluate_all("os => os.map(o => o.value)")
        assert options == ["", "default", "fork"]
        asked = list_requests(page)
        await choice.select_option("fork")
        await expect(board.rows).to_have_count(1)
        await expect(board.row(forked)).to_be_visible()
        assert any("pipeline=fork" in q for q in asked), asked
        later = await gw.upload(token, name="Forked Jug", pipeline="fork")
        await gw.upload(token, name="Plain Jug")
        await expect(board.row(later)).to_be_visible()
        await expect(board.rows).to_have_count(2)
        await choice.select_option("default")
        await expect(board.rows).to_have_count(2)
        await expect(board.row(plain)).to_be_visible()


async def test_the_created_range_narrows_the_list(browser: Browser, tmp_path: Path) -> None:
    def long_steps(settings: settings_module.Settings) -> None:
        for step in settings.pipeline.steps:  # the clock jumps by days: no step times out
            step.timeout = settings_module.Duration(60 * DAY)

    now = time.time()
    clock = Clock(now)
    async with running_gateway(tmp_path, long_steps, {"clock": clock}) as gw:
        token = gw.token("alice")
        ids = {}
        for days in (10, 5, 1):
            clock.now = now - days * DAY
            ids[days] = await gw.upload(token, name=f"{days} days old")
        clock.now = now

        async with dashboard(browser, gw) as board:
            page = board.page
            await live(board)
            await expect(board.rows).to_have_count(3)
            asked = list_requests(page)

            async def day_of(days: int) -> str:  # the browser's own calendar day
                return str(
                    await page.evaluate(
                        "ms => new Date(ms).toLocaleDateString('en-CA')", (now - days * DAY) * 1000
                    )
                )

            start, end = page.get_by_label("Created from"), page.get_by_label("Created to")
            await start.fill(await day_of(5))
            await expect(board.rows).to_have_count(2)  # from that day on
            assert await shown_names(board) == ["1 days old", "5 days old"]
            await end.fill(await day_of(5))
            await expect(board.rows).to_have_count(1)  # that day only, included
            await expect(board.row(ids[5])).to_be_visible()
            assert any("created_after=" in q and "created_before=" in q for q in asked), asked

            await gw.upload(token, name="Made today")  # live, outside the range: not shown
            await start.fill("")
            await expect(board.rows).to_have_count(2)  # up to that day
            assert await shown_names(board) == ["5 days old", "10 days old"]
            await end.fill("")
            await expect(board.rows).to_have_count(4)
            await expect(board.rows.first.locator(".wf-open")).to_have_text("Made today")


# -- bulk ------------------------------------------------------------------------------------------


async def test_retry_selected_then_every_failed_one(browser: Browser, tmp_path: Path) -> None:
    def one_attempt(settings: settings_module.Settings) -> None:
        for step in settings.pipeline.steps:
            step.max_attempts = 1

    async with running_gateway(tmp_path, one_attempt) as gw:
        token = gw.token("alice")
        fail = _reports(gw)
        failed = []
        for n in range(103):  # more than one bulk call retries
            workflow_id = await gw.upload(token, name=f"Broken {n:03d}")
            await fail(workflow_id, fail="image service down")
            failed.append(workflow_id)
        running = await gw.upload(token, name="Still Going")

        async with dashboard(browser, gw) as board:
            page = board.page
            await live(board)
            await expect(board.rows).to_have_count(100)
            await expect(page.locator('[data-count="failed"]')).to_have_text("99")
            bulk_bodies: list[Any] = []
            page.on(
                "request",
                lambda r: (
                    bulk_bodies.append(json.loads(r.post_data or "null"))
                    if r.url.endswith("/workflow/bulk")
                    else None
                ),
            )

            # two failed ones (one by the keyboard) and a running one
            await board.row(failed[-1]).get_by_role("checkbox", name="Select Broken 102").check()
            check = board.row(failed[-2]).get_by_role("checkbox", name="Select Broken 101")
            await check.focus()
            await page.keyboard.press("Space")
            await expect(check).to_be_checked()
            await board.row(running).get_by_role("checkbox", name="Select Still Going").check()
            await expect(page.locator("#bulk-count")).to_have_text("3 selected")
            await page.get_by_role("button", name="Retry selected").click()

            outcome = page.locator("#bulk-outcome")
            await expect(outcome).to_contain_text("Retry selected: 2 retried, 1 not allowed.")
            problem = outcome.locator('li[data-outcome="not_allowed"]')
            await expect(problem).to_have_count(1)
            await expect(problem).to_contain_text(
                "Still Going (" + running[:8] + "): not allowed — only a failed workflow can be"
                " retried; this one is running"
            )
            for workflow_id in failed[-2:]:
                await expect(board.row(workflow_id)).to_have_attribute("data-status", "running")
            await expect(page.locator("#bulk-count")).to_have_text("1 selected")  # not done
            assert bulk_bodies == [{"action": "retry", "ids": [running, failed[-1], failed[-2]]}]

            await page.get_by_role("button", name="Retry all failed").click()
            await expect(outcome).to_contain_text("Retry all failed: 101 retried.")
            await expect(page.locator('[data-count="failed"]')).to_have_text("0")
            assert [b.get("filter") for b in bulk_bodies[1:]] == [{"status": "failed"}] * 2
            assert "cursor" not in bulk_bodies[1] and bulk_bodies[2]["cursor"]
            left = await gw.fetch("GET", "/api/v1/workflow/list?status=failed", token=token)
            assert left.body["workflows"] == []


async def test_cancel_selected_asks_first(browser: Browser, tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw) as board:
        page = board.page
        token = gw.token("alice")
        ids = [await gw.upload(token, name=f"Chair {n}") for n in range(3)]
        await expect(board.rows).to_have_count(3)
        select_all = page.get_by_label("Select all shown")
        await select_all.check()
        await expect(page.locator("#bulk-count")).to_have_text("3 selected")
        await board.row(ids[0]).get_by_role("checkbox").uncheck()
        assert await select_all.evaluate("e => e.indeterminate")
        await page.get_by_role("button", name="Cancel selected").click()
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_contain_text("Cancel 2 selected workflows?")
        await dialog.get_by_role("button", name="Keep running").click()
        await expect(board.row(ids[2])).to_have_attribute("data-status", "running")
        await page.get_by_role("button", name="Cancel selected").click()
        await dialog.get_by_role("button", name="Cancel workflows").click()
        await expect(page.locator("#bulk-outcome")).to_contain_text("Cancel selected: 2 cancelled.")
        for workflow_id, status in zip(ids, ["running", "cancelled", "cancelled"], strict=True):
            await expect(board.row(workflow_id)).to_have_attribute("data-status", status)
        await expect(page.locator("#bulk-count")).to_have_text("None selected")


# -- admins ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [ADMIN, REVIEWER])
async def test_admins_and_reviewers_see_everyones_workflows_by_owner(
    browser: Browser, tmp_path: Path, role: str
) -> None:
    async with running_gateway(tmp_path) as gw:
        issue = gw.gateway.tokens.issue
        alice, bob = issue("id-alice", "alice", USER), issue("id-bob", "bob", USER)
        mine = await gw.upload(alice, name="Alice's Vase")
        theirs = await gw.upload(bob, name="Bob's Bowl")
        admin = issue("id-root", "root", role)

        async with dashboard(browser, gw, user="root", token=admin) as board:
            page = board.page
            await live(board)
            await expect(board.rows).to_have_count(2)
            await expect(board.row(theirs).locator(".wf-owner")).to_have_text("Owner bob")
            await expect(board.row(mine).locator(".wf-owner")).to_have_text("Owner alice")

            owner = page.get_by_label("Owner")
            labels = await owner.locator("option").evaluate_all(
                "os => os.map(o => [o.value, o.textContent])"
            )
            assert labels == [["", "Everyone"], ["id-alice", "alice"], ["id-bob", "bob"]]
            await owner.select_option(label="bob")
            await expect(board.rows).to_have_count(1)
            await expect(board.row(theirs)).to_be_visible()
            await gw.upload(alice, name="Alice's Jug")  # live, another owner's: not shown
            later = await gw.upload(bob, name="Bob's Plate")
            await expect(board.row(later)).to_be_visible()
            await expect(board.row(later).locator(".wf-owner")).to_have_text("Owner bob")
            await expect(board.rows).to_have_count(2)
            await owner.select_option(label="Everyone")
            await expect(board.rows).to_have_count(4)

        # a user sees only their own, without owners
        async with dashboard(browser, gw, user="alice", token=alice) as board:
            await live(board)
            await expect(board.rows).to_have_count(2)
            await expect(board.page.locator(".wf-owner")).to_have_count(0)
            await expect(board.page.get_by_label("Owner")).to_be_hidden()
