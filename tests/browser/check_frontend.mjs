// Drives the real ComfyUI frontend (1.32.9, served by the test server) in headless Chromium with
// playwright-core. Run by test_frontend.py, which starts the server and checks the JSON this prints.
//
//   node check_frontend.mjs --url http://127.0.0.1:PORT --chromium /usr/bin/chromium \
//        --out test-artifacts --nodes A,B,C  workflows/x.json ...
//
// Prints one line "RESULT <json>" with: frontend version, registered pack node types, the pack's
// extension scripts the page loaded, and per workflow: missing node types, broken links, node and
// link counts, the frontend's own graphToPrompt() output, and the screenshot path.
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

function parseArgs(argv) {
  const a = { workflows: [] };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k.startsWith("--")) a[k.slice(2)] = argv[++i];
    else a.workflows.push(k);
  }
  a.nodes = (a.nodes || "").split(",").filter(Boolean);
  a.timeout = Number(a.timeout || 90000);
  return a;
}

const args = parseArgs(process.argv.slice(2));
const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
];
const result = { console: [], pageErrors: [], extensionScripts: [], workflows: [] };
const t0 = Date.now();
const userDir = fs.mkdtempSync(path.join(os.tmpdir(), "glm-chromium-"));
fs.mkdirSync(args.out, { recursive: true });
let ctx;
try {
  ctx = await chromium.launchPersistentContext(userDir, {
    executablePath: args.chromium, headless: true, args: FLAGS, viewport: { width: 1600, height: 900 },
  });
  const page = ctx.pages()[0] || (await ctx.newPage());
  page.setDefaultTimeout(args.timeout);
  page.on("console", (m) => { if (m.type() === "error") result.console.push(m.text().slice(0, 300)); });
  page.on("pageerror", (e) => result.pageErrors.push(String(e?.stack || e).slice(0, 1000)));
  page.on("response", (r) => {
    const u = new URL(r.url());
    if (u.pathname.startsWith(`/extensions/${args.pack}/`)) result.extensionScripts.push({ path: u.pathname, status: r.status() });
  });

  await page.goto(args.url + "/", { waitUntil: "load" });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph && window.app.canvas);
  // Extensions register their node hooks before the node definitions are registered: wait for ours.
  await page.waitForFunction((ids) => ids.every((n) => window.LiteGraph.registered_node_types[n]), args.nodes);
  result.appReadyMs = Date.now() - t0;
  Object.assign(result, await page.evaluate((ids) => ({
    frontendVersion: window.__COMFYUI_FRONTEND_VERSION__ || null,
    registered: ids.filter((n) => window.LiteGraph.registered_node_types[n]),
    registeredCount: Object.keys(window.LiteGraph.registered_node_types).length,
  }), args.nodes));
  await page.screenshot({ path: path.join(args.out, "frontend-default.png") });

  for (const wf of args.workflows) {
    const json = JSON.parse(fs.readFileSync(wf, "utf8"));
    const name = path.basename(wf, ".json");
    const r = await page.evaluate(async ({ json, name }) => {
      const app = window.app, LG = window.LiteGraph;
      const errs = [];
      const missingBefore = [...new Set(json.nodes.map((n) => n.type).filter((t) => !LG.registered_node_types[t]))];
      // loadGraphData(graphData, clean, restore_view, workflow): the path the frontend takes on drag & drop.
      await app.loadGraphData(structuredClone(json), true, true, name);
      await new Promise((res) => setTimeout(res, 300));
      const g = app.graph;
      const nodes = g.nodes ?? g._nodes;
      const byId = new Map(nodes.map((n) => [n.id, n]));
      const missing = [...new Set(nodes.filter((n) => !LG.registered_node_types[n.type] || n.has_errors).map((n) => n.type))];
      const linkList = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
      const broken = [];
      for (const l of linkList) {
        if (!l) continue;
        const o = byId.get(l.origin_id), t = byId.get(l.target_id);
        if (!o) { broken.push(`link ${l.id}: origin node ${l.origin_id} missing`); continue; }
        if (!t) { broken.push(`link ${l.id}: target node ${l.target_id} missing`); continue; }
        const out = o.outputs?.[l.origin_slot], inp = t.inputs?.[l.target_slot];
        if (!out) broken.push(`link ${l.id}: ${o.type} has no output slot ${l.origin_slot}`);
        else if (!(out.links || []).includes(l.id)) broken.push(`link ${l.id}: not listed on ${o.type}.${out.name}`);
        if (!inp) broken.push(`link ${l.id}: ${t.type} has no input slot ${l.target_slot}`);
        else if (inp.link !== l.id) broken.push(`link ${l.id}: ${t.type}.${inp.name} points at link ${inp.link}`);
        if (out && inp && out.type !== inp.type && out.type !== "*" && inp.type !== "*")
          broken.push(`link ${l.id}: type ${out.type} -> ${inp.type}`);
      }
      for (const n of nodes) for (const inp of n.inputs || []) {
        if (inp.link != null && !linkList.some((l) => l && l.id === inp.link))
          broken.push(`${n.type}.${inp.name}: dangling link ${inp.link}`);
      }
      let prompt = null;
      try { prompt = (await app.graphToPrompt()).output; } catch (e) { errs.push(`graphToPrompt: ${e}`); }
      const widgets = {};
      for (const n of nodes) widgets[n.id] = Object.fromEntries((n.widgets || []).map((w) => [w.name, w.value]));
      return {
        name, missingBefore, missing, broken, errors: errs, prompt, widgets,
        nodeCount: nodes.length, expectedNodes: json.nodes.length,
        linkCount: linkList.filter(Boolean).length, expectedLinks: json.links.length,
        groupCount: (g.groups ?? g._groups ?? []).length, expectedGroups: (json.groups || []).length,
      };
    }, { json, name });
    await page.waitForTimeout(500);
    r.screenshot = path.join(args.out, `frontend-${name}.png`);
    await page.screenshot({ path: r.screenshot });
    // Save -> reload round trip, as a user saving the workflow and opening it again would do it.
    Object.assign(r, await page.evaluate(async ({ name }) => {
      const app = window.app;
      const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
      const holes = saved.nodes
        .filter((n) => Array.isArray(n.widgets_values) && n.widgets_values.some((v) => v === null))
        .map((n) => ({ id: n.id, type: n.type, widgets_values: n.widgets_values }));
      await app.loadGraphData(saved, true, true, name + "-reloaded");
      await new Promise((res) => setTimeout(res, 300));
      let reloadedPrompt = null;
      try { reloadedPrompt = (await app.graphToPrompt()).output; } catch (e) { reloadedPrompt = { error: String(e) }; }
      return { savedHoles: holes, reloadedPrompt };
    }, { name }));
    result.workflows.push(r);
  }
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e?.stack || e);
} finally {
  if (ctx) await ctx.close().catch(() => {});
  fs.rmSync(userDir, { recursive: true, force: true });
}
result.totalMs = Date.now() - t0;
console.log("RESULT " + JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
