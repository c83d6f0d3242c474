"""Uploads a client can retry (`Idempotency-Key`) and the per-user upload rate, over HTTP
against a real gateway (docs/architecture.md#the-http-api)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from procs import gateway_config, remote, start_gateway, wait_ready
from support import (
    LIST,
    PRODUCT,
    UPLOAD,
    Clock,
    Response,
    RunningGateway,
    assert_error,
    free_port,
    report,
    running_gateway,
)

import settings as settings_module
from settings import Duration

KEY = "Idempotency-Key"
RETENTION = 24 * 3600


async def keyed_upload(
    gw: RunningGateway, key: str, body: Any = None, *, user: str = "alice", raw: bytes | None = None
) -> Response:
    return await gw.fetch(
        "POST", UPLOAD, body or PRODUCT, token=gw.token(user), raw=raw, headers={KEY: key}
    )


async def workflows_of(gw: RunningGateway, user: str = "alice") -> list[str]:
    response = await gw.fetch("GET", f"{LIST}?limit=100", token=gw.token(user))
    assert response.status == 200, response.body
    return [doc["id"] for doc in response.body["workflows"]]


@pytest.fixture
async def stored_gw(tmp_path: Path, store_url: str) -> AsyncIterator[RunningGateway]:
    """A gateway on each store (SQLite, MongoDB)."""
    async with running_gateway(tmp_path, storage__url=store_url) as gateway:
        yield gateway


# -- Idempotency-Key -----------------------------------------------------------------------


async def test_an_upload_sent_again_with_its_key_answers_the_first_workflow(
    stored_gw: RunningGateway,
) -> None:
    gw = stored_gw
    first = await keyed_upload(gw, "order-1")
    assert first.status == 202, first.body
    workflow_id = first.body["workflow_id"]
    doc = await gw.status(workflow_id)
    await report(gw, workflow_id, doc["steps"][0])  # the workflow moves on meanwhile

    again = await keyed_upload(gw, "order-1")

    assert (again.status, again.body) == (202, first.body)  # the first answer, as it was
    assert await workflows_of(gw) == [workflow_id]  # nothing created


async def test_the_same_key_with_another_body_is_422_and_creates_nothing(
    stored_gw: RunningGateway,
) -> None:
    gw = stored_gw
    first = await keyed_upload(gw, "order-1")
    assert first.status == 202, first.body

    other = await keyed_upload(gw, "order-1", {**PRODUCT, "price": 21.0})

    assert_error(other, 422, "idempotency_key_reused", KEY)
    assert await workflows_of(gw) == [first.body["workflow_id"]]


async def test_the_body_is_compared_by_its_meaning_not_its_bytes(gw: RunningGateway) -> None:
    first = await keyed_upload(gw, "order-1")
    reordered = json.dumps(dict(reversed(list(PRODUCT.items()))), indent=2).encode()

    again = await keyed_upload(gw, "order-1", raw=reordered)

    assert (again.status, again.body) == (202, first.body)


async def test_keys_are_per_user(stored_gw: RunningGateway) -> None:
    gw = stored_gw
    alices = await keyed_upload(gw, "order-1")
    bobs = await keyed_upload(gw, "order-1", user="bob")
    assert alices.status == bobs.status == 202
    assert alices.body["workflow_id"] != bobs.body["workflow_id"]
    assert await workflows_of(gw, "bob") == [bobs.body["workflow_id"]]
    # bob's key with another body is his own: no 422 from alice's
    other = await keyed_upload(gw, "order-2", {**PRODUCT, "name": "Other"}, user="bob")
    assert other.status == 202
    assert (await keyed_upload(gw, "order-1")).body == alices.body


async def test_concurrent_uploads_with_one_key_create_one_workflow(
    stored_gw: RunningGateway,
) -> None:
    gw = stored_gw
    answers = await asyncio.gather(*(keyed_upload(gw, "order-1") for _ in range(8)))

    assert {answer.status for answer in answers} == {202}
    assert len({answer.body["workflow_id"] for answer in answers}) == 1
    assert await workflows_of(gw) == [answers[0].body["workflow_id"]]


async def test_a_key_outlives_a_gateway_killed_after_answering(
    tmp_path: Path, store_url: str
) -> None:
    """SIGKILL once the upload was answered: the key was stored with the workflow, so the
    retry against the restarted gateway finds it."""
    port = free_port()
    config = gateway_config(port, "idem", store_url, "")
    client = remote(port)
    first_answer = None
    for run in range(2):
        gateway = start_gateway(tmp_path, f"gateway-{run}", config)
        try:
            await wait_ready(gateway, port)
            answer = await keyed_upload(client, "order-1")
            assert answer.status == 202, answer.body
            first_answer = first_answer or answer.body
            assert answer.body == first_answer
            assert await workflows_of(client) == [first_answer["workflow_id"]]
            gateway.popen.send_signal(signal.SIGKILL)
            gateway.popen.wait(10)
        finally:
            gateway.kill()


async def test_uploads_without_a_key_are_each_a_new_workflow(gw: RunningGateway) -> None:
    ids = [await gw.upload(gw.token()) for _ in range(2)]
    assert len(set(ids)) == 2


@pytest.mark.parametrize("value", ["", " ", "x" * 256, "caf\u00e9", "tab\there"], ids=repr)
async def test_a_malformed_key_is_400_naming_the_header(gw: RunningGateway, value: str) -> None:
    response = await raw_upload(gw, [(KEY, value)])
    assert_error(response, 400, "invalid_idempotency_key", KEY)
    assert await workflows_of(gw) == []


async def test_a_key_with_a_control_character_never_reaches_the_upload(
    gw: RunningGateway,
) -> None:
    """Tornado refuses such a header line itself (a bare 400, the connection closed)."""
    response = await raw_upload(gw, [(KEY, "bell\x07")])
    assert response.status == 400
    assert await workflows_of(gw) == []


async def test_two_keys_in_one_request_are_400(gw: RunningGateway) -> None:
    response = await raw_upload(gw, [(KEY, "a"), (KEY, "b")])
    assert_error(response, 400, "invalid_idempotency_key", KEY)


async def test_a_key_of_255_printable_characters_is_taken(gw: RunningGateway) -> None:
    key = ("k" * 254) + "~"
    first = await raw_upload(gw, [(KEY, key)])
    assert first.status == 202, first.body
    assert (await raw_upload(gw, [(KEY, key)])).body == first.body


async def raw_upload(gw: RunningGateway, headers: list[tuple[str, str]]) -> Response:
    """POST the product with exactly these header lines (bytes as given, latin-1)."""
    body = json.dumps(PRODUCT).encode()
    lines = [
        f"POST {UPLOAD} HTTP/1.1",
        f"Host: 127.0.0.1:{gw.port}",
        f"Authorization: Bearer {gw.token()}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = dict(line.split(": ", 1) for line in header_lines)
    parsed = json.loads(content) if content else None
    return Response(int(status_line.split()[1]), parsed, answer_headers)


async def test_after_the_retention_the_key_makes_a_new_workflow(tmp_path: Path) -> None:
    clock = Clock()
    async with running_gateway(tmp_path, gateway_options={"clock": clock}) as gw:
        first = await keyed_upload(gw, "order-1")
        clock.advance(RETENTION - 1)
        assert (await keyed_upload(gw, "order-1")).body == first.body  # still held
        clock.advance(1)

        later = await keyed_upload(gw, "order-1", {**PRODUCT, "price": 1.0})

        assert later.status == 202, later.body
        assert later.body["workflow_id"] != first.body["workflow_id"]
        assert (await keyed_upload(gw, "order-1", {**PRODUCT, "price": 1.0})).body == later.body
        assert sorted(await workflows_of(gw)) == sorted(
            [first.body["workflow_id"], later.body["workflow_id"]]
        )


async def test_expired_keys_are_released_so_they_do_not_accumulate(tmp_path: Path) -> None:
    clock = Clock()
    async with running_gateway(
        tmp_path, gateway_options={"clock": clock}, server__idempotency_retention=Duration(60)
    ) as gw:
        store, orchestrator = gw.gateway.store, gw.gateway.orchestrator
        kept = await keyed_upload(gw, "order-1")
        await keyed_upload(gw, "order-3", {**PRODUCT, "name": "Third"})
        clock.advance(30)
        await keyed_upload(gw, "order-2")
        clock.advance(30)

        # what the gateway runs every relay_interval: every expired key, `limit` a write
        assert await orchestrator.expire_keys(limit=1) == 2

        assert await store.keyed("alice", "order-1") is None
        assert await store.keyed("alice", "order-3") is None
        assert await store.keyed("alice", "order-2") is not None
        assert await store.get(kept.body["workflow_id"]) is not None  # the workflow stays


# -- the per-user upload rate --------------------------------------------------------------


async def test_a_flood_of_uploads_from_one_user_is_429_with_retry_after(tmp_path: Path) -> None:
    async with running_gateway(
        tmp_path, server__max_uploads_per_user=3, server__upload_window=Duration(60)
    ) as gw:
        token = gw.token()
        ids = [await gw.upload(token) for _ in range(3)]

        refused = await gw.fetch("POST", UPLOAD, PRODUCT, token=token)

        answer = assert_error(refused, 429, "too_many_attempts")
        assert "uploads" in answer["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert sorted(await workflows_of(gw)) == sorted(ids)  # the refused one made nothing
        await gw.upload(gw.token("bob"))  # another user uploads on


async def test_no_upload_limit_when_max_uploads_per_user_is_0(tmp_path: Path) -> None:
    async with running_gateway(
        tmp_path, server__max_uploads_per_user=0, server__upload_window=Duration(60)
    ) as gw:
        token = gw.token()
        await asyncio.gather(*(gw.upload(token) for _ in range(20)))
        assert len(await workflows_of(gw)) == 20


def test_upload_settings_defaults_and_environment() -> None:
    defaults = settings_module.load([], {}).server
    assert float(defaults.idempotency_retention) == RETENTION
    assert (defaults.max_uploads_per_user, float(defaults.upload_window)) == (300, 10.0)
    environ = {"STOX_MAX_UPLOADS_PER_USER": "0"}
    assert settings_module.load([], environ).server.max_uploads_per_user == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_uploads_per_user", -1),
        ("upload_window", "0s"),
        ("idempotency_retention", "0s"),
    ],
)
def test_bad_upload_settings_are_refused(tmp_path: Path, key: str, value: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  {key}: {value}\n")
    with pytest.raises(settings_module.SettingsError, match=f"server.{key}"):
        settings_module.load(["--config", str(config)], {})
