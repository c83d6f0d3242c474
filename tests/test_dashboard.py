"""The live dashboard in a real browser: Playwright driving Debian's Chromium.

Each test starts a real gateway in this process (the page talks to it over HTTP and the
WebSocket exactly as a person's browser does) and opens the page in a fresh browser context.
Set STOX_UPDATE_SCREENSHOT=1 to write the README's docs/dashboard.png from the last test.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from marshmallow import fields, validate
from support import Clock, RunningGateway, eventually, free_port, report, running_gateway

import settings as settings_module
from stox import schemas
from stox.auth.tokens import TokenAuthority
from stox.demo_workers import enhance, process_images, seo

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Locator, Page

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("STOX_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "dashboard.png"
WAIT = 10_000  # ms, for anything that happens live
DURATION = re.compile(r"^\d+(\.\d)?s$")
STEPS = ["image_processing", "ai_enhancement", "seo_generation"]


def require(reason: str) -> None:
    """Browser tests are required in CI (CI=true): a missing browser fails them there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


@pytest.fixture
def chromium() -> Path:
    try:
        import playwright  # noqa: F401
    except ImportError:
        require("playwright is not installed (pip install -r requirements-dev.txt)")
    if not CHROMIUM.exists():
        require(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


class Dashboard:
    """One browser tab on the dashboard, with the problems it reported."""

    def __init__(self, page: Page, gw: RunningGateway) -> None:
        self.page = page
        self.gw = gw
        self.problems: list[str] = []
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        if "Content Security Policy" in text or "TrustedHTML" in text or "Trusted Type" in text:
            self.problems.append(f"policy violation: {text}")

    def row(self, workflow_id: str) -> Locator:
        return self.page.locator(f'li.wf[data-workflow-id="{workflow_id}"]')

    @property
    def rows(self) -> Locator:
        return self.page.locator("li.wf")

    async def open_detail(self, workflow_id: str) -> Locator:
        await self.row(workflow_id).locator(".wf-open").click()
        detail = self.page.locator(f'#detail[data-workflow-id="{workflow_id}"]')
        await expect(detail).to_be_visible()
        return detail

    async def record_statuses(self) -> None:
        """From now on, note every (id, status, version) a row shows, in order."""
        await self.page.evaluate(
            """() => {
              window.rowLog = [];
              const note = (row) => row.matches && row.matches("li.wf") &&
                window.rowLog.push([row.dataset.workflowId, row.dataset.status,
                                    Number(row.dataset.version)]);
              new MutationObserver((records) => {
                for (const r of records) {
                  if (r.type === "attributes") note(r.target);
                  for (const node of r.addedNodes) note(node);
                }
              }).observe(document.getElementById("workflow-list"),
                         {subtree: true, childList: true, attributes: true,
                          attributeFilter: ["data-version"]});
            }"""
        )

    async def shown(self, workflow_id: str) -> list[tuple[str, int]]:
        """What the row showed, each (status, version) once: a re-render repeats them."""
        log = await self.page.evaluate("() => window.rowLog")
        shown: list[tuple[str, int]] = []
        for wid, status, version in log:
            if wid == workflow_id and (not shown or shown[-1] != (status, version)):
                shown.append((status, version))
        return shown


def expect(target: Any) -> Any:
    from playwright.async_api import expect as playwright_expect

    playwright_expect.set_options(timeout=WAIT)
    return playwright_expect(target)


@asynccontextmanager
async def dashboard(
    browser: Browser,
    gw: RunningGateway,
    *,
    user: str | None = "alice",
    token: str | None = None,
    width: int = 1280,
    height: int = 860,
    init_script: str | None = None,
) -> AsyncIterator[Dashboard]:
    """The page in a fresh context; signed in as `user` (a session in sessionStorage);
    `init_script` runs before the page's own scripts."""
    context: BrowserContext = await browser.new_context(
        base_url=gw.base_url, viewport={"width": width, "height": height}
    )
    if init_script is not None:
        await context.add_init_script(init_script)
    if user is not None or token is not None:
        session = {"token": token or gw.token(user or "alice"), "username": user or "alice"}
        await context.add_init_script(
            f"sessionStorage.setItem('stox.session', {json.dumps(json.dumps(session))})"
        )
    page = await context.new_page()
    page.set_default_timeout(WAIT)
    board = Dashboard(page, gw)
    try:
        await page.goto("/")
        yield board
        assert board.problems == []
    finally:
        await context.close()


async def live(board: Dashboard) -> None:
    await expect(board.page.locator("#connection")).to_have_attribute("data-state", "live")


def demo_workers(
    *, configure: Callable[[settings_module.Settings], None] | None = None, **options: Any
) -> dict[str, Any]:
    """running_gateway arguments for a gateway with demo workers."""

    def with_workers(settings: settings_module.Settings) -> None:
        settings.demo_workers = True
        if configure is not None:
            configure(settings)

    return {"configure": with_workers, "gateway_options": {"demo_worker_options": options}}


async def upload_via_form(page: Page, **fields: str) -> None:
    for label, value in fields.items():
        await page.get_by_label(label.capitalize(), exact=True).fill(value)
    await page.get_by_role("button", name="Upload").click()


# -- sign up, upload, watch it complete ------------------------------------------------------------


async def test_register_sign_in_upload_and_watch_it_complete_live(
    browser: Browser, tmp_path: Path
) -> None:
    options = demo_workers(failure_rate=0.0, min_delay=0.15, max_delay=0.3)
    async with (
        running_gateway(tmp_path, **options) as gw,
        dashboard(browser, gw, user=None) as board,
    ):
        page = board.page
        await expect(page.get_by_role("heading", name="Sign in to Stox")).to_be_visible()

        await page.get_by_label("Username", exact=True).fill("dana")
        await page.get_by_label("Password", exact=True).fill("short")
        await page.get_by_role("button", name="Register").click()
        await expect(page.locator("#signin-password-error")).to_contain_text("12 characters")

        await page.get_by_label("Password", exact=True).fill("correct horse battery")
        await page.get_by_role("button", name="Register").click()
        await expect(page.locator("#signin-message")).to_contain_text("created")
        await page.get_by_role("button", name="Sign in").click()

        await live(board)
        await expect(page.locator("#account-name")).to_have_text("dana")
        session = await page.evaluate("() => JSON.parse(sessionStorage.getItem('stox.session'))")
        assert session["username"] == "dana" and session["token"].count(".") == 2
        await expect(page.locator("#list-empty")).to_contain_text("No workflows yet")

        await board.record_statuses()
        await upload_via_form(
            page,
            name="Brass Desk Lamp",
            description="A warm light for the study.",
            category="Lighting",
            price="89.50",
            images="lamp-front.jpg, lamp-side.jpg",
        )
        await expect(page.locator("#upload-message")).to_contain_text("Uploaded “Brass Desk Lamp”")
        row = board.rows.first
        await expect(row).to_have_attribute("data-status", "completed")
        workflow_id = await row.get_attribute("data-workflow-id")
        assert workflow_id

        # seen live, in order: running while the steps went by, then completed, once each
        shown = await board.shown(workflow_id)
        statuses = [status for status, _ in shown]
        assert statuses[0] == "running" and statuses[-1] == "completed", shown
        assert statuses.count("completed") == 1, shown
        versions = [version for _, version in shown]
        assert versions == sorted(set(versions)), f"each version once, in order: {shown}"
        assert await board.rows.count() == 1
        for step in STEPS:
            chip = row.locator(f'li.step[data-step="{step}"]')
            await expect(chip).to_have_attribute("data-state", "completed")
            await expect(chip).to_have_attribute("data-attempt", "1")
        await expect(row.locator(".elapsed")).to_have_text(DURATION)
        await expect(page.locator("#announcer")).to_contain_text("Brass Desk Lamp: Completed")

        detail = await board.open_detail(workflow_id)
        await expect(page.locator("#detail-title")).to_be_focused()
        await expect(detail).to_contain_text("Lighting")
        await expect(detail).to_contain_text(f"processed/{workflow_id[:8]}/lamp-front_1200.webp")
        await expect(detail).to_contain_text(f"processed/{workflow_id[:8]}/lamp-side_1200.webp")
        await expect(detail).to_contain_text("Brass Desk Lamp: A warm light for the study.")
        await expect(detail.get_by_role("list", name="Tags")).to_contain_text("lamp")
        await expect(detail).to_contain_text("Brass Desk Lamp | Lighting")  # SEO title
        await expect(detail.get_by_role("list", name="Keywords")).to_contain_text("brass")
        await expect(detail.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()
        await expect(detail.get_by_role("button", name="Retry", exact=True)).to_be_hidden()

        await page.keyboard.press("Escape")
        await expect(detail).to_be_hidden()
        await expect(row.locator(".wf-open")).to_be_focused()

        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("heading", name="Sign in to Stox")).to_be_visible()
        assert await page.evaluate("() => sessionStorage.getItem('stox.session')") is None


async def test_a_taken_name_and_a_wrong_password_are_refused_beside_the_form(
    browser: Browser, tmp_path: Path
) -> None:
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw, user=None) as board:
        page = board.page
        await page.get_by_label("Username", exact=True).fill("erin")
        await page.get_by_label("Password", exact=True).fill("a long enough password")
        await page.get_by_role("button", name="Register").click()
        await expect(page.locator("#signin-message")).to_contain_text("created")
        await page.get_by_role("button", name="Register").click()  # again: the name is taken
        await expect(page.locator("#signin-username-error")).to_have_text(
            "That username is taken. Choose another."
        )
        await page.get_by_label("Password", exact=True).fill("not the password at all")
        await page.get_by_label("Password", exact=True).press("Enter")
        await expect(page.locator("#signin-message")).to_contain_text("do not match")
        await expect(page.locator("#dashboard")).to_be_hidden()

        wrong = {"username": "erin", "password": "not the password at all"}
        for _ in range(50):  # until the service stops listening to this address
            if (await gw.fetch("POST", "/api/v1/auth/login", wrong)).status == 429:
                break
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#signin-message")).to_contain_text(
            re.compile(r"^Too many attempts\. Try again in \d+ minutes? \d+ seconds\.$")
        )


