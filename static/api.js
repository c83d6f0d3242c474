// Talking to the gateway: JSON over HTTP (docs/architecture.md#the-http-api) and the one
// live WebSocket (docs/architecture.md#the-hub-and-the-websocket).

export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, code, message, fields = null, retryAfter = null) {
    super(message);
    this.status = status; // 0: the server could not be reached
    this.code = code;
    this.fields = fields;
    this.retryAfter = retryAfter;
  }
}

/** One JSON request; resolves to the parsed body, rejects with an ApiError. */
export async function request(method, path, { body, token } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached. Check the connection and try again.");
  }
  let parsed = null;
  try {
    parsed = await response.json();
  } catch {
    // an empty or non-JSON body: only the status speaks
  }
  if (response.ok) return parsed;
  const error = parsed?.error ?? {};
  const retryAfter = Number(response.headers.get("Retry-After")) || null;
  throw new ApiError(
    response.status,
    error.code ?? `http_${response.status}`,
    error.message ?? `The server answered ${response.status} ${response.statusText}.`,
    error.fields ?? null,
    retryAfter,
  );
}

// Close codes the gateway ends a socket with (README, "WebSocket messages").
const CLOSE_TOO_MANY = 4029; // the user has too many sockets open: wait longer, then retry
const CLOSE_EXPIRED = 4401; // the token expired: sign in again, reconnecting cannot help

/**
 * The all-my-workflows subscription, kept open: after a drop it reconnects with
 * exponential backoff (with jitter), and each new connection starts with a fresh snapshot.
 *
 * A browser cannot see why a WebSocket handshake failed, so when one is refused before it
 * opens, `onRefused()` is asked whether to go on (it checks the token over HTTP). Once open,
 * the gateway says why it closes: at 4401 `onExpired()` is called and nothing reconnects; at
 * 4029 the next try waits `busyDelay` (the state says `reason: "too-many"`); anything else,
 * 4008 (too slow) included, reconnects with backoff.
 */
export class LiveSocket {
  constructor({ url, token, onMessage, onState, onOpen, onRefused, onExpired }) {
    Object.assign(this, { url, token, onMessage, onState, onOpen, onRefused, onExpired });
    this.socket = null;
    this.failures = 0;
    this.timer = null;
    this.stopped = false;
    this.baseDelay = 500;
    this.maxDelay = 8000;
    this.busyDelay = 30000; // after 4029: until another tab has likely closed
    this.stableAfter = 5000; // a connection that lasted this long resets the backoff
    this.onOnline = () => this.reconnectNow();
  }

  start() {
    this.stopped = false;
    window.addEventListener("online", this.onOnline);
    this.connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    clearTimeout(this.timer);
    const socket = this.socket;
    this.socket = null;
    if (socket) socket.close(1000, "signed out");
  }

  reconnectNow() {
    if (this.stopped || this.socket) return;
    clearTimeout(this.timer);
    this.connect();
  }

  connect() {
    this.timer = null;
    this.onState({ state: "connecting" });
    let socket;
    try {
      socket = new WebSocket(this.url, ["bearer", this.token]);
    } catch {
      this.retry();
      return;
    }
    this.socket = socket;
    let openedAt = null;
    socket.onopen = () => {
      openedAt = Date.now();
      this.onOpen?.();
      this.onState({ state: "live" });
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return; // closing: it no longer speaks for this page
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // not ours to act on
      }
      this.onMessage(message);
    };
    socket.onclose = async (event) => {
      if (this.socket !== socket) return; // replaced or stopped
      this.socket = null;
      if (this.stopped) return;
      if (event.code === CLOSE_EXPIRED) {
        this.stop();
        this.onExpired();
        return;
      }
      if (event.code === CLOSE_TOO_MANY) {
        this.retry("too-many");
        return;
      }
      if (openedAt === null) {
        this.failures += 1;
        const goOn = await this.onRefused();
        if (!goOn || this.stopped) return;
      } else {
        // 4008 among them: a page that fell behind (too slow) re-syncs from a new snapshot
        this.failures = Date.now() - openedAt >= this.stableAfter ? 0 : this.failures + 1;
      }
      this.retry();
    };
  }

  /** Connect again after a jittered pause; `reason` "too-many" waits `busyDelay`. */
  retry(reason = null) {
    const backoff = Math.min(this.maxDelay, this.baseDelay * 2 ** Math.max(0, this.failures - 1));
    const ceiling = reason === "too-many" ? this.busyDelay : backoff;
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.onState({ state: "reconnecting", reason, retryAt: Date.now() + delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }
}

export function socketUrl(path = "/ws") {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}
