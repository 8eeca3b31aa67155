#!/usr/bin/env python3
"""`make demo`: run workflows/api/glm_image_t2i_api.json on the tiny random-weight checkpoint in a real
ComfyUI server (127.0.0.1, free port), copy the PNG to demo-output/ and print its path.

Needs `make host` and `make tiny` (make demo does both). The tiny checkpoint has random weights,
so the picture is noise: the demo shows that the whole graph runs, not what GLM-Image draws.
When a stage of the pack is not written yet, it stops with the stage's name and ComfyUI's message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import comfy_server as cs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default=os.path.join(ROOT, "workflows", "api", "glm_image_t2i_api.json"))
    ap.add_argument("--model", default=cs.TINY_CKPT, help="folder linked as models/diffusers/GLM-Image-tiny")
    ap.add_argument("--out", default=os.path.join(ROOT, "demo-output"))
    ap.add_argument("--base-dir", default=None,
                    help="ComfyUI --base-directory (output/, user/, the server log); default: a temporary "
                         "folder outside the checkout (its custom_nodes/ links back to this checkout)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args(argv)

    if not os.path.isfile(os.path.join(a.model, "model_index.json")):
        print(f"[demo] no checkpoint at {a.model}: run `make tiny` (or `make demo`)", file=sys.stderr)
        return 2
    with open(a.workflow, encoding="utf-8") as f:
        prompt = json.load(f)

    server = cs.ComfyServer(a.base_dir, diffusers={"GLM-Image-tiny": a.model})
    t0 = time.monotonic()
    print(f"[demo] starting ComfyUI 0.3.75 on {server.url} (server log -> "
          f"{os.path.relpath(os.path.join(a.out, 'comfyui.log'), ROOT)})", flush=True)
    try:
        server.start()
        server.check_pack()
        print(f"[demo] server ready in {server.start_seconds:.1f}s; pack loaded "
              f"({len(cs.PACK_NODE_IDS)} GLM-Image nodes)", flush=True)
        print(f"[demo] queueing {os.path.relpath(a.workflow, ROOT)}", flush=True)
        t1 = time.monotonic()
        try:
            entry = server.run(prompt, timeout=a.timeout)
        except cs.ExecutionFailed as e:
            print(f"[demo] FAILED in stage '{e.stage}' (node {e.node_id}, {e.node_type}): "
                  f"{e.exception_type}: {e.exception_message}\n{e.traceback}", file=sys.stderr)
            return 1
        except cs.PromptRejected as e:
            print(f"[demo] the server rejected the workflow: {e}", file=sys.stderr)
            return 1
        run_s = time.monotonic() - t1
        saved = [nid for nid, n in prompt.items() if n.get("class_type") == "SaveImage"]
        paths = server.download_images(entry, a.out, saved[0] if saved else None)
        if not paths:
            print("[demo] the workflow finished but produced no image", file=sys.stderr)
            return 1
        print(f"[demo] workflow ran in {run_s:.1f}s (total {time.monotonic() - t0:.1f}s)")
        for p in paths:
            print(os.path.abspath(p))
        return 0
    except cs.ServerError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "comfyui.log"), "w", encoding="utf-8") as f:
            f.write(server.log_text())
        if a.base_dir is None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
