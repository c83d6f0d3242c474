"""GET /api/v1/workflow/list with q, pipeline and a created range, on a real gateway: the
filters narrow the list, the cursor pages through what they admit, bad values are 400s
naming the parameter."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import LIST, RunningGateway, assert_error, running_gateway

import settings as settings_module


def with_apparel(settings: settings_module.Settings) -> None:
    settings.pipelines["apparel"] = settings_module.PipelineSettings(
        [settings_module.StepSettings("image_processing")]
    )


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_gateway(tmp_path, configure=with_apparel) as gateway:
        yield gateway


async def listed(gw: RunningGateway, token: str, **query: str) -> list[str]:
    response = await gw.fetch("GET", f"{LIST}?{urllib.parse.urlencode(query)}", token=token)
    assert response.status == 200, response.body
    return [w["id"] for w in response.body["workflows"]]


async def test_q_pipeline_and_created_range_narrow_the_list(gw: RunningGateway) -> None:
    alice = gw.token()
    lamp = await gw.upload(alice, name="Desk Lamp", category="home")
    dress = await gw.upload(alice, name="Red dress", category="Apparel", pipeline="apparel")
    shade = await gw.upload(alice, name="lampshade", category="lighting", pipeline="apparel")
    await gw.upload(gw.token("bob"), name="Bob's lamp")  # never in alice's list

    assert await listed(gw, alice, q="LAMP") == [shade, lamp]
    assert await listed(gw, alice, q="apparel") == [dress]  # the category
    assert await listed(gw, alice, pipeline="apparel") == [shade, dress]
    assert await listed(gw, alice, pipeline="default") == [lamp]
    assert await listed(gw, alice, q="lamp", pipeline="apparel") == [shade]
    status = await gw.fetch("GET", f"/api/v1/workflow/status?workflow_id={dress}", token=alice)
    created = status.body["created_at"]
    assert await listed(gw, alice, created_after=created) == [shade, dress]
    assert await listed(gw, alice, created_before=created) == [lamp]
    # any zone: the same instant written with an offset
    assert await listed(gw, alice, created_before=created.replace("Z", "+00:00")) == [lamp]
    admin = gw.token("root", role="admin")
    assert len(await listed(gw, admin, q="lamp")) == 3  # admins search everyone's


async def test_the_cursor_pages_through_what_the_filters_admit(gw: RunningGateway) -> None:
    alice = gw.token()
    lamps = [await gw.upload(alice, name=f"lamp {i}") for i in range(5)]
    for i in range(3):
        await gw.upload(alice, name=f"chair {i}")
    seen: list[str] = []
    cursor = None
    while True:
        query = {"q": "lamp", "limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await gw.fetch("GET", f"{LIST}?{urllib.parse.urlencode(query)}", token=alice)
        seen.extend(w["id"] for w in response.body["workflows"])
        cursor = response.body["next_cursor"]
        if cursor is None:
            break
    assert seen == lamps[::-1]


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("q", ""),
        ("q", "x" * 201),
        ("pipeline", "Not A Name"),
        ("created_after", "yesterday"),
        ("created_after", "2026-12-04T10:00:00"),  # no zone
        ("created_before", "2026-13-01T00:00:00Z"),
    ],
)
async def test_bad_filters_are_400_naming_the_parameter(
    gw: RunningGateway, parameter: str, value: str
) -> None:
    query = urllib.parse.urlencode({parameter: value})
    response = await gw.fetch("GET", f"{LIST}?{query}", token=gw.token())
    assert_error(response, 400, "invalid_input", parameter)
