// The list of workflows, live: the WebSocket that feeds it (a snapshot, then every change),
// the rows and counts it renders, older pages on demand, and what is announced to screen
// readers as workflows change. A search (search.js) shows the server's list of it, a page at
// a time, and the live changes that match; the rows' checkboxes are bulk.js's.

import { API, LiveSocket, socketUrl } from "./api.js";
import { labelCheck, renderBulk, resetBulk, rowCheck, wireBulk } from "./bulk.js";
import { renderStats } from "./charts.js";
import { $, h, setMessage } from "./dom.js";
import {
  REVIEW_FILTER,
  SNAPSHOT_LIMIT,
  STATUS_LABELS,
  describeStep,
  elapsedMs,
  formatDuration,
  formatPrice,
  isSequence,
  newestFirst,
  parseTime,
  pipelineLabel,
  progress,
  searchParams,
  serverSearch,
  stages,
  stepLongName,
  stepShortName,
  stepState,
  tokenClaims,
} from "./model.js";
import {
  ownerLabel,
  renderOwnerChoice,
  resetSearch,
  searchKeep,
  seesEveryone,
  wireSearch,
} from "./search.js";
import { EXPIRED, call, onSignIn, onSignOut, sessionExpired, signOut } from "./session.js";
import { markDirty, renderSoon, serverNow, state } from "./state.js";

const PAGE_SIZE = 100;

export const STATE_ICONS = {
  pending: "○",
  running: "●",
  retrying: "↻",
  review: "✎",
  completed: "✓",
  failed: "✕",
  cancelled: "–",
};

// -- the live connection --------------------------------------------------------------------------

/** Whether this person sees everyone's workflows: the token says, else their profile. */
function learnRole(session) {
  const role = tokenClaims(session.token)?.role;
  state.role = typeof role === "string" ? role : null;
  if (state.role) return;
  call("GET", `${API}/auth/profile`)
    .then((profile) => {
      if (profile && state.session === session) {
        state.role = profile.role ?? null;
        renderSoon(true);
      }
    })
    .catch(() => {}); // the rows go without owners
}

function startLive(session) {
  learnRole(session);
  state.live = new LiveSocket({
    url: socketUrl("/ws?stats=1"), // the charts' figures too (charts.js)
    token: session.token,
    onMessage: (message) => (message?.type === "stats" ? renderStats(message.data) : onLiveMessage(message)),
    onState: renderConnection,
    onOpen: () => {
      state.snapshotIds = new Set();
      state.connections += 1;
      renderSoon(); // "Loading…" ends even when there is nothing to load
    },
    onRefused: checkAfterRefusal,
    onExpired: () => signOut(EXPIRED, "warning"),
  });
  state.live.start();
  renderSoon(true);
}

function onLiveMessage(message) {
  if (!message || typeof message.version !== "number") return;
  const ts = parseTime(message.ts);
  if (ts !== null) state.skew = ts - Date.now();
  const isSnapshot = message.type === "snapshot";
  const doc = isSnapshot ? message.data : message.data?.workflow;
  if (!doc || typeof doc.id !== "string") return;
  if (isSnapshot) {
    state.snapshotIds.add(doc.id);
    if (state.snapshotIds.size === SNAPSHOT_LIMIT) snapshotWindowComplete();
  }
  const applied = state.store.apply(doc, message.version);
  if (!applied) return; // already showing this version or a newer one
  announceChange(message.type, message.data?.step ?? null, applied.previous, state.store.get(doc.id));
  markDirty(doc.id);
}

/**
 * The snapshot covers the newest SNAPSHOT_LIMIT workflows. Older ones this page loaded may
 * have changed while it was disconnected; those that still can change are fetched again.
 */
function snapshotWindowComplete() {
  state.snapshotFull = true;
  if (state.connections < 2) return;
  const outside = [...state.store.byId.values()].filter(
    (w) => !state.snapshotIds.has(w.id) && (w.status === "running" || w.status === "failed"),
  );
  for (const w of outside) refreshWorkflow(w.id);
}

