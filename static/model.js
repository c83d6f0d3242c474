// The dashboard's pure parts: the workflow store (applied by version), the input checks
// the server makes (stox/schemas.py ProductSchema: tests/test_dashboard.py keeps PRODUCT_LIMITS
// equal to its validators; the auth service's rules), and formatting.
// No DOM here, so a test can import this module on its own.

export const STATUSES = ["running", "completed", "failed", "cancelled"];
export const REVIEW_FILTER = "review"; // the list's "needs review": running, a step waiting for a person
export const TERMINAL = new Set(["completed", "failed", "cancelled"]);
export const SNAPSHOT_LIMIT = 100; // the newest workflows the WebSocket snapshot covers

// -- the workflows this page knows ---------------------------------------------------------

export class WorkflowStore {
  constructor() {
    this.byId = new Map();
  }

  get size() {
    return this.byId.size;
  }

  get(id) {
    return this.byId.get(id);
  }

  /** Keep `doc` if it is newer than what is shown; the version it replaced, or null. */
  apply(doc, version = doc.version) {
    const current = this.byId.get(doc.id);
    if (current !== undefined && current.version >= version) return null;
    this.byId.set(doc.id, { ...doc, version });
    return { previous: current ?? null };
  }

  /** Newest first, as the server lists them; only `status` (or those needing review) when
   * given, and only those `keep` keeps. */
  list(status = null, keep = null) {
    const docs = [...this.byId.values()].filter(
      (w) =>
        (!status || (status === REVIEW_FILTER ? needsReview(w) : w.status === status)) && (!keep || keep(w)),
    );
    return docs.sort(newestFirst);
  }

  /** How many by status (and needing review), among those `keep` keeps. */
  counts(keep = null) {
    const counts = { all: 0, [REVIEW_FILTER]: 0 };
    for (const status of STATUSES) counts[status] = 0;
    for (const w of this.byId.values()) {
      if (keep && !keep(w)) continue;
      counts.all += 1;
      counts[w.status] = (counts[w.status] ?? 0) + 1;
      if (needsReview(w)) counts[REVIEW_FILTER] += 1;
    }
    return counts;
  }

  clear() {
    this.byId.clear();
  }
}

export function newestFirst(a, b) {
  if (a.created_at !== b.created_at) return a.created_at < b.created_at ? 1 : -1;
  return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
}

// -- search: the server's rules (GET /api/v1/workflow/list), applied to what arrives live ------

export const DEFAULT_PIPELINE = "default"; // what a workflow stored without a pipeline runs on

export const NO_SEARCH = Object.freeze({ q: "", pipeline: "", createdAfter: "", createdBefore: "", owner: "" });

/** A search the server narrows the list by (the owner is narrowed here only). */
export const serverSearch = (s) => Boolean(s.q || s.pipeline || s.createdAfter || s.createdBefore);

/**
 * Whether workflow `w` is one search `s` finds, as the server decides it: `q` a part of the
 * product's name or category in any case, `pipeline` the name of the pipeline it runs on,
 * `createdAfter` inclusive and `createdBefore` exclusive (ISO times); `owner` an owner's id.
 */
export function matchesSearch(w, s) {
  if (s.q) {
    const q = s.q.toLowerCase();
    const name = String(w.product?.name ?? "").toLowerCase();
    const category = String(w.product?.category ?? "").toLowerCase();
    if (!name.includes(q) && !category.includes(q)) return false;
  }
  if (s.pipeline && (w.pipeline?.name ?? DEFAULT_PIPELINE) !== s.pipeline) return false;
  if (s.createdAfter || s.createdBefore) {
    const created = parseTime(w.created_at);
    if (created === null) return false;
    if (s.createdAfter && created < parseTime(s.createdAfter)) return false;
    if (s.createdBefore && created >= parseTime(s.createdBefore)) return false;
  }
  if (s.owner && w.owner !== s.owner) return false;
  return true;
}

/** The list's query parameters of search `s`. */
export function searchParams(s) {
  const params = {};
  if (s.q) params.q = s.q;
  if (s.pipeline) params.pipeline = s.pipeline;
  if (s.createdAfter) params.created_after = s.createdAfter;
  if (s.createdBefore) params.created_before = s.createdBefore;
  return params;
}

/** A day of a date input ("2026-12-04") as the ISO time its local midnight is, `days` later. */
export function dayStart(value, days = 0) {
  const m = /^(\d{4})-(\d\d)-(\d\d)$/.exec(value ?? "");
  if (!m) return "";
  return new Date(+m[1], +m[2] - 1, +m[3] + days).toISOString();
}

