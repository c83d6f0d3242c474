"""Named pipelines, parallel steps and review steps (issue 14) over HTTP, against a real gateway.

Each test configures its pipelines as `pipelines:` in the settings would, drives the workflow
with service reports and reviews over HTTP, and checks the answers, the stored workflow and
the events it published.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    CANCEL,
    RETRY,
    STATUS,
    UPLOAD,
    Clock,
    RecordingBus,
    RunningGateway,
    assert_error,
    eventually,
    report,
    running_gateway,
)

import settings as settings_module
from settings import Duration, PipelineSettings, StepSettings
from stox.bus.base import Event

REVIEW = "/api/v1/workflow/review"
PIPELINES = "/api/v1/pipelines"
VERSION = re.compile(r"^[0-9a-f]{12}$")
DAY = 24 * 3600.0

# the example: image work and AI copy at once, then a person reviews, then SEO
APPAREL: list[dict[str, Any]] = [
    {"name": "image_processing", "timeout": 120},
    {"name": "ai_enhancement"},
    {
        "name": "copy_review",
        "kind": "review",
        "after": ["image_processing", "ai_enhancement"],
        "timeout": DAY,
    },
    {"name": "seo_generation", "after": ["copy_review"]},
]
# two independent service steps and a service step joining them
PARALLEL: list[dict[str, Any]] = [
    {"name": "image_processing", "max_attempts": 1},
    {"name": "ai_enhancement", "max_attempts": 1},
    {"name": "seo_generation", "after": ["image_processing", "ai_enhancement"]},
]


# -- helpers -------------------------------------------------------------------------------


def pipeline(specs: list[dict[str, Any]], **review: Any) -> PipelineSettings:
    """Pipeline settings from step dicts as YAML gives them; `review` fields go on the review
    step (on_reject, on_deadline, timeout)."""
    steps = []
    for spec in specs:
        fields = dict(spec)
        if fields.get("kind") == "review":
            fields.update(review)
        for key in ("timeout", "backoff"):
            if fields.get(key) is not None:
                fields[key] = Duration(fields[key])
        steps.append(StepSettings(**fields))
    return PipelineSettings(steps=steps)


def with_pipelines(**pipelines: PipelineSettings) -> Callable[[settings_module.Settings], None]:
    def configure(settings: settings_module.Settings) -> None:
        settings.pipelines = dict(pipelines)

    return configure


def apparel(**review: Any) -> Callable[[settings_module.Settings], None]:
    return with_pipelines(apparel=pipeline(APPAREL, **review), parallel=pipeline(PARALLEL))


async def upload(gw: RunningGateway, token: str, pipeline: str | None = None) -> str:
    body: dict[str, Any] = {"name": "Linen shirt", "description": "washed linen"}
    if pipeline is not None:
        body["pipeline"] = pipeline
    response = await gw.fetch("POST", UPLOAD, body, token=token)
    assert response.status == 202, response.body
    return str(response.body["workflow_id"])


async def status(gw: RunningGateway, workflow_id: str, token: str | None = None) -> dict[str, Any]:
    response = await gw.fetch(
        "GET", f"{STATUS}?workflow_id={workflow_id}", token=token or gw.token()
    )
    assert response.status == 200, response.body
    return dict(response.body)


def step(doc: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [s for s in doc["steps"] if s["name"] == name]
    return dict(found)


def statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["status"] for s in doc["steps"]}


async def done(
    gw: RunningGateway, workflow_id: str, name: str, result: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Report step `name`'s current attempt as a success; the workflow afterwards."""
    current = step(await status(gw, workflow_id), name)
    answer = await report(gw, workflow_id, current, result=result or {"done": name})
    assert answer.status == 200 and answer.body["result"] == "applied", answer.body
    return await status(gw, workflow_id)


async def waiting_review(gw: RunningGateway, token: str | None = None) -> tuple[str, str]:
    """An apparel workflow of alice's whose copy_review waits: its id and the review's step_id."""
    workflow_id = await upload(gw, token or gw.token(), "apparel")
    await done(gw, workflow_id, "image_processing", {"images": ["shirt.webp"]})
    doc = await done(gw, workflow_id, "ai_enhancement", {"title": "Linen shirt", "tags": ["x"]})
    review = step(doc, "copy_review")
    assert review["status"] == "waiting", doc
    return workflow_id, str(review["step_id"])


def decision(
    workflow_id: str, step_id: str, decision: str = "approve", **fields: Any
) -> dict[str, Any]:
    return {"workflow_id": workflow_id, "step_id": step_id, "decision": decision, **fields}


def for_workflow(bus: RecordingBus, workflow_id: str, key: str | None = None) -> list[Event]:
    return [
        e
        for e in bus.events
        if e.payload.get("workflow_id") == workflow_id and (key is None or e.routing_key == key)
    ]


def dispatches(bus: RecordingBus, workflow_id: str) -> list[Event]:
    return [
        e
        for e in for_workflow(bus, workflow_id)
        if e.routing_key.startswith("step.") and e.routing_key != "step.completed"
    ]


def changes(bus: RecordingBus, workflow_id: str) -> list[tuple[int, list[tuple[str, Any]]]]:
    """Each `workflow.changed` of the workflow: its version and its (type, step) changes."""
    return [
        (e.payload["version"], [(c["type"], c["step"]) for c in e.payload["changes"]])
        for e in for_workflow(bus, workflow_id, "workflow.changed")
    ]


