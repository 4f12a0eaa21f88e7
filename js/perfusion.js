// Front-end extension of comfyui-perfusion (served through WEB_DIRECTORY = "./js"). Works in the 2024 front end and
// in the current one, with classic canvas nodes and with Vue nodes ("Nodes 2.0").
//
// * Perfusion Train Concept: a live loss chart and step counter while training runs, from the "perfusion.train"
//   messages the node sends each step ({node, step, steps, loss}; a run's first step adds {earlier, first}: the losses
//   of a resumed run's earlier steps, and the step the first of them belongs to), and beside the chart the preview
//   renders of the concept so far, from "perfusion.preview" messages ({node, step, images: JPEG data URLs}); a toast
//   when training finishes or fails.
// * Perfusion Load Concept and Perfusion Apply: the concept's trigger word, superclass and recommended β/τ, from
//   GET /perfusion/concept_info?name=<file> (perfusion_comfy/routes.py). Apply follows its concept link back to the Load
//   Concept node (through reroutes), or shows the Train node's words. Its node menu offers
//   "Perfusion: recommended β/τ".
//
// Each node gets one panel as a DOM widget (node.addDOMWidget, in every front end since 2024): both renderers show
// DOM widgets, while canvas-drawn widgets do not appear in Vue nodes. The panel is neither sent with the prompt
// (options.serialize) nor saved in the workflow's widget values (widget.serialize; the 2024 front end stores a
// trailing null for it, which loads back harmlessly).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN = "PerfusionTrainConcept";
const LOAD = "PerfusionLoadConcept";
const APPLY = "PerfusionApply";
const OWN_GATE = "beta and tau widgets"; // Apply's gate that uses its beta/tau widgets (perfusion_comfy/inference.py GATES)
const PANEL = "perfusion_panel";
const LINE_H = 16;
const WIDGET_MARGIN = 10; // both front ends inset a DOM widget by this much on each side
const CHART_PANEL_H = 130;
const INFO_PANEL_H = 3 * LINE_H + 12;
const MEAN_WINDOW = 10; // the running mean of perfusion_comfy/loss_chart.py
const REFRESH_MS = 400;
const TOAST_MS = 8000;
const COLORS = {
  frame: "#555", dim: "#9a9a9a", raw: "#8a8a8a", mean: "#5aa9ff", ok: "#7fd17f", warn: "#f0b35a", error: "#ff6b6b",
};
const STYLE = `
.perfusion-panel { box-sizing: border-box; height: 100%; display: flex; flex-direction: column; padding: 4px 8px;
  background: rgba(0, 0, 0, 0.28); border: 1px solid ${COLORS.frame}; border-radius: 4px; overflow: hidden;
  font: 12px Arial, sans-serif; color: #ddd; pointer-events: none; }
.perfusion-line { line-height: ${LINE_H}px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.perfusion-info .perfusion-error { white-space: normal; display: -webkit-box; -webkit-box-orient: vertical;
  -webkit-line-clamp: 3; } /* an error is the only line: it may take all three */
.perfusion-row { flex: 1 1 0; min-height: 0; display: flex; gap: 4px; margin-top: 4px; }
.perfusion-chart { flex: 1 1 0; min-width: 0; height: 100%; border: 1px solid ${COLORS.frame}; }
.perfusion-previews { display: flex; gap: 4px; max-width: 60%; }
.perfusion-previews:empty { display: none; }
.perfusion-previews img { height: 100%; aspect-ratio: 1; object-fit: cover; min-width: 0; border: 1px solid ${COLORS.frame}; }
.perfusion-dim { color: ${COLORS.dim}; } .perfusion-mean { color: ${COLORS.mean}; }
.perfusion-ok { color: ${COLORS.ok}; } .perfusion-warn { color: ${COLORS.warn}; } .perfusion-error { color: ${COLORS.error}; }
.perfusion-toasts { position: fixed; right: 16px; bottom: 16px; z-index: 10000; display: flex; flex-direction: column;
  gap: 8px; font: 13px Arial, sans-serif; }
.perfusion-toast { max-width: 360px; padding: 8px 12px; border-radius: 6px; border-left: 4px solid ${COLORS.ok};
  background: #2b2b2b; color: #eee; box-shadow: 0 2px 8px rgba(0, 0, 0, 0.5); cursor: pointer; }
.perfusion-toast b { display: block; margin-bottom: 2px; }
.perfusion-toast.perfusion-error { border-left-color: ${COLORS.error}; color: #eee; }
.perfusion-toast.perfusion-warn { border-left-color: ${COLORS.warn}; color: #eee; }
`;

