"""Seeded store faults (stox/store/faulty.py): what the gateway answers and keeps when its
store fails, is slow, or lands a write and then fails (an unknown outcome)."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from procs import gateway_config, remote, start_gateway, wait_ready
from support import (
    COMPLETED,
    UPLOAD,
    Response,
    RunningGateway,
    assert_error,
    completion,
    eventually,
    free_port,
    report,
    running_gateway,
)

import settings as settings_module
from stox import workflow as w
from stox.app import make_workflow_store
from stox.store import StoreError, make_store
from stox.store.faulty import LANDED, LOST, SLOW, TIMEOUT, FaultyStore, InjectedFault

Faulty = tuple[RunningGateway, FaultyStore]


class Retrying:
    """A client that sends each request again while it is answered 503 (the JSON error, with
    Retry-After), as a well-behaved one does; `statuses` keeps every answer's status. Uploads
    carry an Idempotency-Key, so one whose write landed before its 503 is not made twice."""

    def __init__(self, client: RunningGateway) -> None:
        self.client = client
        self.statuses: list[int] = []
        self._keys = itertools.count()

    async def fetch(self, method: str, path: str, body: Any, token: str) -> Response:
        headers = {"Idempotency-Key": f"try-{next(self._keys)}"} if path == UPLOAD else {}
        while True:
            response = await self.client.fetch(method, path, body, token=token, headers=headers)
            self.statuses.append(response.status)
            if response.status != 503:
                return response
            assert_error(response, 503)
            assert response.headers["Retry-After"] == "1"


def faulty(tmp_path: Path, **options: Any) -> FaultyStore:
    store = make_store(f"sqlite:///{tmp_path}/stox.db")
    return FaultyStore(store, seed=7, slow_seconds=0.01, **options)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Faulty]:
    """A gateway on a FaultyStore that injects nothing until a test sets its shares."""
    store = faulty(tmp_path)
    async with running_gateway(tmp_path, gateway_options={"store": store}) as gateway:
        yield gateway, store


async def stored(store: FaultyStore, workflow_id: str) -> dict[str, Any] | None:
    return await store.inner.get(workflow_id)


# -- the wrapper ---------------------------------------------------------------------------


async def test_the_same_seed_injects_the_same_faults(tmp_path: Path) -> None:
    async def kinds(seed: int) -> list[str]:
        store = FaultyStore(
            make_store("sqlite://:memory:"), seed=seed, fail_share=0.4, slow_share=0.2
        )
        store.slow_seconds = 0
        await store.open()
        seen = []
        for _ in range(40):
            before = dict(store.counts)
            with contextlib.suppress(InjectedFault):
                await store.get("x")
            (kind,) = [k for k in store.counts if store.counts[k] != before.get(k, 0)] or ["ok"]
            seen.append(kind)
        await store.close()
        return seen

    first = await kinds(3)
    assert first == await kinds(3)
    assert first != await kinds(4)
    assert {"ok", LOST, TIMEOUT, SLOW} == set(first)


async def test_a_landed_write_is_stored_and_still_raises() -> None:
    inner = make_store("sqlite://:memory:")
    store = FaultyStore(inner, fail_share=1, write_faults=(LANDED,))
    await store.open()
    try:
        doc = upload_doc()
        with pytest.raises(StoreError, match="landed then failed"):
            await store.insert(doc)
        assert (await inner.get(doc["id"])) is not None
        store.write_faults = (LOST,)
        with pytest.raises(StoreError, match="connection lost"):
            await store.insert({**doc, "id": "f" * 32})
        assert (await inner.get("f" * 32)) is None
    finally:
        await store.close()


def upload_doc() -> dict[str, Any]:
    from support import PRODUCT

    from stox.workflow import Pipeline, StepSpec

    pipeline = Pipeline(
        steps=(StepSpec("image_processing", "step.image_processing", 60, 3, 1),),
        completion_url="http://x/c",
        completion_routing_key="step.completed",
    )
    workflow, _ = w.start(pipeline, "alice", dict(PRODUCT), 1_767_225_600.0)
    return workflow.to_doc()


def load(tmp_path: Path, storage: dict[str, Any], **sections: Any) -> settings_module.Settings:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"storage": storage, **sections}))  # JSON is YAML
    return settings_module.load(["--config", str(path)], {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fail_share": 1.5}, "storage.faults.fail_share: expected a share from 0 to 1"),
        ({"slow_share": -0.1}, "storage.faults.slow_share: expected a share from 0 to 1"),
        ({"fail_share": "lots"}, "storage.faults.fail_share: expected a number"),
        ({"fail_share": 0.6, "slow_share": 0.6}, "together must be at most 1"),
    ],
)
def test_fault_settings_are_checked(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    with pytest.raises(settings_module.SettingsError, match=message):
        load(tmp_path, {"faults": values})


def test_faults_are_off_by_default_and_refused_in_production(tmp_path: Path) -> None:
    settings = load(tmp_path, {"url": f"sqlite:///{tmp_path}/s.db"})
    assert not settings.storage.faults.enabled
    assert not isinstance(make_workflow_store(settings.storage), FaultyStore)
    with pytest.raises(settings_module.SettingsError, match="refused in production"):
        load(tmp_path, {"faults": {"fail_share": 0.1}}, server={"environment": "production"})


def test_fault_settings_wrap_the_store_unarmed(tmp_path: Path) -> None:
    settings = load(tmp_path, {"url": f"sqlite:///{tmp_path}/s.db", "faults": {"fail_share": 0.2}})
    store = make_workflow_store(settings.storage)
    assert isinstance(store, FaultyStore)
    assert store.fail_share == 0.2 and not store.armed  # the gateway arms it once started


# -- what the gateway answers ----------------------------------------------------------------


@pytest.mark.parametrize("kind", [LOST, TIMEOUT])
async def test_a_failing_store_is_503_with_retry_after_on_every_endpoint(
    gw: Faulty, kind: str
) -> None:
    client, store = gw
    token = client.token()
    workflow_id = await client.upload(token)
    store.fail_share, store.write_faults = 1.0, (kind,)
    for method, path, body in [
        ("POST", UPLOAD, {"name": "Mug"}),
        ("GET", f"/api/v1/workflow/status?workflow_id={workflow_id}", None),
        ("GET", "/api/v1/workflow/list", None),
        ("POST", "/api/v1/workflow/cancel", {"workflow_id": workflow_id}),
    ]:
        response = await client.fetch(method, path, body, token=token)
        assert_error(response, 503, "store_unavailable")
        assert response.headers["Retry-After"] == "1"
    store.fail_share = 0.0
    assert (await client.status(workflow_id))["status"] == w.RUNNING  # the cancel did not land


async def test_an_upload_whose_write_landed_is_kept_though_answered_503(gw: Faulty) -> None:
    client, store = gw
    store.fail_share, store.calls = 1.0, frozenset({"insert"})
    store.write_faults = (LANDED,)
    response = await client.fetch("POST", UPLOAD, {"name": "Mug"}, token=client.token())
    assert_error(response, 503, "store_unavailable")
    store.fail_share = 0.0
    docs = await store.inner.list_workflows(owner=None, status=None, limit=10)
    assert [doc["product"]["name"] for doc in docs] == ["Mug"]  # a workflow that will run


async def test_a_report_whose_write_landed_is_a_duplicate_when_retried(gw: Faulty) -> None:
    client, store = gw
    workflow_id = await client.upload(client.token())
    before = await client.status(workflow_id)
    step = before["steps"][0]
    store.fail_share, store.calls = 1.0, frozenset({"replace"})
    store.write_faults = (LANDED,)
    first = await report(client, workflow_id, step)
    assert_error(first, 503, "store_unavailable")
    store.fail_share = 0.0

    again = await report(client, workflow_id, step)
    assert again.status == 200, again.body
    assert again.body["result"] == "duplicate"
    after = await client.status(workflow_id)
    assert after["version"] == before["version"] + 1  # one transition, not two
    assert [a["outcome"] for a in after["steps"][0]["attempts"]] == [w.COMPLETED]
    assert after["steps"][1]["status"] == w.DISPATCHED
    assert after["steps"][1]["attempt"] == 1


async def test_accepted_workflows_survive_a_seeded_run_of_faults(gw: Faulty) -> None:
    """30% of the store's calls fail (a third of the failing writes landing) or are slow:
    every answer is a 2xx or a 503, every 202 upload is in the store, and clients that retry
    each 503 finish every workflow with one completed attempt per step."""
    client, store = gw
    token, service = client.token(), client.service_token()
    store.fail_share, store.slow_share = 0.3, 0.1
    rng = random.Random(11)
    retrying = Retrying(client)

    accepted = []
    for i in range(30):
        response = await retrying.fetch("POST", UPLOAD, {"name": f"Mug {i}"}, token)
        assert response.status == 202, response.body
        accepted.append(response.body["workflow_id"])
    for workflow_id in rng.sample(accepted, len(accepted)):
        while True:
            path = f"/api/v1/workflow/status?workflow_id={workflow_id}"
            doc = (await retrying.fetch("GET", path, None, token)).body
            if doc["status"] != w.RUNNING:
                break
            step = doc["steps"][doc["current_step"]]
            if step["status"] != w.DISPATCHED:  # its dispatch waits for the relay
                continue
            body = {
                "workflow_id": workflow_id,
                "step_id": step["step_id"],
                "step_type": step["name"],
                "success": True,
                "result": {"done": step["name"]},
            }
            answer = await retrying.fetch("POST", "/api/v1/workflow/step-completed", body, service)
            assert answer.status == 200, answer.body
    assert set(retrying.statuses) <= {200, 202, 503}, retrying.statuses
    assert retrying.statuses.count(503) > 0 and store.counts[LANDED] > 0
    store.fail_share = store.slow_share = 0.0
    every = await store.list_workflows(owner=None, status=None, limit=1000)
    assert sorted(d["id"] for d in every) == sorted(accepted), "a retried upload made another"
    for workflow_id in accepted:
        doc = await stored(store, workflow_id)
        assert doc is not None and doc["status"] == w.COMPLETED
        for step in doc["steps"]:
            assert [a["outcome"] for a in step["attempts"]] == [w.COMPLETED], step


# -- the background loops ----------------------------------------------------------------


async def test_the_sweeper_and_relay_carry_on_through_store_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = faulty(tmp_path, calls=frozenset({"due", "unpublished"}))

    def configure(settings: settings_module.Settings) -> None:
        settings.pipeline.steps[0].timeout = settings_module.Duration(0.2)
        settings.pipeline.steps[0].backoff = settings_module.Duration(0.01)
        settings.server.relay_interval = settings_module.Duration(0.05)

    async with running_gateway(tmp_path, configure, {"store": store}) as client:
        workflow_id = await client.upload(client.token())
        store.fail_share = 1.0
        with caplog.at_level("WARNING"):
            await eventually(lambda: store.counts[LOST] + store.counts[TIMEOUT] >= 10)
        assert all(not task.done() for task in client.gateway._tasks)
        assert "store unavailable: injected fault" in caplog.text
        assert "Traceback" not in caplog.text
        store.fail_share = 0.0

        async def attempt() -> int:
            return int((await client.status(workflow_id))["steps"][0]["attempt"])

        await eventually(attempt, lambda n: n >= 2)  # the deadline fired after all


async def test_a_sweep_goes_on_past_a_workflow_whose_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = faulty(tmp_path)

    def configure(settings: settings_module.Settings) -> None:
        settings.pipeline.steps[0].timeout = settings_module.Duration(0.1)
        settings.server.sweep_interval = settings_module.Duration(3600)  # swept by the test

    async with running_gateway(tmp_path, configure, {"store": store}) as client:
        for _ in range(3):
            await client.upload(client.token())
        orchestrator = client.gateway.orchestrator
        orchestrator.clock = lambda: 4_000_000_000.0  # every deadline has passed
        fails = iter([True, False, False])
        real = store.inner.replace

        async def replace(*args: Any) -> int:
            if next(fails):
                raise StoreError("SQLite: database or disk is full")
            return await real(*args)

        monkeypatch.setattr(store.inner, "replace", replace)
        assert await orchestrator.sweep() == 2  # the two after the failing one


async def test_a_gateway_process_with_faults_configured_answers_only_2xx_and_503(
    tmp_path: Path,
) -> None:
    """server.py with `storage.faults` on: clients that retry each 503 get every upload and
    report through, and a gateway started on the same file without faults has each of them,
    applied once."""
    port = free_port()
    config = gateway_config(port, "faulty", f"sqlite:///{tmp_path}/stox.db", "").replace(
        "storage:\n",
        "storage:\n  faults: {seed: 5, fail_share: 0.3, slow_share: 0.1, slow: 20ms}\n",
    )
    client = remote(port)
    token, service = client.token(), client.service_token()
    retrying = Retrying(client)

    gateway = start_gateway(tmp_path, "gateway-faulty", config)
    reported = {}
    try:
        await wait_ready(gateway, port)
        for i in range(20):
            response = await retrying.fetch("POST", UPLOAD, {"name": f"Mug {i}"}, token)
            assert response.status == 202, response.body
            workflow_id = response.body["workflow_id"]
            path = f"/api/v1/workflow/status?workflow_id={workflow_id}"
            step = (await retrying.fetch("GET", path, None, token)).body["steps"][0]
            body = completion(workflow_id, step["step_id"], step["name"])
            answer = await retrying.fetch("POST", COMPLETED, body, service)
            assert answer.status == 200, answer.body
            reported[workflow_id] = step["step_id"]
    finally:
        gateway.stop()
    assert set(retrying.statuses) <= {200, 202, 503} and 503 in retrying.statuses
    assert "injecting store faults (seed 5, 0.3 failing, 0.1 slow): testing only" in gateway.log()

    async with running_gateway(tmp_path) as plain:
        for workflow_id, step_id in reported.items():
            step = (await plain.status(workflow_id))["steps"][0]
            assert [(a["step_id"], a["outcome"]) for a in step["attempts"]] == [
                (step_id, w.COMPLETED)
            ]