async def settled(gw: RunningGateway) -> None:
    await gw.gateway.orchestrator.drain()


def durable(doc: dict[str, Any]) -> dict[str, Any]:
    """What a refused or duplicate request must not change (not the outbox's confirmation)."""
    keys = ("status", "steps", "current_step", "version", "wake_at", "pipeline")
    return {key: doc[key] for key in keys}


# -- naming a pipeline on upload -----------------------------------------------------------


async def test_an_upload_naming_a_pipeline_runs_on_it_and_records_name_and_version(
    tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        token = gw.token()
        response = await gw.fetch(
            "POST", UPLOAD, {"name": "Linen shirt", "pipeline": "apparel"}, token=token
        )
        assert response.status == 202, response.body
        assert response.body["message"] == (
            "workflow accepted; image_processing, ai_enhancement dispatched"
        )
        doc = await status(gw, response.body["workflow_id"], token)

        assert doc["pipeline"]["name"] == "apparel"
        assert VERSION.match(doc["pipeline"]["version"])
        assert [s["name"] for s in doc["pipeline"]["steps"]] == [s["name"] for s in APPAREL]
        # a stored step keeps what differs from the defaults: kind only for the review
        assert [s.get("kind", "service") for s in doc["pipeline"]["steps"]] == [
            "service",
            "service",
            "review",
            "service",
        ]
        assert step(doc, "copy_review")  # the workflow's steps are the pipeline's
        assert [s["name"] for s in doc["steps"]] == [s["name"] for s in APPAREL]
        assert statuses(doc) == {
            "image_processing": "dispatched",
            "ai_enhancement": "dispatched",
            "copy_review": "pending",
            "seo_generation": "pending",
        }
        listed = await gw.fetch("GET", PIPELINES, token=token)
        versions = {p["name"]: p["version"] for p in listed.body["pipelines"]}
        assert doc["pipeline"]["version"] == versions["apparel"]
        assert versions["apparel"] != versions["default"]


async def test_without_a_pipeline_an_upload_runs_on_default_as_before(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        token = gw.token()
        response = await gw.fetch("POST", UPLOAD, {"name": "Mug"}, token=token)

        assert response.status == 202
        assert set(response.body) == {"workflow_id", "status", "message"}
        assert response.body["message"] == "workflow accepted; image_processing dispatched"
        doc = await status(gw, response.body["workflow_id"], token)
        assert doc["pipeline"]["name"] == "default"
        assert [s["name"] for s in doc["steps"]] == [
            "image_processing",
            "ai_enhancement",
            "seo_generation",
        ]
        assert list(statuses(doc).values()) == ["dispatched", "pending", "pending"]
        named = await upload(gw, token, "default")
        assert (await status(gw, named, token))["pipeline"] == doc["pipeline"]


async def test_an_idempotency_key_answers_its_pipelines_workflow_and_refuses_another(
    tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        token, key = gw.token(), {"Idempotency-Key": "shirt-1"}
        body = {"name": "Linen shirt", "pipeline": "apparel"}
        first = await gw.fetch("POST", UPLOAD, body, token=token, headers=key)
        again = await gw.fetch("POST", UPLOAD, body, token=token, headers=key)
        assert first.status == again.status == 202
        assert again.body == first.body
        other = await gw.fetch(
            "POST", UPLOAD, {**body, "pipeline": "parallel"}, token=token, headers=key
        )
        assert_error(other, 422, "idempotency_key_reused")
        listed = await gw.fetch("GET", "/api/v1/workflow/list", token=token)
        assert [w["id"] for w in listed.body["workflows"]] == [first.body["workflow_id"]]


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("electronics", "unknown"),
        ("Apparel", "malformed"),
        ("", "malformed"),
        ("apparel!", "malformed"),
        ("a" * 65, "malformed"),
        (5, "malformed"),
        (["apparel"], "malformed"),
    ],
)
async def test_an_unknown_or_malformed_pipeline_is_400_naming_it(
    tmp_path: Path, name: Any, code: str
) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        token = gw.token()
        response = await gw.fetch("POST", UPLOAD, {"name": "Mug", "pipeline": name}, token=token)
        error = assert_error(response, 400, "invalid_input", "pipeline")
        if code == "unknown":
            assert "apparel" in error["fields"]["pipeline"]  # the names it could be
            assert "default" in error["fields"]["pipeline"]
        listed = await gw.fetch("GET", "/api/v1/workflow/list", token=token)
        assert listed.body["workflows"] == []  # nothing was stored


async def test_get_pipelines_lists_default_first_then_the_others(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        assert_error(await gw.fetch("GET", PIPELINES), 401)
        response = await gw.fetch("GET", PIPELINES, token=gw.token())

        assert response.status == 200
        names = [p["name"] for p in response.body["pipelines"]]
        assert names == ["default", "apparel", "parallel"]
        for listed in response.body["pipelines"]:
            assert set(listed) == {"name", "version", "steps"}
            assert VERSION.match(listed["version"])
        default, shown, _ = response.body["pipelines"]
        assert [s["name"] for s in default["steps"]] == [
            "image_processing",
            "ai_enhancement",
            "seo_generation",
        ]
        review = shown["steps"][2]
        assert review["kind"] == "review"
        assert review["after"] == ["image_processing", "ai_enhancement"]
        assert review["timeout"] == DAY
        # the defaults (on_reject and on_deadline fail) are left out
        assert "on_reject" not in review and "on_deadline" not in review
        assert default["steps"] == [
            {"name": "image_processing"},
            {"name": "ai_enhancement"},
            {"name": "seo_generation"},
        ]
        # a reviewer's token (a user's audience) may read them too
        as_reviewer = await gw.fetch("GET", PIPELINES, token=gw.token("rita", "reviewer"))
        assert as_reviewer.status == 200 and as_reviewer.body == response.body


# -- parallel steps and fan-in -------------------------------------------------------------


async def test_independent_steps_go_out_together_and_the_join_waits_for_both(
    tmp_path: Path,
) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, apparel(), {"bus": bus}) as gw:
        workflow_id = await upload(gw, gw.token(), "parallel")
        await settled(gw)

        first = dispatches(bus, workflow_id)
        assert sorted(e.routing_key for e in first) == [
            "step.ai_enhancement",
            "step.image_processing",
        ]
        # one transition: the same moment, and one change notification listing both
        assert first[0].payload["occurred_at"] == first[1].payload["occurred_at"]
        assert all(e.payload["results"] == {} for e in first)
        [(version, kinds)] = changes(bus, workflow_id)
        assert version == 1  # the upload's transition
        assert sorted(kinds) == [
            ("step_dispatched", "ai_enhancement"),
            ("step_dispatched", "image_processing"),
        ]

        doc = await done(gw, workflow_id, "ai_enhancement", {"copy": "soft"})
        assert statuses(doc)["seo_generation"] == "pending"  # one of two is not enough
        await settled(gw)
        assert len(dispatches(bus, workflow_id)) == 2

        doc = await done(gw, workflow_id, "image_processing", {"images": ["a.webp"]})
        assert statuses(doc)["seo_generation"] == "dispatched"
        await settled(gw)
        [join] = dispatches(bus, workflow_id)[2:]
        assert join.routing_key == "step.seo_generation"
        assert join.payload["results"] == {
            "image_processing": {"images": ["a.webp"]},
            "ai_enhancement": {"copy": "soft"},
        }

        doc = await done(gw, workflow_id, "seo_generation", {"slug": "linen-shirt"})
        assert doc["status"] == "completed"
        await settled(gw)
        [completed] = for_workflow(bus, workflow_id, "workflow.completed")
        assert completed.payload["results"] == {
            "image_processing": {"images": ["a.webp"]},
            "ai_enhancement": {"copy": "soft"},
            "seo_generation": {"slug": "linen-shirt"},
        }


async def test_a_dispatch_after_a_review_carries_every_transitive_result(tmp_path: Path) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, apparel(), {"bus": bus}) as gw:
        workflow_id, review_id = await waiting_review(gw)
        answer = await gw.fetch(
            "POST", REVIEW, decision(workflow_id, review_id, result={"ok": 1}), token=gw.token()
        )
        assert answer.status == 200, answer.body
        await settled(gw)
        [seo] = for_workflow(bus, workflow_id, "step.seo_generation")
        assert seo.payload["results"] == {
            "image_processing": {"images": ["shirt.webp"]},
            "ai_enhancement": {"title": "Linen shirt", "tags": ["x"]},
            "copy_review": {"ok": 1},
        }
        # the review itself was never sent to a queue
        assert for_workflow(bus, workflow_id, "step.copy_review") == []


