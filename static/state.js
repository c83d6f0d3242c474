// The page's state, shared by its modules, and the rendering they ask for when it changes.

import { NO_SEARCH, WorkflowStore } from "./model.js";

export const state = {
  session: null, // {token, username, expiresAt}
  store: new WorkflowStore(),
  live: null,
  connection: { state: "offline" },
  skew: 0, // the server's clock minus ours, in ms
  snapshotIds: new Set(), // workflows in the current connection's snapshot
  connections: 0,
  snapshotFull: false, // the newest SNAPSHOT_LIMIT are not all there is
  chains: new Map(), // filter (and search) -> {cursor, done, last}: pages of older workflows
  loadingOlder: false,
  reloadAfter: false, // the search changed while a page loaded: ask for its first page after
  listNote: null, // what went wrong loading older workflows
  filter: "all",
  search: NO_SEARCH, // what the search form applies (model.js matchesSearch)
  role: null, // the signed-in person's role: admins and reviewers see everyone's workflows
  pipelines: [], // GET /api/v1/pipelines, the default first
  selected: new Set(), // workflow ids checked for a bulk action
  bulkBusy: false,
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

export const serverNow = () => Date.now() + state.skew;

let render = () => {};

/** What renderSoon runs: app.js sets it (the list, then the open detail). */
export function renderWith(fn) {
  render = fn;
}

export function markDirty(id) {
  state.dirty.add(id);
  renderSoon();
}

/** Changes arrive in bursts (a snapshot is up to 100 messages): render once per burst. */
export function renderSoon(all = false) {
  state.renderAll ||= all;
  if (state.renderTimer === null) state.renderTimer = setTimeout(() => render(), 16);
}