export async function refreshWorkflow(id) {
  try {
    const doc = await call("GET", `${API}/workflow/status?workflow_id=${encodeURIComponent(id)}`);
    const applied = doc && state.store.apply(doc);
    if (applied) {
      announceChange("refresh", null, applied.previous, state.store.get(id));
      markDirty(id);
    }
    return true;
  } catch (error) {
    return error.status !== 404;
  }
}

/** The socket closed before it opened: an expired token, or the server is away. */
async function checkAfterRefusal() {
  const session = state.session;
  if (!session) return false;
  if (sessionExpired(session)) {
    signOut(EXPIRED, "warning");
    return false;
  }
  try {
    await call("GET", `${API}/workflow/list?limit=1`);
  } catch (error) {
    if (error.status === 403) {
      signOut("This account cannot watch workflows. Sign in as a user.", "warning");
      return false;
    }
  }
  return state.session === session;
}

const CONNECTION_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Connection lost. Reconnecting…",
  offline: "Offline",
};

const TOO_MANY_TEXT = "Too many open dashboards. Close one; retrying in a while…";

function renderConnection(next) {
  state.connection = next;
  const box = $("connection");
  box.dataset.state = next.state;
  $("dashboard").dataset.connection = next.state;
  $("connection-text").textContent =
    next.reason === "too-many" ? TOO_MANY_TEXT : (CONNECTION_TEXT[next.state] ?? next.state);
  $("reconnect-now").hidden = next.state !== "reconnecting";
}

// -- announcements for screen readers -------------------------------------------------------------

function announce(text) {
  state.announcements.push(text);
  if (state.announceTimer) return;
  state.announceTimer = setTimeout(() => {
    const region = $("announcer");
    const items = state.announcements.splice(0);
    state.announceTimer = null;
    region.textContent = items.length > 4 ? `${items.length} workflows changed.` : items.join(" ");
  }, 400);
}

function announceChange(kind, stepName, previous, current) {
  const name = current.product?.name ?? "A workflow";
  if (kind === "step_waiting_review" && stepName) {
    announce(`${name}: ${stepLongName(stepName)} needs review.`);
  } else if (kind === "step_reviewed" && stepName) {
    const review = current.steps.find((s) => s.name === stepName)?.review;
    announce(`${name}: ${stepLongName(stepName)} ${review?.decision ?? "reviewed"}${review?.by ? ` by ${review.by}` : ""}.`);
  } else if (kind === "step_review_escalated" && stepName) {
    announce(`${name}: ${stepLongName(stepName)} is past its deadline, escalated.`);
  } else if (kind === "step_retrying" && stepName) {
    const step = current.steps.find((s) => s.name === stepName);
    announce(`${name}: ${stepLongName(stepName)} failed, will retry${step ? ` (attempt ${step.attempt + 1})` : ""}.`);
  } else if (!previous) {
    if (kind === "step_dispatched") announce(`${name}: new workflow started.`);
  } else if (previous.status !== current.status) {
    announce(`${name}: ${STATUS_LABELS[current.status] ?? current.status}.`);
  }
}

// -- rendering --------------------------------------------------------------------------------------

/** The counts (of what the search finds), the tab's title and the rows of the current filter. */
export function renderList() {
  const keep = searchKeep();
  const counts = state.store.counts(keep);
  for (const el of document.querySelectorAll("[data-count]")) el.textContent = counts[el.dataset.count] ?? 0;
  renderTitle(keep ? state.store.counts() : counts);
  renderOwnerChoice();
  renderRows(keep);
}

/** The chain of pages the list shows: the filter's, or the filter's within the search. */
function chainKey() {
  if (!serverSearch(state.search)) return state.filter;
  return `${state.filter} ${JSON.stringify(searchParams(state.search))}`;
}