# -- the upload form -------------------------------------------------------------------------------


async def test_the_form_checks_what_the_server_checks(browser: Browser, tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw) as board:
        page = board.page
        await live(board)
        uploads: list[str] = []
        page.on("request", lambda r: uploads.append(r.url) if "upload" in r.url else None)

        await page.get_by_label("Price", exact=True).fill("-3")
        await page.get_by_label("Images", exact=True).fill(",".join(f"i{n}.jpg" for n in range(51)))
        await page.get_by_role("button", name="Upload").click()
        name = page.get_by_label("Name", exact=True)
        await expect(name).to_have_attribute("aria-invalid", "true")
        await expect(name).to_be_focused()
        await expect(page.locator("#product-name-error")).to_have_text("Enter the product's name.")
        await expect(page.locator("#product-price-error")).to_contain_text("negative")
        await expect(page.locator("#product-images-error")).to_contain_text("At most 50 images")
        # the message is the field's description, so a screen reader reads it with the field
        described = await page.get_by_label("Price", exact=True).get_attribute("aria-describedby")
        assert "product-price-error" in (described or "").split()
        assert uploads == []

        # what the server refuses (here, a body altered on its way) shows beside its field
        async def too_long_name(route: Any) -> None:
            body = json.loads(route.request.post_data)
            await route.continue_(post_data=json.dumps({**body, "name": "x" * 201}))

        await page.route("**/api/v1/workflow/upload", too_long_name)
        await name.fill("Walnut Board")
        await page.get_by_label("Price", exact=True).fill("45")
        await page.get_by_label("Images", exact=True).fill("board.jpeg")
        await expect(page.locator("#product-price-error")).to_be_hidden()
        await page.get_by_role("button", name="Upload").click()
        await expect(page.locator("#product-name-error")).to_contain_text("between 1 and 200")
        await expect(name).to_have_attribute("aria-invalid", "true")
        await expect(page.locator("#upload-message")).to_contain_text("Check the highlighted")
        assert len(uploads) == 1
        assert await board.rows.count() == 0

        await page.unroute("**/api/v1/workflow/upload")
        await page.get_by_role("button", name="Upload").click()
        await expect(board.rows).to_have_count(1)
        await expect(page.locator("#product-name-error")).to_be_hidden()
        assert await name.input_value() == ""  # the form is ready for the next product


