// The list's search form: a part of a product's name or category, the pipeline (when there
// is more than one), a created range of days and, for admins and reviewers, the owner.
// What it applies is state.search; list.js shows the server's list of it (GET list with
// these filters, a page at a time) and keeps live changes in it by the same rules
// (model.js matchesSearch). The owner is narrowed here only: the list has no such filter.

import { $, h } from "./dom.js";
import { NO_SEARCH, dayStart, matchesSearch } from "./model.js";
import { state } from "./state.js";

let changed = () => {};
let typing = null;

/** Admins and reviewers see everyone's workflows: their rows name the owner. */
export const seesEveryone = () => state.role === "admin" || state.role === "reviewer";

/** What the list keeps of the store: null when nothing is searched. */
export function searchKeep() {
  const s = state.search;
  if (!s.q && !s.pipeline && !s.createdAfter && !s.createdBefore && !s.owner) return null;
  return (w) => matchesSearch(w, s);
}

/** The owner's name as a row shows it: `owner_name`, else the id. */
export const ownerLabel = (w) => w.owner_name || w.owner || "";

function readForm() {
  return {
    q: $("search-q").value.trim(),
    pipeline: $("search-pipeline-field").hidden ? "" : $("search-pipeline").value,
    createdAfter: dayStart($("search-from").value),
    createdBefore: dayStart($("search-to").value, 1), // the day shown is included
    owner: $("search-owner-field").hidden ? "" : $("search-owner").value,
  };
}

/** Apply what the form says; `again`: also when it says what is applied (a search whose
 * first page failed is asked for again). */
function apply(again = false) {
  clearTimeout(typing);
  typing = null;
  const next = readForm();
  const same = Object.keys(NO_SEARCH).every((k) => next[k] === state.search[k]);
  $("search-clear").hidden = Object.values(next).every((v) => !v);
  if (same && !again) return;
  if (!same) state.search = Object.freeze(next);
  changed();
}

/** The pipeline choice, from the pipelines upload.js loaded: only when there are several. */
export function renderPipelineChoice() {
  const select = $("search-pipeline");
  const chosen = select.value;
  select.replaceChildren(
    h("option", { value: "" }, "Any"),
    ...state.pipelines.map((p) => h("option", { value: p.name, selected: p.name === chosen }, p.name)),
  );
  $("search-pipeline-field").hidden = state.pipelines.length < 2;
}

let ownersShown = "";

/** The owners seen among the loaded workflows, for admins and reviewers; the choice kept. */
export function renderOwnerChoice() {
  const field = $("search-owner-field");
  field.hidden = !seesEveryone();
  if (field.hidden) return;
  const owners = new Map();
  for (const w of state.store.byId.values()) if (w.owner) owners.set(w.owner, ownerLabel(w));
  const select = $("search-owner");
  if (state.search.owner && !owners.has(state.search.owner)) owners.set(state.search.owner, state.search.owner);
  const sorted = [...owners].sort((a, b) => a[1].localeCompare(b[1]) || a[0].localeCompare(b[0]));
  const key = JSON.stringify(sorted);
  if (key === ownersShown) return;
  ownersShown = key;
  select.replaceChildren(
    h("option", { value: "" }, "Everyone"),
    ...sorted.map(([id, name]) => h("option", { value: id, selected: id === state.search.owner }, name)),
  );
}

function clear() {
  $("search-form").reset();
  apply();
  $("search-q").focus();
}

/** `onChange()` runs when what the form applies changes. */
export function wireSearch(onChange) {
  changed = onChange;
  const form = $("search-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    apply(true);
  });
  $("search-q").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => apply(), 350);
  });
  for (const id of ["search-pipeline", "search-from", "search-to", "search-owner"]) {
    $(id).addEventListener("change", () => apply());
  }
  $("search-clear").addEventListener("click", clear);
}

/** At sign-out: nothing searched, no owners seen. */
export function resetSearch() {
  clearTimeout(typing);
  typing = null;
  $("search-form").reset();
  $("search-clear").hidden = true;
  ownersShown = "";
  $("search-owner").replaceChildren(h("option", { value: "" }, "Everyone"));
  $("search-owner-field").hidden = true;
  state.search = NO_SEARCH;
}
