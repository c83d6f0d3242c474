// The Stox dashboard: sign in, upload products, and watch every workflow live over one
// WebSocket. Plain DOM, no framework, no HTML from strings (the page requires Trusted Types).

import { ApiError, LiveSocket, request, socketUrl } from "./api.js";
import {
  SNAPSHOT_LIMIT,
  STATE_LABELS,
  STATUS_LABELS,
  TERMINAL,
  WorkflowStore,
  checkCredentials,
  describeStep,
  elapsedMs,
  fieldMessages,
  formatDuration,
  formatPrice,
  parseProduct,
  parseTime,
  progress,
  spokenDuration,
  stepLongName,
  stepShortName,
  stepState,
  tokenClaims,
} from "./model.js";

const API = "/api/v1";
const SESSION_KEY = "stox.session";
const PAGE_SIZE = 100;
const EXPIRED = "Your session has expired. Sign in again to continue.";
const STATE_ICONS = {
  pending: "○",
  running: "●",
  retrying: "↻",
  completed: "✓",
  failed: "✕",
  cancelled: "–",
};

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text, never markup). */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (typeof value === "function") el.addEventListener(key.replace(/^on/, ""), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

// -- state --------------------------------------------------------------------------------------

const state = {
  session: null, // {token, username, expiresAt}
  store: new WorkflowStore(),
  live: null,
  connection: { state: "offline" },
  skew: 0, // the server's clock minus ours, in ms
  snapshotIds: new Set(), // workflows in the current connection's snapshot
  connections: 0,
  snapshotFull: false, // the newest SNAPSHOT_LIMIT are not all there is
  chains: new Map(), // filter -> {cursor, done}: pages of older workflows
  loadingOlder: false,
  listNote: null, // what went wrong loading older workflows
  filter: "all",
  rows: new Map(), // workflow id -> <li>
  dirty: new Set(),
  renderAll: false,
  renderTimer: null,
  detailId: null,
  fresh: new Set(), // uploaded from this page: highlighted when their row appears
  expiryTimer: null,
  announcements: [],
  announceTimer: null,
};

const serverNow = () => Date.now() + state.skew;

// -- session ------------------------------------------------------------------------------------

function loadSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? "null");
    if (saved && typeof saved.token === "string") return saved;
  } catch {
    // a damaged entry: start signed out
  }
  return null;
}

function saveSession(session) {
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
}

/** When the token stops working (ms since the epoch), from its `exp` or the login's `expires_in`. */
function expiresAt(session) {
  const exp = tokenClaims(session.token)?.exp;
  const at = typeof exp === "number" ? exp * 1000 : session.expiresAt;
  return typeof at === "number" ? at : null;
}

function sessionExpired(session) {
  const at = expiresAt(session);
  return at !== null && at <= Date.now();
}

function scheduleExpiry(session) {
  clearTimeout(state.expiryTimer);
  const at = expiresAt(session);
  if (at === null) return;
  const wait = Math.min(Math.max(at - Date.now(), 0), 2 ** 31 - 1);
  state.expiryTimer = setTimeout(() => signOut(EXPIRED, "warning"), wait);
}

/**
 * An API call as the signed-in person. Resolves to null when there is nothing left to do
 * with the answer: they signed out meanwhile, or the token no longer works (a 401 returns
 * them to sign-in). Other errors reject with an ApiError.
 */
async function call(method, path, body) {
  const session = state.session;
  if (!session) return null;
  try {
    const answer = await request(method, path, { body, token: session.token });
    return state.session === session ? answer : null;
  } catch (error) {
    if (state.session !== session) return null;
    if (error instanceof ApiError && error.status === 401) {
      signOut(EXPIRED, "warning");
      return null;
    }
    throw error;
  }
}

// -- views --------------------------------------------------------------------------------------

function showSignIn(message = null, tone = "info") {
  document.body.dataset.view = "signin";
  $("signin-view").hidden = false;
  $("dashboard").hidden = true;
  $("account").hidden = true;
  $("connection").hidden = true;
  setMessage($("signin-message"), message, tone);
  document.title = "Sign in · Stox";
  const username = $("signin-username");
  if (!username.value) username.focus();
  else $("signin-password").focus();
}

