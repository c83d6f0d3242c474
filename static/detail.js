// One workflow in detail (#/workflow/<id>, so Back closes it): the product, each step's
// result, errors and earlier attempts, its history and webhook deliveries (timeline.js), and
// Cancel or Retry.

import { API } from "./api.js";
import { $, h, setMessage } from "./dom.js";
import {
  STATE_ICONS,
  formatClock,
  formatDateTime,
  refreshWorkflow,
  renderBadge,
  timeOf,
  updateElapsed,
} from "./list.js";
import {
  STATE_LABELS,
  TERMINAL,
  formatDuration,
  formatPrice,
  isSequence,
  parseTime,
  pipelineLabel,
  stages,
  stepKind,
  stepLongName,
  stepState,
} from "./model.js";
import { renderReview } from "./review.js";
import { call, onSignIn, onSignOut } from "./session.js";
import { markDirty, state } from "./state.js";
import { resetTimeline, timelineSections } from "./timeline.js";

const DETAIL_PREFIX = "#/workflow/";

function openDetail(id) {
  if (location.hash === DETAIL_PREFIX + id) routeFromHash(true);
  else location.hash = DETAIL_PREFIX + id; // hashchange renders it; Back closes it
}

function routeFromHash(focus = true) {
  if (!state.session) return;
  const id = location.hash.startsWith(DETAIL_PREFIX) ? location.hash.slice(DETAIL_PREFIX.length) : null;
  if (!id || !/^[0-9a-f]{32}$/.test(id)) {
    closeDetail(false);
    return;
  }
  const previous = state.detailId;
  state.detailId = id;
  setMessage($("detail-message"), null);
  if (previous && previous !== id) markDirty(previous);
  resetTimeline(); // opened: the history and deliveries are asked for again
  markDirty(id);
  $("detail").hidden = false;
  document.body.classList.add("has-detail");
  renderDetail();
  if (focus) $("detail-title").focus();
  if (!state.store.get(id)) {
    refreshWorkflow(id).then((found) => {
      if (!found && state.detailId === id) renderDetail(true);
    });
  }
}

function closeDetail(restoreFocus = true) {
  const id = state.detailId;
  if (!id) return;
  state.detailId = null;
  $("detail").hidden = true;
  renderReview(null);
  document.body.classList.remove("has-detail");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  markDirty(id);
  const row = state.rows.get(id);
  if (restoreFocus) (row?.isConnected ? row.querySelector(".wf-open") : $("workflows-title")).focus();
}

