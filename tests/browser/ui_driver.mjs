// Drives ComfyUI's own web UI in headless Chromium (playwright-core, Debian's /usr/bin/chromium) for
// tests/browser/test_frontend.py:  node ui_driver.mjs plan.json result.json
//
// The same scenario runs in the 2024 front end and in the current one with classic or Vue nodes (the server's
// settings choose the renderer before the page loads; the driver only reports what the page runs).
// plan: {url, artifacts, renderer, timeout_ms, train_timeout_ms, gallery: {name: workflow},
//        legacy: [{workflow, node}], train: {workflow, node}, fail: {workflow, node},
//        labels: {workflow, load_node, apply_node, corrupt}}
// result: {frontend, prompts: {name: graphToPrompt().output}, missing: {name: [types]},
//          saved: {name: {node id: widgets_values of the Perfusion nodes}}, legacy, train, resumed, fail, labels,
//          page_errors, console_errors: [{text, url}], screenshots, log}
import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tmpdir } from "node:os";

const [planPath, resultPath] = process.argv.slice(2);
const plan = JSON.parse(readFileSync(planPath, "utf8"));
const result = { prompts: {}, missing: {}, saved: {}, page_errors: [], console_errors: [], screenshots: [], log: [] };
const save = () => writeFileSync(resultPath, JSON.stringify(result, null, 1));
const log = (msg) => {
  result.log.push(`${new Date().toISOString()} ${msg}`);
  console.log(msg);
};
const QUEUE_BUTTON = '#queue-button:visible, [data-testid="queue-button"]:visible'; // 2024 menu, current action bar
mkdirSync(plan.artifacts, { recursive: true });

