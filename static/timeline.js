// The detail view's history of one workflow (GET /api/v1/workflow/history) and its webhook
// delivery log (GET /api/v1/workflow/deliveries): fetched when the detail opens, fetched
// again when a newer version of the workflow arrives (on the WebSocket, or from Cancel and
// Retry). Never polled.

import { API } from "./api.js";
import { h } from "./dom.js";
import { formatClock, formatDateTime } from "./list.js";
import { stepLongName } from "./model.js";
import { call } from "./session.js";
import { state } from "./state.js";

const section = h(
  "section",
  { class: "detail-section timeline", id: "detail-history", "aria-labelledby": "detail-history-title" },
  h("h3", { id: "detail-history-title" }, "History"),
  h("div", { class: "timeline-body" }, h("p", { class: "muted small" }, "Loading the history…")),
);
const deliveriesSection = h(
  "section",
  {
    class: "detail-section deliveries",
    id: "detail-deliveries",
    "aria-labelledby": "detail-deliveries-title",
    hidden: true,
  },
  h("h3", { id: "detail-deliveries-title" }, "Webhook deliveries"),
  h("div", { class: "deliveries-body" }),
);

// what is shown: the workflow and the version its answers were asked for; `asking`: the
// workflow a request is under way for (another opened meanwhile is asked about at once)
const loaded = { id: null, version: null, asking: null };

/** Forget what is shown: the next render asks again (the detail opened). */
export function resetTimeline() {
  loaded.id = loaded.version = null;
  section.querySelector(".timeline-body").replaceChildren(h("p", { class: "muted small" }, "Loading the history…"));
  section.dataset.state = "loading";
  deliveriesSection.hidden = true;
  deliveriesSection.querySelector(".deliveries-body").replaceChildren();
}

/** The history and delivery sections for `w`, asking the server when `w` is newer than they. */
export function timelineSections(w) {
  if (loaded.id !== w.id) resetTimeline();
  const stale = loaded.id !== w.id || loaded.version !== w.version;
  if (stale && loaded.asking !== w.id) load(w.id, w.version);
  return [section, deliveriesSection];
}

async function load(id, version) {
  Object.assign(loaded, { id, version, asking: id });
  const [history, deliveries] = await Promise.allSettled([
    call("GET", `${API}/workflow/history?workflow_id=${id}`),
    call("GET", `${API}/workflow/deliveries?workflow_id=${id}`),
  ]);
  if (loaded.asking === id) loaded.asking = null;
  if (loaded.id !== id || state.detailId !== id) return; // another workflow opened meanwhile
  showHistory(history);
  showDeliveries(deliveries);
  const w = state.store.get(id);
  if (w && w.version !== loaded.version && loaded.asking !== id) load(id, w.version); // changed while asking
}

function showHistory(outcome) {
  const body = section.querySelector(".timeline-body");
  if (outcome.status === "rejected") {
    const error = outcome.reason;
    const forbidden = error?.status === 404 || error?.status === 403;
    section.dataset.state = forbidden ? "forbidden" : "error";
    body.replaceChildren(
      h(
        "p",
        { class: forbidden ? "muted small" : "step-error" },
        forbidden
          ? "The history of this workflow is only shown to its owner and to admins."
          : `The history could not be loaded: ${error?.message ?? error}`,
      ),
    );
    return;
  }
  const doc = outcome.value;
  if (!doc) return; // signed out meanwhile
  section.dataset.state = "loaded";
  const entries = Array.isArray(doc.entries) ? doc.entries : [];
  const dispatched = new Set(); // steps dispatched before: a retry dispatches one "again"
  const rejections = reviewOutcomes(entries);
  const dropped =
    doc.dropped > 0
      ? h(
          "p",
          { class: "muted small timeline-dropped" },
          `${doc.dropped} older ${doc.dropped === 1 ? "entry" : "entries"} not shown.`,
        )
      : null;
  const list = entries.length
    ? h(
        "ol",
        { class: "timeline-entries", "aria-label": "What happened, oldest first" },
        entries.map((entry) => {
          const again = entry.event === "step_dispatched" && dispatched.has(entry.step);
          if (entry.event === "step_dispatched") dispatched.add(entry.step);
          return entryItem(entry, { again, rejected: rejections.get(entry) ?? Boolean(entry.error) });
        }),
      )
    : h("p", { class: "muted small" }, "Nothing recorded yet.");
  body.replaceChildren(...present(dropped, list));
}

/** The nodes given, without the nulls (replaceChildren would show them as text). */
function present(...nodes) {
  return nodes.filter((node) => node !== null && node !== undefined);
}

function entryItem(entry, how) {
  return h(
    "li",
    { class: "timeline-entry", dataset: { event: entry.event, tone: toneOf(entry.event) } },
    h("time", { datetime: entry.at, title: formatDateTime(entry.at) }, formatClock(entry.at)),
    h("span", { class: "timeline-text" }, describe(entry, how)),
    entry.by ? h("span", { class: "timeline-by muted small" }, byWhom(entry.by)) : null,
  );
}

const TONES = {
  step_completed: "success",
  workflow_completed: "success",
  webhook_delivered: "success",
  step_retrying: "warning",
  step_review_escalated: "warning",
  webhook_retrying: "warning",
  step_failed: "error",
  workflow_failed: "error",
  webhook_given_up: "error",
  workflow_cancelled: "muted",
};