async def test_a_failing_parallel_step_fails_the_workflow_and_the_siblings_late_report_is_409(
    tmp_path: Path,
) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, apparel(), {"bus": bus}) as gw:
        token = gw.token()
        workflow_id = await upload(gw, token, "parallel")
        doc = await status(gw, workflow_id, token)
        sibling = step(doc, "ai_enhancement")

        answer = await report(
            gw, workflow_id, step(doc, "image_processing"), success=False, error="no pixels"
        )
        assert answer.status == 200 and answer.body["status"] == "failed"
        doc = await status(gw, workflow_id, token)
        assert doc["status"] == "failed"
        assert statuses(doc) == {
            "image_processing": "failed",
            "ai_enhancement": "cancelled",
            "seo_generation": "pending",
        }
        assert step(doc, "image_processing")["error"] == "no pixels"
        assert [a["outcome"] for a in step(doc, "ai_enhancement")["attempts"]] == ["cancelled"]
        await settled(gw)
        [failed] = for_workflow(bus, workflow_id, "workflow.failed")
        assert failed.payload["error"] == {"step": "image_processing", "message": "no pixels"}

        late = await report(gw, workflow_id, sibling)
        assert_error(late, 409, "stale_report")
        assert durable(await status(gw, workflow_id, token)) == durable(doc)

        # retry restarts the failed step and the sibling its failure stopped
        retried = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)
        assert retried.status == 200, retried.body
        assert retried.body["status"] == "running"
        assert statuses(retried.body) == {
            "image_processing": "dispatched",
            "ai_enhancement": "dispatched",
            "seo_generation": "pending",
        }
        again = step(retried.body, "ai_enhancement")
        assert again["attempt"] == 1 and again["step_id"] != sibling["step_id"]
        assert_error(await report(gw, workflow_id, sibling), 409, "stale_report")
        await done(gw, workflow_id, "ai_enhancement")
        await done(gw, workflow_id, "image_processing")
        doc = await done(gw, workflow_id, "seo_generation")
        assert doc["status"] == "completed"


