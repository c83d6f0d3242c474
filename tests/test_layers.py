"""Layers point one way (docs/architecture.md#layers-and-imports): `stox/` never imports the
web layer, the domain does no I/O, adapters never reach up into the services, the services
never name a concrete store or bus; the web layer names its routes; and every pointer into
docs/architecture.md names one of its headings."""

from __future__ import annotations

import ast
import re
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


def imports_of(package_path: str) -> list[tuple[str, str]]:
    """(file:line, module) for every absolute import in the module or package at `package_path`."""
    target = ROOT / package_path
    paths = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert paths, package_path
    return [
        (f"{path.relative_to(ROOT)}:{line}", name)
        for path in paths
        for line, name in imported_modules(path)
    ]


def names_any(name: str, prefixes: set[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


# what does I/O, keeps time or reaches a process outside: none of it belongs in the domain
IO_MODULES = {
    "asyncio", "socket", "sqlite3", "os", "time", "threading", "subprocess", "pathlib",
    "random", "tornado", "pika", "pymongo", "grpc", "logging", "settings", "opentelemetry",
}  # fmt: skip
SERVICES = {"stox.orchestrator", "stox.changes", "stox.hub", "stox.completions", "stox.app"}
CONCRETE_BACKENDS = {
    "stox.store.sqlite", "stox.store.sqlite_db", "stox.store.mongo", "stox.store.mongo_url",
    "stox.bus.local", "stox.bus.journal", "stox.bus.rabbitmq", "stox.bus.pika_calls",
    "stox.bus.pika_writes", "sqlite3", "pymongo", "pika",
}  # fmt: skip


@pytest.mark.parametrize("module", ["stox/workflow.py", "stox/codec.py", "stox/tracecontext.py"])
def test_the_domain_does_no_io(module: str) -> None:
    assert [
        (where, name) for where, name in imports_of(module) if names_any(name, IO_MODULES)
    ] == []


@pytest.mark.parametrize("package", ["stox/store", "stox/bus"])
def test_adapters_never_import_the_services_above_them(package: str) -> None:
    offending = [(where, name) for where, name in imports_of(package) if names_any(name, SERVICES)]
    assert offending == []


@pytest.mark.parametrize(
    "module",
    ["stox/orchestrator.py", "stox/changes.py", "stox/hub.py", "stox/completions.py"],
)
def test_services_name_no_concrete_store_or_bus(module: str) -> None:
    offending = [
        (where, name) for where, name in imports_of(module) if names_any(name, CONCRETE_BACKENDS)
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


ARCHITECTURE = ROOT / "docs" / "architecture.md"
POINTER = re.compile(r"docs/architecture\.md#([a-z0-9-]+)")
POINTING_FILES = ["stox", "handlers", "static", "tests", "bench", "README.md", "server.py"]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation out, spaces to hyphens."""
    return {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in markdown.splitlines()
        if line.startswith("#")
    }


def pointers() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for name in POINTING_FILES:
        target = ROOT / name
        paths = [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else [target]
        for path in paths:
            if path.suffix not in {".py", ".js", ".md", ".html"}:
                continue
            text = path.read_text(encoding="utf-8")
            found += [(str(path.relative_to(ROOT)), m) for m in POINTER.findall(text)]
    return found


def test_every_pointer_into_the_architecture_names_a_heading() -> None:
    anchors = heading_anchors(ARCHITECTURE.read_text(encoding="utf-8"))
    assert {"layers-and-imports", "the-transition-path", "the-workflow-model"} <= anchors
    found = pointers()
    assert len(found) >= 12  # the walk found the comments
    assert [(where, anchor) for where, anchor in found if anchor not in anchors] == []


def test_no_comment_points_at_a_document_the_repository_lacks() -> None:
    stale = [
        f"{path.relative_to(ROOT)}"
        for name in POINTING_FILES
        for path in ((ROOT / name).rglob("*.py") if (ROOT / name).is_dir() else [ROOT / name])
        if "DESIGN" + " §" in path.read_text(encoding="utf-8")  # not this line itself
    ]
    assert stale == []