// a fresh profile (--user-data-dir) each run: playwright takes it as launchPersistentContext's first argument
const profile = mkdtempSync(join(tmpdir(), "perfusion-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: plan.chromium ?? "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1920, height: 1080 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = browser.pages()[0] ?? (await browser.newPage());

async function shot(name, clip) {
  const path = join(plan.artifacts, `${name}.png`);
  await page.screenshot({ path, clip });
  result.screenshots.push(path);
}

// ---------------------------------------------------------------------------------------- page helpers
// Installed once in the page; they work on both renderers (a Vue node is a DOM element, a classic node is
// drawn at ds.offset/ds.scale on the canvas).
function installHelpers() {
  const clientRect = (node) => {
    const el = document.querySelector(`[data-node-id="${node.id}"]`);
    if (el) return el.getBoundingClientRect().toJSON();
    const { scale, offset } = app.canvas.ds;
    const box = app.canvas.canvas.getBoundingClientRect();
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    return { x: box.x + (node.pos[0] + offset[0]) * scale, y: box.y + (node.pos[1] - title + offset[1]) * scale,
             width: node.size[0] * scale, height: (node.size[1] + title) * scale };
  };
  const panel = (node) => {
    const el = node.perfusion?.panel?.element;
    if (!el) return null;
    const r = el.getBoundingClientRect();
    const onScreen = r.width > 20 && r.height > 20 && r.right > 0 && r.bottom > 0 &&
      r.left < innerWidth && r.top < innerHeight;
    return {
      visible: el.isConnected && el.checkVisibility({ checkOpacity: true, visibilityProperty: true }) && onScreen,
      rect: r.toJSON(),
      lines: [...el.querySelectorAll(".perfusion-line")].map((l) => ({ text: l.textContent,
                                                                      color: getComputedStyle(l).color })),
      previews: [...el.querySelectorAll(".perfusion-previews img")].filter((img) => img.complete &&
        img.naturalWidth > 0 && img.getBoundingClientRect().width > 8).length, // shown preview renders
    };
  };
  window.__perfusion = {
    done: 0, errors: [],
    node: (id) => app.graph.getNodeById(id),
    clientRect: (id) => clientRect(app.graph.getNodeById(id)),
    panel: (id) => panel(app.graph.getNodeById(id)),
    async load(wf) {
      await app.loadGraphData(wf);
      const ds = wf.extra?.ds; // the 2024 UI does not restore the saved view; newer ones do: show what they show
      if (ds) this.view(ds.scale, ds.offset);
    },
    view(scale, offset) {
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [...offset];
      app.canvas.setDirty(true, true);
    },
    focus(ids, scale = 1) { // these nodes' top left corner clear of the menus over the canvas (current front end)
      const nodes = ids.map((id) => app.graph.getNodeById(id));
      const x = Math.min(...nodes.map((n) => n.pos[0]));
      const y = Math.min(...nodes.map((n) => n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT));
      this.view(scale, [90 / scale - x, 130 / scale - y]);
    },
    chartPixels(id) { // pixels of the running-mean colour on the Train panel's chart
      const t = app.graph.getNodeById(id).perfusion;
      const chart = t.panel.chart;
      const data = chart.getContext("2d").getImageData(0, 0, chart.width, chart.height).data;
      const want = t.train.drawn.color.match(/[0-9a-f]{2}/gi).map((v) => parseInt(v, 16));
      let hits = 0;
      for (let k = 0; k < data.length; k += 4) {
        if (Math.abs(data[k] - want[0]) + Math.abs(data[k + 1] - want[1]) + Math.abs(data[k + 2] - want[2]) < 60) hits++;
      }
      return hits;
    },
    setWidget(id, name, value) {
      const node = app.graph.getNodeById(id);
      const w = node.widgets.find((x) => x.name === name);
      w.value = value;
      w.callback?.(value, app.canvas, node);
      app.canvas.setDirty(true, true);
    },
    widget: (id, name) => app.graph.getNodeById(id).widgets.find((x) => x.name === name).value,
  };
}

const inPage = (fn, arg) => page.evaluate(fn, arg);
const settle = () => page.waitForTimeout(400); // a few frames: DOM widgets follow the canvas on its next draw

async function nodeClip(ids, pad = 12) {
  const rects = await inPage((list) => list.map((id) => window.__perfusion.clientRect(id)), ids);
  const x = Math.max(0, Math.min(...rects.map((r) => r.x)) - pad);
  const y = Math.max(0, Math.min(...rects.map((r) => r.y)) - pad);
  const viewport = page.viewportSize();
  const right = Math.min(viewport.width, Math.max(...rects.map((r) => r.x + r.width)) + pad);
  const bottom = Math.min(viewport.height, Math.max(...rects.map((r) => r.y + r.height)) + pad);
  return { x, y, width: Math.max(1, right - x), height: Math.max(1, bottom - y) };
}

function toastShown(text, screenshot, timeout = plan.timeout_ms) {
  // the current front end's toast service or the extension's fallback: either way, text on screen. Started before
  // the run it reports on, since a toast lives a few seconds and the rest of the graph may run longer.
  const toast = page.getByText(text, { exact: true }).first();
  const shown = toast.waitFor({ state: "visible", timeout }).then(async () => {
    const box = await toast.evaluate((el) =>
      el.closest('[role="alert"], [role="status"], .p-toast-message')?.innerText ?? el.innerText);
    await shot(screenshot);
    return box;
  });
  shown.catch(() => {}); // awaited later; an early failure must not be an unhandled rejection
  return shown;
}

async function dismissDialogs() {
  // the front end's own error report (a modal in 2024, a dialog in the current one) covers the canvas
  await page.keyboard.press("Escape");
  const close = page.locator('.comfy-modal button:text-is("Close"):visible, [role="dialog"] [aria-label="Close"]:visible');
  for (const button of await close.all()) await button.click().catch(() => {});
  await settle();
}

async function waitQueueDone(before, timeout) {
  const deadline = Date.now() + timeout;
  while (!(await inPage((n) => window.__perfusion.done > n, before))) {
    if (Date.now() > deadline) throw new Error("the queued prompt did not finish in time");
    await page.waitForTimeout(100);
  }
}

// --------------------------------------------------------------------------------------------- phases
async function start() {
  page.setDefaultTimeout(plan.timeout_ms);
  page.on("pageerror", (err) => result.page_errors.push(String(err?.stack ?? err)));
  page.on("console", (msg) => {
    if (msg.type() === "error") result.console_errors.push({ text: msg.text(), url: msg.location()?.url ?? "" });
  });
  await page.goto(plan.url, { waitUntil: "load" });
  await page.waitForFunction(() => window.app?.graph && window.app.extensions?.some((e) => e.name === "perfusion.core"));
  // the websocket is up (the server knows our client id): progress and perfusion.train messages reach us
  await page.waitForFunction(async () => !!(await import("/scripts/api.js")).api.clientId);
  await page.evaluate(installHelpers);
  await page.evaluate(async () => {
    const { api } = await import("/scripts/api.js");
    api.addEventListener("executing", ({ detail }) => { if (detail === null) window.__perfusion.done += 1; });
    api.addEventListener("execution_error", ({ detail }) => window.__perfusion.errors.push(detail));
  });
  result.frontend = await inPage(() => ({
    version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
    vue_nodes: app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled") ?? null,
    toast_service: !!app.extensionManager?.toast?.add,
    node_menu_hook: typeof app.collectNodeMenuItems === "function",
  }));
  await page.keyboard.press("Escape"); // whatever opened on first start (a dialog, a panel)
  log(`UI ready (${plan.renderer} nodes requested): ${JSON.stringify(result.frontend)}`);
}

async function loadGallery() {
  // every gallery workflow: loads without missing nodes; graphToPrompt is what the UI would queue
  for (const [name, workflow] of Object.entries(plan.gallery)) {
    const out = await inPage(async (wf) => {
      const missing = wf.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types));
      await window.__perfusion.load(wf);
      const prompt = await app.graphToPrompt();
      const saved = Object.fromEntries(app.graph.serialize().nodes.filter((n) => n.type.startsWith("Perfusion"))
        .map((n) => [n.id, n.widgets_values]));
      return { missing, output: prompt.output, saved };
    }, workflow);
    result.prompts[name] = out.output;
    result.missing[name] = out.missing;
    result.saved[name] = out.saved;
    await settle();
    await shot(`workflow-${name}`);
    log(`loaded ${name}`);
  }
}