const OUTCOMES = ["retried", "cancelled", "not_allowed", "not_found", "unavailable"];

/** "3 retried, 1 not allowed" of a bulk answer's results: what was done first. */
export function outcomeCounts(results) {
  const counts = new Map();
  for (const r of results) counts.set(r.outcome, (counts.get(r.outcome) ?? 0) + 1);
  const rank = (outcome) => (OUTCOMES.includes(outcome) ? OUTCOMES.indexOf(outcome) : OUTCOMES.length);
  return [...counts]
    .sort((a, b) => rank(a[0]) - rank(b[0]))
    .map(([outcome, n]) => `${n} ${outcome.replace(/_/g, " ")}`)
    .join(", ");
}

// -- input checks, mirroring the server ------------------------------------------------------

export const PRODUCT_LIMITS = {
  name: 200,
  description: 10_000,
  category: 100,
  images: 50,
  image: 2048,
  price: 1e12,
};

const wellFormed = (text) =>
  typeof text.isWellFormed === "function" ? text.isWellFormed() : !/[\uD800-\uDFFF]/.test(text);

function textProblem(text, max, label) {
  if (text.length > max) return `${label} must be at most ${max} characters (now ${text.length}).`;
  if (!wellFormed(text)) return `${label} contains characters that are not valid text.`;
  return null;
}

/** The upload body from the form's raw strings: `{product, errors}` (errors by field). */
export function parseProduct({ name = "", description = "", category = "", price = "", images = "" }) {
  const errors = {};
  const product = {};

  const trimmedName = name.trim();
  if (!trimmedName) errors.name = "Enter the product's name.";
  else errors.name = textProblem(trimmedName, PRODUCT_LIMITS.name, "The name");
  product.name = trimmedName;

  const trimmedDescription = description.trim();
  errors.description = textProblem(trimmedDescription, PRODUCT_LIMITS.description, "The description");
  product.description = trimmedDescription;

  const trimmedCategory = category.trim();
  errors.category = textProblem(trimmedCategory, PRODUCT_LIMITS.category, "The category");
  product.category = trimmedCategory;

  const priceText = price.trim();
  if (priceText) {
    const value = /^[+]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?$/.test(priceText)
      ? Number(priceText.replace(",", "."))
      : Number.NaN;
    if (priceText.startsWith("-")) errors.price = "The price cannot be negative.";
    else if (!Number.isFinite(value)) errors.price = "Enter a price as a number, like 12.50.";
    else if (value > PRODUCT_LIMITS.price) errors.price = "The price is too large.";
    else product.price = value;
  }

  const list = images
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  if (list.length > PRODUCT_LIMITS.images) {
    errors.images = `At most ${PRODUCT_LIMITS.images} images (now ${list.length}).`;
  } else {
    const bad = list.findIndex((s) => textProblem(s, PRODUCT_LIMITS.image, "x"));
    if (bad >= 0) {
      errors.images = textProblem(list[bad], PRODUCT_LIMITS.image, `Image ${bad + 1}`);
    }
  }
  product.images = list;

  return { product, errors: compact(errors) };
}

export const USERNAME_RULE = /^[a-z0-9_.-]{3,64}$/;
export const MIN_PASSWORD = 12;

/** Sign-in needs both fields; registering also needs the account rules met. */
export function checkCredentials({ username, password }, registering) {
  const errors = {};
  if (!username) errors.username = "Enter your username.";
  else if (registering && !USERNAME_RULE.test(username)) {
    errors.username = "Use 3–64 characters: lowercase letters, digits, _ . or -.";
  }
  if (!password) errors.password = "Enter your password.";
  else if (registering && password.length < MIN_PASSWORD) {
    errors.password = `Use at least ${MIN_PASSWORD} characters.`;
  }
  return errors;
}

function compact(errors) {
  return Object.fromEntries(Object.entries(errors).filter(([, message]) => message));
}

/** `error.fields` of a 400 as one message per field ("images": {"3": [...]} and the like). */
export function fieldMessages(fields) {
  const out = {};
  for (const [field, value] of Object.entries(fields ?? {})) out[field] = describe(value);
  return out;
}

function describe(value) {
  if (typeof value === "string") return value;
  if (Array.isArray(value)) return value.map(describe).join(" ");
  if (value && typeof value === "object") {
    return Object.entries(value)
      .map(([key, inner]) => (/^\d+$/.test(key) ? `Item ${Number(key) + 1}: ` : `${key}: `) + describe(inner))
      .join(" ");
  }
  return String(value);
}

// -- tokens -----------------------------------------------------------------------------------

/** The claims of a JWT, unverified (the server verifies); null if it is not one. */
export function tokenClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

