"""docs/grafana-dashboard.json: importable as it is, laid out without overlaps, and asking only
for metric families a real gateway's GET /metrics exposes, with the labels its legends name."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import RunningGateway, running_gateway

import settings as settings_module

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD: dict[str, Any] = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# the series names a family of each type is exposed under (Prometheus's text format)
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "unknown": ("",),
}
LABEL = r"\{\{\s*(\w+)\s*\}\}"  # a label in a legendFormat


def fill_in(legend: str, labels: dict[str, str]) -> str:
    return re.sub(LABEL, lambda m: labels.get(m.group(1), ""), legend)


@pytest.fixture(scope="module")
def promql() -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        yield importlib.import_module("promql")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def expressions() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in PANELS:
        for target in panel["targets"]:
            yield panel, target


def variables() -> dict[str, str]:
    """Every variable at All, and a rate window, as Grafana substitutes them."""
    return {v["name"]: v["allValue"] for v in DASHBOARD["templating"]["list"]} | {
        "__rate_interval": "30s"
    }


def test_it_is_an_importable_dashboard_that_asks_for_a_prometheus_data_source() -> None:
    assert DASHBOARD["schemaVersion"] == 42  # the last of Grafana's classic dashboard model
    assert DASHBOARD["id"] is None and DASHBOARD["uid"] and DASHBOARD["title"]
    (source,) = DASHBOARD["__inputs"]
    assert source | {"label": "", "description": ""} == {
        "name": "DS_PROMETHEUS",
        "type": "datasource",
        "pluginId": "prometheus",
        "pluginName": "Prometheus",
        "label": "",
        "description": "",
    }
    names = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert set(names) == {"instance", "pipeline"}
    for variable in names.values():
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
        assert variable["definition"].startswith("label_values(")


def test_every_panel_has_the_data_source_a_unique_id_and_its_own_place() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), ids
    taken: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] > 0 and pos["h"] > 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = itertools.product(
            range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        )
        for cell in cells:
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r} at {cell}"
            taken[cell] = panel["title"]
    for panel in PANELS:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_every_expression_is_in_the_subset_the_picture_is_drawn_with_and_filters_by_the_variables(
    promql: Any,
) -> None:
    """Each parses in scripts/promql.py (PromQLError names what is outside it); each selector
    keeps to the chosen instances, and each of a workflow family to the chosen pipelines."""
    chosen = variables() | {"instance": "INSTANCE", "pipeline": "PIPELINE"}
    for panel, target in expressions():
        node = promql.parse(promql.substitute(target["expr"], chosen))
        for selector in promql.selectors(node):
            matchers = {(m.label, m.op, m.value) for m in selector.matchers}
            assert ("instance", "=~", "INSTANCE") in matchers, (panel["title"], selector)
            if selector.name.startswith("stox_workflow"):
                assert ("pipeline", "=~", "PIPELINE") in matchers, (panel["title"], selector)


async def scrape(gw: RunningGateway) -> str:
    response = await gw.fetch("GET", "/metrics")
    assert response.status == 200, f"GET /metrics: {response.status}"
    assert response.headers.get("Content-Type", "").startswith("text/plain")
    return str(response.body)


def exposed_series(text: str) -> set[str]:
    """The series names the families in `text` are exposed under, whether or not a series of
    the family has a sample yet."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES[family.type]
    }


async def test_it_asks_a_real_gateway_only_for_what_its_metrics_expose(
    tmp_path: Path, promql: Any
) -> None:
    """Two scrapes of a gateway with demo workers, a workflow before them and three between
    them: every metric the dashboard names is one of its families, each legend's labels are
    labels of its series, and the panels of the work that happened show it."""

    def with_demo_workers(settings: settings_module.Settings) -> None:
        settings.demo_workers = True

    options = {"demo_worker_options": {"min_delay": 0.0, "max_delay": 0.01, "failure_rate": 0}}
    async with running_gateway(tmp_path, with_demo_workers, options) as gw:
        token = gw.token()
        await gw.wait_finished([await gw.upload(token)])  # its series exist in both scrapes
        scrapes = promql.Scrapes()
        scrapes.add(time.time(), await scrape(gw), {"instance": "gw", "job": "stox"})
        ids = [await gw.upload(token) for _ in range(3)]
        docs = await gw.wait_finished(ids)
        assert {doc["status"] for doc in docs.values()} == {"completed"}
        await asyncio.sleep(1.0)
        text = await scrape(gw)
        scrapes.add(time.time(), text, {"instance": "gw", "job": "stox"})

    exposed = exposed_series(text)
    for panel, target in expressions():
        node = promql.parse(promql.substitute(target["expr"], variables()))
        for selector in promql.selectors(node):
            assert selector.name in exposed, f"{panel['title']!r}: no {selector.name} in /metrics"

    # label names as exposed (an empty value included: Prometheus drops it, the legend shows "")
    exposed_labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exposed_labels.setdefault(sample.name, {"instance", "job"}).update(sample.labels)
    evaluator = promql.Evaluator(scrapes)
    shown: dict[str, set[str]] = {}
    for panel, target in expressions():
        node = promql.parse(promql.substitute(target["expr"], variables()))
        legend = target["legendFormat"]
        for selector in promql.selectors(node):
            if selector.name in exposed_labels:
                missing = set(re.findall(LABEL, legend)) - exposed_labels[selector.name]
                assert not missing, f"{panel['title']!r}: {selector.name} has no {missing}"
        for labels, number in evaluator.at(node, scrapes.times[-1]).items():
            if number == number and number > 0:  # not NaN
                shown.setdefault(panel["title"], set()).add(fill_in(legend, dict(labels)))
    steps = [step["name"] for step in next(iter(docs.values()))["steps"]]
    assert any(legend.endswith(" started") for legend in shown["Workflows per second"])
    assert any(legend.endswith(" completed") for legend in shown["Workflows per second"])
    assert {f"{step} dispatched" for step in steps} <= shown["Step dispatches and completions"]
    assert {f"p50 {step}" for step in steps} <= shown["Step duration"]
    assert shown["Workflow success ratio"] == {"success"}
    assert shown["Bus connected"] == {"gw"}
    assert shown["Build"], "stox_build_info has no version"
    assert any(legend.endswith("2xx") for legend in shown["HTTP requests per second"])
    assert shown["Store operation duration p95"]