# What the form sends, field by field, at and past each limit the server sets (ProductSchema).
FORM_CASES: list[dict[str, str]] = [
    {"name": ""},
    {"name": "   "},
    {"name": "x" * 200},
    {"name": "x" * 201},
    {"description": "d" * 10_000},
    {"description": "d" * 10_001},
    {"category": "c" * 100},
    {"category": "c" * 101},
    {"price": "0"},
    {"price": "12.50"},
    {"price": "-0.01"},
    {"price": "1e12"},
    {"price": "1.1e12"},
    {"price": "twelve"},
    {"images": ", ".join(f"i{n}.jpg" for n in range(50))},
    {"images": ", ".join(f"i{n}.jpg" for n in range(51))},
    {"images": "a.jpg, " + "x" * 2048},
    {"images": "a.jpg, " + "x" * 2049},
]


def naive_body(raw: dict[str, str]) -> dict[str, Any]:
    """The body a careless client would send for the form's raw strings."""
    body: dict[str, Any] = {"name": "Mug", **raw}
    if "price" in raw:
        with suppress(ValueError):
            body["price"] = float(raw["price"])
    if "images" in raw:
        body["images"] = [s.strip() for s in raw["images"].split(",")]
    return body


async def test_the_browser_refuses_exactly_what_the_server_refuses(
    browser: Browser, tmp_path: Path
) -> None:
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw) as board:
        token = gw.token("alice")
        for raw in FORM_CASES:
            checked = await board.page.evaluate(
                "async (raw) => (await import('/static/model.js')).parseProduct(raw)",
                {"name": "Mug", **raw},
            )
            if checked["errors"]:
                (field,) = checked["errors"]
                assert field in raw or field == "name", (raw, checked["errors"])
                if field == "name" and not raw.get("name", "x").strip():
                    continue  # blank names: the browser is stricter than the server
                answer = await gw.fetch(
                    "POST", "/api/v1/workflow/upload", naive_body(raw), token=token
                )
                assert answer.status == 400, (raw, answer.body)
                assert field in answer.body["error"]["fields"], (raw, answer.body)
            else:
                answer = await gw.fetch(
                    "POST", "/api/v1/workflow/upload", checked["product"], token=token
                )
                assert answer.status == 202, (raw, answer.body)