// -- time -------------------------------------------------------------------------------------

/** Milliseconds since the epoch of a server timestamp ("2026-11-26T08:45:47.120000Z"). */
export function parseTime(text) {
  if (!text) return null;
  const m = /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z$/.exec(text);
  if (!m) {
    const parsed = Date.parse(text);
    return Number.isNaN(parsed) ? null : parsed;
  }
  const ms = m[7] ? Number(m[7].slice(0, 3).padEnd(3, "0")) : 0;
  return Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], ms);
}

/** When the workflow stopped running (null while it runs). */
export function finishedAt(w) {
  if (!TERMINAL.has(w.status)) return null;
  const ends = w.steps.map((s) => parseTime(s.completed_at)).filter((t) => t !== null);
  return ends.length && w.status !== "cancelled" ? Math.max(...ends) : parseTime(w.updated_at);
}

/** Milliseconds the workflow has been (or was) running, at `now` in server time. */
export function elapsedMs(w, now) {
  const start = parseTime(w.created_at);
  if (start === null) return 0;
  return Math.max(0, (finishedAt(w) ?? now) - start);
}

export function formatDuration(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return ms < 10_000 ? `${(ms / 1000).toFixed(1)}s` : `${s}s`;
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h ${pad(Math.floor(s / 60) % 60)}m`;
  return `${Math.floor(s / 86_400)}d ${Math.floor(s / 3600) % 24}h`;
}

export function spokenDuration(ms) {
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} second${s === 1 ? "" : "s"}`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} minute${m === 1 ? "" : "s"} ${s % 60} seconds`;
  const h = Math.floor(m / 60);
  return `${h} hour${h === 1 ? "" : "s"} ${m % 60} minutes`;
}

// -- steps --------------------------------------------------------------------------------------

const STEP_NAMES = {
  image_processing: ["Images", "Image processing"],
  ai_enhancement: ["AI copy", "AI enhancement"],
  seo_generation: ["SEO", "SEO generation"],
};

const humanize = (name) => name.replace(/[_.-]+/g, " ").replace(/^./, (c) => c.toUpperCase());

export const stepShortName = (name) => STEP_NAMES[name]?.[0] ?? humanize(name);
export const stepLongName = (name) => STEP_NAMES[name]?.[1] ?? humanize(name);

/** What a step is doing, as the dashboard shows it: a pending step that failed before waits to
 * retry; a waiting one waits for a person's review. */
export function stepState(step) {
  if (step.status === "dispatched") return "running";
  if (step.status === "waiting") return "review";
  if (step.status === "pending" && step.attempt > 0) return "retrying";
  return step.status;
}

export const STATE_LABELS = {
  pending: "waiting",
  running: "running",
  retrying: "retry pending",
  review: "needs review",
  completed: "done",
  failed: "failed",
  cancelled: "cancelled",
};

export function describeStep(step) {
  const state = stepState(step);
  const attempt = step.attempt > 0 ? `, attempt ${step.attempt}` : "";
  return `${stepLongName(step.name)}: ${STATE_LABELS[state] ?? state}${attempt}`;
}

export function progress(w) {
  const done = w.steps.filter((s) => s.status === "completed").length;
  return { done, total: w.steps.length };
}

export const STATUS_LABELS = {
  running: "Running",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

export function formatPrice(price) {
  if (price === null || price === undefined) return "—";
  return new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 }).format(price);
}

// -- pipelines: which steps wait on which ---------------------------------------------------------

/**
 * The definition a workflow runs on: its stored `pipeline`, or (a workflow stored before
 * pipelines were) the plain sequence of its steps.
 */
export function pipelineOf(w) {
  if (w.pipeline && Array.isArray(w.pipeline.steps)) return w.pipeline;
  return { name: null, version: null, steps: w.steps.map((s) => ({ name: s.name, kind: "service", after: null })) };
}

/** Each step's direct dependencies by name: with no `after` anywhere, each follows the one before. */
export function dependencies(w) {
  const specs = pipelineOf(w).steps;
  const deps = new Map();
  const sequence = specs.every((s) => s.after === null || s.after === undefined);
  specs.forEach((spec, i) => {
    deps.set(spec.name, sequence ? (i ? [specs[i - 1].name] : []) : [...(spec.after ?? [])]);
  });
  for (const step of w.steps) if (!deps.has(step.name)) deps.set(step.name, []);
  return deps;
}

/** Every step `name` depends on, directly or not. */
export function upstreamOf(deps, name) {
  const found = new Set();
  const todo = [...(deps.get(name) ?? [])];
  while (todo.length) {
    const next = todo.pop();
    if (found.has(next)) continue;
    found.add(next);
    todo.push(...(deps.get(next) ?? []));
  }
  return found;
}

/**
 * The workflow's steps grouped by depth, in pipeline order within each stage: the steps of a
 * stage may run side by side; each waits on steps of earlier stages only. A sequence is one
 * step a stage.
 */
export function stages(w) {
  const deps = dependencies(w);
  const depth = new Map();
  const depthOf = (name, seen = new Set()) => {
    if (depth.has(name)) return depth.get(name);
    if (seen.has(name)) return 0; // a cycle cannot be stored; be safe anyway
    seen.add(name);
    const d = Math.max(-1, ...(deps.get(name) ?? []).map((dep) => depthOf(dep, seen))) + 1;
    depth.set(name, d);
    return d;
  };
  const out = [];
  w.steps.forEach((step, index) => {
    const d = depthOf(step.name);
    (out[d] ??= []).push({ step, index, after: deps.get(step.name) ?? [] });
  });
  return out.filter(Boolean);
}

export const isSequence = (w) => stages(w).every((stage) => stage.length === 1);

export function stepKind(w, name) {
  return pipelineOf(w).steps.find((s) => s.name === name)?.kind ?? "service";
}

export function stepSpec(w, name) {
  return pipelineOf(w).steps.find((s) => s.name === name) ?? { name, kind: "service", after: null };
}

/** A running workflow with a step waiting for a person. */
export const needsReview = (w) => w.status === "running" && w.steps.some((s) => s.status === "waiting");

/** "apparel · v3f2a9c01b7de", or null for a workflow stored before pipelines were. */
export function pipelineLabel(w) {
  const p = w.pipeline;
  if (!p?.name) return null;
  return p.version ? `${p.name} · v${p.version}` : p.name;
}

// -- a review: the upstream copy a person checks --------------------------------------------------

/** The copy a review shows when its upstream steps made it (the demo services' fields); `limit`
 * is the length search engines show, counted beside the field, not enforced. */
export const REVIEW_COPY = [
  { key: "description", label: "Enhanced description", kind: "long" },
  { key: "tags", label: "Tags", kind: "list", hint: "Comma separated" },
  { key: "title", label: "SEO title", kind: "text", limit: 60 },
  { key: "meta_description", label: "Meta description", kind: "long", limit: 160 },
];

const isScalar = (v) => typeof v === "string" || (typeof v === "number" && Number.isFinite(v));

/**
 * The editable fields of review step `name`: the upstream results' copy (REVIEW_COPY) when
 * any of it is there, else every upstream result field that is text, a number or a list of
 * them. A later step's value of a field wins (a review after another shows the edited copy).
 */
export function reviewFields(w, name) {
  const upstream = upstreamOf(dependencies(w), name);
  const results = w.steps.filter((s) => upstream.has(s.name) && s.result && typeof s.result === "object");
  const values = new Map();
  for (const step of results) {
    for (const [key, value] of Object.entries(step.result)) values.set(key, { value, from: step.name });
  }
  const copy = REVIEW_COPY.filter((f) => values.has(f.key)).map((f) => ({ ...f, ...values.get(f.key) }));
  if (copy.length) return copy;
  const general = [];
  for (const [key, { value, from }] of values) {
    const label = `${humanize(key)} (${stepLongName(from)})`;
    if (typeof value === "number" && Number.isFinite(value)) general.push({ key, label, kind: "number", value, from });
    else if (typeof value === "string") general.push({ key, label, kind: value.length > 80 ? "long" : "text", value, from });
    else if (Array.isArray(value) && value.every(isScalar)) general.push({ key, label, kind: "list", value, from });
  }
  return general;
}

/** A field's value as its input shows it. */
export function fieldText(field) {
  if (field.kind === "list") return (Array.isArray(field.value) ? field.value : []).map(String).join(", ");
  return field.value === null || field.value === undefined ? "" : String(field.value);
}

/** The approved result from the inputs' texts: `{result, errors}` (errors by key). */
export function parseReview(fields, texts) {
  const result = {};
  const errors = {};
  for (const field of fields) {
    const text = texts[field.key] ?? "";
    if (field.kind === "list") {
      result[field.key] = text
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean);
    } else if (field.kind === "number") {
      const value = Number(text.trim());
      if (!text.trim() || !Number.isFinite(value)) errors[field.key] = "Enter a number.";
      else result[field.key] = value;
    } else {
      const value = text.trim();
      if (!wellFormed(value)) {
        errors[field.key] = "This contains characters that are not valid text.";
      }
      result[field.key] = value;
    }
  }
  return { result, errors };
}
