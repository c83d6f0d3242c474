"""The OpenAPI document (handlers/openapi.py): valid OpenAPI 3.1, one operation for each routed
method and no other, roles and errors declared, and real answers that conform to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tornado.web
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from support import (
    COMPLETED,
    LIST,
    STATUS,
    UPLOAD,
    Response,
    RunningGateway,
    report,
    running_gateway,
)

import handlers
import settings as settings_module
from handlers import openapi

DOCUMENT_PATH = "/api/v1/openapi.json"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.build(handlers.routes)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_routed_method_is_an_operation_and_there_are_no_others(
    document: dict[str, Any],
) -> None:
    routed = {
        (path, method) for path, ms in openapi.paths(handlers.routes).items() for method in ms
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routed == documented
    assert ("/ws", "get") in documented and (DOCUMENT_PATH, "get") in documented


def test_a_routed_method_without_a_declaration_fails_the_build() -> None:
    class Undocumented(tornado.web.RequestHandler):
        def get(self) -> None:
            self.finish("")

    with pytest.raises(openapi.Undeclared, match="GET /extra"):
        openapi.build([*handlers.routes, (r"/extra", Undocumented)])


@pytest.mark.parametrize(
    ("path", "method", "role"),
    [
        (UPLOAD, "post", "user"),
        (STATUS, "get", "user"),
        (COMPLETED, "post", "service"),
        ("/api/v1/auth/profile", "get", "user"),
        ("/ws", "get", "user"),
        ("/api/v1/auth/login", "post", None),
        ("/healthz", "get", None),
        (DOCUMENT_PATH, "get", None),
    ],
)
def test_each_operation_states_the_role_it_needs(
    document: dict[str, Any], path: str, method: str, role: str | None
) -> None:
    operation = document["paths"][path][method]
    assert operation.get("x-required-role") == role
    assert operation["security"] == ([{"bearer": []}] if role else [])
    if role:
        assert {"401", "403"} <= set(operation["responses"])
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_every_error_answer_has_the_error_shape(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"code", "message", "fields"}
    assert set(detail["required"]) == {"code", "message"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert ("500" in operation["responses"]) == (path != "/"), (path, method)
            for status, answer in operation["responses"].items():
                if int(status) >= 400 and not (path == "/readyz" and status == "503"):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)


def test_operation_ids_are_unique_and_every_link_leads_to_an_input_of_its_target(
    document: dict[str, Any],
) -> None:
    operations = {
        op["operationId"]: op for ops in document["paths"].values() for op in ops.values()
    }
    assert len(operations) == sum(len(ops) for ops in document["paths"].values())
    assert document["paths"][UPLOAD]["post"]["operationId"] == "postUpload"
    followed = set()
    for source in operations.values():
        for answer in source["responses"].values():
            for link in answer.get("links", {}).values():
                target = operations[link["operationId"]]
                followed.add(link["operationId"])
                names = {p["name"] for p in target.get("parameters", [])}
                assert set(link.get("parameters", {})) <= names, link
                if "requestBody" in link:
                    ref = target["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
                    assert set(link["requestBody"]) <= set(schema["properties"]), link
    # upload → status → cancel → retry; status → step-completed
    assert followed == {"getStatus", "postCancel", "postRetry", "postStepCompleted"}
    upload_links = document["paths"][UPLOAD]["post"]["responses"]["202"]["links"]
    assert upload_links["status"]["parameters"] == {"workflow_id": "$response.body#/workflow_id"}
    report = document["paths"][STATUS]["get"]["responses"]["200"]["links"]["report_step_0"]
    assert report["requestBody"]["step_id"] == "$response.body#/steps/0/step_id"


def test_answers_declare_the_request_id_and_a_429_its_retry_after(
    document: dict[str, Any],
) -> None:
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                headers = answer.get("headers", {})
                assert ("X-Request-Id" in headers) == (path != "/"), (path, status)
                assert ("Retry-After" in headers) == (status == "429"), (path, status)
    assert document["paths"][UPLOAD]["post"]["responses"]["429"]["headers"]["Retry-After"] == {
        **openapi.RETRY_AFTER
    }


def test_inputs_come_from_the_handlers_schemas(document: dict[str, Any]) -> None:
    upload = document["paths"][UPLOAD]["post"]
    body = upload["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Upload"}
    upload_body = document["components"]["schemas"]["Upload"]
    assert upload_body["required"] == ["name"]
    assert "pipeline" in upload_body["properties"]
    assert "Idempotency-Key" in {p["name"] for p in upload["parameters"]}
    listed = {p["name"] for p in document["paths"][LIST]["get"]["parameters"]}
    filters = {"q", "pipeline", "created_after", "created_before"}
    assert listed == {"status", "limit", "cursor", *filters}
    ws = document["paths"]["/ws"]["get"]
    assert (
        "snapshot" in ws["description"] and "WebSocketMessage" in document["components"]["schemas"]
    )


def conforms(document: dict[str, Any], path: str, method: str, response: Response) -> None:
    """The answer's status is documented for the operation, and its body matches the schema."""
    answers = document["paths"][path][method]["responses"]
    assert str(response.status) in answers, (path, method, response.status)
    schema = answers[str(response.status)]["content"]["application/json"]["schema"]
    OAS31Validator({**schema, "components": document["components"]}).validate(response.body)