// ------------------------------------------------------------------------------------------ concept info
// file name -> {state: "loading"|"ok"|"error", data}; errors included, so a missing file is asked for once. Cleared
// when the front end refreshes its file lists and after training, the two ways a file appears or changes.
const infoCache = new Map();

function conceptInfo(name) {
  if (!name) return null;
  let entry = infoCache.get(name);
  if (!entry) {
    entry = { state: "loading", data: null };
    infoCache.set(name, entry);
    fetchInfo(name).then((result) => {
      Object.assign(entry, result);
      refreshPanels();
    });
  }
  return entry;
}

function forgetConcepts() {
  infoCache.clear();
  refreshPanels();
}

async function fetchInfo(name) {
  try {
    const response = await api.fetchApi(`/perfusion/concept_info?name=${encodeURIComponent(name)}`);
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (response.ok && !body.error) return { state: "ok", data: body };
    return { state: "error", data: { error: body?.error ?? `HTTP ${response.status}` } };
  } catch (err) {
    return { state: "error", data: { error: String(err) } };
  }
}

// ---------------------------------------------------------------------------------------- graph helpers
const classOf = (node) => node?.comfyClass ?? node?.type;
const widget = (node, name) => node?.widgets?.find((w) => w.name === name);
const getLink = (id) => (id == null ? null : app.graph?.links?.get?.(id) ?? app.graph?.links?.[id] ?? null);
const graphNodes = () => app.graph?.nodes ?? app.graph?._nodes ?? [];

function nodeById(id) {
  if (id == null || !app.graph) return null;
  return app.graph.getNodeById(id) ?? app.graph.getNodeById(Number(id));
}

/** The node feeding Apply's "concept" input, through reroute nodes. */
function conceptSource(node) {
  let link = getLink(node.inputs?.find((i) => i.name === "concept")?.link);
  for (let hops = 0; link && hops < 32; hops++) {
    const origin = nodeById(link.origin_id);
    if (classOf(origin) !== "Reroute") return origin;
    link = getLink(origin.inputs?.[0]?.link);
  }
  return null;
}

const fmt = (x, digits = 2) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "?");

// ---------------------------------------------------------------------------------------------- panels
function addPanel(node, height, kind) {
  const element = document.createElement("div");
  element.className = `perfusion-panel perfusion-${kind}`;
  element.style.minHeight = `${height}px`; // Vue nodes size the widget by its content
  const lines = document.createElement("div");
  element.append(lines);
  let chart = null;
  let previews = null;
  if (kind === "train") { // the chart, and the preview renders beside it
    const row = element.appendChild(document.createElement("div"));
    row.className = "perfusion-row";
    chart = row.appendChild(document.createElement("canvas"));
    chart.className = "perfusion-chart";
    previews = row.appendChild(document.createElement("div"));
    previews.className = "perfusion-previews";
  }
  const full = height + 2 * WIDGET_MARGIN; // the canvas renderers' layout takes the margins into the height
  const panel = node.addDOMWidget(PANEL, "perfusion-panel", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => full,
    getMaxHeight: () => full,
  });
  panel.serialize = false;
  node.perfusion ??= {};
  node.perfusion.panel = { element, lines, chart, previews, key: null, shown: null };
  if (chart) observeChart(node, chart);
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

function setLines(node, lines) {
  const panel = node.perfusion?.panel;
  const key = JSON.stringify(lines);
  if (!panel || panel.key === key) return;
  panel.key = key;
  panel.lines.replaceChildren(...lines.map(([text, tone]) => {
    const line = document.createElement("div");
    line.className = `perfusion-line${tone ? ` perfusion-${tone}` : ""}`;
    line.textContent = text;
    line.title = text;
    return line;
  }));
}

function observeChart(node, chart) {
  // the chart keeps its pixels in step with its box (node resized, renderer switched)
  const observer = new ResizeObserver(() => drawChart(node));
  observer.observe(chart);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    observer.disconnect();
    return onRemoved?.apply(this, arguments);
  };
}

function refreshPanels() {
  for (const node of graphNodes()) {
    const kind = classOf(node);
    if (kind === LOAD || kind === APPLY) showInfo(node);
  }
}