async def test_retry_restarts_only_the_failed_step_and_keeps_completed_results(
    tmp_path: Path,
) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, apparel(), {"bus": bus}) as gw:
        token = gw.token()
        workflow_id = await upload(gw, token, "parallel")
        await done(gw, workflow_id, "ai_enhancement", {"copy": "kept"})
        doc = await status(gw, workflow_id, token)
        failing = step(doc, "image_processing")
        assert (await report(gw, workflow_id, failing, success=False)).body["status"] == "failed"

        retried = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)

        assert retried.status == 200, retried.body
        assert statuses(retried.body) == {
            "image_processing": "dispatched",
            "ai_enhancement": "completed",
            "seo_generation": "pending",
        }
        assert step(retried.body, "ai_enhancement")["result"] == {"copy": "kept"}
        restarted = step(retried.body, "image_processing")
        assert restarted["attempt"] == 1 and restarted["step_id"] != failing["step_id"]
        assert restarted["error"] is None
        await settled(gw)
        sent = [e.routing_key for e in dispatches(bus, workflow_id)]
        assert sent.count("step.ai_enhancement") == 1  # not sent again
        assert sent.count("step.image_processing") == 2

        doc = await done(gw, workflow_id, "image_processing")
        assert statuses(doc)["seo_generation"] == "dispatched"
        await settled(gw)
        [seo] = for_workflow(bus, workflow_id, "step.seo_generation")
        assert seo.payload["results"]["ai_enhancement"] == {"copy": "kept"}


async def test_cancel_of_a_partly_parallel_workflow(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        token = gw.token()
        workflow_id = await upload(gw, token, "parallel")
        await done(gw, workflow_id, "ai_enhancement", {"copy": "kept"})
        running = step(await status(gw, workflow_id, token), "image_processing")

        response = await gw.fetch("POST", CANCEL, {"workflow_id": workflow_id}, token=token)

        assert response.status == 200, response.body
        assert response.body["status"] == "cancelled"
        assert response.body["wake_at"] is None
        assert statuses(response.body) == {
            "image_processing": "cancelled",
            "ai_enhancement": "completed",
            "seo_generation": "cancelled",
        }
        assert step(response.body, "ai_enhancement")["result"] == {"copy": "kept"}
        assert [a["outcome"] for a in step(response.body, "image_processing")["attempts"]] == [
            "cancelled"
        ]
        assert_error(await report(gw, workflow_id, running), 409, "stale_report")
        retry = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)
        assert_error(retry, 409, "not_allowed")


# -- stored definitions --------------------------------------------------------------------


@pytest.mark.parametrize("then", ["changed", "removed"])
async def test_a_workflow_finishes_on_its_definition_after_a_restart_without_it(
    tmp_path: Path, store_url: str, then: str
) -> None:
    async with running_gateway(tmp_path, apparel(), storage__url=store_url) as gw:
        token = gw.token()
        workflow_id = await upload(gw, token, "apparel")
        await done(gw, workflow_id, "image_processing", {"images": ["a.webp"]})
        began = (await status(gw, workflow_id, token))["pipeline"]

    if then == "changed":  # no review any more, and another step instead
        changed: list[dict[str, Any]] = [
            {"name": "image_processing"},
            {"name": "ai_enhancement"},
            {"name": "quality_check", "after": ["image_processing", "ai_enhancement"]},
        ]
        configure = with_pipelines(apparel=pipeline(changed))
    else:
        configure = with_pipelines()
    async with running_gateway(tmp_path, configure, storage__url=store_url) as gw:
        token = gw.token()
        listed = await gw.fetch("GET", PIPELINES, token=token)
        now = {p["name"]: p["version"] for p in listed.body["pipelines"]}
        if then == "changed":
            assert now["apparel"] != began["version"]
        else:
            assert "apparel" not in now
            refused = await gw.fetch(
                "POST", UPLOAD, {"name": "Mug", "pipeline": "apparel"}, token=token
            )
            assert_error(refused, 400, "invalid_input", "pipeline")

        doc = await done(gw, workflow_id, "ai_enhancement", {"title": "T"})
        assert step(doc, "copy_review")["status"] == "waiting"  # the review it began with
        review_id = step(doc, "copy_review")["step_id"]
        answer = await gw.fetch("POST", REVIEW, decision(workflow_id, review_id), token=token)
        assert answer.status == 200, answer.body
        doc = await done(gw, workflow_id, "seo_generation")

        assert doc["status"] == "completed"
        assert doc["pipeline"] == began
        assert [s["name"] for s in doc["steps"]] == [s["name"] for s in APPAREL]
        if then == "changed":  # a new upload runs on the new definition
            fresh = await status(gw, await upload(gw, token, "apparel"), token)
            assert fresh["pipeline"]["version"] == now["apparel"]
            assert [s["name"] for s in fresh["steps"]][-1] == "quality_check"


