"""The dashboard's charts (issue 15 item 5) in Chromium: they render, as SVG and as text, and
move when workflows complete or fail, from the gateway's pushes on the list's socket.

Reuses tests/test_dashboard.py's browser and page fixtures. The services' reports are driven
from the test, so the figures are known: two completions, one failure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import test_dashboard
from support import RunningGateway, report, running_gateway
from test_dashboard import dashboard, expect, live

import settings as settings_module

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page

chromium = test_dashboard.chromium
browser = test_dashboard.browser
pytestmark = test_dashboard.pytestmark


def one_attempt(settings: settings_module.Settings) -> None:
    for step in settings.pipeline.steps:
        step.max_attempts = 1


async def run_through(gw: RunningGateway, workflow_id: str, *, fail_at: int | None = None) -> None:
    """Report on each step in turn; a failure at step `fail_at` ends it."""
    for index in range(3):
        step = (await gw.status(workflow_id))["steps"][index]
        answer = await report(gw, workflow_id, step, success=index != fail_at)
        assert answer.status == 200, answer.body
        if index == fail_at:
            return


async def drawn(page: Page) -> tuple[int, int, float, float]:
    """What the per-minute bars say, all minutes together (a minute may turn meanwhile):
    completed, failed, and the drawn heights of each."""
    totals = await page.evaluate(
        """() => {
          const sum = [0, 0, 0, 0];
          for (const bar of document.querySelectorAll("#chart-minutes g.minute")) {
            sum[0] += Number(bar.dataset.completed);
            sum[1] += Number(bar.dataset.failed);
            sum[2] += Number(bar.querySelector(".bar-completed").getAttribute("height"));
            sum[3] += Number(bar.querySelector(".bar-failed").getAttribute("height"));
          }
          return sum;
        }"""
    )
    return int(totals[0]), int(totals[1]), float(totals[2]), float(totals[3])


async def test_the_charts_render_and_move_when_workflows_finish(
    browser: Browser, tmp_path: Path
) -> None:
    async with running_gateway(tmp_path, one_attempt) as gw:
        token = gw.token("alice")
        first = await gw.upload(token, name="Oak shelf")
        async with dashboard(browser, gw, token=token) as board:
            page = board.page
            await live(board)
            charts = page.locator("#charts")
            await expect(charts).to_be_visible()

            def tile(key: str) -> Locator:
                return page.locator(f'.stat-tile[data-stat="{key}"] dd')

            await expect(tile("running")).to_have_text("1")
            await expect(tile("completed")).to_have_text("0")
            await expect(page.locator("#chart-minutes g.minute")).to_have_count(60)
            assert await drawn(page) == (0, 0, 0.0, 0.0)
            await expect(page.locator("#steps-empty")).to_be_visible()
            updates = int(await charts.get_attribute("data-updated") or 0)

            await run_through(gw, first)
            await expect(tile("completed")).to_have_text("1")
            await expect(tile("running")).to_have_text("0")
            completed, failed, green, red = await drawn(page)
            assert (completed, failed) == (1, 0) and green > 0 and red == 0

            second, third = await gw.upload(token), await gw.upload(token)
            await run_through(gw, second)
            await run_through(gw, third, fail_at=1)
            await expect(tile("failed")).to_have_text("1")
            await expect(tile("completed")).to_have_text("2")
            completed, failed, green, red = await drawn(page)
            assert (completed, failed) == (2, 1) and green > 0 and red > 0
            assert int(await charts.get_attribute("data-updated") or 0) > updates + 1

            # the steps' table: every step, its failure rate as text
            rows = page.locator("#steps-table-body tr")
            await expect(rows).to_have_count(3)
            ai = page.locator('#steps-table-body tr[data-step="ai_enhancement"]')
            await expect(ai.locator('[data-figure="failure-rate"]')).to_have_text("33%")
            await expect(ai).to_contain_text("3 attempts")
            image = page.locator('#steps-table-body tr[data-step="image_processing"]')
            await expect(image.locator('[data-figure="failure-rate"]')).to_have_text("0%")
            await expect(image.locator('[data-figure="p50"]')).to_have_text(re.compile(r"^\d"))

            # the text alternatives: the chart's label and the minutes' table
            label = await page.locator("#chart-minutes").get_attribute("aria-label") or ""
            assert "2 completed, 1 failed" in label, label
            await page.get_by_text("The minutes as a table").click()
            await expect(page.locator("#minutes-table-body")).to_be_visible()
            cells = await page.locator("#minutes-table-body tr").evaluate_all(
                "rows => rows.map(r => [...r.querySelectorAll('td')]"
                ".map(c => Number(c.textContent)))"
            )
            assert 1 <= len(cells) <= 2  # one minute, or two when it turned meanwhile
            assert [sum(column) for column in zip(*cells, strict=True)] == [2, 1]
