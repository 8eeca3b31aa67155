// ComfyUI-GLM-Image frontend extension: size presets that snap to the 32-pixel token grid (with
// the resulting token counts), socket colours for the GLM types, and the glyph spans shown on the
// Glyph Text Regions node. No build step, no network.
import { app } from "../../scripts/app.js";

const GRID = 32;
const MIN_SIZE = 256;
const MAX_SIZE = 2048;

// Width × height presets, all multiples of 32 (aspect ratios people use).
export const SIZE_PRESETS = [
  ["custom", null, null],
  ["1:1 · 1024×1024", 1024, 1024],
  ["1:1 · 512×512", 512, 512],
  ["1:1 · 2048×2048", 2048, 2048],
  ["4:3 · 1152×864", 1152, 864],
  ["3:4 · 864×1152", 864, 1152],
  ["3:2 · 1248×832", 1248, 832],
  ["2:3 · 832×1248", 832, 1248],
  ["16:9 · 1344×768", 1344, 768],
  ["9:16 · 768×1344", 768, 1344],
  ["21:9 · 1536×640", 1536, 640],
];

const TYPE_COLORS = {
  GLM_AR: "#c77dff",
  GLM_DECODER: "#7b2cbf",
  GLM_GLYPH_ENCODER: "#5a189a",
  GLM_TOKENS: "#f4a261",
  GLM_GLYPH: "#2a9d8f",
  GLM_REFERENCE: "#e76f51",
};

export function snapToGrid(v) {
  const s = Math.round(Number(v) / GRID) * GRID;
  return Math.min(MAX_SIZE, Math.max(MIN_SIZE, s));
}

// Same formula as the official processor: preview grid ≈ 16×16 tokens with the target's aspect.
export function tokenCounts(width, height) {
  const th = Math.floor(height / GRID), tw = Math.floor(width / GRID);
  const r = th / tw;
  const ph = Math.floor(Math.sqrt(r) * 16), pw = Math.floor(Math.sqrt(1 / r) * 16);
  return { th, tw, ph, pw, total: th * tw + ph * pw + 1 };
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// A read-only line of text on a node, not saved with the workflow. Not `disabled`: frontend 1.32.9
// draws a disabled widget's value as an empty string.
function infoWidget(node, name, label, options = {}) {
  const info = node.addWidget("text", name, "", () => {}, { serialize: false, ...options });
  info.serialize = false;
  info.label = label;
  info.onClick = () => {};                 // no edit prompt: the node writes this text
  return info;
}

function setupSizeWidgets(node) {
  const w = widget(node, "width"), h = widget(node, "height");
  if (!w || !h || widget(node, "size_preset")) return;
  const info = infoWidget(node, "token_counts", "tokens");
  const refresh = () => {
    const c = tokenCounts(w.value, h.value);
    info.value = `preview ${c.ph}×${c.pw} + grid ${c.th}×${c.tw} = ${c.total} tokens`;
    node.setDirtyCanvas?.(true, true);
  };
  const preset = node.addWidget("combo", "size_preset", "custom", (v) => {
    const p = SIZE_PRESETS.find((x) => x[0] === v);
    if (p && p[1]) {
      w.value = p[1];
      h.value = p[2];
      w.callback?.(w.value);
      h.callback?.(h.value);
    }
    refresh();
  }, { values: SIZE_PRESETS.map((p) => p[0]), serialize: false });
  preset.serialize = false;
  for (const sw of [w, h]) {
    const orig = sw.callback;
    sw.callback = function (v, ...rest) {
      const snapped = snapToGrid(v);
      if (snapped !== sw.value) sw.value = snapped;
      const r = orig?.apply(this, [snapped, ...rest]);
      syncPreset();
      return r;
    };
  }
  const syncPreset = () => {
    const match = SIZE_PRESETS.find((p) => p[1] === w.value && p[2] === h.value);
    preset.value = match ? match[0] : "custom";
    refresh();
  };
  // A loaded workflow sets width/height after onNodeCreated (in configure), without callbacks.
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const r = onConfigure?.apply(this, arguments);
    syncPreset();
    return r;
  };
  // The extra widgets stay after the node's own ones: frontend 1.32.9 restores widgets_values
  // positionally over the serialised widgets only, so an unserialised widget in between would
  // shift every saved value after it.
  refresh();
}

function colorSlots(node) {
  for (const slot of [...(node.inputs || []), ...(node.outputs || [])]) {
    const c = TYPE_COLORS[slot.type];
    if (c) {
      slot.color_on = c;
      slot.color_off = c;
    }
  }
}

app.registerExtension({
  name: "comfyui.glm_image",
  async setup() {
    const canvasCls = window.LGraphCanvas || app.canvas?.constructor;
    if (canvasCls?.link_type_colors) Object.assign(canvasCls.link_type_colors, TYPE_COLORS);
    if (app.canvas?.default_connection_color_byType) Object.assign(app.canvas.default_connection_color_byType, TYPE_COLORS);
    window.__GLM_IMAGE_EXT__ = { SIZE_PRESETS, snapToGrid, tokenCounts, TYPE_COLORS };
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("GLMImage")) return;
    const onCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onCreated?.apply(this, arguments);
      colorSlots(this);
      if (nodeData.name === "GLMImageTextToTokens") setupSizeWidgets(this);
      return r;
    };
    if (nodeData.name === "GLMImageGlyphText") {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = onExecuted?.apply(this, arguments);
        const text = message?.text?.join?.("\n") ?? String(message?.text ?? "");
        let shown = widget(this, "glyph_spans");
        if (!shown) shown = infoWidget(this, "glyph_spans", "glyph spans", { multiline: true });
        shown.value = text.replace(/\n/g, "   ");          // one line on the canvas
        this.setDirtyCanvas?.(true, true);
        return r;
      };
    }
  },
});