# -- reviews: who may decide ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "role"), [("alice", "user"), ("rita", "reviewer"), ("root", "admin")]
)
async def test_the_owner_a_reviewer_or_an_admin_approves(
    tmp_path: Path, user: str, role: str
) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        workflow_id, review_id = await waiting_review(gw)

        response = await gw.fetch(
            "POST", REVIEW, decision(workflow_id, review_id), token=gw.token(user, role)
        )

        assert response.status == 200, response.body
        assert response.body["result"] == "applied"
        assert response.body["workflow_id"] == workflow_id
        assert response.body["status"] == "running"
        doc = await status(gw, workflow_id)
        assert response.body["version"] == doc["version"]
        reviewed = step(doc, "copy_review")
        assert reviewed["status"] == "completed"
        assert reviewed["result"] == {}
        assert reviewed["review"]["decision"] == "approved"
        assert reviewed["review"]["by"] == user
        assert reviewed["review"]["at"] == reviewed["completed_at"]
        assert reviewed["review"]["reason"] is None
        assert reviewed["attempts"][-1]["by"] == user
        assert step(doc, "seo_generation")["status"] == "dispatched"


async def test_anyone_else_gets_404_a_service_403_and_no_token_401(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        workflow_id, review_id = await waiting_review(gw)
        body = decision(workflow_id, review_id)
        before = await status(gw, workflow_id)

        assert_error(await gw.fetch("POST", REVIEW, body, token=gw.token("bob")), 404, "not_found")
        assert_error(await gw.fetch("POST", REVIEW, body, token=gw.service_token()), 403)
        assert_error(await gw.fetch("POST", REVIEW, body), 401)
        unknown = decision("e" * 32, review_id)
        assert_error(await gw.fetch("POST", REVIEW, unknown, token=gw.token()), 404, "not_found")
        assert durable(await status(gw, workflow_id)) == durable(before)


# -- reviews: decisions --------------------------------------------------------------------


async def test_an_approval_with_edits_becomes_the_steps_result_and_the_final_results(
    tmp_path: Path,
) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, apparel(), {"bus": bus}) as gw:
        workflow_id, review_id = await waiting_review(gw)
        edits = {"title": "Washed linen shirt", "tags": ["linen", "shirt"]}

        response = await gw.fetch(
            "POST",
            REVIEW,
            decision(workflow_id, review_id, result=edits),
            token=gw.token("rita", "reviewer"),
        )

        assert response.status == 200, response.body
        doc = await status(gw, workflow_id)
        assert step(doc, "copy_review")["result"] == edits
        doc = await done(gw, workflow_id, "seo_generation", {"slug": "washed-linen-shirt"})
        assert doc["status"] == "completed"
        await settled(gw)
        [completed] = for_workflow(bus, workflow_id, "workflow.completed")
        assert completed.payload["results"]["copy_review"] == edits
        assert completed.payload["results"]["seo_generation"] == {"slug": "washed-linen-shirt"}


async def test_a_rejection_fails_the_workflow_with_the_reason(tmp_path: Path) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, apparel(), {"bus": bus}) as gw:
        workflow_id, review_id = await waiting_review(gw)

        response = await gw.fetch(
            "POST",
            REVIEW,
            decision(workflow_id, review_id, "reject", reason="too salesy"),
            token=gw.token(),
        )

        assert response.status == 200, response.body
        assert response.body["status"] == "failed"
        doc = await status(gw, workflow_id)
        rejected = step(doc, "copy_review")
        assert rejected["status"] == "failed"
        assert "too salesy" in rejected["error"]
        assert rejected["review"]["decision"] == "rejected"
        assert rejected["review"]["reason"] == "too salesy"
        assert rejected["review"]["by"] == "alice"
        assert [a["outcome"] for a in rejected["attempts"]] == ["rejected"]
        assert statuses(doc)["seo_generation"] == "pending"
        await settled(gw)
        [failed] = for_workflow(bus, workflow_id, "workflow.failed")
        assert failed.payload["error"]["step"] == "copy_review"
        assert "too salesy" in failed.payload["error"]["message"]


async def test_a_rejection_naming_an_upstream_step_runs_it_again_and_the_review_waits_again(
    tmp_path: Path,
) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, apparel(on_reject="ai_enhancement"), {"bus": bus}) as gw:
        token = gw.token()
        workflow_id, review_id = await waiting_review(gw)
        first_ai = step(await status(gw, workflow_id), "ai_enhancement")

        response = await gw.fetch(
            "POST",
            REVIEW,
            decision(workflow_id, review_id, "reject", reason="say linen"),
            token=token,
        )

        assert response.status == 200, response.body
        assert response.body["status"] == "running"
        doc = await status(gw, workflow_id)
        assert statuses(doc) == {
            "image_processing": "completed",  # not upstream of the rejection's target
            "ai_enhancement": "dispatched",
            "copy_review": "pending",
            "seo_generation": "pending",
        }
        again = step(doc, "ai_enhancement")
        assert again["step_id"] != first_ai["step_id"]
        assert again["result"] is None
        assert step(doc, "copy_review")["review"]["reason"] == "say linen"
        await settled(gw)
        assert len(for_workflow(bus, workflow_id, "step.ai_enhancement")) == 2
        assert len(for_workflow(bus, workflow_id, "step.image_processing")) == 1
        # the rejected review's attempt is over: approving it now is not allowed
        late = await gw.fetch("POST", REVIEW, decision(workflow_id, review_id), token=token)
        assert_error(late, 409, "not_allowed")
        # the first attempt's report again is the duplicate it always was
        assert (await report(gw, workflow_id, first_ai)).body["result"] == "duplicate"

        doc = await done(gw, workflow_id, "ai_enhancement", {"title": "Linen shirt, washed"})
        waiting = step(doc, "copy_review")
        assert waiting["status"] == "waiting"
        assert waiting["step_id"] != review_id
        answer = await gw.fetch(
            "POST", REVIEW, decision(workflow_id, waiting["step_id"]), token=token
        )
        assert answer.status == 200, answer.body
        doc = await done(gw, workflow_id, "seo_generation")
        assert doc["status"] == "completed"
        assert [a["outcome"] for a in step(doc, "copy_review")["attempts"]] == [
            "rejected",
            "completed",
        ]