// ------------------------------------------------------------------------------------------- train node
function trainState(node) {
  node.perfusion ??= {};
  node.perfusion.train ??= {
    status: "idle", step: 0, steps: 0, first: 1, losses: [], times: [], message: "", previews: [], previewStep: 0,
  };
  return node.perfusion.train;
}

function runningMean(values, window) {
  const out = [];
  let sum = 0;
  values.forEach((v, k) => {
    sum += v;
    if (k >= window) sum -= values[k - window];
    out.push(sum / Math.min(k + 1, window));
  });
  return out;
}

function eta(t) {
  if (!(t.times?.length > 1)) return "";
  const perStep = (t.times[t.times.length - 1] - t.times[0]) / (t.times.length - 1) / 1000;
  const left = Math.round(perStep * (t.steps - t.step));
  return ` · ${perStep.toFixed(1)} s/step · ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")} left`;
}

function trainLabel(t) {
  const last = t.losses[t.losses.length - 1];
  switch (t.status) {
    case "running":
      return [`step ${t.step}/${t.steps} · loss ${fmt(last, 4)}${eta(t)}`];
    case "done":
      return t.steps
        ? [`done: ${t.steps} steps · last loss ${fmt(last, 4)}${t.message ? " · " + t.message : ""}`, "ok"]
        : [`done${t.message ? ": " + t.message : ""}`, "ok"];
    case "interrupted":
      return [`interrupted at step ${t.step}/${t.steps}`, "warn"];
    case "error":
      return [`error${t.step ? ` at step ${t.step}/${t.steps}` : ""}: ${t.message}`, "error"];
    default:
      return ["loss chart: queue the prompt to train", "dim"];
  }
}

function showTrain(node) {
  const t = trainState(node);
  const label = trainLabel(t);
  setLines(node, [label]);
  drawChart(node);
  showPreviews(node);
  t.drawn = { label: label[0], points: t.losses.length, color: COLORS.mean, previews: t.previews.length,
              previewStep: t.previewStep }; // for tests and other extensions
}

function showPreviews(node) {
  const panel = node.perfusion?.panel;
  const t = node.perfusion?.train;
  if (!panel?.previews || !t || panel.shown === t.previews) return;
  panel.shown = t.previews;
  panel.previews.replaceChildren(...t.previews.map((url, k) => {
    const img = document.createElement("img");
    img.src = url;
    img.title = `preview ${k + 1} at step ${t.previewStep}`;
    return img;
  }));
}

function drawChart(node) {
  const chart = node.perfusion?.panel?.chart;
  const t = node.perfusion?.train;
  if (!chart || !t) return;
  const ratio = window.devicePixelRatio || 1;
  const w = chart.clientWidth;
  const h = chart.clientHeight;
  if (!w || !h) return; // not laid out (hidden, collapsed): the observer draws once it is
  chart.width = Math.round(w * ratio);
  chart.height = Math.round(h * ratio);
  const ctx = chart.getContext("2d");
  ctx.scale(ratio, ratio);
  if (t.steps > 0) { // progress along the bottom edge
    ctx.fillStyle = t.status === "error" ? COLORS.error : COLORS.ok;
    ctx.fillRect(0, h - 2, (w * Math.min(t.step, t.steps)) / t.steps, 2);
  }
  if (t.losses.length) plotLosses(ctx, t, w, h);
}