async function legacyApply() {
  // Apply nodes saved before the gate widget existed: loaded, their gate is the beta/tau widgets
  result.legacy = [];
  for (const { workflow, node: id } of plan.legacy) {
    result.legacy.push(await inPage(async ([wf, nodeId]) => {
      await window.__perfusion.load(wf);
      const node = window.__perfusion.node(nodeId);
      const prompt = await app.graphToPrompt();
      return { widget: node.widgets.find((w) => w.name === "gate")?.value, queued: prompt.output[nodeId].inputs.gate };
    }, [workflow, id]));
  }
}

async function train() {
  // queue with the UI's own Queue/Run button, watch the live chart, then the toast
  const { workflow, node: id } = plan.train;
  await inPage(async (wf) => await window.__perfusion.load(wf), workflow);
  await inPage((nodeId) => window.__perfusion.focus([nodeId], 0.9), id);
  await settle();
  const before = await inPage(() => window.__perfusion.done);
  const toast = toastShown("Perfusion: training finished", "train-toast", plan.train_timeout_ms);
  await page.locator(QUEUE_BUTTON).first().click();
  log("queued training");
  const seen = [];
  let running = null;
  const deadline = Date.now() + plan.train_timeout_ms;
  for (;;) {
    const state = await inPage(([nodeId, n]) => {
      const t = window.__perfusion.node(nodeId)?.perfusion?.train;
      return { t: t && { status: t.status, step: t.step, steps: t.steps, n: t.losses.length, label: t.drawn?.label },
               finished: window.__perfusion.done > n, errors: window.__perfusion.errors };
    }, [id, before]);
    if (state.t?.status === "running" && !seen.includes(state.t.step)) {
      seen.push(state.t.step);
      if (!running && state.t.step < state.t.steps) {
        running = { ...state.t, panel: await inPage((nodeId) => window.__perfusion.panel(nodeId), id) };
        await shot("train-running", await nodeClip([id]));
      }
    }
    if (state.errors.length) throw new Error(`execution_error: ${JSON.stringify(state.errors[0]).slice(0, 2000)}`);
    if (state.finished && state.t?.status !== "running") break;
    if (Date.now() > deadline) throw new Error(`training did not finish: ${JSON.stringify(state)}`);
    await page.waitForTimeout(100);
  }
  log(`training finished; running states seen at steps ${seen.join(",")}`);
  await settle();
  result.train = await inPage((nodeId) => {
    const t = window.__perfusion.node(nodeId).perfusion.train;
    return { status: t.status, step: t.step, steps: t.steps, losses: t.losses, message: t.message, drawn: t.drawn,
             chart_pixels: window.__perfusion.chartPixels(nodeId), panel: window.__perfusion.panel(nodeId) };
  }, id);
  Object.assign(result.train, { running_seen: running, toast: await toast });
  await shot("train-node", await nodeClip([id]));
}