def test_the_document_is_built_once() -> None:
    assert handlers.openapi_document() is handlers.openapi_document()


async def test_the_endpoint_is_public_and_serves_the_document(
    gw: RunningGateway, document: dict[str, Any]
) -> None:
    response = await gw.fetch("GET", DOCUMENT_PATH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.body == document


async def test_real_answers_conform_to_the_document(
    gw: RunningGateway, document: dict[str, Any]
) -> None:
    token = gw.token("alice")
    uploaded = await gw.fetch("POST", UPLOAD, {"name": "Mug"}, token=token)
    conforms(document, UPLOAD, "post", uploaded)
    workflow_id = uploaded.body["workflow_id"]
    status = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=token)
    conforms(document, STATUS, "get", status)
    reported = await report(gw, workflow_id, status.body["steps"][0])
    conforms(document, COMPLETED, "post", reported)
    conforms(document, LIST, "get", await gw.fetch("GET", f"{LIST}?limit=1", token=token))
    conforms(document, "/healthz", "get", await gw.fetch("GET", "/healthz"))
    conforms(document, "/readyz", "get", await gw.fetch("GET", "/readyz"))
    # errors: no token, a bad body, a missing workflow, another role
    conforms(document, STATUS, "get", await gw.fetch("GET", f"{STATUS}?workflow_id=x"))
    conforms(document, UPLOAD, "post", await gw.fetch("POST", UPLOAD, {}, token=token))
    missing = await gw.fetch("GET", f"{STATUS}?workflow_id={'0' * 32}", token=token)
    assert missing.status == 404
    conforms(document, STATUS, "get", missing)
    forbidden = await report(gw, workflow_id, status.body["steps"][0], token=token)
    assert forbidden.status == 403
    conforms(document, COMPLETED, "post", forbidden)


async def test_pipeline_and_review_answers_conform_to_the_document(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    """Issue 14: GET /api/v1/pipelines, a workflow with a review step (waiting, then decided),
    the review endpoint's answers and errors."""

    def with_review(settings: Any) -> None:
        step = settings_module.StepSettings
        settings.pipelines = {
            "checked": settings_module.PipelineSettings(
                steps=[
                    step(name="image_processing"),
                    step(name="ai_enhancement"),
                    step(
                        name="copy_review",
                        kind="review",
                        after=["image_processing", "ai_enhancement"],
                    ),
                ]
            )
        }

    review_path = "/api/v1/workflow/review"
    async with running_gateway(tmp_path, with_review) as gw:
        token = gw.token("alice")
        conforms(
            document,
            "/api/v1/pipelines",
            "get",
            await gw.fetch("GET", "/api/v1/pipelines", token=token),
        )
        bad = await gw.fetch("POST", UPLOAD, {"name": "Mug", "pipeline": "nope"}, token=token)
        assert bad.status == 400
        conforms(document, UPLOAD, "post", bad)
        uploaded = await gw.fetch(
            "POST", UPLOAD, {"name": "Mug", "pipeline": "checked"}, token=token
        )
        workflow_id = uploaded.body["workflow_id"]
        for index in (0, 1):
            step_doc = (await gw.status(workflow_id))["steps"][index]
            assert (await report(gw, workflow_id, step_doc)).status == 200
        waiting = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=token)
        assert waiting.body["steps"][2]["status"] == "waiting"
        conforms(document, STATUS, "get", waiting)
        body = {
            "workflow_id": workflow_id,
            "step_id": waiting.body["steps"][2]["step_id"],
            "decision": "approve",
            "result": {"title": "T"},
        }
        for who in (gw.token("bob"), gw.service_token(), None):  # 404, 403, 401
            conforms(
                document, review_path, "post", await gw.fetch("POST", review_path, body, token=who)
            )
        conforms(
            document, review_path, "post", await gw.fetch("POST", review_path, {}, token=token)
        )
        conforms(
            document, review_path, "post", await gw.fetch("POST", review_path, body, token=token)
        )
        conforms(
            document, review_path, "post", await gw.fetch("POST", review_path, body, token=token)
        )
        refused = await gw.fetch(
            "POST",
            review_path,
            {**body, "decision": "reject", "reason": "no", "result": None},
            token=token,
        )
        assert refused.status == 409
        conforms(document, review_path, "post", refused)
        decided = await gw.fetch("GET", f"{STATUS}?workflow_id={workflow_id}", token=token)
        assert decided.body["steps"][2]["review"]["by"] == "alice"
        conforms(document, STATUS, "get", decided)
        conforms(document, LIST, "get", await gw.fetch("GET", LIST, token=token))
