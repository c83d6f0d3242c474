// The upload form: checked here as the server checks it (model.js), sent, and a 400 from the
// server shown beside the field it names. The pipelines an upload may name come from
// GET /api/v1/pipelines at each sign-in, the default first and preselected.

import { API } from "./api.js";
import { $, h, setFieldError, setMessage, showFieldErrors } from "./dom.js";
import { refreshWorkflow } from "./list.js";
import { fieldMessages, parseProduct, stepLongName } from "./model.js";
import { renderPipelineChoice } from "./search.js";
import { call, onSignIn, onSignOut } from "./session.js";
import { state } from "./state.js";

const PRODUCT_FIELDS = ["name", "description", "category", "price", "images"];
const ERROR_FIELDS = [...PRODUCT_FIELDS, "pipeline"];

let pipelines = []; // the definitions GET /api/v1/pipelines gave, default first

async function loadPipelines() {
  const field = $("pipeline-field");
  try {
    const answer = await call("GET", `${API}/pipelines`);
    pipelines = Array.isArray(answer?.pipelines) ? answer.pipelines : [];
  } catch {
    pipelines = []; // uploads still go to the default pipeline
  }
  state.pipelines = pipelines;
  renderPipelineChoice(); // the list's search offers them too
  const select = $("product-pipeline");
  select.replaceChildren(
    ...pipelines.map((p, i) => h("option", { value: p.name, selected: i === 0 }, `${p.name} (v${p.version})`)),
  );
  field.hidden = pipelines.length < 2; // one pipeline: nothing to choose
  describePipeline();
}

/** What the chosen pipeline does, in words: "Image processing and AI enhancement at once, then…". */
function describePipeline() {
  const chosen = pipelines.find((p) => p.name === $("product-pipeline").value);
  $("product-pipeline-hint").textContent = chosen ? pipelineSummary(chosen) : "";
}

function pipelineSummary(pipeline) {
  const steps = pipeline.steps ?? [];
  const sequence = steps.every((s) => s.after === null || s.after === undefined);
  const name = (s) => stepLongName(s.name) + (s.kind === "review" ? " (review)" : "");
  if (sequence) return steps.map(name).join(", then ");
  const depth = new Map();
  const depthOf = (s) => {
    if (!depth.has(s.name)) {
      depth.set(s.name, 0);
      const deps = (s.after ?? []).map((d) => steps.find((x) => x.name === d)).filter(Boolean);
      depth.set(s.name, deps.length ? Math.max(...deps.map(depthOf)) + 1 : 0);
    }
    return depth.get(s.name);
  };
  const stagesOf = [];
  for (const s of steps) (stagesOf[depthOf(s)] ??= []).push(s);
  return stagesOf
    .filter(Boolean)
    .map((group) => group.map(name).join(" and ") + (group.length > 1 ? " at once" : ""))
    .join(", then ");
}

async function upload(event) {
  event.preventDefault();
  const form = $("upload-form");
  const message = $("upload-message");
  const raw = Object.fromEntries(PRODUCT_FIELDS.map((f) => [f, $(`product-${f}`).value]));
  const { product, errors } = parseProduct(raw);
  const pipeline = $("pipeline-field").hidden ? "" : $("product-pipeline").value;
  if (pipeline) product.pipeline = pipeline;
  setMessage(message, null);
  setFieldError("product", "pipeline", null);
  showFieldErrors("product", PRODUCT_FIELDS, errors);
  if (Object.keys(errors).length) return;
  const button = form.querySelector('button[type="submit"]');
  button.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    const answer = await call("POST", `${API}/workflow/upload`, product);
    if (!answer) return;
    state.fresh.add(answer.workflow_id);
    form.reset(); // the pipeline back to the default, selected first
    describePipeline();
    setMessage(message, `Uploaded “${product.name}”. Its workflow has started.`, "success");
    $("product-name").focus();
    // the socket brings it too; this makes it show even while the socket reconnects
    refreshWorkflow(answer.workflow_id);
  } catch (error) {
    if (error.status === 400 && error.fields) {
      const unplaced = showFieldErrors("product", ERROR_FIELDS, fieldMessages(error.fields));
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
  onSignIn(loadPipelines);
  onSignOut(() => {
    pipelines = [];
    state.pipelines = [];
    renderPipelineChoice();
    $("product-pipeline").replaceChildren();
    $("pipeline-field").hidden = true;
    $("upload-form").reset();
    for (const field of PRODUCT_FIELDS) setFieldError("product", field, null);
    setMessage($("upload-message"), null);
  });
  $("upload-form").addEventListener("submit", upload);
  for (const field of PRODUCT_FIELDS) {
    $(`product-${field}`).addEventListener("input", () => setFieldError("product", field, null));
  }
  $("product-pipeline").addEventListener("change", () => {
    setFieldError("product", "pipeline", null);
    describePipeline();
  });
}
