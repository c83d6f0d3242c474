// DOM helpers of every view: elements by id, elements built from parts (never from markup:
// the page requires Trusted Types), and the messages beside fields and forms.

export const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text, never markup). */
export function h(tag, props = {}, ...children) {
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

// -- messages beside fields and forms -----------------------------------------------------------

export function setMessage(el, text, tone = "info") {
  el.textContent = text ?? "";
  el.hidden = !text;
  el.dataset.tone = tone;
}

export function setFieldError(prefix, field, message) {
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
export function showFieldErrors(prefix, fields, errors) {
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