/**
 * What a search shows: the workflows that match, down to the oldest of the server's pages
 * loaded so far (older ones loaded otherwise would leave a gap the next page fills).
 */
function searched(workflows) {
  if (!serverSearch(state.search) || state.chains.get("all")?.done) return workflows;
  const chain = state.chains.get(chainKey());
  if (!chain?.last || chain.done) return workflows;
  return workflows.filter((w) => newestFirst(w, chain.last) <= 0);
}

function renderTitle(counts) {
  const parts = [];
  if (counts.running) parts.push(`${counts.running} running`);
  if (counts.failed) parts.push(`${counts.failed} failed`);
  if (counts[REVIEW_FILTER]) parts.push(`${counts[REVIEW_FILTER]} to review`);
  document.title = parts.length ? `(${parts.join(", ")}) Stox` : "Stox";
}

function renderRows(keep) {
  const list = $("workflow-list");
  const status = state.filter === "all" ? null : state.filter;
  const workflows = searched(state.store.list(status, keep));
  let cursor = list.firstElementChild;
  for (const w of workflows) {
    let row = state.rows.get(w.id);
    if (!row) {
      row = createRow(w.id);
      state.rows.set(w.id, row);
      updateRow(row, w);
    } else if (state.renderAll || state.dirty.has(w.id)) {
      updateRow(row, w);
    }
    if (row === cursor) cursor = cursor.nextElementSibling;
    else list.insertBefore(row, cursor);
  }
  while (cursor) {
    const next = cursor.nextElementSibling;
    cursor.remove();
    cursor = next;
  }
  renderListFooter(workflows.length, keep !== null);
  renderBulk(workflows.map((w) => w.id));
}

function renderListFooter(shown, searching) {
  const total = state.store.size;
  const empty = $("list-empty");
  const which =
    state.filter === "all"
      ? "workflows"
      : state.filter === REVIEW_FILTER
        ? "workflows needing review"
        : `${state.filter} workflows`;
  const server = serverSearch(state.search);
  const chain = state.chains.get(chainKey());
  if (!state.connections && !total) {
    setMessage(empty, "Loading workflows…");
  } else if (shown) {
    setMessage(empty, null);
  } else if (server && chain && chain.cursor === null && !chain.done && state.loadingOlder) {
    setMessage(empty, "Searching…");
  } else if (searching) {
    setMessage(empty, `No ${which} match the search.`);
  } else if (!total) {
    setMessage(empty, "No workflows yet. Upload a product to start one.");
  } else {
    setMessage(empty, `No ${which} among the ${total} loaded.`);
  }
  const summary = searching
    ? `Showing ${shown} that match, newest first.`
    : `Showing ${shown} of ${total} loaded, newest first.`;
  $("list-summary").textContent = state.listNote ?? (total ? summary : "");
  const everything = state.chains.get("all")?.done;
  const more = !everything && (chain ? !chain.done : !server && state.snapshotFull);
  const button = $("load-older");
  button.hidden = !more;
  button.disabled = state.loadingOlder;
  button.textContent = state.loadingOlder ? "Loading…" : "Load older";
}

function createRow(id) {
  // a click opens the workflow's detail: detail.js listens on the list
  const open = h("button", { type: "button", class: "wf-open", "aria-controls": "detail" });
  const row = h(
    "li",
    { class: "wf", dataset: { workflowId: id } },
    h(
      "div",
      { class: "wf-title" },
      rowCheck(id), // bulk.js's
      h("div", { class: "wf-text" }, open, h("p", { class: "wf-meta" })),
    ),
    h("span", { class: "badge" }),
    h("ol", { class: "steps" }),
    h("p", { class: "wf-elapsed" }, h("span", { class: "visually-hidden" }, "Elapsed "), h("time", { class: "elapsed" })),
  );
  if (state.fresh.delete(id)) row.classList.add("is-fresh");
  return row;
}