export function renderDetail(missing = false) {
  const w = state.store.get(state.detailId);
  $("detail").dataset.workflowId = state.detailId;
  const body = $("detail-body");
  const cancel = $("detail-cancel");
  const retry = $("detail-retry");
  if (!w) {
    $("detail-title").textContent = missing ? "Workflow not found" : "Loading…";
    $("detail-status").hidden = true;
    cancel.hidden = retry.hidden = true;
    renderReview(null);
    body.replaceChildren(
      h("p", { class: "muted" }, missing ? "There is no workflow of yours with this id." : "Fetching the workflow…"),
    );
    return;
  }
  $("detail").dataset.status = w.status;
  $("detail-title").textContent = w.product?.name ?? w.id;
  const badge = $("detail-status");
  badge.hidden = false;
  renderBadge(badge, w.status);
  cancel.hidden = w.status !== "running";
  retry.hidden = w.status !== "failed";

  const open = new Set([...body.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  body.replaceChildren(
    h(
      "div",
      { class: "detail-summary" },
      failureNote(w),
      factsList([
        ["Workflow id", h("span", { class: "mono break" }, w.id)],
        ["Pipeline", pipelineLabel(w) ?? "default (stored before pipelines)"],
        ["Started", timeOf(w.created_at, formatDateTime(w.created_at))],
        ["Elapsed", h("time", { class: "elapsed" })],
        ["Last change", timeOf(w.updated_at, `version ${w.version}`)],
      ]),
    ),
    productSection(w.product ?? {}),
    stepsSection(w),
    ...timelineSections(w),
  );
  renderReview(w);
  updateElapsed(body.querySelector(".elapsed"), w);
  for (const details of body.querySelectorAll("details")) details.open = open.has(details.dataset.key);
}

/**
 * The steps: a sequence as one list of cards; a pipeline with parallel branches as its stages
 * in order, the steps of a stage side by side, each saying which steps it waits on.
 */
function stepsSection(w) {
  const heading = h("h3", { id: "detail-steps-title" }, "Steps");
  if (isSequence(w)) {
    return h(
      "section",
      { class: "detail-section", "aria-labelledby": "detail-steps-title" },
      heading,
      h("ol", { class: "step-cards" }, w.steps.map((step, i) => stepCard(step, i, w))),
    );
  }
  const groups = stages(w);
  return h(
    "section",
    { class: "detail-section", "aria-labelledby": "detail-steps-title" },
    heading,
    h(
      "ol",
      { class: "stages", "aria-label": `${groups.length} stages; the steps of a stage run side by side` },
      groups.map((group, depth) =>
        h(
          "li",
          { class: "stage", dataset: { stage: depth + 1, parallel: group.length > 1 ? "true" : "false" } },
          h(
            "h4",
            { class: "stage-title", id: `detail-stage-${depth + 1}` },
            `Stage ${depth + 1}`,
            group.length > 1 ? h("span", { class: "muted small" }, ` · ${group.length} in parallel`) : null,
          ),
          h(
            "ol",
            { class: "step-cards stage-steps", "aria-labelledby": `detail-stage-${depth + 1}` },
            group.map(({ step, index, after }) => stepCard(step, index, w, after)),
          ),
        ),
      ),
    ),
  );
}

function failureNote(w) {
  if (w.status !== "failed") return null;
  const step = w.steps.find((s) => s.status === "failed") ?? w.steps[w.current_step];
  return h(
    "p",
    { class: "callout", dataset: { tone: "error" } },
    h("strong", {}, `Failed at ${stepLongName(step.name)}`),
    ` after ${step.attempt} attempt${step.attempt === 1 ? "" : "s"}: ${step.error ?? "no reason given"}. `,
    "Retry starts that step again.",
  );
}

function factsList(entries) {
  return h(
    "dl",
    { class: "facts" },
    entries
      .filter(([, value]) => value !== null && value !== undefined && value !== "")
      .map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))),
  );
}

function productSection(product) {
  const images = product.images ?? [];
  const metadata = product.metadata && Object.keys(product.metadata).length ? product.metadata : null;
  return h(
    "section",
    { class: "detail-section", "aria-labelledby": "detail-product-title" },
    h("h3", { id: "detail-product-title" }, "Product"),
    factsList([
      ["Category", product.category || "—"],
      ["Price", formatPrice(product.price)],
      ["Images", String(images.length)],
    ]),
    product.description ? h("p", { class: "prose" }, product.description) : null,
    images.length
      ? h("ul", { class: "chips mono", "aria-label": "Images" }, images.map((src) => h("li", {}, src)))
      : null,
    metadata ? h("pre", { class: "json", "aria-label": "Metadata" }, JSON.stringify(metadata, null, 2)) : null,
  );
}