function toneOf(event) {
  return TONES[event] ?? "info";
}

/** "user:rita" → "rita": the person, else the service, the sweeper or the webhook relay. */
function actorName(by) {
  if (by.startsWith("user:")) return by.slice(5);
  if (by.startsWith("service:")) return `service ${by.slice(8)}`;
  if (by === "sweeper") return "the sweeper";
  if (by === "webhooks") return "the webhook relay";
  return by;
}

function byWhom(by) {
  return `by ${actorName(by)}`;
}

/**
 * What an entry says, in words: "AI enhancement failed (attempt 2): timeout". `again`: the
 * step was dispatched before (a retry of a failed workflow starts its attempts anew);
 * `rejected`: a review's entry rejected.
 */
export function describe(entry, { again = false, rejected = false } = {}) {
  const step = entry.step ? stepLongName(entry.step) : "A step";
  const attempt = entry.attempt ? ` (attempt ${entry.attempt})` : "";
  const laterAttempt = entry.attempt > 1 ? attempt : "";
  const error = entry.error ? `: ${entry.error}` : "";
  const url = entry.url ?? "its endpoint";
  switch (entry.event) {
    case "workflow_started":
      return "Workflow started";
    case "step_dispatched":
      return `${step} dispatched${laterAttempt || (again ? " again" : "")}`;
    case "step_completed":
      return `${step} completed${laterAttempt}`;
    case "step_retrying":
      return `${step} failed${attempt}${error}; it will be tried again`;
    case "step_failed":
      return `${step} failed${attempt}${error}`;
    case "step_waiting_review":
      return `${step} waiting for review`;
    case "step_reviewed":
      return reviewed(entry, step, rejected);
    case "step_review_escalated":
      return `${step} escalated: past its deadline`;
    case "workflow_completed":
      return "Workflow completed";
    case "workflow_failed":
      return "Workflow failed";
    case "workflow_cancelled":
      return "Workflow cancelled";
    case "webhook_delivered":
      return `Webhook to ${url} delivered`;
    case "webhook_retrying":
      return `Webhook to ${url} not taken${error}; it will be tried again`;
    case "webhook_given_up":
      return `Webhook to ${url} given up${error}`;
    default:
      return String(entry.event ?? "change").replaceAll("_", " ");
  }
}

/**
 * Whether each step_reviewed entry approved or rejected: the step's ended review attempts, in
 * order, matched from the newest (the history may have dropped the oldest entries). The
 * attempt number cannot tell: a rejection starts the review's attempts anew.
 */
function reviewOutcomes(entries) {
  const w = state.store.get(loaded.id);
  const outcomes = new Map();
  const pending = new Map(); // step -> its step_reviewed entries, oldest first
  for (const entry of entries) {
    if (entry.event !== "step_reviewed") continue;
    if (!pending.has(entry.step)) pending.set(entry.step, []);
    pending.get(entry.step).push(entry);
  }
  for (const [name, reviewed] of pending) {
    const ended = (w?.steps.find((s) => s.name === name)?.attempts ?? []).filter(
      (a) => a.outcome === "completed" || a.outcome === "rejected",
    );
    const offset = ended.length - reviewed.length;
    reviewed.forEach((entry, i) => {
      const attempt = ended[offset + i];
      outcomes.set(entry, attempt ? attempt.outcome === "rejected" : Boolean(entry.error));
    });
  }
  return outcomes;
}

function reviewed(entry, step, rejected) {
  const who = entry.by?.startsWith("user:") ? ` by ${entry.by.slice(5)}` : "";
  return rejected
    ? `Rejected${who} (${step})${entry.error ? `: ${entry.error}` : ""}`
    : `Approved${who} (${step})`;
}

// -- the delivery log ------------------------------------------------------------------------------

const DELIVERY_STATUS = { pending: "Pending", delivered: "Delivered", given_up: "Given up" };

function showDeliveries(outcome) {
  const body = deliveriesSection.querySelector(".deliveries-body");
  const list = outcome.status === "fulfilled" ? (outcome.value?.deliveries ?? []) : [];
  deliveriesSection.hidden = list.length === 0; // none, or not the user's to see
  if (list.length) {
    body.replaceChildren(h("ul", { class: "delivery-list", "aria-label": "Webhook deliveries" }, list.map(deliveryItem)));
  } else body.replaceChildren();
}

function deliveryItem(d) {
  const status = DELIVERY_STATUS[d.status] ?? d.status;
  const facts = [
    ["Status", h("span", { class: "delivery-status", dataset: { status: d.status } }, status)],
    ["Attempts", String(d.attempts)],
    ["Last error", d.last_error || null],
    ["Next try", d.status === "pending" ? timeText(d.next_at) : null],
    [d.status === "delivered" ? "Delivered" : "Ended", d.ended_at ? timeText(d.ended_at) : null],
  ];
  return h(
    "li",
    { class: "delivery", dataset: { status: d.status, deliveryId: d.id } },
    h(
      "p",
      { class: "delivery-head" },
      h("strong", {}, d.event),
      " to ",
      h("span", { class: "mono break delivery-url" }, d.url),
    ),
    h(
      "dl",
      { class: "facts delivery-facts" },
      facts
        .filter(([, value]) => value !== null && value !== undefined && value !== "")
        .map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))),
    ),
  );
}

function timeText(iso) {
  return h("time", { datetime: iso, title: formatDateTime(iso) }, formatClock(iso));
}