function plotLosses(ctx, t, w, h) {
  let lo = Math.min(...t.losses);
  let hi = Math.max(...t.losses);
  if (hi - lo < 1e-12) {
    lo -= 0.05 * Math.abs(lo || 1);
    hi += 0.05 * Math.abs(hi || 1);
  }
  const offset = t.first - 1; // a run resumed from a finished concept knows only its own losses
  const span = Math.max(t.steps, offset + t.losses.length) - 1 || 1;
  const X = (k) => 4 + ((w - 8) * (offset + k)) / span;
  const Y = (v) => h - 6 - ((h - 12) * (v - lo)) / (hi - lo);
  const line = (values, color, width) => {
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    if (values.length === 1) {
      ctx.arc(X(0), Y(values[0]), 3, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    values.forEach((v, k) => (k ? ctx.lineTo(X(k), Y(v)) : ctx.moveTo(X(k), Y(v))));
    ctx.stroke();
  };
  line(t.losses, COLORS.raw, 1);
  line(runningMean(t.losses, MEAN_WINDOW), COLORS.mean, 2);
  ctx.font = "10px Arial, sans-serif";
  ctx.fillStyle = COLORS.dim;
  ctx.textAlign = "right";
  ctx.fillText(fmt(hi, 4), w - 4, 11);
  ctx.fillText(fmt(lo, 4), w - 4, h - 6);
}

// ------------------------------------------------------------------------------------ load / apply nodes
function infoLines(entry, name, source) {
  if (!name) return [["connect a Perfusion Load Concept or Train node", "dim"]];
  if (!entry || entry.state === "loading") return [[`reading ${name} …`, "dim"]];
  if (entry.state === "error") return [[`⚠ ${entry.data.error}`, "error"]];
  const c = entry.data;
  const words = [`trigger "${c.trigger}" → superclass "${c.superclass}"`];
  if (c.pending) return [words, ["recommended β/τ: once the concept is saved", "dim"], [source, "dim"]];
  return [
    words,
    [`β/τ local ${fmt(c.beta_local)}/${fmt(c.tau_local)} · global ${fmt(c.beta_global)}/${fmt(c.tau_global)}`, "mean"],
    [source ?? `${c.layers} layers · ${(c.size / 1024).toFixed(1)} KB · ${c.trained_k ? "trained K" : "keys locked"}`,
      "dim"],
  ];
}

function conceptOf(node) {
  // -> {name, entry, source} for a Load Concept or Apply node
  if (classOf(node) === LOAD) {
    const name = widget(node, "concept_name")?.value;
    return { name, entry: conceptInfo(name) };
  }
  const origin = conceptSource(node);
  if (classOf(origin) === LOAD) {
    const name = widget(origin, "concept_name")?.value;
    return { name, entry: conceptInfo(name), source: `from ${name}` };
  }
  if (classOf(origin) === TRAIN) {
    const trigger = widget(origin, "trigger_word")?.value;
    const superclass = widget(origin, "superclass")?.value;
    const save = widget(origin, "save_name")?.value;
    const saved = save ? conceptInfo(`${save}.safetensors`) : null;
    const data = saved?.state === "ok" && saved.data.trigger === trigger ? saved.data : { trigger, superclass, pending: true };
    return { name: "training", entry: { state: "ok", data }, source: "from Perfusion Train Concept" };
  }
  return { name: null, entry: null };
}

function showInfo(node) {
  const { name, entry, source } = conceptOf(node);
  const lines = infoLines(entry, name, source);
  setLines(node, lines);
  node.perfusion.drawn = { name, lines: lines.map(([text]) => text), info: entry?.state === "ok" ? entry.data : null };
}

function setRecommended(node, lock) {
  // copies the file's β/τ into the widgets and makes the widgets count (gate), so they can be tuned from there
  const { entry } = conceptOf(node);
  if (entry?.state !== "ok" || entry.data.pending) return;
  const c = entry.data;
  for (const [key, value] of [["beta", c[`beta_${lock}`]], ["tau", c[`tau_${lock}`]], ["gate", OWN_GATE]]) {
    const w = widget(node, key);
    if (w && value !== undefined) {
      w.value = value;
      w.callback?.(value, app.canvas, node);
    }
  }
  node.setDirtyCanvas(true, true);
}

function recommendedItems(node) {
  const { entry } = conceptOf(node);
  if (entry?.state !== "ok" || entry.data.pending) return [];
  return ["local", "global"].map((lock) => ({
    content: `Perfusion: recommended β/τ (${lock} lock)`,
    callback: () => setRecommended(node, lock),
  }));
}

// ---------------------------------------------------------------------------------------------- toasts
function toast(severity, summary, detail) {
  const manager = app.extensionManager?.toast;
  if (manager?.add) manager.add({ severity, summary, detail, life: TOAST_MS });
  else fallbackToast(severity, summary, detail);
}

function fallbackToast(severity, summary, detail) {
  // the 2024 front end has no toast service: a small box in the corner, gone after TOAST_MS or on click
  let stack = document.querySelector(".perfusion-toasts");
  if (!stack) {
    stack = document.createElement("div");
    stack.className = "perfusion-toasts";
    document.body.append(stack);
  }
  const box = document.createElement("div");
  box.className = `perfusion-toast perfusion-${severity}`;
  box.setAttribute("role", "status");
  const title = document.createElement("b");
  title.textContent = summary;
  box.append(title, detail);
  box.addEventListener("click", () => box.remove());
  stack.append(box);
  setTimeout(() => box.remove(), TOAST_MS);
}

// ------------------------------------------------------------------------------------ execution events
const trainNode = (id) => {
  const node = nodeById(id);
  return classOf(node) === TRAIN ? node : null;
};

function onTrainMessage({ detail }) {
  const node = trainNode(detail?.node);
  if (!node) return;
  const t = trainState(node);
  if (detail.earlier || t.status !== "running" || detail.step < t.step) { // a run's first step, or a new run
    Object.assign(t, { status: "running", first: detail.first ?? 1, losses: (detail.earlier ?? []).map(Number),
                       times: [], message: "", previews: [], previewStep: 0 });
  }
  t.step = detail.step;
  t.steps = detail.steps;
  t.losses.push(Number(detail.loss));
  t.times.push(performance.now());
  showTrain(node);
}

function onPreview({ detail }) {
  const node = trainNode(detail?.node);
  if (!node || !Array.isArray(detail.images)) return;
  Object.assign(trainState(node), { previews: detail.images, previewStep: detail.step });
  showTrain(node);
}

function onExecuted({ detail }) {
  const node = trainNode(detail?.display_node ?? detail?.node);
  if (!node) return;
  const t = trainState(node);
  const trained = t.status === "running"; // not a cached result replayed
  t.status = "done";
  t.message = detail.output?.text?.[0] ?? "";
  showTrain(node);
  if (trained) toast("success", "Perfusion: training finished", `${t.steps} steps · ${t.message}`);
  refreshCombos(); // the run wrote a concept file: new in the lists, and its cached info is stale
}

function refreshCombos() {
  // both call the extensions' refreshComboInNodes hook (below); the current front end's reloadNodeDefs is the one
  // without "update requested" toasts
  if (app.reloadNodeDefs) app.reloadNodeDefs();
  else app.refreshComboInNodes?.();
}

function onFailure(status) {
  return ({ detail }) => {
    const node = trainNode(detail?.node_id);
    if (!node) return;
    const t = trainState(node);
    t.status = status;
    t.message = detail.exception_message?.trim?.() ?? "";
    showTrain(node);
    if (status === "error") toast("error", "Perfusion: training failed", t.message);
    else toast("warn", "Perfusion: training interrupted", `at step ${t.step}/${t.steps}`);
  };
}

// ------------------------------------------------------------------------------------------ extension
app.registerExtension({
  name: "perfusion.core",

  async setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.append(style);
    api.addEventListener("perfusion.train", onTrainMessage);
    api.addEventListener("perfusion.preview", onPreview);
    api.addEventListener("executed", onExecuted);
    api.addEventListener("execution_error", onFailure("error"));
    api.addEventListener("execution_interrupted", onFailure("interrupted"));
    // Vue nodes run no canvas draw per node, and a change upstream (a combo, a reroute) fires no event on Apply:
    // re-read the labels a few times a second; the DOM only changes when the text does
    setInterval(refreshPanels, REFRESH_MS);
  },

  // the current front end's node menu hook (classic and Vue nodes)
  getNodeMenuItems(node) {
    return classOf(node) === APPLY ? recommendedItems(node) : [];
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== APPLY) return;
    // Apply saved before its gate widget existed used its beta and tau widgets: loaded, it keeps doing so. Such a
    // workflow has no gate value, or (the 2024 UI saved the panel as a trailing null) a null in its place
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const r = onConfigure?.apply(this, arguments);
      const gate = this.widgets?.find((w) => w.name === "gate");
      const values = info?.widgets_values;
      if (gate && Array.isArray(values) && !(gate.options?.values ?? []).includes(values[this.widgets.indexOf(gate)])) {
        gate.value = OWN_GATE;
      }
      return r;
    };
    if (typeof app.collectNodeMenuItems === "function") return;
    // the 2024 front end has no menu hook: extend the node's own menu
    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (_, options) {
      const r = getExtraMenuOptions?.apply(this, arguments);
      const items = recommendedItems(this);
      if (items.length) options.unshift(...items, null);
      return r;
    };
  },

  // the user refreshed the file lists (or training did): files may have appeared, changed or gone
  refreshComboInNodes() {
    forgetConcepts();
  },

  nodeCreated(node) {
    const kind = classOf(node);
    if (kind === TRAIN) {
      addPanel(node, CHART_PANEL_H, "train");
      showTrain(node);
    } else if (kind === LOAD || kind === APPLY) {
      addPanel(node, INFO_PANEL_H, "info");
      showInfo(node);
    }
  },
});
