"""Layers point one way: `stox/` never imports the web layer; the web layer names its routes."""

from __future__ import annotations

import ast
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support import ROOT, RecordingBus, running_gateway

import handlers
from handlers.workflow import STEP_COMPLETED

# the web layer, and the entry point that wires it
WEB_LAYER = {"handlers", "server"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Each absolute module an `import` or `from … import` of `path` names, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_module_of_stox_imports_the_web_layer() -> None:
    modules = sorted((ROOT / "stox").rglob("*.py"))
    assert len(modules) > 20  # the walk found the package
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in modules
        for line, name in imported_modules(path)
        if name.split(".")[0] in WEB_LAYER
    ]
    assert offending == []


def test_the_check_sees_every_spelling_of_an_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import handlers.ws\nfrom handlers import base\ndef f():\n    import server\n"
        "from . import handlers_like\nimport stox.hub\n"
    )
    names = [name for _, name in imported_modules(source)]
    assert [n for n in names if n.split(".")[0] in WEB_LAYER] == [
        "handlers.ws",
        "handlers",
        "server",
    ]


def test_a_route_is_looked_up_by_name() -> None:
    assert handlers.path_of(STEP_COMPLETED) == "/api/v1/workflow/step-completed"
    with pytest.raises(KeyError):
        handlers.path_of("no_such_route")


async def test_dispatches_reply_to_the_named_route(tmp_path: Path) -> None:
    bus = RecordingBus()
    async with running_gateway(tmp_path, gateway_options={"bus": bus}) as gw:
        app = handlers.make_app(gw.gateway)
        route = app.reverse_url(STEP_COMPLETED)
        assert route == handlers.completion_path()

        workflow_id = await gw.upload(gw.token())
        dispatch = next(e for e in bus.events if e.routing_key.startswith("step."))
        reply_to = dispatch.payload["reply_to"]["http"]
        assert reply_to == gw.gateway.settings.public_url + route
        assert gw.gateway.pipeline.completion_url == reply_to

        # and it is where the gateway takes the report
        body = {
            "workflow_id": workflow_id,
            "step_id": dispatch.payload["step_id"],
            "step_type": dispatch.payload["step_type"],
            "success": True,
            "result": {},
        }
        token = gw.service_token()
        answer = await gw.fetch("POST", urlsplit(reply_to).path, body, token=token)
        assert answer.status == 200, answer.body
        assert answer.body["result"] == "applied"
