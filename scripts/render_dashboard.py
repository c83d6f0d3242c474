"""Draw docs/grafana-dashboard.json from real scrapes of a gateway: the README's picture.

No Grafana runs here, so this stands in for Grafana and Prometheus: it starts a gateway with
demo workers, loads it for a while (scripts/dashboard_load.py), scrapes its /metrics every
`--interval` seconds, evaluates each panel's PromQL over the scrapes (scripts/promql.py: the
subset the dashboard uses, and nothing else) and draws the panels where their gridPos puts
them, in the colours of Grafana's dark theme.

    python scripts/render_dashboard.py --out docs/grafana-dashboard.png
    python scripts/render_dashboard.py --save-scrapes run.jsonl   # keep the scrapes …
    python scripts/render_dashboard.py --from-scrapes run.jsonl   # … and draw them again

Needs matplotlib (bench/requirements.txt: `make .venv/.bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch
from matplotlib.ticker import FuncFormatter, MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dashboard_load
import promql

REPO = Path(__file__).resolve().parent.parent
PAGE, PANEL, BORDER = "#111217", "#181b1f", "#2c3036"
TEXT, WEAK, GRID = "#ccccdc", "#8e8ea0", "#24272d"
PALETTE = [
    "#73BF69",
    "#F2CC0C",
    "#8AB8FF",
    "#FF780A",
    "#F2495C",
    "#5794F2",
    "#B877D9",
    "#705DA0",
    "#37872D",
    "#FADE2A",
    "#447EBC",
    "#C15C17",
    "#890F02",
    "#0A437C",
]
NAMED = {
    "green": "#73BF69",
    "red": "#F2495C",
    "orange": "#FF9830",
    "yellow": "#FADE2A",
    "blue": "#5794F2",
}
CELL_W, CELL_H = 75, 38  # pixels of one grid column, one grid row (30 px and its margin)
HEADER = 1.6  # grid rows of the top bar


@dataclass
class Line:
    legend: str
    times: list[float]
    values: list[float]


def evaluate(
    dashboard: dict[str, Any], scrapes: promql.Scrapes, window: str
) -> dict[int, list[Line]]:
    """Each panel's series (by panel id), its targets evaluated at every scrape a full rate
    window after the first, with every variable at All."""
    variables = {v["name"]: v.get("allValue") or ".*" for v in dashboard["templating"]["list"]}
    variables["__rate_interval"] = window
    first = scrapes.times[0] + promql.parse_duration(window)
    times = [t for t in scrapes.times if t >= first]
    if len(times) < 2:
        raise SystemExit(f"the scrapes span less than the rate window ({window}) and a scrape")
    evaluator = promql.Evaluator(scrapes)
    panels: dict[int, list[Line]] = {}
    for panel in dashboard["panels"]:
        lines = panels.setdefault(panel["id"], [])
        for target in panel.get("targets", []):
            node = promql.parse(promql.substitute(target["expr"], variables))
            for labels, points in sorted(evaluator.over(node, times).items()):
                legend = legend_of(target.get("legendFormat", ""), dict(labels))
                lines.append(Line(legend, [t for t, _ in points], [v for _, v in points]))
    return panels


def legend_of(form: str, labels: dict[str, str]) -> str:
    if not form or form == "__auto":
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), form).strip()


def formatter(unit: str) -> FuncFormatter:
    def short(value: float) -> str:
        for size, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " K")):
            if abs(value) >= size:
                return f"{value / size:.3g}{suffix}"
        return f"{value:.3g}"

    def seconds(value: float) -> str:
        if value == 0:
            return "0 s"
        if abs(value) < 1e-3:
            return f"{value * 1e6:.3g} µs"
        if abs(value) < 1:
            return f"{value * 1e3:.3g} ms"
        return f"{value:.3g} s"

    text = {
        "s": seconds,
        "percentunit": lambda v: f"{v * 100:.3g}%",
        "ops": lambda v: f"{short(v)} ops/s",
        "reqps": lambda v: f"{short(v)} req/s",
    }.get(unit, short)
    return FuncFormatter(lambda value, _: text(value))


def threshold_color(defaults: dict[str, Any], value: float) -> str:
    color = "green"
    for step in defaults.get("thresholds", {}).get("steps", []):
        if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
            color = step["color"]
    return NAMED.get(color, color)


def mapped(defaults: dict[str, Any], value: float) -> tuple[str, str] | None:
    """(text, colour) of a value mapping that applies to `value`."""
    for mapping in defaults.get("mappings", []):
        if mapping["type"] == "value" and not math.isnan(value):
            option = mapping["options"].get(f"{value:g}")
            if option is not None:
                return option["text"], NAMED.get(option["color"], option["color"])
    return None


class Page:
    """The figure: grid units to figure coordinates, and the panels' frames."""

    def __init__(self, dashboard: dict[str, Any], span: str, times: tuple[float, float]) -> None:
        self.start, self.end = (datetime.fromtimestamp(t) for t in times)
        rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"]) + HEADER
        self.width, self.height = 24 * CELL_W, rows * CELL_H
        self.figure = plt.figure(figsize=(self.width / 100, self.height / 100), dpi=100)
        self.figure.patch.set_facecolor(PAGE)
        self.header(dashboard, span)

    def box(self, pos: dict[str, int], inset: float = 4) -> tuple[float, float, float, float]:
        """(left, bottom, width, height) of a grid position, in figure fractions."""
        x, y = pos["x"] * CELL_W + inset, (pos["y"] + HEADER) * CELL_H + inset
        w, h = pos["w"] * CELL_W - 2 * inset, pos["h"] * CELL_H - 2 * inset
        return x / self.width, 1 - (y + h) / self.height, w / self.width, h / self.height

    def px(self, pixels: float, vertical: bool = True) -> float:
        return pixels / (self.height if vertical else self.width)

    def header(self, dashboard: dict[str, Any], span: str) -> None:
        top = 1 - self.px(CELL_H * HEADER / 2)
        self.figure.text(
            self.px(16, False),
            top,
            f"Dashboards  /  {dashboard['title']}",
            color=TEXT,
            fontsize=15,
            va="center",
        )
        chips = "      ".join(f"{v['label']}  [ All ]" for v in dashboard["templating"]["list"])
        self.figure.text(0.42, top, chips, color=WEAK, fontsize=11, va="center")
        self.figure.text(
            1 - self.px(16, False), top, span, color=WEAK, fontsize=11, va="center", ha="right"
        )

    def frame(self, panel: dict[str, Any]) -> tuple[float, float, float, float]:
        left, bottom, width, height = self.box(panel["gridPos"])
        self.figure.patches.append(
            FancyBboxPatch(
                (left, bottom),
                width,
                height,
                boxstyle="round,pad=0,rounding_size=0.002",
                transform=self.figure.transFigure,
                facecolor=PANEL,
                edgecolor=BORDER,
                linewidth=1,
                zorder=-1,
            )
        )
        self.figure.text(
            left + self.px(10, False),
            bottom + height - self.px(16),
            panel["title"],
            color=TEXT,
            fontsize=10.5,
            va="center",
        )
        return left, bottom, width, height

    def row(self, panel: dict[str, Any]) -> None:
        left, bottom, _, height = self.box(panel["gridPos"], inset=0)
        self.figure.text(
            left + self.px(8, False),
            bottom + height / 2,
            f"⌄  {panel['title']}",
            color=TEXT,
            fontsize=12.5,
            fontweight="bold",
            va="center",
        )

    def stat(self, panel: dict[str, Any], lines: list[Line]) -> None:
        left, bottom, width, height = self.frame(panel)
        defaults = panel["fieldConfig"]["defaults"]
        if not lines:
            self.no_data(left, bottom, width, height)
            return
        each = width / len(lines)
        for i, line in enumerate(lines):
            value = next((v for v in reversed(line.values) if not math.isnan(v)), math.nan)
            color = threshold_color(defaults, value)
            if panel["options"]["textMode"] == "name":
                text = line.legend
            elif (hit := mapped(defaults, value)) is not None:
                text, color = hit
            elif math.isnan(value):
                text = "No data"
            else:
                decimals = defaults.get("decimals")
                text = formatter(defaults["unit"])(value, None)
                if decimals is not None and defaults["unit"] == "percentunit":
                    text = f"{value * 100:.{decimals}f}%"
            center = left + each * (i + 0.5)
            if panel["options"]["graphMode"] == "area" and len(line.values) > 1:
                spark = self.figure.add_axes(
                    (left + each * i, bottom + self.px(4), each, height * 0.35)
                )
                spark.fill_between(line.times, line.values, color=color, alpha=0.18, lw=0)
                spark.plot(line.times, line.values, color=color, lw=1)
                spark.set_axis_off()
                spark.set_ylim(bottom=0)
            self.figure.text(
                center,
                bottom + height * 0.48,
                text,
                color=color,
                fontsize=26 if len(text) < 9 else 18,
                ha="center",
                va="center",
            )
            if len(lines) > 1:
                self.figure.text(
                    center, bottom + height * 0.2, line.legend, color=WEAK, fontsize=9, ha="center"
                )

    def timeseries(self, panel: dict[str, Any], lines: list[Line]) -> None:
        left, bottom, width, height = self.frame(panel)
        defaults = panel["fieldConfig"]["defaults"]
        longest = max((len(line.legend) for line in lines), default=0)
        columns = max(1, int(width * self.width // (longest * 7 + 40)))
        legend_rows = math.ceil(len(lines) / columns) if lines else 0
        legend_h = self.px(8 + 19 * legend_rows)
        ax = self.figure.add_axes(
            (
                left + self.px(72, False),
                bottom + legend_h + self.px(22),
                width - self.px(84, False),
                height - legend_h - self.px(58),
            )
        )
        ax.set_facecolor(PANEL)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.grid(True, color=GRID, linewidth=0.8)
        ax.tick_params(colors=WEAK, labelsize=8, length=0)
        ax.yaxis.set_major_formatter(formatter(defaults["unit"]))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.xaxis.set_major_locator(MaxNLocator(6))
        if not lines:
            self.no_data(left, bottom, width, height)
            ax.set_yticks([])
            ax.set_xticks([])
            return
        fill = defaults["custom"]["fillOpacity"] / 100
        for i, line in enumerate(lines):
            color = PALETTE[i % len(PALETTE)]
            when = [datetime.fromtimestamp(t) for t in line.times]
            ax.plot(when, line.values, color=color, lw=1.3, label=line.legend)
            ax.fill_between(when, line.values, color=color, alpha=fill, lw=0)
        finite = [v for line in lines for v in line.values if math.isfinite(v)]
        top = defaults.get("max", max(finite, default=0) * 1.1 or 1)
        ax.set_ylim(defaults.get("min", 0), top)
        ax.set_xlim(self.start, self.end)
        handles, labels = ax.get_legend_handles_labels()
        order = [i * columns + j for j in range(columns) for i in range(legend_rows)]
        order = [k for k in order if k < len(lines)]  # row by row, as Grafana lists them
        legend = ax.legend(
            [handles[k] for k in order],
            [labels[k] for k in order],
            loc="upper left",
            bbox_to_anchor=(
                -self.px(64, False) / ax.get_position().width,
                -0.1 - self.px(4) / ax.get_position().height,
            ),
            ncol=columns,
            frameon=False,
            fontsize=8.5,
            labelcolor=TEXT,
            handlelength=1.2,
            columnspacing=1.6,
            borderaxespad=0,
        )
        for handle in legend.legend_handles:
            if handle is not None:
                handle.set_linewidth(3)

    def no_data(self, left: float, bottom: float, width: float, height: float) -> None:
        self.figure.text(
            left + width / 2,
            bottom + height / 2,
            "No data",
            color=WEAK,
            fontsize=12,
            ha="center",
            va="center",
        )

    def save(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(out, facecolor=PAGE, dpi=100)
        plt.close(self.figure)


def draw(dashboard: dict[str, Any], panels: dict[int, list[Line]], span: str, out: Path) -> None:
    drawn = [line for lines in panels.values() for line in lines]
    times = (min(line.times[0] for line in drawn), max(line.times[-1] for line in drawn))
    page = Page(dashboard, span, times)
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            page.row(panel)
        elif panel["type"] == "stat":
            page.stat(panel, panels[panel["id"]])
        elif panel["type"] == "timeseries":
            page.timeseries(panel, panels[panel["id"]])
        else:
            raise SystemExit(f"panel {panel['id']}: cannot draw a {panel['type']!r} panel")
    page.save(out)


def read_scrapes(path: Path) -> tuple[list[dashboard_load.Scrape], str]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(line["t"], line["text"]) for line in lines], lines[0]["instance"]


def write_scrapes(path: Path, scrapes: list[dashboard_load.Scrape], instance: str) -> None:
    with path.open("w") as f:
        for t, text in scrapes:
            f.write(json.dumps({"t": t, "instance": instance, "text": text}) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "grafana-dashboard.png")
    p.add_argument("--dashboard", type=Path, default=REPO / "docs" / "grafana-dashboard.json")
    p.add_argument("--seconds", type=float, default=75, help="how long the load runs")
    p.add_argument("--rate", type=float, default=4, help="uploads a second")
    p.add_argument("--interval", type=float, default=1, help="seconds between scrapes")
    p.add_argument("--window", default="15s", help="the rate window ($__rate_interval)")
    p.add_argument("--save-scrapes", type=Path, help="write the scrapes to this JSON-lines file")
    p.add_argument("--from-scrapes", type=Path, help="draw these saved scrapes; run nothing")
    args = p.parse_args(argv)

    dashboard = json.loads(args.dashboard.read_text())
    if args.from_scrapes:
        raw, instance = read_scrapes(args.from_scrapes)
    else:
        print(f"loading a gateway for {args.seconds:g} s, scraping every {args.interval:g} s …")
        raw, instance = asyncio.run(
            dashboard_load.run_and_scrape(args.seconds, args.rate, args.interval)
        )
    if args.save_scrapes:
        write_scrapes(args.save_scrapes, raw, instance)
    scrapes = promql.Scrapes()
    for t, text in raw:
        scrapes.add(t, text, {"instance": instance, "job": "stox"})
    panels = evaluate(dashboard, scrapes, args.window)
    first, last = (datetime.fromtimestamp(raw[i][0]) for i in (0, -1))
    span = f"{first:%H:%M:%S} to {last:%H:%M:%S}"
    draw(dashboard, panels, f"{span}   ·   rate over {args.window}", args.out)
    print(f"{len(raw)} scrapes; wrote {args.out}")


if __name__ == "__main__":
    main()
