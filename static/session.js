// Who is signed in: the session kept for the tab (sessionStorage), its expiry, API calls as
// that person, the sign-in and register form, and the switch between sign-in and dashboard.
// What the other modules do on either switch they register here (onSignIn, onSignOut).

import { API, ApiError, request } from "./api.js";
import { $, setFieldError, setMessage, showFieldErrors } from "./dom.js";
import { checkCredentials, fieldMessages, spokenDuration, tokenClaims } from "./model.js";
import { state } from "./state.js";

const SESSION_KEY = "stox.session";

export const EXPIRED = "Your session has expired. Sign in again to continue.";

const signInHooks = [];
const signOutHooks = [];

/** `fn(session)` runs each time the dashboard opens for a session, in registration order. */
export function onSignIn(fn) {
  signInHooks.push(fn);
}

/** `fn()` runs at each sign-out, in registration order: each module forgets its part. */
export function onSignOut(fn) {
  signOutHooks.push(fn);
}

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

export function sessionExpired(session) {
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
export async function call(method, path, body) {
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
  for (const enter of signInHooks) enter(session);
}

export function signOut(message = null, tone = "info") {
  state.live?.stop();
  state.live = null;
  clearTimeout(state.expiryTimer);
  sessionStorage.removeItem(SESSION_KEY);
  state.session = null;
  for (const leave of signOutHooks) leave();
  $("signin-password").value = "";
  showSignIn(message, tone);
}

/** At load: the tab's session if it still holds, else sign-in. */
export function resumeSession() {
  const session = loadSession();
  if (session && !sessionExpired(session)) {
    state.session = session;
    showDashboard();
  } else {
    if (session) sessionStorage.removeItem(SESSION_KEY);
    showSignIn(session ? EXPIRED : null, "warning");
  }
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

export function wireSession() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitCredentials(false);
  });
  $("register").addEventListener("click", () => submitCredentials(true));
  for (const field of CREDENTIAL_FIELDS) {
    $(`signin-${field}`).addEventListener("input", () => setFieldError("signin", field, null));
  }
  $("sign-out").addEventListener("click", () => signOut("You have signed out."));
}
