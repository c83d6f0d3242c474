// The upload form: checked here as the server checks it (model.js), sent, and a 400 from the
// server shown beside the field it names.

import { API } from "./api.js";
import { $, setFieldError, setMessage, showFieldErrors } from "./dom.js";
import { refreshWorkflow } from "./list.js";
import { fieldMessages, parseProduct } from "./model.js";
import { call, onSignOut } from "./session.js";
import { state } from "./state.js";

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

export function wireUpload() {
  onSignOut(() => {
    $("upload-form").reset();
    for (const field of PRODUCT_FIELDS) setFieldError("product", field, null);
    setMessage($("upload-message"), null);
  });
  $("upload-form").addEventListener("submit", upload);
  for (const field of PRODUCT_FIELDS) {
    $(`product-${field}`).addEventListener("input", () => setFieldError("product", field, null));
  }
}
