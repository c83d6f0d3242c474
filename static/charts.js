// The charts: workflows completed and failed per minute over the last hour, each step's
// duration (p50, p95) and failure rate, and how many run and wait for a review now. Plain
// SVG built element by element (no markup from strings, no inline styles: the page's CSP),
// live from the gateway's `stats` messages on the list's socket (`/ws?stats=1`: at most one
// a second, only when the figures move; list.js hands them to `renderStats`), never polled.
// Every figure is also there as text: the tiles, the steps' table, and a table of the busy
// minutes beside the per-minute chart.

import { $, h } from "./dom.js";
import { stepLongName } from "./model.js";
import { onSignOut } from "./session.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600; // the per-minute chart's viewBox
const HEIGHT = 100;
const AXIS = 1; // the baseline's

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  el.append(...children);
  return el;
}

const count = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

/** Seconds as people read them: 850 ms, 4.2 s, 3 min 5 s. */
export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 60) return `${value < 10 ? value.toFixed(1) : Math.round(value)} s`;
  const minutes = Math.floor(value / 60);
  const rest = Math.round(value % 60);
  return rest ? `${minutes} min ${rest} s` : `${minutes} min`;
}

const percent = (rate) => `${(rate * 100).toFixed(rate && rate < 0.1 ? 1 : 0)}%`;

function clockTime(iso) {
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? iso : at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// -- the tiles ----------------------------------------------------------------------------------

function renderTiles(stats) {
  const tiles = [
    ["running", "Running", stats.running],
    ["waiting", "Waiting for review", stats.waiting],
    ["completed", "Completed, last hour", stats.completed],
    ["failed", "Failed, last hour", stats.failed],
  ];
  $("stats-tiles").replaceChildren(
    ...tiles.map(([key, label, value]) =>
      h("div", { class: `stat-tile tone-${key}`, dataset: { stat: key } }, h("dt", {}, label), h("dd", {}, String(value))),
    ),
  );
}

// -- completed and failed per minute ------------------------------------------------------------

function renderMinutes(stats) {
  const minutes = stats.minutes;
  const most = Math.max(1, ...minutes.map((m) => m.completed + m.failed));
  const slot = WIDTH / minutes.length;
  const barWidth = Math.max(1, slot - 2);
  const scale = (HEIGHT - AXIS - 2) / most;
  const bars = minutes.map((minute, index) => {
    const x = (index * slot + 1).toFixed(1);
    const base = HEIGHT - AXIS;
    const completed = minute.completed * scale;
    const failed = minute.failed * scale;
    return svg(
      "g",
      { class: "minute", "data-index": index, "data-completed": minute.completed, "data-failed": minute.failed },
      svg("rect", { class: "bar-completed", x, y: (base - completed).toFixed(1), width: barWidth.toFixed(1), height: completed.toFixed(1) }),
      svg("rect", { class: "bar-failed", x, y: (base - completed - failed).toFixed(1), width: barWidth.toFixed(1), height: failed.toFixed(1) }),
      svg("title", {}, `${clockTime(minute.start)}: ${minute.completed} completed, ${minute.failed} failed`),
    );
  });
  const chart = $("chart-minutes");
  chart.replaceChildren(svg("line", { class: "axis", x1: 0, y1: HEIGHT - 0.5, x2: WIDTH, y2: HEIGHT - 0.5 }), ...bars);
  $("chart-minutes-max").textContent = `${most} a minute`;
  $("chart-minutes-start").textContent = minutes.length ? clockTime(minutes[0].start) : "";
  const busiest = minutes.reduce((best, m) => (m.completed + m.failed > best.completed + best.failed ? m : best), minutes[0] ?? { completed: 0, failed: 0 });
  chart.setAttribute(
    "aria-label",
    `Workflows finished per minute over the last hour: ${stats.completed} completed, ${stats.failed} failed` +
      (stats.completed + stats.failed ? `; the busiest minute, ${clockTime(busiest.start)}, had ${busiest.completed + busiest.failed}.` : "."),
  );
  const busy = minutes.filter((m) => m.completed + m.failed > 0).reverse();
  $("minutes-table-body").replaceChildren(
    ...busy.map((m) => h("tr", {}, h("th", { scope: "row" }, clockTime(m.start)), h("td", {}, String(m.completed)), h("td", {}, String(m.failed)))),
  );
  $("minutes-empty").hidden = busy.length > 0;
}

// -- the steps ----------------------------------------------------------------------------------

function bar(value, most, tone) {
  const width = most > 0 && value ? Math.max(2, (value / most) * 100) : 0;
  return svg(
    "svg",
    { class: "meter", viewBox: "0 0 100 8", preserveAspectRatio: "none", "aria-hidden": "true", focusable: "false" },
    svg("rect", { class: "meter-track", x: 0, y: 0, width: 100, height: 8 }),
    svg("rect", { class: `meter-fill ${tone}`, x: 0, y: 0, width: width.toFixed(1), height: 8 }),
  );
}

function renderSteps(stats) {
  const steps = stats.steps;
  const slowest = Math.max(0, ...steps.map((s) => s.p95 ?? 0));
  $("steps-table-body").replaceChildren(
    ...steps.map((step) =>
      h(
        "tr",
        { dataset: { step: step.step } },
        h(
          "th",
          { scope: "row" },
          h("span", { class: "step-name", title: step.step }, stepLongName(step.step)),
          h("span", { class: "muted small step-attempts" }, count(step.attempts, "attempt")),
        ),
        h("td", { class: "num" }, h("span", { class: "figure", dataset: { figure: "p50" } }, seconds(step.p50)), bar(step.p50, slowest, "tone-p50")),
        h("td", { class: "num" }, h("span", { class: "figure", dataset: { figure: "p95" } }, seconds(step.p95)), bar(step.p95, slowest, "tone-p95")),
        h(
          "td",
          { class: "num" },
          h("span", { class: "figure", dataset: { figure: "failure-rate" } }, percent(step.failure_rate)),
          bar(step.failure_rate, 1, "tone-failed"),
        ),
      ),
    ),
  );
  $("steps-table").hidden = steps.length === 0;
  $("steps-empty").hidden = steps.length > 0;
}

export function renderStats(stats) {
  if (!stats || !Array.isArray(stats.minutes) || !Array.isArray(stats.steps)) return;
  const section = $("charts");
  renderTiles(stats);
  renderMinutes(stats);
  renderSteps(stats);
  section.dataset.updated = String(Number(section.dataset.updated ?? 0) + 1);
  section.hidden = false; // from the first figures on: a gateway that sends none shows none
  $("charts-since").textContent = `Counted since ${clockTime(stats.since)}`;
}

function stop() {
  $("charts").hidden = true;
  delete $("charts").dataset.updated;
}

export function wireCharts() {
  onSignOut(stop);
}