function updateRow(row, w) {
  row.dataset.status = w.status;
  row.dataset.version = w.version;
  row.classList.toggle("is-selected", state.detailId === w.id);
  const open = row.querySelector(".wf-open");
  open.textContent = w.product?.name ?? w.id;
  open.setAttribute("aria-expanded", String(state.detailId === w.id));
  labelCheck(row.querySelector(".wf-check"), w.product?.name ?? w.id);
  const owner = seesEveryone() ? ownerLabel(w) : "";
  row.dataset.owner = w.owner ?? "";
  const meta = [w.product?.category, w.product?.price != null ? formatPrice(w.product.price) : null]
    .filter(Boolean)
    .join(" · ");
  const pipeline = pipelineLabel(w);
  row.querySelector(".wf-meta").replaceChildren(
    owner
      ? h("span", { class: "wf-owner", title: `Owner ${owner}` }, h("span", { class: "visually-hidden" }, "Owner "), owner)
      : "", // replaceChildren writes null as the text "null"
    owner ? " · " : "",
    meta ? `${meta} · ` : "",
    pipeline
      ? h("span", { class: "wf-pipeline", title: `Pipeline ${w.pipeline.name}, version ${w.pipeline.version}` }, pipeline)
      : "",
    pipeline ? " · " : "",
    h("span", { class: "mono", title: w.id }, w.id.slice(0, 8)),
    " · ",
    timeOf(w.created_at, formatDateTime(w.created_at)),
  );
  renderBadge(row.querySelector(".badge"), w.status);
  const { done, total } = progress(w);
  const steps = row.querySelector(".steps");
  steps.setAttribute("aria-label", `Steps: ${done} of ${total} done`);
  if (isSequence(w)) {
    steps.replaceChildren(...w.steps.map(stepChip));
  } else {
    // a stage's steps stacked in one segment: they run side by side
    steps.replaceChildren(
      ...stages(w).map((group, depth) =>
        group.length === 1
          ? stepChip(group[0].step)
          : h(
              "li",
              { class: "step-stage", dataset: { stage: depth + 1 } },
              h("ol", { class: "stage-chips", "aria-label": `${group.length} in parallel` }, group.map((g) => stepChip(g.step))),
            ),
      ),
    );
  }
  updateElapsed(row.querySelector(".elapsed"), w);
}

function stepChip(step) {
  const shown = stepState(step);
  return h(
    "li",
    { class: "step", dataset: { step: step.name, state: shown, attempt: step.attempt } },
    h("span", { class: "step-bar", "aria-hidden": "true" }),
    h(
      "span",
      { class: "step-label", "aria-hidden": "true" },
      h("span", { class: "step-icon" }, STATE_ICONS[shown] ?? "·"),
      stepShortName(step.name),
      step.attempt > 1 ? h("span", { class: "step-attempt" }, `×${step.attempt}`) : null,
    ),
    h("span", { class: "visually-hidden" }, `${describeStep(step)}.`),
  );
}

export function renderBadge(el, status) {
  el.dataset.status = status;
  el.textContent = STATUS_LABELS[status] ?? status;
}

export function updateElapsed(el, w) {
  const ms = elapsedMs(w, serverNow());
  el.textContent = formatDuration(ms);
  el.setAttribute("datetime", `PT${Math.round(ms / 1000)}S`);
}

