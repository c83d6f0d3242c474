"""Logs that join up: every line about a workflow carries its `workflow_id` (and its `step`,
`attempt` and the request's `request_id` where there is one), whoever writes it; lines about
no workflow carry none; JSON lines name the gateway instance, so one workflow is followed
through the logs of several (`jq 'select(.workflow_id==…)' a.log b.log`, as the README says).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import rabbit
from procs import gateway_config, remote, start_gateway, wait_ready
from support import (
    COMPLETED,
    LIST,
    UPLOAD,
    Clock,
    RecordingBus,
    RunningGateway,
    completion,
    eventually,
    free_port,
    report,
    running_gateway,
)

from stox.bus.base import Event, PublishError
from stox.changes import ChangeBatcher
from stox.logs import (
    CONTEXT_FIELDS,
    JSONFormatter,
    LogContext,
    TextFormatter,
    bind,
    detached,
    log_context,
    make_handler,
    start_context,
)
from stox.store.sqlite_db import SQLiteDatabase

Lines = Callable[[], list[dict[str, Any]]]
WORKFLOW_FIELDS = ("workflow_id", "step", "attempt")


@pytest.fixture
def json_log() -> Iterator[Lines]:
    """Every logger's lines, at debug, as the gateway writes them with `logging.format: json`
    (the handler `stox.logs.configure` installs); a function that parses what was written."""
    stream = io.StringIO()
    handler = make_handler("json", stream, "test-instance")
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def of(lines: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    """The lines whose fields include `fields`."""
    return [line for line in lines if all(line.get(k) == v for k, v in fields.items())]


def one(lines: list[dict[str, Any]], text: str, **fields: Any) -> dict[str, Any]:
    """The one line whose message holds `text` and whose fields include `fields`."""
    found = [line for line in of(lines, **fields) if text in line["message"]]
    assert len(found) == 1, (text, fields, [line["message"] for line in lines])
    return found[0]


def assert_joined_up(lines: list[dict[str, Any]], workflow_ids: list[str]) -> None:
    """Each line that names one of the workflows carries its id, and only ever its own."""
    for line in lines:
        named = [i for i in workflow_ids if i in line["message"]]
        if named:
            assert line.get("workflow_id") == named[0], line
        if "workflow_id" in line:
            assert line["workflow_id"] in workflow_ids, line
        assert line["instance"] == "test-instance", line


def assert_about_no_workflow(line: dict[str, Any]) -> None:
    assert not set(WORKFLOW_FIELDS) & line.keys(), line


async def call(
    gw: RunningGateway, method: str, path: str, body: Any, token: str, request_id: str
) -> int:
    response = await gw.fetch(method, path, body, token=token, headers={"X-Request-Id": request_id})
    return response.status


# -- one gateway ------------------------------------------------------------------------------


async def test_an_upload_a_failed_and_a_stale_report_are_logged_with_their_fields(
    tmp_path: Path, json_log: Lines
) -> None:
    async with running_gateway(tmp_path) as gw:
        user, service = gw.token(), gw.service_token("imaging")
        response = await gw.fetch(
            "POST", UPLOAD, {"name": "Mug"}, token=user, headers={"X-Request-Id": "req-upload"}
        )
        workflow_id = response.body["workflow_id"]
        status = f"/api/v1/workflow/status?workflow_id={workflow_id}"
        headers = {"X-Request-Id": "req-status"}
        step = (await gw.fetch("GET", status, token=user, headers=headers)).body["steps"][0]
        failed = completion(workflow_id, step["step_id"], "image_processing", False, error="boom")
        assert await call(gw, "POST", COMPLETED, failed, service, "req-fail") == 200
        # the same attempt reported again, now as a success: it ended already, a 409
        late = completion(workflow_id, step["step_id"], "image_processing", True)
        assert await call(gw, "POST", COMPLETED, late, service, "req-stale") == 409
        # an unexpected failure: Tornado's line about it, and the gateway's, name both

        async def broken(*args: Any) -> Any:
            raise RuntimeError("the store fell over")

        gw.gateway.orchestrator.cancel = broken  # type: ignore[method-assign,assignment]
        cancel = {"workflow_id": workflow_id}
        assert await call(gw, "POST", "/api/v1/workflow/cancel", cancel, user, "req-bug") == 500
        # requests about no workflow, after those about one
        assert await call(gw, "GET", LIST, None, user, "req-list") == 200
        assert await call(gw, "GET", "/healthz", None, user, "req-health") == 200

    lines = json_log()
    assert_joined_up(lines, [workflow_id])
    about = {"workflow_id": workflow_id, "step": "image_processing"}
    # the upload: its dispatch and its answer, with the request's id
    one(lines, "attempt 1 dispatched (upload)", **about, attempt=1, request_id="req-upload")
    upload = one(lines, "202 POST /api/v1/workflow/upload", request_id="req-upload")
    assert upload["workflow_id"] == workflow_id
    # the failed report: its attempt is found by its step_id
    one(lines, "attempt 1 failed: boom; another", **about, attempt=1, request_id="req-fail")
    one(
        lines, "200 POST /api/v1/workflow/step-completed", **about, attempt=1, request_id="req-fail"
    )
    # the stale one
    one(lines, "stale report", **about, attempt=1, request_id="req-stale")
    one(
        lines,
        "409 POST /api/v1/workflow/step-completed",
        **about,
        attempt=1,
        request_id="req-stale",
    )
    uncaught = "Uncaught exception POST /api/v1/workflow/cancel"
    one(
        lines, uncaught, workflow_id=workflow_id, request_id="req-bug", logger="tornado.application"
    )
    one(lines, "request req-bug failed", workflow_id=workflow_id, logger="stox.http")
    # no request leaves its workflow on the lines of the next
    for request_id in ("req-list", "req-health"):
        (line,) = of(lines, request_id=request_id)
        assert_about_no_workflow(line)
    assert {line["request_id"] for line in of(lines, workflow_id=workflow_id)} == {
        "req-upload",
        "req-status",
        "req-fail",
        "req-stale",
        "req-bug",
    }


async def test_a_timeout_fired_by_the_sweeper_is_logged_with_its_workflow(
    tmp_path: Path, json_log: Lines
) -> None:
    clock = Clock()
    async with running_gateway(tmp_path, gateway_options={"clock": clock}) as gw:
        workflow_id = await gw.upload(gw.token())
        clock.advance(61)  # past the first attempt's deadline: the sweeper times it out
        timed_out = "image_processing attempt 1 timed_out"
        await eventually(lambda: any(timed_out in line["message"] for line in json_log()))
        clock.advance(1.5)  # past the backoff: the sweeper dispatches attempt 2
        dispatched = "image_processing attempt 2 dispatched (wake)"
        await eventually(lambda: any(dispatched in line["message"] for line in json_log()))

    lines = json_log()
    assert_joined_up(lines, [workflow_id])
    about = {"workflow_id": workflow_id, "step": "image_processing"}
    line = one(lines, f"{timed_out}: no report within 60s; another attempt follows (wake)")
    assert line.items() >= {**about, "attempt": 1, "level": "info"}.items()
    line = one(lines, dispatched)
    assert line.items() >= {**about, "attempt": 2}.items()
    # the sweeper's lines carry no request: the upload's id stayed with the upload
    for line in of(lines, logger="stox.workflow"):
        if "(wake)" in line["message"]:
            assert "request_id" not in line, line


class RefusingDispatches(RecordingBus):
    """Confirms every event but the dispatches (`step.*`)."""

    async def publish(self, event: Event) -> None:
        if event.routing_key.startswith("step."):
            raise PublishError("broker unavailable")
        await super().publish(event)


async def test_a_publish_left_for_the_relay_names_its_workflow_not_the_request(
    tmp_path: Path, json_log: Lines
) -> None:
    bus = RefusingDispatches()
    async with running_gateway(tmp_path, gateway_options={"bus": bus}) as gw:
        first = await gw.upload(gw.token())
        second = await gw.upload(gw.token())
        await gw.gateway.orchestrator.drain()
        await gw.gateway.orchestrator.relay(min_age=0)  # and the relay fails again

    lines = json_log()
    assert_joined_up(lines, [first, second])
    for workflow_id in (first, second):
        left = [
            line
            for line in of(lines, workflow_id=workflow_id)
            if "left for the relay" in line["message"]
        ]
        assert len(left) >= 2, left  # the publish after the upload, then the relay's
        for line in left:
            assert line.items() >= {"step": "image_processing", "attempt": 1}.items(), line
            # the publish runs after the upload's answer, in a task of the workflow's own
            assert "request_id" not in line, line


@pytest.mark.rabbitmq
async def test_a_completion_over_amqp_is_logged_with_its_workflow_step_and_attempt(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, json_log: Lines
) -> None:
    ns = rabbit_ns
    async with running_gateway(tmp_path, **ns.settings()) as gw:
        workflow_id = await gw.upload(gw.token())
        step = (await gw.status(workflow_id))["steps"][0]
        headers = {"authorization": f"Bearer {gw.service_token()}"}
        failed, ignored = "attempt 1 failed: boom", "ignored: StaleReport"
        # a failure, then a report on the attempt it ended
        for success, logged in ((False, failed), (True, ignored)):
            body = completion(workflow_id, step["step_id"], "image_processing", success)
            await asyncio.to_thread(
                ns.publish,
                "step.completed",
                json.dumps(body).encode(),
                headers,
                correlation_id=workflow_id,
            )
            await eventually(lambda: any(logged in line["message"] for line in json_log()))  # noqa: B023
        # a completion that can never be applied, naming the workflow as its correlation_id
        await asyncio.to_thread(
            ns.publish, "step.completed", b"[1, 2]", headers, correlation_id=workflow_id
        )
        await eventually(lambda: any("dead-lettered" in line["message"] for line in json_log()))

    lines = json_log()
    assert_joined_up(lines, [workflow_id])
    about = {"workflow_id": workflow_id, "step": "image_processing", "attempt": 1}
    line = one(lines, "image_processing attempt 1 failed: boom; another attempt follows (report)")
    assert line.items() >= about.items() and "request_id" not in line
    assert one(lines, ignored).items() >= about.items()
    assert one(lines, "dead-lettered step.completed")["workflow_id"] == workflow_id


# -- two instances --------------------------------------------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.mongo
async def test_one_workflow_is_followed_through_the_logs_of_two_instances(
    tmp_path: Path, rabbit_ns: rabbit.Namespace, mongo_url: str
) -> None:
    ns = rabbit_ns
    names = ("gw-a", "gw-b")
    ports = free_port(), free_port()
    procs = [
        start_gateway(
            tmp_path,
            name,
            gateway_config(
                port, f"{name}-{ns.prefix[-6:]}", mongo_url, ns.config_yaml(), log_format="json"
            ),
            STOX_LOG_LEVEL="debug",
        )
        for name, port in zip(names, ports, strict=True)
    ]
    try:
        await asyncio.gather(*(wait_ready(p, port) for p, port in zip(procs, ports, strict=True)))
        a, b = (remote(port) for port in ports)
        workflow_id = await a.upload(a.token())  # uploaded on A
        step = (await a.status(workflow_id))["steps"][0]
        answer = await report(b, workflow_id, step, success=False)  # reported on B
        assert answer.status == 200, answer.body
        # after its backoff, a sweeper (of either instance) dispatches attempt 2
        await eventually(lambda: attempt_now(a, workflow_id), lambda n: n == 2)
        assert [proc.stop() for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            proc.kill()

    logs = [proc.log_path for proc in procs]
    # what the README shows: jq over both logs finds the workflow's lines on both instances
    jq = shutil.which("jq")
    if jq is None:  # .ci/run installs it
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("jq is not installed (apt-get install jq)")
        pytest.skip("jq is not installed")
    found = (
        await asyncio.to_thread(
            subprocess.run,
            [jq, "-c", f'select(.workflow_id=="{workflow_id}")', *map(str, logs)],
            capture_output=True,
            text=True,
            check=True,  # and every line of both logs is JSON
        )
    ).stdout.splitlines()
    lines = [json.loads(line) for line in found]
    instances = {f"{name}-{ns.prefix[-6:]}": name for name in names}
    by_instance = {
        name: [ln for ln in lines if instances[ln["instance"]] == name] for name in names
    }
    upload = [ln["message"] for ln in by_instance["gw-a"]]
    assert any("202 POST /api/v1/workflow/upload" in m for m in upload), upload
    reported = by_instance["gw-b"]
    line = one(reported, "image_processing attempt 1 failed: boom; another attempt follows")
    assert line.items() >= {"step": "image_processing", "attempt": 1}.items()
    assert "request_id" in line
    one(lines, "step image_processing attempt 2 dispatched (wake)", attempt=2)
    every = [json.loads(ln) for log in logs for ln in log.read_text().splitlines()]
    assert {ln["instance"] for ln in every} == set(instances)  # every line names its instance
    assert [ln for ln in every if workflow_id in ln["message"] and ln not in lines] == []


async def attempt_now(gw: RunningGateway, workflow_id: str) -> int:
    step = (await gw.status(workflow_id))["steps"][0]
    return int(step["attempt"]) if step["status"] == "dispatched" else 0


# -- the pieces -------------------------------------------------------------------------------


def record(message: str = "m", **extra: Any) -> logging.LogRecord:
    entry = logging.LogRecord("stox.test", logging.INFO, __file__, 1, message, None, None)
    entry.__dict__.update(extra)
    return entry


def test_the_filter_copies_the_context_and_keeps_what_the_call_gave() -> None:
    context = detached()  # not this test's own

    def logged() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        start_context(workflow_id="w1", step="image_processing")
        bind(attempt=2, request_id="r1", step=None)  # None adds nothing
        plain, given = record(), record(step="seo_generation")
        for entry in (plain, given):
            LogContext("i1").filter(entry)
        with log_context(workflow_id="w2"):
            inner = record()
            LogContext().filter(inner)
        after = record()
        LogContext().filter(after)
        fields = {k: after.__dict__.get(k) for k in CONTEXT_FIELDS}
        assert fields == {
            "workflow_id": "w1",
            "step": "image_processing",
            "attempt": 2,
            "request_id": "r1",
        }
        return (
            json.loads(JSONFormatter().format(plain)),
            json.loads(JSONFormatter().format(given)),
            json.loads(JSONFormatter().format(inner)),
        )

    plain, given, inner = context.run(logged)
    assert plain == {
        "ts": plain["ts"],
        "level": "info",
        "logger": "stox.test",
        "instance": "i1",
        "message": "m",
        "workflow_id": "w1",
        "step": "image_processing",
        "attempt": 2,
        "request_id": "r1",
    }
    assert given["step"] == "seo_generation"  # `extra` says more precisely
    assert {k: inner.get(k) for k in CONTEXT_FIELDS} == {
        "workflow_id": "w2",
        "step": None,
        "attempt": None,
        "request_id": None,
    }
    # and none of it outside that context
    entry = record()
    LogContext().filter(entry)
    assert not set(CONTEXT_FIELDS) & entry.__dict__.keys()


async def test_a_task_inherits_the_context_and_a_detached_callback_does_not() -> None:
    seen: dict[str, Any] = {}

    def note(name: str) -> None:
        entry = record()
        LogContext().filter(entry)
        seen[name] = entry.__dict__.get("workflow_id")

    async def child() -> None:
        note("task")

    async def work() -> None:
        bind(workflow_id="w1")
        await asyncio.ensure_future(child())
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def callback() -> None:
            note("detached")
            done.set_result(None)

        loop.call_soon(callback, context=detached())
        await done
        note("work")

    await asyncio.ensure_future(work())
    note("test")  # the task's binding stayed in the task
    assert seen == {"task": "w1", "detached": None, "work": "w1", "test": None}


def context_now() -> dict[str, Any]:
    entry = record()
    LogContext().filter(entry)
    return {k: entry.__dict__[k] for k in CONTEXT_FIELDS if k in entry.__dict__}


async def about(workflow_id: str, work: Callable[[], Awaitable[None]]) -> None:
    """`work()` in a task of its own about `workflow_id`, as a request's or message's is."""

    async def task() -> None:
        start_context(workflow_id=workflow_id, request_id=f"req-{workflow_id}")
        await work()

    await asyncio.ensure_future(task())


async def test_a_batch_of_change_notifications_is_sent_in_no_workflow_s_context() -> None:
    class Bus(RecordingBus):
        async def publish(self, event: Event) -> None:
            contexts.append(context_now())  # what a line the bus wrote would carry
            await super().publish(event)

    contexts: list[dict[str, Any]] = []
    batcher = ChangeBatcher(Bus())
    await asyncio.gather(
        *(
            about(i, partial(batcher.publish, f"m-{i}", {"workflow_id": i}, "{}"))
            for i in ("w1", "w2")
        )
    )
    assert contexts == [{}]  # one batch, for both


async def test_a_group_commit_runs_in_no_workflow_s_context(tmp_path: Path) -> None:
    db = SQLiteDatabase(str(tmp_path / "db.sqlite"))
    await db.open()
    contexts: list[dict[str, Any]] = []
    try:

        async def write() -> None:
            await db.write(lambda conn: contexts.append(context_now()))

        await asyncio.gather(about("w1", write), about("w2", write))
    finally:
        await db.close()
    assert contexts == [{}, {}]  # committed together, for neither


def test_text_lines_end_with_the_fields_before_the_traceback() -> None:
    entry = record("step failed", workflow_id="w1", step="ai_enhancement", attempt=3)
    entry.request_id = "r1"
    assert (
        TextFormatter()
        .format(entry)
        .endswith(
            " INFO stox.test step failed workflow_id=w1 step=ai_enhancement attempt=3 request_id=r1"
        )
    )
    try:
        raise ValueError("bad")
    except ValueError:
        entry = record("oops", workflow_id="w1", exc_info=sys.exc_info())
    text = TextFormatter().format(entry)
    assert text.splitlines()[0].endswith("oops workflow_id=w1")
    assert text.endswith("ValueError: bad")