function stepCard(step, index, w, after = null) {
  const shown = stepState(step);
  const review = stepKind(w, step.name) === "review";
  const started = parseTime(step.dispatched_at);
  const ended = parseTime(step.completed_at);
  const facts = [];
  if (step.attempt) facts.push(`attempt ${step.attempt}`);
  if (started !== null && ended !== null) facts.push(`took ${formatDuration(ended - started)}`);
  if (shown === "retrying" && step.retry_at) facts.push(`next attempt at ${formatClock(step.retry_at)}`);
  if (shown === "running" && step.deadline) facts.push(`deadline ${formatClock(step.deadline)}`);
  const history = (step.attempts ?? []).filter((a) => a.outcome !== "completed");
  return h(
    "li",
    { class: "step-card", dataset: { step: step.name, state: shown, kind: review ? "review" : "service" } },
    h(
      "div",
      { class: "step-card-head" },
      h("span", { class: "step-icon", "aria-hidden": "true" }, STATE_ICONS[shown] ?? "·"),
      h(
        after ? "h5" : "h4",
        {},
        `${index + 1}. ${stepLongName(step.name)}`,
        review ? h("span", { class: "kind-tag" }, "review") : null,
      ),
      h("span", { class: "state-label" }, STATE_LABELS[shown] ?? shown),
    ),
    after
      ? h(
          "p",
          { class: "muted small step-after" },
          after.length ? `after ${after.map(stepLongName).join(" and ")}` : "starts at once",
        )
      : null,
    facts.length ? h("p", { class: "muted small" }, facts.join(" · ")) : null,
    reviewNote(step),
    step.error && shown !== "completed" ? h("p", { class: "step-error" }, step.error) : null,
    step.result && (!review || Object.keys(step.result).length) ? renderResult(step.name, step.result, w) : null,
    history.length
      ? h(
          "details",
          { dataset: { key: `${step.name}-attempts` } },
          h("summary", {}, `Earlier attempts (${history.length})`),
          h(
            "ol",
            { class: "attempts" },
            history.map((a) =>
              h(
                "li",
                {},
                `Attempt ${a.attempt}: ${a.outcome.replace("_", " ")}${a.by ? ` by ${a.by}` : ""}${a.error ? ` — ${a.error}` : ""}`,
              ),
            ),
          ),
        )
      : null,
  );
}

/** Who decided a review and when, or that it escalated. */
function reviewNote(step) {
  const review = step.review;
  if (!review) return null;
  if (!review.decision) {
    return review.escalated_at
      ? h("p", { class: "review-note small" }, `Escalated at ${formatClock(review.escalated_at)}: past its deadline.`)
      : null;
  }
  const how = review.decision === "approved" ? "Approved" : "Rejected";
  return h(
    "p",
    { class: "review-note small", dataset: { decision: review.decision } },
    `${how} by ${review.by ?? "?"} at ${formatClock(review.at)}`,
    review.reason ? `: ${review.reason}` : ".",
    review.escalated_at ? ` (escalated at ${formatClock(review.escalated_at)})` : "",
  );
}

const RESULT_RENDERERS = {
  image_processing: (result) => {
    const images = Array.isArray(result.images) ? result.images : [];
    return [
      h("h5", {}, `Processed images (${images.length})`),
      h(
        "ul",
        { class: "result-images" },
        images.map((img) =>
          h(
            "li",
            {},
            h("span", { class: "mono break" }, String(img.processed ?? "")),
            h(
              "span",
              { class: "muted small" },
              `from ${img.source ?? "?"}`,
              img.width && img.height ? ` · ${img.width}×${img.height}` : "",
              img.thumbnail ? ` · thumbnail ${img.thumbnail}` : "",
            ),
          ),
        ),
      ),
    ];
  },
  ai_enhancement: (result) => [
    h("h5", {}, "Enhanced description"),
    h("p", { class: "prose" }, String(result.description ?? "")),
    chips("Tags", result.tags),
  ],
  seo_generation: (result) => [
    h(
      "dl",
      { class: "seo" },
      seoEntry("SEO title", result.title, 60),
      seoEntry("Meta description", result.meta_description, 160),
      result.slug ? h("div", {}, h("dt", {}, "Slug"), h("dd", { class: "mono break" }, `/${result.slug}`)) : null,
    ),
    chips("Keywords", result.keywords),
  ],
};

function seoEntry(label, value, limit) {
  if (typeof value !== "string") return null;
  return h(
    "div",
    {},
    h("dt", {}, label, " ", h("span", { class: "muted small" }, `${value.length}/${limit}`)),
    h("dd", {}, value),
  );
}

function chips(label, items) {
  if (!Array.isArray(items) || !items.length) return null;
  return [h("h5", {}, label), h("ul", { class: "chips", "aria-label": label }, items.map((t) => h("li", {}, String(t))))];
}

