// Front-end extension of comfyui-perfusion (served through WEB_DIRECTORY = "./js").
//
// * Perfusion Train Concept: a live loss chart and step counter while training runs, from the
//   "perfusion.train" messages the node sends each step ({node, step, steps, loss}).
// * Perfusion Load Concept and Perfusion Apply: the concept's trigger word, superclass and recommended β/τ,
//   from GET /perfusion/concept_info?name=<file> (nodes/routes.py). Apply follows its concept link back to the
//   Load Concept node (through reroutes), or shows the Train node's words. Right-click Apply for
//   "Perfusion: recommended β/τ".
//
// Each node gets one canvas-drawn panel widget after its own widgets (not sent with the prompt; a saved workflow
// stores null for it after the node's widget values). ComfyUI lays image previews out below it: the Train node's
// server-side preview (the loss chart as a PNG) stays visible under the live chart.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN = "PerfusionTrainConcept";
const LOAD = "PerfusionLoadConcept";
const APPLY = "PerfusionApply";
const LINE_H = 16;
const PAD = 8;
const CHART_PANEL_H = 140;
const INFO_PANEL_H = 3 * LINE_H + 2 * PAD;
const MEAN_WINDOW = 10; // the running mean of nodes/loss_chart.py
const ERROR_TTL_MS = 5000;
const COLORS = {
  panel: "rgba(0, 0, 0, 0.28)",
  frame: "#555",
  text: "#ddd",
  dim: "#9a9a9a",
  raw: "#8a8a8a",
  mean: "#5aa9ff",
  ok: "#7fd17f",
  warn: "#f0b35a",
  error: "#ff6b6b",
};

// ------------------------------------------------------------------------------------------ concept info
const infoCache = new Map(); // file name -> {state: "loading"|"ok"|"error", data, at}

function conceptInfo(name) {
  if (!name) return null;
  let entry = infoCache.get(name);
  if (entry && entry.state === "error" && Date.now() - entry.at > ERROR_TTL_MS) entry = null;
  if (!entry) {
    entry = { state: "loading", data: null, at: Date.now() };
    infoCache.set(name, entry);
    api
      .fetchApi(`/perfusion/concept_info?name=${encodeURIComponent(name)}`)
      .then(async (response) => {
        let body = null;
        try {
          body = await response.json();
        } catch {
          body = { error: `HTTP ${response.status}` };
        }
        Object.assign(entry, response.ok && !body.error
          ? { state: "ok", data: body, at: Date.now() }
          : { state: "error", data: { error: body?.error ?? `HTTP ${response.status}` }, at: Date.now() });
      })
      .catch((err) => Object.assign(entry, { state: "error", data: { error: String(err) }, at: Date.now() }))
      .finally(() => app.graph?.setDirtyCanvas(true, false));
  }
  return entry;
}

function forgetConcepts() {
  infoCache.clear(); // a training run may have rewritten a file
  app.graph?.setDirtyCanvas(true, false);
}

// ---------------------------------------------------------------------------------------- graph helpers
const classOf = (node) => node?.comfyClass ?? node?.type;
const widget = (node, name) => node?.widgets?.find((w) => w.name === name);
const getLink = (id) => (id == null ? null : app.graph?.links?.get?.(id) ?? app.graph?.links?.[id] ?? null);

function nodeById(id) {
  if (id == null || !app.graph) return null;
  return app.graph.getNodeById(id) ?? app.graph.getNodeById(Number(id));
}

/** The node feeding Apply's "concept" input, through reroutes. */
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

// ---------------------------------------------------------------------------------------------- drawing
function drawPanel(ctx, node, top, height) {
  ctx.fillStyle = COLORS.panel;
  ctx.strokeStyle = COLORS.frame;
  ctx.lineWidth = 1;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(PAD, top, node.size[0] - 2 * PAD, height - PAD, 4);
  else ctx.rect(PAD, top, node.size[0] - 2 * PAD, height - PAD);
  ctx.fill();
  ctx.stroke();
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "…";
}

function drawLines(ctx, node, top, lines) {
  ctx.font = "12px Arial, sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  const width = node.size[0] - 4 * PAD;
  lines.forEach(([text, color], k) => {
    ctx.fillStyle = color ?? COLORS.text;
    ctx.fillText(fitText(ctx, text, width), 2 * PAD, top + PAD + LINE_H * (k + 1) - 4);
  });
}

