// A step waiting for a person (docs: README, "The dashboard"): the upstream copy in editable
// fields, Approve (the values shown, edited or not, become the review step's result) and Reject
// with a reason (the workflow fails, or the step the pipeline names runs again).
//
// The panels live in #review-panels, outside the detail's body: they are rebuilt only when the
// steps waiting change, so a change elsewhere in the workflow (a parallel branch reporting)
// keeps what the reviewer typed and where the focus is. The outcome and any error go to
// #review-message below them, which stays when the panel goes.

import { API } from "./api.js";
import { $, h, setFieldError, setMessage, showFieldErrors } from "./dom.js";
import { formatClock, refreshWorkflow } from "./list.js";
import { fieldMessages, fieldText, parseReview, reviewFields, stepLongName, stepSpec } from "./model.js";
import { call } from "./session.js";
import { markDirty, state } from "./state.js";

const shown = { key: null, workflowId: null };

/** The panels of `w`'s waiting review steps (none when `w` is null or none waits). */
export function renderReview(w) {
  const panels = $("review-panels");
  if (!w) {
    shown.key = shown.workflowId = null;
    panels.replaceChildren();
    setMessage($("review-message"), null);
    return;
  }
  if (shown.workflowId !== w.id) setMessage($("review-message"), null);
  const waiting = w.status === "running" ? w.steps.filter((s) => s.status === "waiting") : [];
  const key = `${w.id}:${waiting.map((s) => s.step_id).join(",")}`;
  if (key === shown.key) {
    for (const step of waiting) updateFacts(step);
    return; // the same reviews: keep what is typed
  }
  shown.key = key;
  shown.workflowId = w.id;
  panels.replaceChildren(...waiting.map((step) => panel(w, step)));
}

function prefixOf(step) {
  return `review-${step.name}`;
}

function panel(w, step) {
  const prefix = prefixOf(step);
  const fields = reviewFields(w, step.name);
  const spec = stepSpec(w, step.name);
  const inputs = fields.map((field, i) => fieldInput(prefix, `f${i}`, field));
  const form = h(
    "form",
    {
      class: "review-panel",
      novalidate: true,
      "aria-labelledby": `${prefix}-title`,
      dataset: { step: step.name, stepId: step.step_id },
    },
    h("h3", { id: `${prefix}-title` }, `Needs review: ${stepLongName(step.name)}`),
    h("p", { class: "muted small review-facts" }),
    fields.length
      ? h("p", { class: "small" }, "Check the copy the steps before it made; what you approve is what goes on.")
      : h("p", { class: "muted" }, "The steps before it left nothing to edit."),
    inputs,
    h(
      "div",
      { class: "field" },
      h("label", { for: `${prefix}-reason` }, "Reason for rejecting"),
      h("textarea", {
        id: `${prefix}-reason`,
        rows: 2,
        maxlength: 4000,
        "aria-describedby": `${prefix}-reason-hint ${prefix}-reason-error`,
      }),
      h(
        "p",
        { id: `${prefix}-reason-hint`, class: "hint" },
        spec.on_reject && spec.on_reject !== "fail"
          ? `Needed to reject. Rejecting runs ${stepLongName(spec.on_reject)} again, then this review waits again.`
          : "Needed to reject. Rejecting fails the workflow.",
      ),
      h("p", { id: `${prefix}-reason-error`, class: "field-error", hidden: true }),
    ),
    h(
      "div",
      { class: "actions" },
      h("button", { class: "button primary", type: "submit" }, "Approve"),
      h("button", { class: "button danger", type: "button", dataset: { action: "reject" } }, "Reject"),
    ),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    decide(w.id, step, fields, form, "approve");
  });
  form.querySelector('[data-action="reject"]').addEventListener("click", () => decide(w.id, step, fields, form, "reject"));
  for (const [i] of fields.entries()) {
    const input = form.querySelector(`#${prefix}-f${i}`);
    input.addEventListener("input", () => {
      setFieldError(prefix, `f${i}`, null);
      updateCounter(form, prefix, `f${i}`, fields[i]);
    });
  }
  form.querySelector(`#${prefix}-reason`).addEventListener("input", () => setFieldError(prefix, "reason", null));
  updateFacts(step, form);
  return form;
}