def schema_limit(field: Any, kind: type) -> Any:
    """The `max` of the field's one validator of `kind` (marshmallow's Length or Range)."""
    (found,) = [v for v in field.validators if isinstance(v, kind)]
    return cast(Any, found).max


async def test_the_dashboards_upload_limits_are_the_servers(
    browser: Browser, tmp_path: Path
) -> None:
    product = schemas.ProductSchema().fields
    images = cast("fields.List[Any]", product["images"])
    expected = {
        "name": schema_limit(product["name"], validate.Length),
        "description": schema_limit(product["description"], validate.Length),
        "category": schema_limit(product["category"], validate.Length),
        "images": schema_limit(images, validate.Length),
        "image": schema_limit(images.inner, validate.Length),
        "price": schema_limit(product["price"], validate.Range),
    }
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw) as board:
        limits = await board.page.evaluate(
            "async () => (await import('/static/model.js')).PRODUCT_LIMITS"
        )
    assert limits == expected


async def test_changes_apply_by_version(browser: Browser, tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw, user=None) as board:
        applied = await board.page.evaluate(
            """async () => {
              const { WorkflowStore } = await import("/static/model.js");
              const store = new WorkflowStore();
              const doc = (version, status) => ({ id: "a", version, status, created_at: "" });
              return [
                store.apply(doc(3, "running")) !== null,
                store.apply(doc(2, "failed")) !== null,  // older: ignored
                store.apply(doc(3, "failed")) !== null,  // the same version: ignored
                store.get("a").status,
                store.apply(doc(5, "completed")).previous.version,
                store.get("a").status,
                store.size,
              ];
            }"""
        )
        assert applied == [True, False, False, "running", 3, "completed", 1]


# -- cancel and retry ------------------------------------------------------------------------------


