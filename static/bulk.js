// Acting on many workflows at once: a checkbox on each row, "select all shown", and
// POST /api/v1/workflow/bulk to retry or cancel the selected ones (100 a call) or to retry
// every failed one (by filter, following next_cursor to the end). What happened to each is
// shown below the buttons: the counts by outcome, and why those not done were not. The rows
// themselves change as the WebSocket brings the new versions.

import { API } from "./api.js";
import { $, h } from "./dom.js";
import { outcomeCounts } from "./model.js";
import { call } from "./session.js";
import { state } from "./state.js";

const BULK_LIMIT = 100; // ids one call may name (stox/schemas.py BULK_LIMIT)
const DONE = new Set(["retried", "cancelled"]);
const TITLES = { retry: "Retry selected", cancel: "Cancel selected", failed: "Retry all failed" };

let shown = []; // the ids of the rows shown, in order

/** A row's checkbox (list.js puts it in the row; its label names the product). */
export function rowCheck(id) {
  return h("input", { type: "checkbox", class: "wf-check", dataset: { workflowId: id } });
}

export function labelCheck(check, name) {
  check.setAttribute("aria-label", `Select ${name}`);
}

/** After each render of the rows: the selection is of rows shown only; the bar says it. */
export function renderBulk(ids) {
  shown = ids;
  const visible = new Set(ids);
  for (const id of state.selected) if (!visible.has(id)) state.selected.delete(id);
  for (const id of ids) {
    const check = state.rows.get(id)?.querySelector(".wf-check");
    if (check) check.checked = state.selected.has(id);
  }
  const n = state.selected.size;
  const all = $("select-shown");
  all.checked = n > 0 && n === ids.length;
  all.indeterminate = n > 0 && n < ids.length;
  all.disabled = !ids.length;
  $("bulk-count").textContent = n ? `${n} selected` : "None selected";
  $("bulk-retry").disabled = $("bulk-cancel").disabled = !n || state.bulkBusy;
  $("bulk-retry-failed").disabled = state.bulkBusy;
  $("bulk-bar").setAttribute("aria-busy", String(state.bulkBusy));
}

const rerender = () => renderBulk(shown);

function nameOf(id) {
  const w = state.store.get(id);
  return `${w?.product?.name ?? "Workflow"} (${id.slice(0, 8)})`;
}

function showOutcome(kind, results, error = null) {
  const box = $("bulk-outcome");
  const notDone = results.filter((r) => !DONE.has(r.outcome));
  const summary = results.length ? `${outcomeCounts(results)}.` : "No workflows to act on.";
  const parts = [
    h("p", {}, h("strong", {}, `${TITLES[kind]}: `), summary),
    error ? h("p", { class: "bulk-error" }, `Stopped: ${error.message}`) : null,
    notDone.length
      ? h(
          "ul",
          { class: "bulk-problems", "aria-label": "Not done" },
          notDone.map((r) =>
            h(
              "li",
              { dataset: { workflowId: r.workflow_id, outcome: r.outcome } },
              `${nameOf(r.workflow_id)}: ${r.outcome.replace(/_/g, " ")}`,
              r.message ? ` — ${r.message}` : "",
            ),
          ),
        )
      : null,
  ];
  box.replaceChildren(...parts.filter(Boolean));
  box.dataset.tone = error || notDone.length ? "warning" : "success";
  box.hidden = false;
}

/** Send bulk calls until `next()` has nothing more to ask; every result kept. */
async function run(kind, next) {
  if (state.bulkBusy) return;
  state.bulkBusy = true;
  rerender();
  const results = [];
  let error = null;
  try {
    for (let body = next(null); body; ) {
      const answer = await call("POST", `${API}/workflow/bulk`, body);
      if (!answer) return; // signed out meanwhile
      results.push(...answer.results);
      body = next(answer);
    }
  } catch (caught) {
    error = caught;
  } finally {
    state.bulkBusy = false;
    if (state.session) {
      for (const r of results) if (DONE.has(r.outcome)) state.selected.delete(r.workflow_id);
      showOutcome(kind, results, error);
      rerender();
    }
  }
}

function actOnSelected(action) {
  const ids = shown.filter((id) => state.selected.has(id));
  let at = 0;
  return run(action, () => {
    if (at >= ids.length) return null;
    const chunk = ids.slice(at, at + BULK_LIMIT);
    at += BULK_LIMIT;
    return { action, ids: chunk };
  });
}

function retryAllFailed() {
  return run("failed", (answer) => {
    const body = { action: "retry", filter: { status: "failed" } };
    if (answer === null) return body;
    return answer.next_cursor ? { ...body, cursor: answer.next_cursor } : null;
  });
}

function askCancel() {
  const n = state.selected.size;
  if (!n) return;
  $("bulk-dialog-title").textContent = `Cancel ${n} selected workflow${n === 1 ? "" : "s"}?`;
  $("bulk-dialog").showModal();
}

export function wireBulk() {
  $("workflow-list").addEventListener("change", (event) => {
    const check = event.target.closest(".wf-check");
    if (!check) return;
    const id = check.dataset.workflowId;
    if (check.checked) state.selected.add(id);
    else state.selected.delete(id);
    rerender();
  });
  $("select-shown").addEventListener("change", (event) => {
    if (event.target.checked) for (const id of shown) state.selected.add(id);
    else state.selected.clear();
    rerender();
  });
  $("bulk-retry").addEventListener("click", () => actOnSelected("retry"));
  $("bulk-cancel").addEventListener("click", askCancel);
  $("bulk-retry-failed").addEventListener("click", retryAllFailed);
  $("bulk-keep").addEventListener("click", () => $("bulk-dialog").close());
  $("bulk-confirm").addEventListener("click", () => {
    $("bulk-dialog").close();
    actOnSelected("cancel");
  });
}

/** At sign-out: nothing selected, no outcome shown. */
export function resetBulk() {
  state.selected.clear();
  state.bulkBusy = false;
  shown = [];
  $("bulk-outcome").replaceChildren();
  $("bulk-outcome").hidden = true;
  $("bulk-dialog").close();
}
