#!/usr/bin/env python
"""The stock-sampler path on the medium checkpoint, in the real ComfyUI host (in-process), CPU:

* **own**: GLM-Image Semantic Tokens → Latent (the exact one-node path);
* **stock**: SamplerCustomAdvanced + RandomNoise + CFGGuider + euler + GLM-Image Scheduler on the
  DiT's MODEL with GLM-Image Conditioning — must equal *own* (max |Δ| of the raw latent);
* **EasyCache**: the stock path with ComfyUI's EasyCache node on the MODEL (its default reuse
  threshold 0.2, and 0.5; from 15 % to 95 % of the schedule) — speed-up against *stock* and its
  error: relative L2 of the raw latent and PSNR of the decoded image against the uncached run.

Same tokens (a fixed random grid through Load Tokens), same seeds; each repetition uses a new seed
(the executor would otherwise answer from its cache). Timed: the sampling node alone (Semantic
Tokens → Latent, or SamplerCustomAdvanced), from the executor's "executing" events, so nodes the
cache answers (the conditioning) do not skew it; medians over repetitions, sides alternating.
Writes bench/results/stock.{md,json}.

    .venv/bin/python bench/bench_stock.py                  # medium, 512², 20 steps, cfg 1.5, 3 reps
    .venv/bin/python bench/bench_stock.py --size tiny --reps 1 --steps 6 --px 256
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, SUPPORT, NodeTimer, cached_checkpoint, psnr, write_report  # noqa: E402

sys.path.insert(0, SUPPORT)
sys.path.insert(0, ROOT)


def graph(token_file: str, seed: int, steps: int, cfg: float, px: int, side: str) -> dict:
    g = {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-bench", "weight_dtype": "default"}},
        "2": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": token_file}},
    }
    if side == "own":
        g["3"] = {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
                  "seed": seed, "steps": steps, "cfg": cfg}}
    else:
        model = ["1", 3]
        if side.startswith("easycache"):
            g["9"] = {"class_type": "EasyCache", "inputs": {"model": ["1", 3], "reuse_threshold": EASYCACHE[side],
                      "start_percent": 0.15, "end_percent": 0.95, "verbose": False}}
            model = ["9", 0]
        g.update({
            "4": {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0]}},
            "5": {"class_type": "GLMImageScheduler", "inputs": {"model": ["1", 3], "tokens": ["2", 0], "steps": steps}},
            "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "7": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["4", 0], "negative": ["4", 1],
                  "cfg": cfg}},
            "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": px, "height": px, "batch_size": 1}},
            "3": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["7", 0],
                  "sampler": ["8", 0], "sigmas": ["5", 0], "latent_image": ["10", 0]}},
        })
    g["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}}
    g["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    return g


EASYCACHE = {"easycache": 0.2, "easycache-0.5": 0.5}     # side -> reuse threshold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="medium")
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "stock"))
    a = ap.parse_args()

    import torch
    import glmtest_host
    from glm_image_core.generation.tokens import GLMTokens, save_tokens

    host, _ = glmtest_host.host_with_checkpoint(cached_checkpoint(a.size), "GLM-Image-bench", "glm-bench-stock-")
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(0, 16384, (1, a.px // 32, a.px // 32), generator=g)
    save_tokens(GLMTokens(grid=grid, width=a.px, height=a.px, prompt='a sign that says "GLM"', seed=0),
                os.path.join(host.folder_paths.get_input_directory(), "bench.glmtokens.safetensors"))

    timer = NodeTimer(host)

    def run(side: str, seed: int):
        timer.clear()
        host.run_ok(graph("bench.glmtokens.safetensors", seed, a.steps, a.cfg, a.px, side))
        return timer.seconds("3"), glmtest_host.node_output(host, "3")["samples"].float(), glmtest_host.node_output(host, "11").float()

    sides = ("own", "stock") + tuple(EASYCACHE)
    run("own", 10_000)                                     # warm-up: builds the networks
    times = {s: [] for s in sides}
    diffs, rel, psnrs = [], {s: [] for s in EASYCACHE}, {s: [] for s in EASYCACHE}
    for i in range(a.reps):
        seed = 1 + i
        out = {}
        order = sides if i % 2 == 0 else tuple(reversed(sides))
        for s in order:
            dt, lat, img = run(s, seed)
            times[s].append(dt)
            out[s] = (lat, img)
        diffs.append((out["stock"][0] - out["own"][0]).abs().max().item())
        for s in EASYCACHE:
            rel[s].append(((out[s][0] - out["stock"][0]).norm() / out["stock"][0].norm()).item())
            psnrs[s].append(psnr(out[s][1], out["stock"][1]))
    med = {s: statistics.median(v) for s, v in times.items()}
    res = {
        "machine": f"{os.cpu_count()} cores, {platform.platform()}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "checkpoint": a.size, "px": a.px, "steps": a.steps, "cfg": a.cfg, "reps": a.reps,
        "torch_threads": torch.get_num_threads(),
        "seconds": med, "stock_vs_own_max_abs": max(diffs),
        "easycache": {s: {"reuse_threshold": EASYCACHE[s], "speedup": med["stock"] / med[s],
                          "rel_l2": statistics.median(rel[s]), "psnr_db": statistics.median(psnrs[s])}
                      for s in EASYCACHE},
    }
    md = [
        f"# The stock-sampler path ({a.size} checkpoint, {a.px}², {a.steps} steps, cfg {a.cfg}, CPU)", "",
        f"Machine: {res['machine']}; {res['date']}; torch threads {res['torch_threads']}; median of {a.reps} "
        "repetitions of the sampling node alone (tokens from a file). Written by `bench/bench_stock.py`.", "",
        "| path | s / image (sampling) | vs own | EasyCache: speed-up vs stock | latent rel. L2 vs stock | "
        "image PSNR vs stock |", "|---|---|---|---|---|---|",
        f"| own: Semantic Tokens → Latent | {med['own']:.2f} | 1.00 | | | |",
        f"| stock: SamplerCustomAdvanced + euler + GLM-Image Scheduler | {med['stock']:.2f} | "
        f"{med['stock'] / med['own']:.2f} | | | |"]
    for s, e in res["easycache"].items():
        md.append(f"| stock + EasyCache (threshold {e['reuse_threshold']}, 15–95 %) | {med[s]:.2f} | "
                  f"{med[s] / med['own']:.2f} | **{e['speedup']:.2f}×** | {e['rel_l2']:.3f} | {e['psnr_db']:.1f} dB |")
    md += ["",
        f"- stock vs own, raw latent: max |Δ| = {res['stock_vs_own_max_abs']:.2g} (the parity test's bound: 1e-5).",
        "- Random weights: EasyCache skips steps by how much the DiT's output changes from step to step, which "
        "differs on trained weights; the speed-up and error here show that the patch works on the GLM MODEL, "
        "not what it gives on the real model.", ""]
    write_report(a.out, res, md)


if __name__ == "__main__":
    main()