function showDashboard() {
  const session = state.session;
  document.body.dataset.view = "dashboard";
  $("signin-view").hidden = true;
  $("dashboard").hidden = false;
  $("account").hidden = false;
  $("connection").hidden = false;
  $("account-name").textContent = session.username;
  scheduleExpiry(session);
  state.live = new LiveSocket({
    url: socketUrl(),
    token: session.token,
    onMessage: onLiveMessage,
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
  routeFromHash();
}

function signOut(message = null, tone = "info") {
  state.live?.stop();
  state.live = null;
  clearTimeout(state.expiryTimer);
  sessionStorage.removeItem(SESSION_KEY);
  state.session = null;
  state.store.clear();
  state.rows.clear();
  state.chains.clear();
  state.snapshotFull = false;
  state.snapshotIds = new Set();
  state.connections = 0;
  state.detailId = null;
  state.fresh.clear();
  $("workflow-list").replaceChildren();
  $("upload-form").reset();
  for (const field of PRODUCT_FIELDS) setFieldError("product", field, null);
  setMessage($("upload-message"), null);
  $("detail").hidden = true;
  document.body.classList.remove("has-detail");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  $("cancel-dialog").close();
  $("signin-password").value = "";
  showSignIn(message, tone);
}

// -- messages beside fields and forms -----------------------------------------------------------

function setMessage(el, text, tone = "info") {
  el.textContent = text ?? "";
  el.hidden = !text;
  el.dataset.tone = tone;
}

function setFieldError(prefix, field, message) {
  const input = $(`${prefix}-${field}`);
  const slot = $(`${prefix}-${field}-error`);
  if (!input || !slot) return false;
  slot.textContent = message ?? "";
  slot.hidden = !message;
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
  return true;
}

/** Show errors by field; focus the first. Fields the form does not have are returned. */
function showFieldErrors(prefix, fields, errors) {
  const unplaced = [];
  let first = null;
  for (const field of fields) setFieldError(prefix, field, errors[field]);
  for (const [field, message] of Object.entries(errors)) {
    if (!fields.includes(field)) unplaced.push(field === "_schema" ? message : `${field}: ${message}`);
    else first ??= $(`${prefix}-${field}`);
  }
  first?.focus();
  return unplaced;
}

// -- sign in and register -----------------------------------------------------------------------

const CREDENTIAL_FIELDS = ["username", "password"];

function credentials() {
  return { username: $("signin-username").value.trim(), password: $("signin-password").value };
}

async function submitCredentials(registering) {
  const form = $("signin-form");
  const message = $("signin-message");
  const values = credentials();
  const errors = checkCredentials(values, registering);
  setMessage(message, null);
  if (showFieldErrors("signin", CREDENTIAL_FIELDS, errors).length || Object.keys(errors).length) return;
  form.setAttribute("aria-busy", "true");
  for (const button of form.querySelectorAll("button")) button.disabled = true;
  try {
    if (registering) {
      await request("POST", `${API}/auth/register`, { body: values });
      setMessage(message, `Account “${values.username}” created. Sign in to continue.`, "success");
      $("signin-password").focus();
      return;
    }
    const answer = await request("POST", `${API}/auth/login`, { body: values });
    const expiresIn = Number(answer.expires_in);
    state.session = {
      token: answer.access_token,
      username: values.username,
      expiresAt: Number.isFinite(expiresIn) ? Date.now() + expiresIn * 1000 : null,
    };
    saveSession(state.session);
    $("signin-password").value = "";
    setMessage(message, null);
    showDashboard();
  } catch (error) {
    showCredentialError(error, registering);
  } finally {
    form.removeAttribute("aria-busy");
    for (const button of form.querySelectorAll("button")) button.disabled = false;
  }
}

function showCredentialError(error, registering) {
  const message = $("signin-message");
  if (!(error instanceof ApiError)) throw error;
  if (error.status === 400 && error.fields) {
    const unplaced = showFieldErrors("signin", CREDENTIAL_FIELDS, fieldMessages(error.fields));
    setMessage(message, unplaced.join(" ") || null, "error");
  } else if (error.status === 401) {
    setMessage(message, "That username and password do not match an account.", "error");
    $("signin-password").focus();
  } else if (error.status === 409 && registering) {
    setFieldError("signin", "username", "That username is taken. Choose another.");
    $("signin-username").focus();
  } else if (error.status === 429) {
    const wait = error.retryAfter ? ` Try again in ${spokenDuration(error.retryAfter * 1000)}.` : " Try again shortly.";
    setMessage(message, `Too many attempts.${wait}`, "error");
  } else {
    setMessage(message, error.message, "error");
  }
}

// -- the live connection --------------------------------------------------------------------------

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

async function refreshWorkflow(id) {
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
  if (kind === "step_retrying" && stepName) {
    const step = current.steps.find((s) => s.name === stepName);
    announce(`${name}: ${stepLongName(stepName)} failed, will retry${step ? ` (attempt ${step.attempt + 1})` : ""}.`);
  } else if (!previous) {
    if (kind === "step_dispatched") announce(`${name}: new workflow started.`);
  } else if (previous.status !== current.status) {
    announce(`${name}: ${STATUS_LABELS[current.status] ?? current.status}.`);
  }
}

// -- rendering --------------------------------------------------------------------------------------

function markDirty(id) {
  state.dirty.add(id);
  renderSoon();
}

/** Changes arrive in bursts (a snapshot is up to 100 messages): render once per burst. */
function renderSoon(all = false) {
  state.renderAll ||= all;
  if (state.renderTimer === null) state.renderTimer = setTimeout(render, 16);
}

function render() {
  state.renderTimer = null;
  if (!state.session) return;
  const counts = state.store.counts();
  for (const el of document.querySelectorAll("[data-count]")) el.textContent = counts[el.dataset.count] ?? 0;
  renderTitle(counts);
  renderList();
  if (state.detailId && (state.renderAll || state.dirty.has(state.detailId))) renderDetail();
  state.dirty.clear();
  state.renderAll = false;
}

function renderTitle(counts) {
  const parts = [];
  if (counts.running) parts.push(`${counts.running} running`);
  if (counts.failed) parts.push(`${counts.failed} failed`);
  document.title = parts.length ? `(${parts.join(", ")}) Stox` : "Stox";
}

function renderList() {
  const list = $("workflow-list");
  const status = state.filter === "all" ? null : state.filter;
  const workflows = state.store.list(status);
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
  renderListFooter(workflows.length);
}

function renderListFooter(shown) {
  const total = state.store.size;
  const empty = $("list-empty");
  if (!state.connections && !total) {
    setMessage(empty, "Loading workflows…");
  } else if (!total) {
    setMessage(empty, "No workflows yet. Upload a product to start one.");
  } else if (!shown) {
    setMessage(empty, `No ${state.filter} workflows among the ${total} loaded.`);
  } else {
    setMessage(empty, null);
  }
  $("list-summary").textContent =
    state.listNote ?? (total ? `Showing ${shown} of ${total} loaded, newest first.` : "");
  const chain = state.chains.get(state.filter);
  const everything = state.chains.get("all")?.done;
  const more = !everything && (chain ? !chain.done : state.snapshotFull);
  const button = $("load-older");
  button.hidden = !more;
  button.disabled = state.loadingOlder;
  button.textContent = state.loadingOlder ? "Loading…" : "Load older";
}

function createRow(id) {
  const open = h("button", { type: "button", class: "wf-open", "aria-controls": "detail" });
  open.addEventListener("click", () => openDetail(id));
  const row = h(
    "li",
    { class: "wf", dataset: { workflowId: id } },
    h("div", { class: "wf-title" }, open, h("p", { class: "wf-meta" })),
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
  const meta = [w.product?.category, w.product?.price != null ? formatPrice(w.product.price) : null]
    .filter(Boolean)
    .join(" · ");
  row.querySelector(".wf-meta").replaceChildren(
    meta ? `${meta} · ` : "",
    h("span", { class: "mono", title: w.id }, w.id.slice(0, 8)),
    " · ",
    timeOf(w.created_at, formatDateTime(w.created_at)),
  );
  renderBadge(row.querySelector(".badge"), w.status);
  const { done, total } = progress(w);
  const steps = row.querySelector(".steps");
  steps.setAttribute("aria-label", `Steps: ${done} of ${total} done`);
  steps.replaceChildren(...w.steps.map(stepChip));
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

function renderBadge(el, status) {
  el.dataset.status = status;
  el.textContent = STATUS_LABELS[status] ?? status;
}

function updateElapsed(el, w) {
  const ms = elapsedMs(w, serverNow());
  el.textContent = formatDuration(ms);
  el.setAttribute("datetime", `PT${Math.round(ms / 1000)}S`);
}

function formatClock(iso) {
  const ms = parseTime(iso);
  if (ms === null) return "";
  const date = new Date(ms);
  const today = new Date();
  const sameDay = date.toDateString() === today.toDateString();
  return sameDay
    ? date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : date.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function formatDateTime(iso) {
  const ms = parseTime(iso);
  return ms === null ? "—" : new Date(ms).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

/** Elapsed times of running workflows move on without asking the server anything. */
function tick() {
  if (!state.session || document.hidden) return;
  for (const row of $("workflow-list").querySelectorAll('.wf[data-status="running"]')) {
    const w = state.store.get(row.dataset.workflowId);
    if (w) updateElapsed(row.querySelector(".elapsed"), w);
  }
  const detailElapsed = $("detail-body").querySelector(".elapsed");
  const w = state.detailId && state.store.get(state.detailId);
  if (detailElapsed && w && !TERMINAL.has(w.status)) updateElapsed(detailElapsed, w);
}

// -- older workflows ----------------------------------------------------------------------------------

async function loadOlder() {
  if (state.loadingOlder || !state.session) return;
  const filter = state.filter;
  const chain = state.chains.get(filter) ?? { cursor: null, done: false };
  state.chains.set(filter, chain);
  state.loadingOlder = true;
  state.listNote = null;
  renderSoon(true);
  try {
    // The first page repeats what the snapshot holds; go on until something new shows.
    let added = 0;
    while (!chain.done && added === 0) {
      const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
      if (filter !== "all") query.set("status", filter);
      if (chain.cursor) query.set("cursor", chain.cursor);
      const page = await call("GET", `${API}/workflow/list?${query}`);
      if (!page) return;
      for (const doc of page.workflows) {
        const applied = state.store.apply(doc);
        if (applied) {
          markDirty(doc.id);
          if (!applied.previous) added += 1;
        }
      }
      chain.cursor = page.next_cursor;
      chain.done = !page.next_cursor;
    }
    announce(added ? `Loaded ${added} older workflows.` : "No older workflows.");
  } catch (error) {
    state.listNote = `Could not load older workflows: ${error.message}`;
    announce(state.listNote);
  } finally {
    state.loadingOlder = false;
    renderSoon(true);
  }
}

// -- upload ---------------------------------------------------------------------------------------------

const PRODUCT_FIELDS = ["name", "description", "category", "price", "images"];

async function upload(event) {
  event.preventDefault();
  const form = $("upload-form");
  const message = $("upload-message");
  const raw = Object.fromEntries(PRODUCT_FIELDS.map((f) => [f, $(`product-${f}`).value]));
  const { product, errors } = parseProduct(raw);
  setMessage(message, null);
  showFieldErrors("product", PRODUCT_FIELDS, errors);
  if (Object.keys(errors).length) return;
  const button = form.querySelector('button[type="submit"]');
  button.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    const answer = await call("POST", `${API}/workflow/upload`, product);
    if (!answer) return;
    state.fresh.add(answer.workflow_id);
    form.reset();
    setMessage(message, `Uploaded “${product.name}”. Its workflow has started.`, "success");
    $("product-name").focus();
    // the socket brings it too; this makes it show even while the socket reconnects
    refreshWorkflow(answer.workflow_id);
  } catch (error) {
    if (error.status === 400 && error.fields) {
      const unplaced = showFieldErrors("product", PRODUCT_FIELDS, fieldMessages(error.fields));
      setMessage(message, unplaced.length ? unplaced.join(" ") : "Check the highlighted fields.", "error");
    } else if (error.status === 413) {
      setMessage(message, "This product is too large to upload. Shorten the description or images.", "error");
    } else {
      setMessage(message, error.message, "error");
    }
  } finally {
    button.disabled = false;
    form.removeAttribute("aria-busy");
  }
}

// -- detail -------------------------------------------------------------------------------------------------

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
  document.body.classList.remove("has-detail");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  markDirty(id);
  const row = state.rows.get(id);
  if (restoreFocus) (row?.isConnected ? row.querySelector(".wf-open") : $("workflows-title")).focus();
}

function renderDetail(missing = false) {
  const w = state.store.get(state.detailId);
  $("detail").dataset.workflowId = state.detailId;
  const body = $("detail-body");
  const cancel = $("detail-cancel");
  const retry = $("detail-retry");
  if (!w) {
    $("detail-title").textContent = missing ? "Workflow not found" : "Loading…";
    $("detail-status").hidden = true;
    cancel.hidden = retry.hidden = true;
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
        ["Started", timeOf(w.created_at, formatDateTime(w.created_at))],
        ["Elapsed", h("time", { class: "elapsed" })],
        ["Last change", timeOf(w.updated_at, `version ${w.version}`)],
      ]),
    ),
    productSection(w.product ?? {}),
    h(
      "section",
      { class: "detail-section", "aria-labelledby": "detail-steps-title" },
      h("h3", { id: "detail-steps-title" }, "Steps"),
      h("ol", { class: "step-cards" }, w.steps.map((step, i) => stepCard(step, i, w))),
    ),
  );
  updateElapsed(body.querySelector(".elapsed"), w);
  for (const details of body.querySelectorAll("details")) details.open = open.has(details.dataset.key);
}

function timeOf(iso, title) {
  return h("time", { datetime: iso, title }, formatClock(iso));
}

function failureNote(w) {
  if (w.status !== "failed") return null;
  const step = w.steps[w.current_step];
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

function stepCard(step, index, w) {
  const shown = stepState(step);
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
    { class: "step-card", dataset: { step: step.name, state: shown } },
    h(
      "div",
      { class: "step-card-head" },
      h("span", { class: "step-icon", "aria-hidden": "true" }, STATE_ICONS[shown] ?? "·"),
      h("h4", {}, `${index + 1}. ${stepLongName(step.name)}`),
      h("span", { class: "state-label" }, STATE_LABELS[shown] ?? shown),
    ),
    facts.length ? h("p", { class: "muted small" }, facts.join(" · ")) : null,
    step.error && shown !== "completed" ? h("p", { class: "step-error" }, step.error) : null,
    step.result ? renderResult(step.name, step.result, w) : null,
    history.length
      ? h(
          "details",
          { dataset: { key: `${step.name}-attempts` } },
          h("summary", {}, `Earlier attempts (${history.length})`),
          h(
            "ol",
            { class: "attempts" },
            history.map((a) =>
              h("li", {}, `Attempt ${a.attempt}: ${a.outcome.replace("_", " ")}${a.error ? ` — ${a.error}` : ""}`),
            ),
          ),
        )
      : null,
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

function renderResult(name, result, w) {
  const render = RESULT_RENDERERS[name];
  const content = render
    ? render(result, w)
    : [h("h5", {}, "Result"), h("pre", { class: "json" }, JSON.stringify(result, null, 2))];
  return h("div", { class: "result" }, content);
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
    setMessage(
      message,
      action === "cancel" ? "Workflow cancelled." : `Retrying from ${stepLongName(doc.steps[doc.current_step].name)}.`,
      "success",
    );
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

// -- wiring ---------------------------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitCredentials(false);
  });
  $("register").addEventListener("click", () => submitCredentials(true));
  for (const field of CREDENTIAL_FIELDS) {
    $(`signin-${field}`).addEventListener("input", () => setFieldError("signin", field, null));
  }
  $("sign-out").addEventListener("click", () => signOut("You have signed out."));
  $("reconnect-now").addEventListener("click", () => state.live?.reconnectNow());

  $("upload-form").addEventListener("submit", upload);
  for (const field of PRODUCT_FIELDS) {
    $(`product-${field}`).addEventListener("input", () => setFieldError("product", field, null));
  }

  for (const radio of document.querySelectorAll('input[name="filter"]')) {
    radio.addEventListener("change", () => {
      state.filter = radio.value;
      $("workflow-list").dataset.filter = radio.value;
      renderSoon();
    });
  }
  $("load-older").addEventListener("click", loadOlder);

  $("detail-close").addEventListener("click", () => closeDetail());
  $("detail-cancel").addEventListener("click", askCancel);
  $("detail-retry").addEventListener("click", () => change("retry"));
  $("cancel-keep").addEventListener("click", () => $("cancel-dialog").close());
  $("cancel-confirm").addEventListener("click", () => {
    $("cancel-dialog").close();
    change("cancel");
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.detailId && !$("cancel-dialog").open) closeDetail();
  });
  window.addEventListener("hashchange", () => routeFromHash());
  setInterval(tick, 1000);
}

function boot() {
  wire();
  const session = loadSession();
  if (session && !sessionExpired(session)) {
    state.session = session;
    showDashboard();
  } else {
    if (session) sessionStorage.removeItem(SESSION_KEY);
    showSignIn(session ? EXPIRED : null, "warning");
  }
}

boot();