/** A review's result: the copy it approved, shown as the steps that made it show theirs. */
function reviewedCopy(result) {
  const parts = [];
  if ("description" in result || "tags" in result) parts.push(RESULT_RENDERERS.ai_enhancement(result));
  if ("title" in result || "meta_description" in result) parts.push(RESULT_RENDERERS.seo_generation(result));
  const rest = Object.fromEntries(
    Object.entries(result).filter(([k]) => !["description", "tags", "title", "meta_description", "keywords", "slug"].includes(k)),
  );
  if (Object.keys(rest).length) parts.push(h("pre", { class: "json" }, JSON.stringify(rest, null, 2)));
  return [h("h5", {}, "Approved copy"), parts];
}

function renderResult(name, result, w) {
  const render = stepKind(w, name) === "review" ? reviewedCopy : RESULT_RENDERERS[name];
  const content = render
    ? render(result, w)
    : [h("h5", {}, "Result"), h("pre", { class: "json" }, JSON.stringify(result, null, 2))];
  return h("div", { class: "result" }, content);
}

/** A running workflow's elapsed time moves on without asking the server anything. */
function tick() {
  if (!state.session || document.hidden) return;
  const elapsed = $("detail-body").querySelector(".elapsed");
  const w = state.detailId && state.store.get(state.detailId);
  if (elapsed && w && !TERMINAL.has(w.status)) updateElapsed(elapsed, w);
}

// -- cancel and retry ------------------------------------------------------------------------------------

async function change(action) {
  const id = state.detailId;
  const w = state.store.get(id);
  if (!w) return;
  const button = action === "cancel" ? $("detail-cancel") : $("detail-retry");
  const message = $("detail-message");
  button.disabled = true;
  try {
    const doc = await call("POST", `${API}/workflow/${action}`, { workflow_id: id });
    if (!doc) return;
    if (state.store.apply(doc)) markDirty(id);
    if (state.detailId === id) renderDetail();
    if (button.hidden) $("detail-title").focus(); // the button is gone: keep focus in the panel
    const restarted = doc.steps.find((s) => s.status === "dispatched" || s.status === "waiting");
    const from = (restarted ?? doc.steps[doc.current_step]).name;
    setMessage(message, action === "cancel" ? "Workflow cancelled." : `Retrying from ${stepLongName(from)}.`, "success");
  } catch (error) {
    const text = error.status === 409 ? `Not possible now: ${error.message}` : error.message;
    setMessage(message, text, "error");
    if (error.status === 409) refreshWorkflow(id);
  } finally {
    button.disabled = false;
  }
}

function askCancel() {
  const w = state.store.get(state.detailId);
  if (!w) return;
  $("cancel-dialog-title").textContent = `Cancel “${w.product?.name ?? "this workflow"}”?`;
  $("cancel-dialog").showModal();
}

export function wireDetail() {
  onSignIn(() => routeFromHash());
  onSignOut(() => {
    state.detailId = null;
    $("detail").hidden = true;
    renderReview(null);
    document.body.classList.remove("has-detail");
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    $("cancel-dialog").close();
  });
  $("workflow-list").addEventListener("click", (event) => {
    const open = event.target.closest(".wf-open");
    if (open) openDetail(open.closest("li.wf").dataset.workflowId);
  });
  $("detail-close").addEventListener("click", () => closeDetail());
  $("detail-cancel").addEventListener("click", askCancel);
  $("detail-retry").addEventListener("click", () => change("retry"));
  $("cancel-keep").addEventListener("click", () => $("cancel-dialog").close());
  $("cancel-confirm").addEventListener("click", () => {
    $("cancel-dialog").close();
    change("cancel");
  });
  document.addEventListener("keydown", (event) => {
    const dialogOpen = $("cancel-dialog").open || $("bulk-dialog").open; // Escape closes that first
    if (event.key === "Escape" && state.detailId && !dialogOpen) closeDetail();
  });
  window.addEventListener("hashchange", () => routeFromHash());
  setInterval(tick, 1000);
}