async def test_cancel_a_running_workflow(browser: Browser, tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw, dashboard(browser, gw) as board:  # no workers
        page = board.page
        workflow_id = await gw.upload(gw.token("alice"), name="Oak Shelf")
        row = board.row(workflow_id)
        await expect(row).to_have_attribute("data-status", "running")
        await expect(row.locator('li.step[data-step="image_processing"]')).to_have_attribute(
            "data-state", "running"
        )

        detail = await board.open_detail(workflow_id)
        await expect(detail.get_by_role("button", name="Retry", exact=True)).to_be_hidden()
        await detail.get_by_role("button", name="Cancel", exact=True).click()
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_contain_text("Cancel “Oak Shelf”?")
        await expect(dialog.get_by_role("button", name="Keep running")).to_be_focused()
        await dialog.get_by_role("button", name="Keep running").click()
        await expect(row).to_have_attribute("data-status", "running")

        await detail.get_by_role("button", name="Cancel", exact=True).click()
        await dialog.get_by_role("button", name="Cancel workflow").click()
        await expect(row).to_have_attribute("data-status", "cancelled")
        await expect(page.locator("#detail-message")).to_have_text("Workflow cancelled.")
        await expect(detail.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()
        await expect(detail.get_by_role("button", name="Retry", exact=True)).to_be_hidden()
        for step in STEPS:
            chip = row.locator(f'li.step[data-step="{step}"]')
            await expect(chip).to_have_attribute("data-state", "cancelled")

        status = await gw.fetch(
            "GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", token=gw.token("alice")
        )
        assert status.body["status"] == "cancelled"


async def test_retry_a_failed_workflow(browser: Browser, tmp_path: Path) -> None:
    def one_attempt(settings: settings_module.Settings) -> None:
        for step in settings.pipeline.steps:
            step.max_attempts = 1

    options = demo_workers(configure=one_attempt, failure_rate=1.0, min_delay=0.4, max_delay=0.5)
    async with running_gateway(tmp_path, **options) as gw, dashboard(browser, gw) as board:
        page = board.page
        await live(board)
        await board.record_statuses()
        workflow_id = await gw.upload(gw.token("alice"), name="Doomed Mug")
        row = board.row(workflow_id)
        await expect(row).to_have_attribute("data-status", "failed")
        chip = row.locator('li.step[data-step="image_processing"]')
        await expect(chip).to_have_attribute("data-state", "failed")

        detail = await board.open_detail(workflow_id)
        await expect(detail.locator(".callout")).to_contain_text(
            "Failed at Image processing after 1 attempt: simulated outage"
        )
        await expect(detail.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()
        await detail.get_by_role("button", name="Retry", exact=True).click()
        await expect(page.locator("#detail-message")).to_have_text(
            "Retrying from Image processing."
        )
        await expect(row).to_have_attribute("data-status", "failed")  # the workers fail again
        await expect(detail.locator("details summary")).to_have_text("Earlier attempts (2)")

        shown = await board.shown(workflow_id)
        assert [status for status, _ in shown] == ["running", "failed", "running", "failed"], shown


# -- connection: expiry, refusal, restart ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["expired", "refused"])
async def test_a_token_that_no_longer_works_returns_to_sign_in(
    browser: Browser, tmp_path: Path, kind: str
) -> None:
    async with running_gateway(tmp_path) as gw:
        if kind == "expired":
            token = gw.token("alice", expires_in=-5)
        else:  # well formed and unexpired, but not signed by this gateway: the socket is refused
            token = TokenAuthority("another-secret-" + "y" * 32).issue("alice", "alice", "user")
        async with dashboard(browser, gw, token=token) as board:
            page = board.page
            await expect(page.get_by_role("heading", name="Sign in to Stox")).to_be_visible()
            await expect(page.locator("#signin-message")).to_contain_text("session has expired")
            await expect(page.locator("#dashboard")).to_be_hidden()
            assert await page.evaluate("() => sessionStorage.getItem('stox.session')") is None


# The page's WebSockets, counted (window.socketsOpened), and a clock an hour behind the
# server's, so that only the gateway can tell the page its token has expired.
COUNT_SOCKETS = """
window.socketsOpened = 0;
window.WebSocket = class extends window.WebSocket {
  constructor(...args) { super(...args); window.socketsOpened += 1; }
};
"""
CLOCK_AN_HOUR_BEHIND = """
{ const now = Date.now.bind(Date); Date.now = () => now() - 3_600_000; }
"""


async def sockets_opened(page: Page) -> int:
    return int(await page.evaluate("() => window.socketsOpened"))


async def test_a_session_that_expires_while_live_returns_to_sign_in(
    browser: Browser, tmp_path: Path
) -> None:
    async with (
        running_gateway(tmp_path, jwt__expiry=settings_module.Duration(3)) as gw,
        dashboard(
            browser, gw, user=None, init_script=COUNT_SOCKETS + CLOCK_AN_HOUR_BEHIND
        ) as board,
    ):
        page = board.page
        await page.get_by_label("Username", exact=True).fill("alice")
        await page.get_by_label("Password", exact=True).fill("correct horse battery")
        await page.get_by_role("button", name="Register").click()
        await expect(page.locator("#signin-message")).to_contain_text("created")
        await page.get_by_role("button", name="Sign in").click()
        await live(board)  # a login token good for 3 s, which this page thinks has an hour

        # the gateway closes the socket at the token's exp (4401): the page signs out
        await expect(page.get_by_role("heading", name="Sign in to Stox")).to_be_visible()
        await expect(page.locator("#signin-message")).to_contain_text("session has expired")
        await expect(page.locator("#dashboard")).to_be_hidden()
        assert await page.evaluate("() => sessionStorage.getItem('stox.session')") is None
        assert await sockets_opened(page) == 1, "it did not try to reconnect"


def one_socket_per_user(settings: settings_module.Settings) -> None:
    settings.websocket.max_sockets_per_user = 1


async def test_too_many_open_dashboards_is_said_and_retried_later(
    browser: Browser, tmp_path: Path
) -> None:
    async with running_gateway(tmp_path, one_socket_per_user) as gw:
        token = gw.token("alice")
        other_tab = await gw.ws_connect(token)
        try:
            async with dashboard(browser, gw, token=token, init_script=COUNT_SOCKETS) as board:
                page = board.page
                connection = page.locator("#connection")
                await expect(connection).to_contain_text("Too many open dashboards")
                await expect(connection).to_have_attribute("data-state", "reconnecting")
                await page.wait_for_timeout(1500)  # an ordinary drop would have retried by now
                assert await sockets_opened(page) == 1
                await expect(page.locator("#signin-view")).to_be_hidden()

                other_tab.close()
                await eventually(lambda: gw.gateway.hub.subscriber_count == 0)
                await page.get_by_role("button", name="Reconnect now").click()
                await live(board)
                assert await sockets_opened(page) == 2
        finally:
            other_tab.close()


async def test_a_page_that_fell_behind_reconnects(browser: Browser, tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        token = gw.token("alice")
        workflow_id = await gw.upload(token, name="Linen Apron")
        async with dashboard(browser, gw, token=token, init_script=COUNT_SOCKETS) as board:
            page = board.page
            await live(board)
            await expect(board.row(workflow_id)).to_be_visible()
            for members in list(gw.gateway.hub._by_owner.values()):
                for sub in list(members):  # as the hub drops a socket whose backlog is full
                    sub.too_slow("too slow: over 2097152 bytes waiting")
            await eventually(lambda: page.evaluate("() => window.socketsOpened === 2"))
            await live(board)
            await expect(board.rows).to_have_count(1)
            await expect(page.locator("#signin-view")).to_be_hidden()


class Server:
    """A gateway on a port of its own that a test can stop and start again on the same data."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.running = AsyncExitStack()

    async def start(self) -> RunningGateway:
        return await self.running.enter_async_context(
            running_gateway(self.tmp_path, port=self.port)
        )

    async def stop(self) -> None:
        await self.running.aclose()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def test_the_page_survives_a_server_restart(browser: Browser, tmp_path: Path) -> None:
    async with Server(tmp_path) as server:
        gw = await server.start()
        token = gw.token("alice")
        async with dashboard(browser, gw, token=token) as board:
            page = board.page
            first = await gw.upload(token, name="Linen Apron")
            second = await gw.upload(token, name="Copper Kettle")
            await expect(board.row(second)).to_have_attribute("data-status", "running")
            await live(board)

            await server.stop()  # the server goes away under the page
            await expect(page.locator("#connection")).to_contain_text("Reconnecting")

            # meanwhile the workflows move on (another instance on the same data)
            async with running_gateway(tmp_path) as other:
                await other.fetch(
                    "POST", "/api/v1/workflow/cancel", {"workflow_id": first}, token=token
                )
                third = await other.upload(token, name="Cedar Box")

            await server.start()
            await live(board)
            await expect(board.row(first)).to_have_attribute("data-status", "cancelled")
            await expect(board.row(third)).to_have_attribute("data-status", "running")
            await expect(board.row(second)).to_have_attribute("data-status", "running")
            await expect(board.rows).to_have_count(3)  # nothing shown twice
            ids = await board.rows.evaluate_all("rows => rows.map(r => r.dataset.workflowId)")
            assert ids == [third, second, first]  # newest first
            await expect(page.locator("#signin-view")).to_be_hidden()


# -- many workflows: paging and the filter ---------------------------------------------------------


async def test_older_workflows_page_in_and_the_filter_narrows_the_list(
    browser: Browser, tmp_path: Path
) -> None:
    async with Server(tmp_path) as server:
        gw = await server.start()
        token = gw.token("alice")
        ids = [await gw.upload(token, name=f"Item {n:03d}") for n in range(105)]

        async def cancel(workflow_id: str, via: RunningGateway = gw) -> None:
            body = {"workflow_id": workflow_id}
            assert (
                await via.fetch("POST", "/api/v1/workflow/cancel", body, token=token)
            ).status == 200

        for workflow_id in ids[:2] + ids[-1:]:  # two of the oldest and the newest
            await cancel(workflow_id)
        await gw.upload(gw.token("bob"), name="Someone else's")

        async with dashboard(browser, gw) as board:
            page = board.page
            await expect(board.rows).to_have_count(100)
            await expect(board.rows.first).to_have_attribute("data-workflow-id", ids[-1])
            await expect(page.locator('[data-count="cancelled"]')).to_have_text("1")

            await page.get_by_role("button", name="Load older").click()
            await expect(board.rows).to_have_count(105)
            await expect(board.rows.last).to_have_attribute("data-workflow-id", ids[0])
            await expect(page.get_by_role("button", name="Load older")).to_be_hidden()
            shown = await board.rows.evaluate_all("rows => rows.map(r => r.dataset.workflowId)")
            assert shown == ids[::-1]

            await page.get_by_role("radio", name="Cancelled").check()
            await expect(board.rows).to_have_count(3)
            await expect(page.locator('[data-count="cancelled"]')).to_have_text("3")
            await page.get_by_role("radio", name="Running").check()
            await expect(board.rows).to_have_count(102)
            await page.get_by_role("radio", name="Failed").check()
            await expect(board.rows).to_have_count(0)
            await expect(page.locator("#list-empty")).to_contain_text("No failed workflows")
            await page.get_by_role("radio", name="All").check()
            await expect(board.rows).to_have_count(105)

            # older than the snapshot's 100, still live: changed now, and changed while away
            await cancel(ids[2])
            await expect(board.row(ids[2])).to_have_attribute("data-status", "cancelled")
            await server.stop()
            async with running_gateway(tmp_path) as other:
                await cancel(ids[3], via=other)
            await server.start()
            await live(board)
            await expect(board.row(ids[3])).to_have_attribute("data-status", "cancelled")
            await expect(page.locator('[data-count="cancelled"]')).to_have_text("5")
            await expect(board.rows).to_have_count(105)


# -- small screens and the keyboard ----------------------------------------------------------------


async def test_keyboard_only_at_360_pixels(browser: Browser, tmp_path: Path) -> None:
    async with (
        running_gateway(tmp_path) as gw,
        dashboard(browser, gw, width=360, height=740) as board,
    ):
        page = board.page
        await live(board)
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("link", name="Skip to workflows")).to_be_focused()
        await page.get_by_label("Name", exact=True).focus()
        await page.keyboard.type("Pocket Notebook")
        await page.keyboard.press("Tab")
        await page.keyboard.type("Dot grid, 120 pages.")
        await page.keyboard.press("Tab")
        await page.keyboard.type("Stationery")
        await page.keyboard.press("Tab")
        await page.keyboard.type("9.90")
        await page.keyboard.press("Enter")  # submits the form
        await expect(board.rows).to_have_count(1)

        wide = await page.evaluate("() => document.documentElement.scrollWidth")
        assert wide <= 360, f"the page is {wide}px wide at a 360px window"

        opener = board.rows.first.locator(".wf-open")
        await opener.focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#detail-title")).to_be_focused()
        await expect(page.locator("#detail-title")).to_have_text("Pocket Notebook")
        box = await page.locator("#detail").bounding_box()
        assert box is not None and box["width"] <= 360
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("button", name="Close details")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("#detail")).to_be_hidden()
        await expect(opener).to_be_focused()


# -- the README's picture --------------------------------------------------------------------------


def _reports(gw: RunningGateway) -> Callable[..., Any]:
    """Reports on a workflow's current step with what the demo workers would have made of it,
    or the failure `fail`."""
    service = gw.service_token("demo")

    async def report_current(workflow_id: str, *, fail: str | None = None) -> None:
        doc = await gw.status(workflow_id)
        step = doc["steps"][doc["current_step"]]
        result = None
        if fail is None:
            results = {s["name"]: s["result"] for s in doc["steps"] if s["result"]}
            work = {
                "image_processing": process_images,
                "ai_enhancement": enhance,
                "seo_generation": seo,
            }
            result = work[step["name"]](workflow_id, doc["product"], results)
        answer = await report(
            gw, workflow_id, step, success=fail is None, result=result, error=fail, token=service
        )
        assert answer.status == 200, answer.body

    return report_current


PRODUCTS = {
    "lamp": (
        "Brass Desk Lamp",
        "Lighting",
        89.5,
        "A warm, dimmable light.",
        ["lamp.jpg", "lamp-side.jpg"],
    ),
    "board": (
        "Walnut Cutting Board",
        "Kitchen",
        45.0,
        "End-grain walnut, oiled by hand.",
        ["board.jpeg"],
    ),
    "shelf": ("Oak Wall Shelf", "Home", 74.0, "", ["shelf.jpg"]),
    "apron": ("Linen Apron", "Kitchen", 32.0, "Washed linen with deep pockets.", ["apron.jpg"]),
    "throw": (
        "Merino Wool Throw",
        "Home",
        129.0,
        "Soft merino wool, woven in Wales.",
        ["throw.jpg"],
    ),
    "mug": ("Stoneware Mug", "Kitchen", 14.0, "", ["mug.jpg"]),
}


async def test_a_dashboard_with_every_kind_of_workflow(browser: Browser, tmp_path: Path) -> None:
    """Every state on one page; the picture in the README is taken from it."""

    def pipeline(settings: settings_module.Settings) -> None:
        for step in settings.pipeline.steps:
            step.timeout = settings_module.Duration(3600)
            step.backoff = settings_module.Duration(600)
        settings.pipeline.steps[2].max_attempts = 1

    clock = Clock(time.time())  # set back for each event, so the picture shows a plausible morning
    async with running_gateway(tmp_path, pipeline, {"clock": clock}) as gw:
        report_current = _reports(gw)
        token = gw.token("alice")
        ids: dict[str, str] = {}
        # seconds ago, what happened to which product
        timeline: list[tuple[float, str, str]] = [
            (840, "upload", "lamp"), (828, "done", "lamp"), (806, "done", "lamp"),
            (801, "done", "lamp"),
            (660, "upload", "board"), (651, "done", "board"), (626, "done", "board"),
            (620, "done", "board"),
            (540, "upload", "shelf"), (512, "cancel", "shelf"),
            (360, "upload", "apron"), (349, "done", "apron"), (333, "done", "apron"),
            (327, "SEO service answered 503", "apron"),  # one attempt only: failed
            (130, "upload", "throw"), (118, "done", "throw"),  # AI copy running
            (65, "upload", "mug"), (50, "image service timed out", "mug"),  # to be retried
        ]  # fmt: skip
        for ago, what, key in timeline:
            clock.now = time.time() - ago
            if what == "upload":
                name, category, price, description, images = PRODUCTS[key]
                ids[key] = await gw.upload(
                    token,
                    name=name,
                    category=category,
                    price=price,
                    description=description,
                    images=images,
                )
            elif what == "cancel":
                body = {"workflow_id": ids[key]}
                await gw.fetch("POST", "/api/v1/workflow/cancel", body, token=token)
            else:
                await report_current(ids[key], fail=None if what == "done" else what)
        clock.now = time.time()
        lamp, board_, shelf, apron, throw, mug = (ids[key] for key in PRODUCTS)

        async with dashboard(browser, gw, width=1440, height=900) as board:
            page = board.page
            await live(board)
            await expect(board.rows).to_have_count(6)
            expected = {
                lamp: ("completed", ["completed", "completed", "completed"]),
                board_: ("completed", ["completed", "completed", "completed"]),
                throw: ("running", ["completed", "running", "pending"]),
                mug: ("running", ["retrying", "pending", "pending"]),
                apron: ("failed", ["completed", "completed", "failed"]),
                shelf: ("cancelled", ["cancelled", "cancelled", "cancelled"]),
            }
            for workflow_id, (status, states) in expected.items():
                row = board.row(workflow_id)
                await expect(row).to_have_attribute("data-status", status)
                await expect(row.locator(".wf-meta")).not_to_contain_text("null")
                chips = row.locator("li.step")
                assert await chips.evaluate_all("cs => cs.map(c => c.dataset.state)") == states
            await expect(board.row(mug).locator("li.step").first).to_contain_text(
                "Image processing: retry pending, attempt 1"
            )
            await expect(page.locator('[data-count="running"]')).to_have_text("2")
            await expect(page).to_have_title("(2 running, 1 failed) Stox")

            await expect(board.row(throw).locator(".elapsed")).to_have_text(
                re.compile(r"^2m 1\ds$")
            )
            await expect(board.row(lamp).locator(".elapsed")).to_have_text("39s")

            await board.open_detail(lamp)
            await page.locator("#product-name").fill("Ceramic Planter")
            await page.locator("#product-description").fill("Glazed terracotta, 20 cm across.")
            await page.locator("#product-category").fill("Garden")
            await page.locator("#product-category").blur()
            await page.mouse.move(0, 0)
            await page.evaluate("() => window.scrollTo(0, 0)")  # the charts at the top show
            path = tmp_path / "dashboard.png"
            await page.screenshot(path=str(path))
            assert path.stat().st_size > 10_000
            if os.environ.get("STOX_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT.write_bytes(path.read_bytes())
