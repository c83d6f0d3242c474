// The Stox dashboard: sign in, upload products, and watch every workflow live over one
// WebSocket. Plain DOM, no framework, no HTML from strings (the page requires Trusted Types).
//
// This entry point wires the page's modules, each its own part of it: session.js (signing
// in and out), list.js (the live list), upload.js (the upload form), detail.js (one
// workflow); state.js is what they share, dom.js how they build elements, api.js how they
// talk to the gateway and model.js the rules and words without a DOM.

import { wireCharts } from "./charts.js";
import { renderDetail, wireDetail } from "./detail.js";
import { renderList, wireList } from "./list.js";
import { resumeSession, wireSession } from "./session.js";
import { renderWith, state } from "./state.js";
import { wireUpload } from "./upload.js";

function render() {
  state.renderTimer = null;
  if (!state.session) return;
  renderList();
  if (state.detailId && (state.renderAll || state.dirty.has(state.detailId))) renderDetail();
  state.dirty.clear();
  state.renderAll = false;
}

renderWith(render);
wireSession();
wireList(); // before detail.js: on sign-in the socket starts, then the detail opens
wireUpload();
wireDetail();
wireCharts(); // the charts' own socket (charts.js)
resumeSession();
