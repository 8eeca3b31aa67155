#!/usr/bin/env python3
"""Convert a ComfyUI UI-format workflow (what the frontend saves, schema 0.4) to API format
(what POST /prompt takes), using the server's /object_info for the widget order.

The committed `workflows/api/*_api.json` files are made with this script, and the server test checks
that they still equal the conversion of their UI twin, so the two never drift:

    python scripts/workflow_to_api.py workflows/glm_image_t2i.json -o workflows/api/glm_image_t2i_api.json
    python scripts/workflow_to_api.py --all            # every workflows/X.json -> workflows/api/X_api.json
    python scripts/workflow_to_api.py --all --check    # exit 1 when a committed API copy differs

The API copies live in a subfolder because ComfyUI's template browser lists every
`<pack>/workflows/*.json` (not subfolders): only the drag-and-drop UI workflows should show there.

Without --url / --object-info it starts a ComfyUI server (scripts/comfy_server.py) for /object_info.

Rules (frontend 1.32.9): `widgets_values` lists the node's widgets in the order of the node
definition's `input_order` (required, then optional); an INT input with `control_after_generate`
(or named seed / noise_seed) is followed by its control value ("fixed", "randomize", ...); a null
is a frontend-extension widget that is not serialized, and is skipped. Linked inputs become
[node_id, slot]; Reroute nodes are followed; PrimitiveNode values are inlined; Note/MarkdownNote
and muted nodes (mode 2) are left out.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_FLAGS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio"}


class ConversionError(ValueError):
    pass


def is_ui_workflow(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("nodes"), list) and "links" in obj


def _widget_inputs(info: dict):
    """(name, has_control) for each input of a node definition that the frontend draws as a widget.
    has_control is True (a seed's control value follows), False, or the value of the upload button
    the frontend adds after a combo flagged image_upload (LoadImage saves ["x.png", "image"])."""
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {}) or {}
        for name in order.get(section, []):
            spec = specs.get(name)
            if spec is None:
                continue
            typ, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if opts.get("forceInput"):
                continue
            if isinstance(typ, list) or typ in WIDGET_TYPES:
                if typ == "INT":
                    ctrl = opts.get("control_after_generate")
                    control = ctrl if ctrl is not None else name in ("seed", "noise_seed")
                else:
                    control = bool(opts.get("control_after_generate"))
                    upload = next((v for k, v in UPLOAD_FLAGS.items() if opts.get(k)), None)
                    if upload is not None:
                        yield name, upload
                        continue
                yield name, bool(control)


def convert(ui: dict, object_info: dict) -> dict:
    if not is_ui_workflow(ui):
        raise ConversionError("not a UI-format workflow (no 'nodes'/'links')")
    if ui.get("definitions", {}).get("subgraphs"):
        raise ConversionError("subgraphs are not supported")
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {}
    for link in ui["links"]:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])

    def source(link_id):
        """Resolve a link to ('link', [id, slot]) or ('value', v), following Reroute/PrimitiveNode."""
        seen = set()
        while True:
            if link_id not in links:
                raise ConversionError(f"link {link_id} is missing from the links array")
            origin, slot = links[link_id]
            if origin not in nodes:
                raise ConversionError(f"link {link_id} starts at missing node {origin}")
            n = nodes[origin]
            if n["type"] == "Reroute":
                if origin in seen:
                    raise ConversionError("Reroute loop")
                seen.add(origin)
                link_id = (n.get("inputs") or [{}])[0].get("link")
                if link_id is None:
                    return None
                continue
            if n["type"] == "PrimitiveNode":
                return ("value", (n.get("widgets_values") or [None])[0])
            return ("link", [str(origin), slot])

    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        typ = node["type"]
        if typ in VIRTUAL or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise ConversionError(f"node {node['id']} ({typ}) is bypassed; bypass is not supported")
        info = object_info.get(typ)
        if info is None:
            raise ConversionError(f"node {node['id']}: type {typ!r} is not in /object_info (missing custom node?)")
        values = [v for v in (node.get("widgets_values") or []) if v is not None]
        if isinstance(node.get("widgets_values"), dict):
            raise ConversionError(f"node {node['id']} ({typ}): dict widgets_values are not supported")
        linked = {i["name"]: i.get("link") for i in node.get("inputs") or []}
        inputs = {}
        pos = 0
        for name, control in _widget_inputs(info):
            if pos >= len(values):
                raise ConversionError(f"node {node['id']} ({typ}): no widget value for {name!r} "
                                      f"(widgets_values has {len(values)})")
            inputs[name] = values[pos]
            pos += 1
            if isinstance(control, str):          # the upload button's value
                if pos < len(values) and values[pos] == control:
                    pos += 1
            elif control:
                if pos < len(values) and values[pos] in CONTROL_VALUES:
                    pos += 1
        if pos != len(values):
            raise ConversionError(f"node {node['id']} ({typ}): {len(values) - pos} widget value(s) left over "
                                  f"({values[pos:]!r}); the node definition changed?")
        for name, link_id in linked.items():
            if link_id is None:
                continue
            src = source(link_id)
            if src is None:
                inputs.pop(name, None)
            else:
                inputs[name] = src[1]
        # Inputs in the node definition's order, links included.
        order = [n for sec in ("required", "optional") for n in (info.get("input_order") or {}).get(sec, [])]
        ordered = {k: inputs[k] for k in order if k in inputs}
        ordered.update({k: v for k, v in inputs.items() if k not in ordered})
        api[str(node["id"])] = {"inputs": ordered, "class_type": typ,
                                "_meta": {"title": node.get("title") or info.get("display_name") or typ}}
    return api


def dumps(api: dict) -> str:
    return json.dumps(api, indent=2, ensure_ascii=False) + "\n"


OLDEST_COMFYUI = (0, 3, 75)       # the oldest ComfyUI the pack supports


def min_comfyui(workflow: dict) -> tuple:
    """The oldest ComfyUI a workflow runs in: ``extra.glm_image.min_comfyui`` when it names one (a stock
    node it uses changed its inputs or outputs since the oldest supported ComfyUI), else that one."""
    v = ((workflow.get("extra") or {}).get("glm_image") or {}).get("min_comfyui")
    return tuple(int(x) for x in v.split(".")) if v else OLDEST_COMFYUI


def ui_workflows(folder: str, comfyui: tuple | None = None) -> list[str]:
    """The UI-format workflows in ``folder``; with ``comfyui``, only those that run in that version."""
    out = []
    for p in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(p, encoding="utf-8") as f:
            wf = json.load(f)
        if is_ui_workflow(wf) and (comfyui is None or min_comfyui(wf) <= tuple(comfyui)):
            out.append(p)
    return out


API_SUBFOLDER = "api"


def api_path_for(ui_path: str) -> str:
    """workflows/X.json -> workflows/api/X_api.json"""
    folder, name = os.path.split(ui_path)
    return os.path.join(folder, API_SUBFOLDER, name[:-len(".json")] + "_api.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="UI-format workflow -> API format via /object_info")
    ap.add_argument("workflow", nargs="?", help="UI-format workflow JSON")
    ap.add_argument("-o", "--output", help="write here (default: stdout)")
    ap.add_argument("--all", action="store_true", help="every UI workflow in workflows/ -> workflows/api/X_api.json")
    ap.add_argument("--check", action="store_true", help="with --all: compare instead of writing")
    ap.add_argument("--url", help="a running ComfyUI server to take /object_info from")
    ap.add_argument("--object-info", help="a saved /object_info JSON")
    a = ap.parse_args(argv)
    if not a.all and not a.workflow:
        ap.error("give a workflow or --all")

    sys.path.insert(0, HERE)
    import comfy_server
    server = None
    if a.object_info:
        with open(a.object_info, encoding="utf-8") as f:
            info = json.load(f)
    elif a.url:
        info = comfy_server.Client(a.url).object_info()
    else:
        server = comfy_server.ComfyServer()
        print(f"[workflow_to_api] starting ComfyUI for /object_info ({server.url})", file=sys.stderr)
        try:
            server.start()
            info = server.check_pack()
        finally:
            server.cleanup()

    # --all: the workflows that run in the ComfyUI at COMFYUI_DIR (the one /object_info comes from);
    # convert the others with that newer ComfyUI (COMFYUI_DIR=.host33/ComfyUI COMFY_PYTHON=.venv33/bin/python)
    pairs = [(p, api_path_for(p)) for p in ui_workflows(os.path.join(ROOT, "workflows"),
                                                        comfy_server.comfyui_version())] if a.all \
        else [(a.workflow, a.output)]
    bad = 0
    for ui_path, out in pairs:
        with open(ui_path, encoding="utf-8") as f:
            text = dumps(convert(json.load(f), info))
        if a.check:
            try:
                with open(out, encoding="utf-8") as f:
                    same = json.load(f) == json.loads(text)
            except FileNotFoundError:
                same = False
            print(f"{'ok  ' if same else 'DIFF'} {os.path.relpath(ui_path, ROOT)} -> {os.path.relpath(out, ROOT)}")
            bad += not same
        elif out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