@pytest.mark.parametrize(
    ("first", "fields"),
    [("approve", {"result": {"title": "T"}}), ("reject", {"reason": "no"})],
)
async def test_the_same_decision_again_is_a_duplicate_and_changes_nothing(
    tmp_path: Path, first: str, fields: dict[str, Any]
) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        workflow_id, review_id = await waiting_review(gw)
        body = decision(workflow_id, review_id, first, **fields)
        applied = await gw.fetch("POST", REVIEW, body, token=gw.token())
        assert applied.body["result"] == "applied", applied.body
        before = await status(gw, workflow_id)

        again = await gw.fetch("POST", REVIEW, body, token=gw.token("rita", "reviewer"))

        assert again.status == 200
        assert again.body == {**applied.body, "result": "duplicate"}
        after = await status(gw, workflow_id)
        assert durable(after) == durable(before)
        assert step(after, "copy_review")["review"]["by"] == "alice"
        other = "reject" if first == "approve" else "approve"
        changed_mind = decision(
            workflow_id, review_id, other, **({"reason": "no"} if other == "reject" else {})
        )
        assert_error(await gw.fetch("POST", REVIEW, changed_mind, token=gw.token()), 409)


async def test_a_review_of_a_step_not_waiting_is_409(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        token = gw.token()
        workflow_id = await upload(gw, token, "apparel")
        doc = await status(gw, workflow_id, token)
        service_step = step(doc, "image_processing")["step_id"]
        # a service step (dispatched, then completed) is no review
        answer = await gw.fetch("POST", REVIEW, decision(workflow_id, service_step), token=token)
        assert_error(answer, 409, "not_allowed")
        await done(gw, workflow_id, "image_processing")
        answer = await gw.fetch("POST", REVIEW, decision(workflow_id, service_step), token=token)
        assert_error(answer, 409, "not_allowed")
        # a step_id the workflow never had
        answer = await gw.fetch("POST", REVIEW, decision(workflow_id, "d" * 32), token=token)
        assert_error(answer, 409, "not_allowed")

        # a waiting review of a workflow cancelled meanwhile
        reviewed, review_id = await waiting_review(gw)
        cancelled = await gw.fetch("POST", CANCEL, {"workflow_id": reviewed}, token=token)
        assert cancelled.status == 200
        assert step(cancelled.body, "copy_review")["status"] == "cancelled"
        answer = await gw.fetch("POST", REVIEW, decision(reviewed, review_id), token=token)
        assert_error(answer, 409, "not_allowed")
        # a default-pipeline workflow has no review at all
        plain = await upload(gw, token)
        first = step(await status(gw, plain, token), "image_processing")["step_id"]
        answer = await gw.fetch("POST", REVIEW, decision(plain, first), token=token)
        assert_error(answer, 409, "not_allowed")


REVIEW_FIELD_ERRORS = [
    ({"decision": "reject"}, "reason"),
    ({"decision": "reject", "reason": ""}, "reason"),
    ({"decision": "reject", "reason": None}, "reason"),
    ({"decision": "reject", "reason": "x" * 4001}, "reason"),
    ({"decision": "approve", "reason": "fine"}, "reason"),
    ({"decision": "reject", "reason": "no", "result": {"title": "T"}}, "result"),
    ({"decision": "approve", "result": "ok"}, "result"),
    ({"decision": "approve", "result": [1]}, "result"),
    ({"decision": "approve", "result": {"score": float("nan")}}, "result"),
    ({"decision": "approve", "result": {"title": "\ud800"}}, "result"),
    (
        {
            "decision": "approve",
            "result": {"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
        },
        "result",
    ),
    ({"decision": "maybe"}, "decision"),
    ({"decision": "APPROVE"}, "decision"),
    ({"decision": None}, "decision"),
    ({}, "decision"),
    ({"decision": "approve", "workflow_id": "xyz"}, "workflow_id"),
    ({"decision": "approve", "workflow_id": None}, "workflow_id"),
    ({"decision": "approve", "step_id": "A" * 32}, "step_id"),
    ({"decision": "approve", "step_id": 7}, "step_id"),
    ({"decision": "approve", "by": "mallory"}, "by"),
    ({"decision": "approve", "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("change", "field"), REVIEW_FIELD_ERRORS)
async def test_bad_review_bodies_are_400_naming_the_field(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        workflow_id, review_id = await waiting_review(gw)
        before = await status(gw, workflow_id)
        body: dict[str, Any] = {"workflow_id": workflow_id, "step_id": review_id, **change}
        if "decision" not in change:
            body.pop("decision", None)

        response = await gw.fetch("POST", REVIEW, body, token=gw.token())

        assert_error(response, 400, "invalid_input", field)
        assert durable(await status(gw, workflow_id)) == durable(before)


async def test_missing_ids_are_400_naming_them(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        for missing in ("workflow_id", "step_id"):
            body = decision("a" * 32, "b" * 32)
            del body[missing]
            response = await gw.fetch("POST", REVIEW, body, token=gw.token())
            assert_error(response, 400, "invalid_input", missing)
        assert_error(
            await gw.fetch("POST", REVIEW, raw=b"{", token=gw.token()), 400, "invalid_json"
        )


# -- review deadlines ----------------------------------------------------------------------


async def test_a_passed_review_deadline_escalates_and_the_review_keeps_waiting(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with running_gateway(tmp_path, apparel(on_deadline="escalate"), {"clock": clock}) as gw:
        workflow_id, review_id = await waiting_review(gw)
        waiting = step(await status(gw, workflow_id), "copy_review")
        assert waiting["deadline"] is not None
        assert (await status(gw, workflow_id))["wake_at"] == waiting["deadline"]

        clock.advance(DAY - 1)  # not yet
        await gw.gateway.sweep()
        assert "review" not in step(await status(gw, workflow_id), "copy_review")
        clock.advance(2)
        doc = await eventually(
            lambda: status(gw, workflow_id),
            lambda d: "review" in step(d, "copy_review"),
        )

        escalated = step(doc, "copy_review")
        assert escalated["status"] == "waiting" and escalated["step_id"] == review_id
        assert escalated["deadline"] is None
        assert set(escalated["review"]) == {"escalated_at"}
        assert doc["status"] == "running" and doc["wake_at"] is None
        clock.advance(DAY)
        await gw.gateway.sweep()
        assert durable(await status(gw, workflow_id)) == durable(doc)  # escalated once, then waits

        answer = await gw.fetch(
            "POST", REVIEW, decision(workflow_id, review_id), token=gw.token("rita", "reviewer")
        )
        assert answer.status == 200, answer.body
        reviewed = step(await status(gw, workflow_id), "copy_review")
        assert reviewed["status"] == "completed"
        assert reviewed["review"]["by"] == "rita"
        assert reviewed["review"]["escalated_at"] == escalated["review"]["escalated_at"]


async def test_a_passed_review_deadline_fails_the_workflow(tmp_path: Path) -> None:
    clock = Clock()
    async with running_gateway(tmp_path, apparel(), {"clock": clock}) as gw:
        workflow_id, review_id = await waiting_review(gw)

        clock.advance(DAY + 1)
        doc = await eventually(lambda: status(gw, workflow_id), lambda d: d["status"] != "running")

        assert doc["status"] == "failed"
        timed_out = step(doc, "copy_review")
        assert timed_out["status"] == "failed"
        assert [a["outcome"] for a in timed_out["attempts"]] == ["timed_out"]
        assert "no review within" in timed_out["error"]
        late = await gw.fetch("POST", REVIEW, decision(workflow_id, review_id), token=gw.token())
        assert_error(late, 409, "not_allowed")


async def test_a_reviewer_sees_the_workflows_it_may_review_but_changes_only_its_own(
    tmp_path: Path,
) -> None:
    """A reviewer needs the step_id and the upstream results of another's waiting review: it
    reads every workflow (status, list) as an admin does; cancel and retry stay the owner's."""
    async with running_gateway(tmp_path, apparel()) as gw:
        workflow_id, review_id = await waiting_review(gw)
        rita = gw.token("rita", "reviewer")

        seen = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=rita)
        assert seen.status == 200, seen.body
        assert step(seen.body, "copy_review")["step_id"] == review_id
        assert step(seen.body, "ai_enhancement")["result"] == {
            "title": "Linen shirt",
            "tags": ["x"],
        }
        listed = await gw.fetch("GET", "/api/v1/workflow/list?status=running", token=rita)
        assert [w["id"] for w in listed.body["workflows"]] == [workflow_id]
        for path in (CANCEL, RETRY):
            refused = await gw.fetch("POST", path, {"workflow_id": workflow_id}, token=rita)
            assert_error(refused, 404, "not_found")
        # a plain user still sees only their own
        bob = gw.token("bob")
        hidden = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=bob)
        assert_error(hidden, 404, "not_found")
        assert (await gw.fetch("GET", "/api/v1/workflow/list", token=bob)).body["workflows"] == []


# -- the transition log ----------------------------------------------------------------------


async def test_the_transition_log_describes_parallel_steps_and_reviews(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    configure = apparel(on_deadline="escalate")
    with caplog.at_level("DEBUG", logger="stox.workflow"):
        async with running_gateway(tmp_path, configure, {"clock": clock}) as gw:
            workflow_id, review_id = await waiting_review(gw)
            clock.advance(DAY + 1)
            await gw.gateway.sweep()
            body = decision(workflow_id, review_id, "reject", reason="too salesy")
            assert (
                await gw.fetch("POST", REVIEW, body, token=gw.token("rita", "reviewer"))
            ).status == 200
            failing = await upload(gw, gw.token(), "parallel")
            ai = step(await status(gw, failing), "ai_enhancement")
            assert (await report(gw, failing, ai, success=False, error="no copy")).status == 200

    failures = [r for r in caplog.records if r.name == "stox.observe"]
    assert failures == [], [r.getMessage() for r in failures]
    lines = [r.getMessage() for r in caplog.records if r.name == "stox.workflow"]
    assert "step copy_review attempt 1 waiting for review (report)" in lines
    assert "step copy_review attempt 1 review escalated (wake)" in lines
    assert "step copy_review attempt 1 rejected by rita: too salesy (review)" in lines
    assert "workflow failed at step copy_review (review)" in lines
    # the step that failed, not the first one not completed (image_processing, running
    # beside it, was cancelled)
    assert "workflow failed at step ai_enhancement (report)" in lines


# -- retry after a review, metrics -----------------------------------------------------------


async def test_retry_after_a_rejection_or_a_passed_deadline_waits_for_review_again(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with running_gateway(tmp_path, apparel(), {"clock": clock}) as gw:
        token = gw.token()
        rejected, first = await waiting_review(gw)
        body = decision(rejected, first, "reject", reason="no")
        assert (await gw.fetch("POST", REVIEW, body, token=token)).body["status"] == "failed"
        lapsed, _ = await waiting_review(gw)
        clock.advance(DAY + 1)
        await eventually(lambda: status(gw, lapsed), lambda d: d["status"] == "failed")

        for workflow_id in (rejected, lapsed):
            retried = await gw.fetch("POST", RETRY, {"workflow_id": workflow_id}, token=token)
            assert retried.status == 200, retried.body
            review = step(retried.body, "copy_review")
            assert review["status"] == "waiting" and review["attempt"] == 1
            assert "review" not in review  # the earlier decision is in its attempts
            assert review["deadline"] > retried.body["created_at"]
            assert step(retried.body, "ai_enhancement")["status"] == "completed"
            answer = await gw.fetch(
                "POST", REVIEW, decision(workflow_id, review["step_id"]), token=token
            )
            assert answer.status == 200, answer.body
            doc = await done(gw, workflow_id, "seo_generation")
            assert doc["status"] == "completed"


async def test_metrics_count_workflows_by_pipeline(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, apparel()) as gw:
        workflow_id, review_id = await waiting_review(gw)
        answer = await gw.fetch("POST", REVIEW, decision(workflow_id, review_id), token=gw.token())
        assert answer.status == 200
        await done(gw, workflow_id, "seo_generation")
        await upload(gw, gw.token())

        response = await gw.fetch("GET", "/metrics")
        assert response.status == 200
        text = str(response.body)
        assert 'stox_workflows_started_total{pipeline="apparel"} 1.0' in text
        assert 'stox_workflows_started_total{pipeline="default"} 1.0' in text
        assert 'stox_workflows_completed_total{pipeline="apparel"} 1.0' in text
        assert 'stox_step_dispatches_total{step="copy_review"} 0.0' in text  # never sent out


# -- queues of steps no pipeline has any more ------------------------------------------------


class DeclaringBus(RecordingBus):
    """A bus whose queues are read by remote services, recording what the gateway declares."""

    remote_consumers = True

    def __init__(self) -> None:
        super().__init__()
        self.declared: dict[str, list[str]] = {}

    async def declare(self, queue: str, bindings: Any, *, exclusive: bool = False) -> None:
        self.declared[queue] = list(bindings)


async def test_a_removed_pipelines_service_step_keeps_its_queue_and_routing_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    removed: list[dict[str, Any]] = [
        {"name": "image_processing"},
        {"name": "tagging", "routing_key": "apparel.tagging"},
        {"name": "copy_review", "kind": "review", "after": ["image_processing", "tagging"]},
    ]
    first = DeclaringBus()
    async with running_gateway(
        tmp_path, with_pipelines(apparel=pipeline(removed)), {"bus": first}
    ) as gw:
        assert first.declared["stox.step.tagging"] == ["apparel.tagging"]
        assert "stox.step.copy_review" not in first.declared  # a review has no queue
        ids = [await upload(gw, gw.token(), "apparel") for _ in range(2)]
        done_one = await done(gw, ids[0], "tagging")  # one still needs only the review
        assert step(done_one, "tagging")["status"] == "completed"

    again = DeclaringBus()
    with caplog.at_level("WARNING", logger="stox.app"):
        async with running_gateway(tmp_path, gateway_options={"bus": again}) as gw:
            warnings = [r.getMessage() for r in caplog.records if "no longer" in r.getMessage()]
    [warning] = warnings  # tagging (the review needs no queue)
    assert warning.startswith("1 running workflows still need step 'tagging'")
    assert ids[1] in warning and ids[0] not in warning
    assert again.declared["stox.step.tagging"] == ["apparel.tagging"]
    assert "stox.step.copy_review" not in again.declared
    assert again.declared["stox.step.seo_generation"] == ["step.seo_generation"]