// ------------------------------------------------------------------------------------------- train node
function trainState(node) {
  node.perfusion ??= {};
  node.perfusion.train ??= { status: "idle", step: 0, steps: 0, losses: [], times: [], message: "" };
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

function trainLabel(t) {
  const last = t.losses[t.losses.length - 1];
  switch (t.status) {
    case "running": {
      let eta = "";
      if (t.times?.length > 1) {
        const perStep = (t.times[t.times.length - 1] - t.times[0]) / (t.times.length - 1) / 1000;
        const left = Math.round(perStep * (t.steps - t.step));
        eta = ` · ${perStep.toFixed(1)} s/step · ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")} left`;
      }
      return [`step ${t.step}/${t.steps} · loss ${fmt(last, 4)}${eta}`, COLORS.text];
    }
    case "done":
      return [`done: ${t.steps} steps · last loss ${fmt(last, 4)}${t.message ? " · " + t.message : ""}`, COLORS.ok];
    case "interrupted":
      return [`interrupted at step ${t.step}/${t.steps}`, COLORS.warn];
    case "error":
      return [`error${t.step ? ` at step ${t.step}/${t.steps}` : ""}: ${t.message}`, COLORS.error];
    default:
      return ["loss chart: queue the prompt to train", COLORS.dim];
  }
}

function drawTrain(ctx, node, top) {
  const t = trainState(node);
  drawPanel(ctx, node, top, CHART_PANEL_H);
  const label = trainLabel(t);
  drawLines(ctx, node, top, [label]);
  const x0 = 2 * PAD;
  const y0 = top + PAD + LINE_H + 4;
  const w = node.size[0] - 4 * PAD;
  const h = CHART_PANEL_H - 3 * PAD - LINE_H - 4;
  ctx.strokeStyle = COLORS.frame;
  ctx.strokeRect(x0, y0, w, h);
  // progress along the bottom edge
  if (t.steps > 0) {
    ctx.fillStyle = t.status === "error" ? COLORS.error : COLORS.ok;
    ctx.fillRect(x0, y0 + h - 2, (w * Math.min(t.step, t.steps)) / t.steps, 2);
  }
  const n = t.losses.length;
  if (n) {
    let lo = Math.min(...t.losses);
    let hi = Math.max(...t.losses);
    if (hi - lo < 1e-12) {
      lo -= 0.5 * Math.abs(lo || 1) * 0.1;
      hi += 0.5 * Math.abs(hi || 1) * 0.1;
    }
    const span = Math.max(t.steps, n) - 1 || 1;
    const X = (k) => x0 + 4 + ((w - 8) * k) / span;
    const Y = (v) => y0 + h - 6 - ((h - 12) * (v - lo)) / (hi - lo);
    const line = (values, color, width) => {
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = width;
      if (values.length === 1) {
        ctx.beginPath();
        ctx.arc(X(0), Y(values[0]), 3, 0, 2 * Math.PI);
        ctx.fill();
        return;
      }
      ctx.beginPath();
      values.forEach((v, k) => (k ? ctx.lineTo(X(k), Y(v)) : ctx.moveTo(X(k), Y(v))));
      ctx.stroke();
    };
    line(t.losses, COLORS.raw, 1);
    line(runningMean(t.losses, MEAN_WINDOW), COLORS.mean, 2);
    ctx.lineWidth = 1;
    ctx.font = "10px Arial, sans-serif";
    ctx.fillStyle = COLORS.dim;
    ctx.textAlign = "right";
    ctx.fillText(fmt(hi, 4), x0 + w - 4, y0 + 11);
    ctx.fillText(fmt(lo, 4), x0 + w - 4, y0 + h - 6);
    ctx.textAlign = "left";
  }
  // what was drawn, for tests and for other extensions
  t.drawn = { label: label[0], points: n, chart: [x0, y0, w, h], color: COLORS.mean };
}

// ------------------------------------------------------------------------------------ load / apply nodes
function infoLines(entry, name, source) {
  if (!name) return [["connect a Perfusion Load Concept or Train node", COLORS.dim]];
  if (!entry || entry.state === "loading") return [[`reading ${name} …`, COLORS.dim]];
  if (entry.state === "error") return [[`⚠ ${entry.data.error}`, COLORS.error]];
  const c = entry.data;
  if (c.pending) {
    return [[`trigger "${c.trigger}" → superclass "${c.superclass}"`, COLORS.text],
      ["recommended β/τ: once the concept is saved", COLORS.dim], [source, COLORS.dim]];
  }
  return [
    [`trigger "${c.trigger}" → superclass "${c.superclass}"`, COLORS.text],
    [`β/τ local ${fmt(c.beta_local)}/${fmt(c.tau_local)} · global ${fmt(c.beta_global)}/${fmt(c.tau_global)}`,
      COLORS.mean],
    [source ?? `${c.layers} layers · ${(c.size / 1024).toFixed(1)} KB · ${c.trained_k ? "trained K" : "keys locked"}`,
      COLORS.dim],
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

function drawInfo(ctx, node, top) {
  const { name, entry, source } = conceptOf(node);
  const lines = infoLines(entry, name, source);
  drawPanel(ctx, node, top, INFO_PANEL_H);
  drawLines(ctx, node, top, lines);
  node.perfusion ??= {};
  node.perfusion.drawn = { name, lines: lines.map(([text]) => text), info: entry?.state === "ok" ? entry.data : null };
}

function setRecommended(node, lock) {
  const { entry } = conceptOf(node);
  if (entry?.state !== "ok" || entry.data.pending) return;
  const c = entry.data;
  for (const [key, value] of [["beta", c[`beta_${lock}`]], ["tau", c[`tau_${lock}`]]]) {
    const w = widget(node, key);
    if (w && typeof value === "number") {
      w.value = value;
      w.callback?.(value, app.canvas, node);
    }
  }
  node.setDirtyCanvas(true, true);
}

// ------------------------------------------------------------------------------------------ extension
function addPanel(node, height, draw) {
  // A canvas-drawn widget: it takes its height in the node's layout, and is neither sent nor converted to an input.
  node.addCustomWidget({
    name: "perfusion_panel",
    type: "perfusion-panel",
    value: null,
    serialize: false,
    options: { serialize: false },
    serializeValue: () => undefined,
    computeSize: (width) => [width ?? node.size[0], height],
    draw(ctx, node_, width, y) {
      if (node.flags?.collapsed) return;
      ctx.save();
      try {
        draw(ctx, node, y);
      } catch (err) {
        console.warn("[perfusion] drawing failed", err);
      } finally {
        ctx.restore();
      }
    },
  });
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

function onTrainMessage({ detail }) {
  const node = nodeById(detail?.node);
  if (!node || classOf(node) !== TRAIN) return;
  const t = trainState(node);
  if (t.status !== "running" || detail.step <= 1 || detail.step < t.step) {
    Object.assign(t, { status: "running", losses: [], times: [], message: "" });
  }
  t.step = detail.step;
  t.steps = detail.steps;
  t.losses.push(Number(detail.loss));
  t.times.push(performance.now());
  node.setDirtyCanvas(true, false);
}

function onFailure(status) {
  return ({ detail }) => {
    const node = nodeById(detail?.node_id);
    if (!node || classOf(node) !== TRAIN) return;
    const t = trainState(node);
    t.status = status;
    t.message = detail.exception_message?.trim?.() ?? "";
    node.setDirtyCanvas(true, false);
  };
}

app.registerExtension({
  name: "perfusion.core",

  async setup() {
    api.addEventListener("perfusion.train", onTrainMessage);
    api.addEventListener("execution_error", onFailure("error"));
    api.addEventListener("execution_interrupted", onFailure("interrupted"));
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === TRAIN) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        const r = onExecuted?.apply(this, arguments);
        const t = trainState(this);
        t.status = "done";
        t.message = output?.text?.[0] ?? "";
        forgetConcepts();
        app.refreshComboInNodes?.(); // the new file appears in Load Concept lists
        return r;
      };
    }
    if (nodeData.name === APPLY) {
      const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
      nodeType.prototype.getExtraMenuOptions = function (_, options) {
        const r = getExtraMenuOptions?.apply(this, arguments);
        const { entry } = conceptOf(this);
        if (entry?.state === "ok" && !entry.data.pending) {
          options.unshift(
            { content: "Perfusion: recommended β/τ (local lock)", callback: () => setRecommended(this, "local") },
            { content: "Perfusion: recommended β/τ (global lock)", callback: () => setRecommended(this, "global") },
            null,
          );
        }
        return r;
      };
    }
  },

  nodeCreated(node) {
    const kind = classOf(node);
    if (kind === TRAIN) {
      trainState(node);
      addPanel(node, CHART_PANEL_H, drawTrain);
    } else if (kind === LOAD || kind === APPLY) {
      addPanel(node, INFO_PANEL_H, drawInfo);
    }
  },
});
