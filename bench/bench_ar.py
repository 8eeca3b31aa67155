"""AR decode benchmark: glm_image_core's sampler vs transformers' ``generate`` (the official pipeline's
AR call), same weights, same prompt, same settings, in one process, alternating runs.

Standalone (no ComfyUI). Writes the "medium" random checkpoint (reference-oracle.md §4) to a temp
folder, then times a 256×256 text-to-image AR pass (256 preview + 64 grid tokens; transformers also
samples the final end marker: 321 tokens) with do_sample, temperature 0.9, top_p 0.75,
top_k 16512 (the official generation_config). Prints a Markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ar.py [--reps 5] [--size 256] [--threads 1]

Rows: ``ours`` (default loader: bit-exact with transformers), ``ours+cpu-layout`` (``NETWORKS["ar"].load(...,
cpu_gemv_layout=True)``: big weights stored column-major for MKL's one-row GEMM; float-rounding-level
logit differences), ``transformers``. Peak RSS is measured per side in a fresh subprocess.

``--checkpoint deep``: the official depth (40 decoder layers) at a tiny width (tiny_checkpoint's
"deep"), so a token costs almost no arithmetic and its time is per-token overhead (launches, Python,
host reads): rows ``ours`` (exact step), ``ours-static-compiled`` (``StaticDecode`` under
``torch.compile``; its one-time compile is reported apart) and ``transformers``, at ``--size`` (512
by default there) and then at a second size not seen before in the run (``--size2``), writing
``bench/results/ar-deep.{md,json}``. The issue's target: ≥ 4× transformers per token, tokens equal.

Reading the numbers: a one-row decode step must stream every decoder weight and the lm_head once
(130 MB at fp32 for the medium config), so on a CPU it is memory-bandwidth bound. The table's
"weight GB/s" column shows how close each implementation gets; the footer gives this machine's
streaming bandwidth and the resulting upper bound on any speed-up over transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PROMPT, machine_bandwidth_gbs, peak_rss_mb  # noqa: E402  (also puts the repo on sys.path)
from glm_image_core.loading.registry import NETWORKS  # noqa: E402


def _load(folder: str, which: str):
    import torch
    from glm_image_core.generation import ar_prompt
    vle = os.path.join(folder, "vision_language_encoder")
    if which == "hf":
        import glmtest_oracle
        from transformers import GlmImageForConditionalGeneration, GlmImageProcessor
        m = glmtest_oracle.realign(GlmImageForConditionalGeneration.from_pretrained(vle, torch_dtype=torch.float32)).train(False)
        proc = GlmImageProcessor.from_pretrained(os.path.join(folder, "processor"))
        return m, proc
    tok = ar_prompt.GlmTokenizer.from_folder(os.path.join(folder, "processor"))
    return NETWORKS["ar"].load(vle, cpu_gemv_layout=(which == "ours+cpu-layout")), tok


# how each of our sides decodes (generate_tokens' decode/compile); the default is the exact step
DECODE = {"ours": {}, "ours+cpu-layout": {}, "ours-static-compiled": dict(decode="static", compile=True)}


def _run(which: str, obj, size: int, seed: int):
    """(seconds, tokens sampled, grid tokens)"""
    import torch
    from glm_image_core.generation import ar_generate, ar_prompt
    if which == "hf":
        m, proc = obj
        inputs = proc.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]],
                                          tokenize=True, target_h=size, target_w=size, return_dict=True,
                                          return_tensors="pt")
        n = ar_prompt.max_new_tokens(size, size)
        torch.manual_seed(seed)
        t = time.perf_counter()
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=n, do_sample=True)
        dt = time.perf_counter() - t
        gen = out[0, inputs["input_ids"].shape[1]:]
        return dt, int(gen.numel()), gen
    m, tok = obj
    t = time.perf_counter()
    r = ar_generate.generate_tokens(m, tok, PROMPT, size, size, seed, **DECODE[which])
    dt = time.perf_counter() - t
    return dt, r.num_generated, torch.cat([r.preview.reshape(-1), r.grid.reshape(-1)])


def _rss_child(folder: str, which: str, size: int) -> None:
    import torch  # noqa: F401  (baseline: torch imported)
    base = peak_rss_mb()
    obj = _load(folder, which)
    _run(which, obj, size, 0)
    print(json.dumps({"rss_mb": peak_rss_mb(), "torch_import_mb": base}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checkpoint", choices=("medium", "deep"), default="medium")
    ap.add_argument("--size", type=int, default=None, help="image side (default 256; 512 for deep)")
    ap.add_argument("--size2", type=int, default=480, help="deep: the second, unseen size")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    ap.add_argument("--folder", default=None, help="an existing checkpoint of that size (default: write one)")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-side peak-RSS subprocesses")
    ap.add_argument("--_rss-child", nargs=2, metavar=("FOLDER", "WHICH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.size = a.size or (512 if a.checkpoint == "deep" else 256)

    import torch
    torch.set_num_threads(a.threads)
    if a._rss_child:
        _rss_child(a._rss_child[0], a._rss_child[1], a.size)
        return 0

    tmp = None
    folder = a.folder
    if folder is None:
        from glm_image_core.testing.tiny_checkpoint import write_checkpoint
        tmp = tempfile.TemporaryDirectory(prefix="glm-bench-ar-")
        folder = write_checkpoint(os.path.join(tmp.name, f"GLM-Image-{a.checkpoint}"), a.checkpoint, seed=0)
    if a.checkpoint == "deep":
        return _deep(a, folder, tmp)
    sides = ["ours", "ours+cpu-layout", "hf"]
    objs = {s: _load(folder, s) for s in sides}
    for s in sides:                       # warm-up (first-call allocations, lazy inits)
        _run(s, objs[s], 64, 123)
    times = {s: [] for s in sides}
    counts = {}
    toks = {}
    for rep in range(a.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for s in order:
            dt, n, gen = _run(s, objs[s], a.size, rep)
            times[s].append(dt)
            counts[s] = n
            if rep == 0:
                toks[s] = gen
    # sanity: same seed, same tokens (ours stops before the end marker; unrestricted = the pipeline's choice)
    from glm_image_core.generation import ar_generate
    m, tok = objs["ours"]
    ru = ar_generate.generate_tokens(m, tok, PROMPT, a.size, a.size, 0, restrict_to_codebook=False)
    unres = torch.cat([ru.preview.reshape(-1), ru.grid.reshape(-1)])
    same_unres = bool(torch.equal(unres, toks["hf"][:unres.numel()]))
    same_restricted = bool(torch.equal(toks["ours"], toks["hf"][:toks["ours"].numel()]))
    same_layout = bool(torch.equal(toks["ours"], toks["ours+cpu-layout"]))

    rss, base = {}, {}
    if not a.no_rss:
        for s in sides:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--size", str(a.size), "--threads",
                                  str(a.threads), "--_rss-child", folder, s], capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
            try:
                d = json.loads(out.stdout.strip().splitlines()[-1])
                rss[s], base[s] = d["rss_mb"], d["torch_import_mb"]
            except Exception:
                rss[s] = base[s] = float("nan")

    # bytes of weights one decode step must read (decoder linears + lm_head): the memory-bandwidth floor
    m0 = objs["ours"][0]
    step_bytes = sum(mod.weight.numel() * mod.weight.element_size() for name, mod in m0.named_modules()
                     if isinstance(mod, torch.nn.Linear) and (name.startswith("model.language_model")
                                                              or name == "lm_head"))
    bw = machine_bandwidth_gbs(256) * 1e9       # streaming-read bandwidth of this machine
    hf_med = statistics.median(times["hf"]) / counts["hf"]
    hf_min = min(times["hf"]) / counts["hf"]
    print(f"\n### AR decode, medium checkpoint, {a.size}x{a.size} t2i, CPU fp32, {a.threads} thread(s), "
          f"{a.reps} alternating reps\n")
    print("| implementation | tokens | median s | min s | median ms/token | min ms/token | tokens/s (median) "
          "| speed-up vs transformers (median / min) | weight GB/s (min) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in sides:
        med, mn = statistics.median(times[s]), min(times[s])
        n = counts[s]
        per_med, per_min = med / n, mn / n
        ratio = f"{hf_med / per_med:.2f}x / {hf_min / per_min:.2f}x"
        name = "transformers generate" if s == "hf" else s
        print(f"| {name} | {n} | {med:.2f} | {mn:.2f} | {per_med * 1e3:.2f} | {per_min * 1e3:.2f} | "
              f"{1 / per_med:.1f} | {ratio} | {step_bytes / per_min / 1e9:.1f} | {rss.get(s, float('nan')):.0f} |")
    print(f"\none decode step reads {step_bytes / 1e6:.0f} MB of fp32 weights; 'weight GB/s' = that / (min s per "
          f"token), i.e. how close each run gets to the machine's memory bandwidth (the floor of a one-row decode). "
          f"Streaming-read bandwidth here (torch.sum over 256 MB): {bw / 1e9:.1f} GB/s -> no fp32 decode step can "
          f"take less than {step_bytes / bw * 1e3:.1f} ms/token, i.e. at most "
          f"{hf_min * bw / step_bytes:.1f}x transformers' best ms/token on this machine")
    print("all times (s): " + "; ".join(f"{s}: " + ", ".join(f"{t:.2f}" for t in times[s]) for s in sides))
    if base:
        print(f"peak RSS is per side in a fresh process (model load + one run); `import torch` alone: "
              f"{min(base.values()):.0f} MB")
    print(f"tokens, seed 0: ours (unrestricted) == transformers: {same_unres}; ours (codebook-restricted) == "
          f"transformers: {same_restricted}; ours == ours+cpu-layout: {same_layout}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _deep(a, folder: str, tmp) -> int:
    """Per-token overhead at the official depth: exact step, static compiled step, transformers."""
    import torch
    sides = ["ours", "ours-static-compiled", "hf"]
    objs = {s: _load(folder, s) for s in sides}
    t = time.perf_counter()
    _run("ours-static-compiled", objs["ours-static-compiled"], a.size, 123)   # compiles the step once
    compile_s = time.perf_counter() - t
    for s in sides:
        _run(s, objs[s], 64, 123)                                              # warm-up
    rows, toks = {}, {}
    for size in (a.size, a.size2):
        times = {s: [] for s in sides}
        for rep in range(a.reps):
            for s in (sides if rep % 2 == 0 else sides[::-1]):
                dt, n, gen = _run(s, objs[s], size, rep)
                times[s].append(dt / n)
                if rep == 0:
                    toks[(s, size)] = gen
        rows[size] = {s: statistics.median(v) * 1e3 for s, v in times.items()}
    same = {size: bool(torch.equal(toks[("ours", size)], toks[("ours-static-compiled", size)]))
            for size in rows}
    from glm_image_core.generation import ar_generate
    m, tok = objs["ours"]
    same_hf = {}
    for size in rows:
        ru = ar_generate.generate_tokens(m, tok, PROMPT, size, size, 0, restrict_to_codebook=False)
        unres = torch.cat([ru.preview.reshape(-1), ru.grid.reshape(-1)])
        same_hf[size] = bool(torch.equal(unres, toks[("hf", size)][:unres.numel()]))
    lines = [f"### AR decode, deep checkpoint (40 layers, width 64), CPU fp32, {a.threads} thread(s), "
             f"median of {a.reps} alternating reps\n",
             "| size | transformers ms/token | ours (exact) ms/token | ours (static, compiled) ms/token "
             "| exact vs transformers | static vs transformers |", "|---|---|---|---|---|---|"]
    for size, r in rows.items():
        note = "" if size == a.size else " (not seen before)"
        lines.append(f"| {size}×{size}{note} | {r['hf']:.2f} | {r['ours']:.2f} | {r['ours-static-compiled']:.2f} "
                     f"| {r['hf'] / r['ours']:.2f}× | {r['hf'] / r['ours-static-compiled']:.2f}× |")
    lines.append(f"\none-time torch.compile of the static step (first {a.size}² run, included nowhere above): "
                 f"{compile_s:.1f} s. Tokens, seed 0: static == exact: {same}; ours (unrestricted) == "
                 f"transformers: {same_hf}.")
    text = "\n".join(lines)
    print("\n" + text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ar-deep.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "ar-deep.json"), "w") as f:
        json.dump({"ms_per_token": {str(k): v for k, v in rows.items()}, "compile_s": compile_s,
                   "static_equals_exact": {str(k): v for k, v in same.items()},
                   "ours_equals_transformers": {str(k): v for k, v in same_hf.items()},
                   "threads": a.threads, "reps": a.reps}, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