function fieldInput(prefix, id, field) {
  const inputId = `${prefix}-${id}`;
  const described = [field.hint || field.limit ? `${inputId}-hint` : null, `${inputId}-error`].filter(Boolean);
  const props = {
    id: inputId,
    name: field.key,
    "aria-describedby": described.join(" "),
    dataset: { key: field.key },
  };
  const input =
    field.kind === "long"
      ? h("textarea", { ...props, rows: field.key === "description" ? 4 : 2 })
      : h("input", { ...props, autocomplete: "off", inputmode: field.kind === "number" ? "decimal" : null });
  input.value = fieldText(field);
  return h(
    "div",
    { class: "field" },
    h("label", { for: inputId }, field.label),
    input,
    field.hint || field.limit ? h("p", { id: `${inputId}-hint`, class: "hint" }, hintText(field, input.value)) : null,
    h("p", { id: `${inputId}-error`, class: "field-error", hidden: true }),
  );
}

function hintText(field, text) {
  if (field.limit) return `${text.trim().length}/${field.limit} characters (search results show about ${field.limit})`;
  return field.hint;
}

function updateCounter(form, prefix, id, field) {
  if (!field.limit) return;
  form.querySelector(`#${prefix}-${id}-hint`).textContent = hintText(field, form.querySelector(`#${prefix}-${id}`).value);
}

function updateFacts(step, form = null) {
  const box = (form ?? $("review-panels").querySelector(`form[data-step-id="${step.step_id}"]`))?.querySelector(
    ".review-facts",
  );
  if (!box) return;
  const facts = [];
  if (step.dispatched_at) facts.push(`waiting since ${formatClock(step.dispatched_at)}`);
  if (step.deadline) facts.push(`deadline ${formatClock(step.deadline)}`);
  if (step.review?.escalated_at) facts.push(`escalated at ${formatClock(step.review.escalated_at)}`);
  box.textContent = facts.join(" · ");
}

async function decide(workflowId, step, fields, form, decision) {
  const prefix = prefixOf(step);
  const message = $("review-message");
  const texts = Object.fromEntries(fields.map((f, i) => [f.key, form.querySelector(`#${prefix}-f${i}`).value]));
  const keys = fields.map((_, i) => `f${i}`);
  const byKey = (errors) => Object.fromEntries(fields.map((f, i) => [`f${i}`, errors[f.key]]).filter(([, m]) => m));
  setMessage(message, null);
  let body;
  if (decision === "approve") {
    const { result, errors } = parseReview(fields, texts);
    setFieldError(prefix, "reason", null);
    if (showFieldErrors(prefix, keys, byKey(errors)).length || Object.keys(errors).length) return;
    body = { workflow_id: workflowId, step_id: step.step_id, decision, result };
  } else {
    const reason = form.querySelector(`#${prefix}-reason`).value.trim();
    showFieldErrors(prefix, ["reason"], reason ? {} : { reason: "Give a reason to reject: it is kept on the step." });
    if (!reason) return;
    body = { workflow_id: workflowId, step_id: step.step_id, decision, reason };
  }
  const buttons = [...form.querySelectorAll("button")];
  for (const button of buttons) button.disabled = true;
  form.setAttribute("aria-busy", "true");
  const edited = fields.some((f) => texts[f.key] !== fieldText(f));
  try {
    const answer = await call("POST", `${API}/workflow/review`, body);
    if (!answer) return;
    const spec = stepSpec(state.store.get(workflowId) ?? { steps: [] }, step.name);
    let text;
    if (answer.result === "duplicate") text = "This decision had already been made; nothing changed.";
    else if (decision === "approve") text = `Approved ${stepLongName(step.name)}${edited ? " with your edits" : ""}.`;
    else if (spec.on_reject && spec.on_reject !== "fail") {
      text = `Rejected: ${stepLongName(spec.on_reject)} runs again, then the review waits again.`;
    } else text = "Rejected: the workflow has failed.";
    setMessage(message, text, "success");
    message.focus();
    refreshWorkflow(workflowId); // the socket brings it too
  } catch (error) {
    let text = error.message;
    if (error.status === 409) {
      text = `Not possible now: ${error.message}`;
      refreshWorkflow(workflowId).then(() => markDirty(workflowId));
    } else if (error.status === 404) {
      text = "This workflow is not one you may review (or it no longer exists).";
    } else if (error.status === 400 && error.fields) {
      const messages = fieldMessages(error.fields);
      if (messages.reason) setFieldError(prefix, "reason", messages.reason);
      text = Object.entries(messages)
        .map(([field, m]) => `${field}: ${m}`)
        .join(" ");
    }
    setMessage(message, text, "error");
  } finally {
    for (const button of buttons) button.disabled = false;
    form.removeAttribute("aria-busy");
  }
}