export function formatClock(iso) {
  const ms = parseTime(iso);
  if (ms === null) return "";
  const date = new Date(ms);
  const today = new Date();
  const sameDay = date.toDateString() === today.toDateString();
  return sameDay
    ? date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : date.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function formatDateTime(iso) {
  const ms = parseTime(iso);
  return ms === null ? "—" : new Date(ms).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function timeOf(iso, title) {
  return h("time", { datetime: iso, title }, formatClock(iso));
}

/** Elapsed times of running workflows move on without asking the server anything. */
function tick() {
  if (!state.session || document.hidden) return;
  for (const row of $("workflow-list").querySelectorAll('.wf[data-status="running"]')) {
    const w = state.store.get(row.dataset.workflowId);
    if (w) updateElapsed(row.querySelector(".elapsed"), w);
  }
}

// -- older workflows ----------------------------------------------------------------------------------

/** A search's first page is still to be asked for. */
const needsFirstPage = () =>
  serverSearch(state.search) && !state.chains.has(chainKey()) && !state.chains.get("all")?.done;

/**
 * The next pages of the filter's (and the search's) list, as the server pages it; `first`: a
 * search's first page, which shows the server's answer at once.
 */
async function loadOlder(first = false) {
  if (!state.session) return;
  if (state.loadingOlder) {
    state.reloadAfter ||= first; // the search changed meanwhile: its first page next
    return;
  }
  const filter = state.filter;
  const search = state.search;
  const key = chainKey();
  const chain = state.chains.get(key) ?? { cursor: null, done: false, last: null };
  state.chains.set(key, chain);
  state.loadingOlder = true;
  state.listNote = null;
  renderSoon(true);
  try {
    // The first page repeats what the snapshot holds; go on until something new shows.
    let added = 0;
    let pages = 0;
    let found = 0;
    while (!chain.done && (first ? pages === 0 : added === 0)) {
      const query = new URLSearchParams({ limit: String(PAGE_SIZE), ...searchParams(search) });
      // those needing review are running: the server filters by status only
      if (filter !== "all") query.set("status", filter === REVIEW_FILTER ? "running" : filter);
      if (chain.cursor) query.set("cursor", chain.cursor);
      const page = await call("GET", `${API}/workflow/list?${query}`);
      if (!page) return;
      pages += 1;
      found += page.workflows.length;
      for (const doc of page.workflows) {
        const applied = state.store.apply(doc);
        if (applied) {
          markDirty(doc.id);
          if (!applied.previous) added += 1;
        }
      }
      if (page.workflows.length) chain.last = page.workflows.at(-1);
      chain.cursor = page.next_cursor;
      chain.done = !page.next_cursor;
    }
    if (first) announce(`${found}${chain.done ? "" : " or more"} workflows match.`);
    else announce(added ? `Loaded ${added} older workflows.` : "No older workflows.");
  } catch (error) {
    if (first) state.chains.delete(key); // asked again at the next change
    state.listNote = `Could not load ${first ? "the search" : "older workflows"}: ${error.message}`;
    announce(state.listNote);
  } finally {
    state.loadingOlder = false;
    renderSoon(true);
    if (state.reloadAfter) {
      state.reloadAfter = false;
      if (needsFirstPage()) loadOlder(true);
    }
  }
}

/** The search or the filter changed: rows it hid may have changed meanwhile, update them all. */
function listChanged() {
  state.listNote = null;
  renderSoon(true);
  if (needsFirstPage()) loadOlder(true);
}

export function wireList() {
  onSignIn(startLive);
  onSignOut(() => {
    state.store.clear();
    state.rows.clear();
    state.chains.clear();
    state.snapshotFull = false;
    state.snapshotIds = new Set();
    state.connections = 0;
    state.fresh.clear();
    state.role = null;
    state.reloadAfter = false;
    resetSearch();
    resetBulk();
    $("workflow-list").replaceChildren();
  });
  $("reconnect-now").addEventListener("click", () => state.live?.reconnectNow());
  for (const radio of document.querySelectorAll('input[name="filter"]')) {
    radio.addEventListener("change", () => {
      state.filter = radio.value;
      $("workflow-list").dataset.filter = radio.value;
      listChanged();
    });
  }
  $("load-older").addEventListener("click", () => loadOlder());
  wireSearch(listChanged);
  wireBulk();
  setInterval(tick, 1000);
}