async function resumedCurve() {
  // a resumed run's messages (synthetic, the server's format): the curve goes on from the earlier losses, and from
  // a finished concept (no earlier losses) it starts at its own first step
  const { node: id } = plan.train;
  result.resumed = await inPage(async (nodeId) => {
    const { api } = await import("/scripts/api.js");
    const send = (detail) => api.dispatchEvent(new CustomEvent("perfusion.train", { detail: { node: nodeId, ...detail } }));
    const read = () => {
      const t = window.__perfusion.node(nodeId).perfusion.train;
      return { first: t.first, losses: [...t.losses], points: t.drawn.points, label: t.drawn.label,
               chart_pixels: window.__perfusion.chartPixels(nodeId) };
    };
    send({ step: 3, steps: 5, loss: 0.5, earlier: [0.9, 0.7], first: 1 });
    send({ step: 4, steps: 5, loss: 0.4 });
    const checkpoint = read();
    send({ step: 11, steps: 12, loss: 0.3, earlier: [], first: 11 });
    return { checkpoint, finished: read() };
  }, id);
}

async function trainFails() {
  // a run the node refuses (no superclass): the panel shows the error, an error toast says so
  const { workflow, node: id } = plan.fail;
  await inPage(async (wf) => await window.__perfusion.load(wf), workflow);
  const before = await inPage(() => window.__perfusion.done);
  const toast = toastShown("Perfusion: training failed", "train-error-toast");
  await page.locator(QUEUE_BUTTON).first().click();
  result.fail = { toast: await toast };
  await waitQueueDone(before, plan.timeout_ms);
  await inPage(() => { window.__perfusion.errors = []; });
  result.fail.drawn = await inPage((nodeId) => window.__perfusion.node(nodeId).perfusion.train.drawn, id);
  await dismissDialogs();
  log("failed training reported");
}

async function labels() {
  const { workflow, load_node: loadId, apply_node: applyId, corrupt } = plan.labels;
  await inPage(async (wf) => await window.__perfusion.load(wf), workflow);
  await inPage((ids) => window.__perfusion.focus(ids), [loadId, applyId]);
  await page.waitForFunction((ids) => ids.every((id) => window.__perfusion.node(id)?.perfusion?.drawn?.info),
    [loadId, applyId]);
  await settle();
  const read = (nodeId) => inPage((n) => ({ ...window.__perfusion.node(n).perfusion.drawn,
                                          panel: window.__perfusion.panel(n) }), nodeId);
  result.labels = { load: await read(loadId), apply: await read(applyId) };
  await shot("concept-labels", await nodeClip([loadId, applyId]));
  result.labels.menu = await recommendedFromMenu(applyId);
  // a corrupt file: its error in red on Load Concept, and on Apply through the link
  await inPage(([n, name]) => window.__perfusion.setWidget(n, "concept_name", name), [loadId, corrupt]);
  await page.waitForFunction((ids) => ids.every((id) => window.__perfusion.node(id).perfusion.drawn.lines[0]
    .startsWith("⚠")), [loadId, applyId]);
  await settle();
  result.labels.corrupt = { load: await read(loadId), apply: await read(applyId) };
  await shot("concept-error", await nodeClip([loadId, applyId]));
}

async function recommendedFromMenu(applyId) {
  // right-click Apply's title, pick "recommended β/τ (global lock)" from the menu the front end shows
  await inPage((n) => window.__perfusion.setWidget(n, "beta", 1.5), applyId);
  await settle();
  const r = await inPage((n) => window.__perfusion.clientRect(n), applyId);
  await page.mouse.click(r.x + r.width / 2, r.y + 10, { button: "right" });
  const item = page.getByText("Perfusion: recommended β/τ (global lock)", { exact: true }).first();
  await item.waitFor({ state: "visible", timeout: plan.timeout_ms });
  await shot("apply-menu");
  await item.click();
  await settle();
  await page.keyboard.press("Escape");
  return { beta: await inPage((n) => window.__perfusion.widget(n, "beta"), applyId),
           tau: await inPage((n) => window.__perfusion.widget(n, "tau"), applyId),
           gate: await inPage((n) => window.__perfusion.widget(n, "gate"), applyId) };
}

try {
  await start();
  await loadGallery();
  await legacyApply();
  save();
  await train();
  await resumedCurve();
  save();
  await trainFails();
  save();
  await labels();
} catch (err) {
  result.error = String(err?.stack ?? err);
  log(`FAILED: ${result.error}`);
  await shot("failure").catch(() => {});
} finally {
  save();
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(result.error ? 1 : 0);
