#!/usr/bin/env python
"""The pack vs the official pipeline, same weights, same run: per-stage times, ratios, peak memory.

    .venv/bin/python bench/run.py                       # medium checkpoint, 256², 8 steps, CPU, 1 thread
    .venv/bin/python bench/run.py --size tiny --reps 1  # quick
    .venv/bin/python bench/run.py --profile             # + torch.profiler tables of the pack's AR / DiT step
    .venv/bin/python bench/run.py --device cuda         # full-size random bf16 weights, 1024², 50 steps

Sides:
* **official**: diffusers ``GlmImagePipeline`` + transformers ``GlmImageForConditionalGeneration``
  (reference-oracle.md), seeded with ``torch.Generator(device).manual_seed(seed)``, image saved as a
  PNG (compress level 1);
* **pack**: this pack's nodes in the real ComfyUI host, in-process (``tests/_support/glmtest_host``:
  ``execution.PromptExecutor``), running ``workflows/api/glm_image_t2i_api.json`` with the bench's
  settings and a PreviewImage output (a PNG at compress level 1, like the official side's).

Both read the same checkpoint folder (``.cache/models/diffusers/GLM-Image-<size>``, written by
``glm_image_core.testing.tiny_checkpoint``; linked into the host's ``models/diffusers``). Repetition i of
each side uses seed ``--seed + i`` (the executor would otherwise answer a repeated prompt from its
cache); the two sides sample the same AR tokens for the same seed, which the report checks.

Stages are timed with wrappers / forward hooks around calls inside each side (outputs untouched;
on CUDA each stamp is preceded by a synchronize). official | pack:

* AR prefill: the first ``vision_language_encoder`` forward | ``GlmImageAR.forward`` (prefill only);
* AR decode: (n - 1) tokens / (generate end - prefill end), n = tokens sampled, both sides;
* AR total: ``pipe.generate_prior_tokens`` | ``ar_generate.generate_tokens`` called by the node;
* glyph encode: ``pipe.encode_prompt`` (cond + uncond) | ``glyph.encode_glyph_texts`` (both calls);
* DiT step: the ``transformer`` forwards / steps | the DiT's methods (``forward_multi``, ``time_embed``,
  ``project_glyph``, ``project_prior``: one-off projections included) / steps;
* whole decode: first glyph start -> last DiT forward end | first glyph start -> ``denoise`` end;
* VAE decode: ``pipe.vae.decode`` | the host VAE's ``decode`` (stock VAEDecode node);
* end to end: ``pipe(...)`` + PNG save | validating + executing the prompt.

CPU (default): both sides are loaded in this process, warmed up once, then run alternately
(official first on even reps, pack first on odd ones); the ratio of a stage is the median over reps
of pack[i] / official[i]. Peak RSS: the two sides share this process, so each side is measured again
in a fresh subprocess (imports, load, one run): its VmHWM, and the RSS right after the imports.

CUDA (``--device cuda``; also on CPU with ``--isolate``): both sides do not fit on one GPU at full
size, so each runs in its own subprocess, one after the other (warm-up, then the reps), reporting
``torch.cuda.max_memory_allocated``. ``--size full`` (default there) writes the real-size config
with random bf16 weights drawn on the GPU into a temporary folder under ``.cache/`` (about 35 GB,
removed at the end unless ``--keep-checkpoint``; ``--folder`` reuses one). Not yet run on a GPU:
the CUDA path is exercised on the CPU only (``--isolate --dtype bf16``, tests/host/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

RESULTS = os.path.join(HERE, "results")
WORKFLOW = os.path.join(C.ROOT, "workflows", "api", "glm_image_t2i_api.json")
SIDES = ("official", "pack")

# (key, label, unit, better): 'lower' times, 'higher' rates
STAGES = [
    ("ar_prefill_s", "AR prefill", "s", "lower"),
    ("ar_decode_tok_s", "AR decode", "tokens/s", "higher"),
    ("ar_total_s", "AR total (prompt → tokens)", "s", "lower"),
    ("glyph_s", "glyph encode (cond + uncond)", "s", "lower"),
    ("dit_step_s", "DiT step (CFG: cond + uncond)", "s", "lower"),
    ("decode_s", "whole decode (glyph + DiT loop)", "s", "lower"),
    ("vae_s", "VAE decode", "s", "lower"),
    ("e2e_s", "end to end", "s", "lower"),
]
STAGE_KEYS = [k for k, *_ in STAGES]


def _sync_fn(device: str):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _grid_hash(grid) -> str:
    import torch
    return hashlib.sha256(grid.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# The official pipeline
# --------------------------------------------------------------------------------------

class OfficialSide:
    name = "official"

    def __init__(self, folder: str, device: str, dtype, png_dir: str):
        import torch
        import glmtest_oracle
        if device == "cpu" and dtype == torch.float32:
            self.pipe = glmtest_oracle.load_reference_pipeline(folder)     # fp32, re-aligned (oracle §7)
        else:
            from diffusers import GlmImagePipeline
            self.pipe = GlmImagePipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
            self.pipe.set_progress_bar_config(disable=True)
        self.device, self.png_dir = device, png_dir
        self.sync = _sync_fn(device)

    def run(self, seed: int, res: int, steps: int, profile=None) -> dict:
        import torch
        pipe, clock, patches = self.pipe, C.CallClock(), C.Patches()
        vle = pipe.vision_language_encoder
        patches.wrap(pipe, "generate_prior_tokens", clock, "ar_total", sync=self.sync)
        patches.wrap(vle, "generate", clock, "ar_generate", sync=self.sync, keep_result=True)
        patches.wrap(pipe, "encode_prompt", clock, "glyph", sync=self.sync)
        patches.wrap(pipe.vae, "decode", clock, "vae", sync=self.sync)
        hooks = clock.hook_module(vle, "ar_forward", self.sync) + clock.hook_module(pipe.transformer, "dit", self.sync)
        try:
            self.sync()
            t0 = clock.stamp()
            out = pipe(prompt=C.PROMPT, height=res, width=res, num_inference_steps=steps, guidance_scale=C.GUIDANCE,
                       generator=torch.Generator(device=self.device).manual_seed(seed))
            out.images[0].save(os.path.join(self.png_dir, f"official_{seed}.png"), compress_level=1)
            self.sync()
            clock.record("e2e", t0, clock.stamp())
        finally:
            patches.restore()
            for h in hooks:
                h.remove()
        n_new = clock.view("wall").calls["ar_forward"]     # one forward per sampled token
        gen = clock.results["ar_generate"][0, -n_new:]
        n_prev, n_grid = 256, (res // 32) ** 2             # t2i: 16x16 preview, grid, end marker
        out = {k: stage_times(clock.view(k), steps, n_new, "ar_generate", "ar_total", "dit") for k in C.TIMERS}
        return out | {"ar_tokens": n_new, "dit_calls": clock.view("wall").calls["dit"],
                      "grid_sha": _grid_hash(gen[n_prev:n_prev + n_grid])}


def stage_times(v: "C.ClockView", steps: int, n_tokens: int, ar_generate: str, ar_total: str, loop_end: str) -> dict:
    """The report's stages from one timer's records (names shared by both sides: ar_forward, glyph,
    dit, vae, e2e; the side-specific ones are passed in)."""
    prefill = v.durations["ar_forward"][0]
    decode = v.last_end[ar_generate] - (v.first_start["ar_forward"] + prefill)
    return {"ar_prefill_s": prefill, "ar_decode_tok_s": (n_tokens - 1) / decode if decode > 0 else float("nan"),
            "ar_total_s": v.total[ar_total], "glyph_s": v.total["glyph"], "dit_step_s": v.total["dit"] / steps,
            "decode_s": v.last_end[loop_end] - v.first_start["glyph"], "vae_s": v.total["vae"], "e2e_s": v.total["e2e"]}


# --------------------------------------------------------------------------------------
# The pack, through the real ComfyUI executor
# --------------------------------------------------------------------------------------

def pack_graph(model_name: str, res: int, steps: int, seed: int, weight_dtype: str) -> dict:
    """workflows/api/glm_image_t2i_api.json with the bench's settings; SaveImage -> PreviewImage."""
    with open(WORKFLOW, encoding="utf-8") as f:
        g = json.load(f)
    for node in g.values():
        ins, ct = node["inputs"], node["class_type"]
        if ct == "GLMImageLoader":
            ins.update(model=model_name, weight_dtype=weight_dtype)
        elif ct == "GLMImageTextToTokens":
            ins.update(prompt=C.PROMPT, width=res, height=res, seed=seed, temperature=0.9, top_p=0.75, top_k=0,
                       batch_size=1)
        elif ct == "GLMImageTokensToLatent":
            ins.update(seed=seed, steps=steps, cfg=C.GUIDANCE)
        elif ct == "SaveImage":
            node["class_type"] = "PreviewImage"
            node["inputs"] = {"images": ins["images"]}
    return g


# The single-file loaders' graph (what a GGUF user builds): AR, glyph encoder, DiT and VAE files.
# The single-file loader node of each network and its file input (the graph's vocabulary; the
# ComfyUI models/ folder of each file is its registry entry's comfy_folder).
SINGLE_FILE_LOADERS = {"ar": ("GLMImageARLoader", "ar_name"),
                       "glyph_encoder": ("GLMImageGlyphEncoderLoader", "glyph_encoder_name"),
                       "dit": ("GLMImageDiTLoader", "dit_name"),
                       "vae": ("GLMImageVAELoader", "vae_name")}


def single_file_node(network: str, name: str, **inputs) -> dict:
    """The API-graph node of ``network``'s single-file loader on file ``name`` (weights as stored)."""
    cls, key = SINGLE_FILE_LOADERS[network]
    return {"class_type": cls, "inputs": {key: name, "weight_dtype": "default", **inputs}}


def single_file_graph(files: dict, res: int, steps: int, seed: int) -> dict:
    """pack_graph's text-to-image with the single-file loaders on ``files`` (component -> file name)."""
    g = pack_graph("unused", res, steps, seed, "default")
    loader = next(k for k, n in g.items() if n["class_type"] == "GLMImageLoader")
    del g[loader]
    for comp in SINGLE_FILE_LOADERS:
        g[f"sf_{comp}"] = single_file_node(comp, files[comp])
    g["sf_dit"]["inputs"]["glyph_encoder"] = ["sf_glyph_encoder", 0]
    outputs = {0: ["sf_ar", 0], 1: ["sf_dit", 0], 2: ["sf_vae", 0], 3: ["sf_dit", 1]}   # Load GLM-Image's slots
    for node in g.values():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and v[0] == loader:
                node["inputs"][k] = outputs[v[1]]
    return g


def single_file(folder: str, network: str, dtype: str, out_dir: str) -> str:
    """``network`` of the official ``folder`` as one file in ``out_dir`` (scripts/convert_to_single_file.py's
    code): GGUF ``dtype`` for the networks that take GGUF, as stored for the others; written once."""
    from glm_image_core.loading import single_file as sf
    from glm_image_core.loading.registry import NETWORKS
    quantized = dtype.startswith("gguf_") and NETWORKS[network].takes_gguf
    path = os.path.join(out_dir, f"{os.path.basename(os.path.normpath(folder))}_{network}"
                        + (f"_{dtype}.gguf" if quantized else ".safetensors"))
    if not os.path.isfile(path):
        os.makedirs(out_dir, exist_ok=True)
        sf.convert_component(folder, network, path + ".tmp", None, dtype if quantized else "as_stored")
        os.replace(path + ".tmp", path)
    return path


def link_into_models(path: str, network: str, models_dir: str, folder_paths=None) -> str:
    """Link a single file into ``models_dir``/<its network's ComfyUI folder> (registered with the host's
    ``folder_paths`` when given); returns the file name the loader node takes."""
    from glm_image_core.loading.registry import NETWORKS
    sub = NETWORKS[network].comfy_folder
    d = os.path.join(models_dir, sub)
    os.makedirs(d, exist_ok=True)
    if folder_paths is not None:
        folder_paths.add_model_folder_path(sub, d, is_default=True)
    name = os.path.basename(path)
    if not os.path.exists(os.path.join(d, name)):
        os.symlink(path, os.path.join(d, name))
    return name


def gguf_files(folder: str, dtype: str, base_dir: str, folder_paths=None) -> dict:
    """The folder's AR and DiT as ``dtype`` GGUF files, the glyph encoder and VAE as stored, beside the
    folder (written once, reused by later jobs) and linked into the host's model folders. Returns
    component -> file name."""
    out = os.path.normpath(folder) + f"-{dtype}"
    return {comp: link_into_models(single_file(folder, comp, dtype, out), comp, os.path.join(base_dir, "models"),
                                   folder_paths)
            for comp in SINGLE_FILE_LOADERS}


class PackSide:
    name = "pack"

    def __init__(self, folder: str, device: str, weight_dtype: str, base_dir: str, host_kwargs: dict | None = None):
        """``weight_dtype`` gguf_*: the single-file loaders on GGUF files converted from the folder."""
        import glmtest_host
        name = os.path.basename(os.path.normpath(folder))
        link = os.path.join(base_dir, "models", "diffusers", name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.islink(link) or os.path.exists(link):
            if os.path.realpath(link) != os.path.realpath(folder):
                os.remove(link)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(folder), link)
        self.host = glmtest_host.Host(base_dir, cpu=(device == "cpu"), **(host_kwargs or {}))
        self.files = gguf_files(folder, weight_dtype, base_dir, self.host.folder_paths) \
            if weight_dtype.startswith("gguf_") else None
        self.model_name, self.device, self.weight_dtype = name, device, weight_dtype
        self.sync = _sync_fn(device)
        pack = glmtest_host.PACK_DIR.replace(".", "_x_")     # ComfyUI's module name for a custom-node folder
        self.mod = {m: importlib.import_module(f"{pack}.{m}") for m in (
            "glm_image_core.generation.ar_generate", "glm_image_core.networks.ar_model", "glm_image_core.generation.glyph_text",
            "glm_image_core.networks.dit",
            "glm_image_core.generation.denoise", "nodes.vae_adapter")}

    def run(self, seed: int, res: int, steps: int, profile=None) -> dict:
        clock, patches, sync = C.CallClock(), C.Patches(), self.sync
        ar, gl, dit, dn = (self.mod[f"glm_image_core.{m}"] for m in ("generation.ar_generate", "generation.glyph_text", "networks.dit", "generation.denoise"))
        patches.wrap(ar, "generate_tokens", clock, "ar", sync=sync, keep_result=True)
        # the AR model's own forward runs once per generation, for the prefill (decode steps call its
        # text model and lm_head directly); timed with syncs, so also right on a GPU
        patches.wrap(self.mod["glm_image_core.networks.ar_model"].GlmImageAR, "forward", clock, "ar_forward", sync=sync)
        patches.wrap(gl, "encode_glyph_texts", clock, "glyph", sync=sync)
        for meth in ("forward_multi", "time_embed", "project_glyph", "project_prior"):
            patches.wrap(dit.GlmImageDiT, meth, clock, "dit", sync=sync)
        patches.wrap(dn, "denoise", clock, "denoise", sync=sync)
        patches.wrap(self.mod["nodes.vae_adapter"].GlmImageComfyVAE, "decode", clock, "vae", sync=sync)
        if profile is not None:
            profile.attach(patches, ar, dn)
        g = single_file_graph(self.files, res, steps, seed) if self.files else \
            pack_graph(self.model_name, res, steps, seed, self.weight_dtype)
        try:
            sync()
            t0 = clock.stamp()
            self.host.run_ok(g)
            sync()
            clock.record("e2e", t0, clock.stamp())
        finally:
            patches.restore()
        r = clock.results["ar"]
        out = {k: stage_times(clock.view(k), steps, r.num_generated, "ar", "ar", "denoise") for k in C.TIMERS}
        import glmtest_host
        image = glmtest_host.node_output(self.host, next(k for k, n in g.items() if n["class_type"] == "VAEDecode"))
        return out | {"ar_tokens": r.num_generated, "dit_calls": clock.view("wall").calls["dit"],
                      "grid_sha": _grid_hash(r.grid[0]), "image_sha": _grid_hash((image * 65535).round())}


# --------------------------------------------------------------------------------------
# Profiles of the pack's AR decode step and DiT step (--profile)
# --------------------------------------------------------------------------------------

class StepProfiler:
    """torch.profiler over the pack's AR decode steps and DiT steps inside one node run: the node's
    own callbacks are wrapped so recording starts after the first sampled token / first DiT step
    (prefill and one-off projections excluded) and stops when the loop returns."""

    def __init__(self, device: str):
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        self.prof = {k: profile(activities=acts) for k in ("ar", "dit")}
        self.steps = {"ar": 0, "dit": 0}
        self.started = {"ar": False, "dit": False}

    def _looped(self, key: str, fn, start_after: int):
        prof = self.prof[key]

        def run(*args, callback=None, **kwargs):
            def cb(done, *rest):
                if callback is not None:
                    callback(done, *rest)
                if self.started[key]:
                    self.steps[key] += 1
                elif done == start_after:
                    prof.start()
                    self.started[key] = True
            try:
                return fn(*args, callback=cb, **kwargs)
            finally:
                if self.started[key]:
                    prof.stop()
        return run

    def attach(self, patches: "C.Patches", ar_module, denoise_module) -> None:
        # AR: callback(done, total, phase) after each token, done = 1.. ; DiT: callback(i, n, latents), i = 0..
        patches.set(ar_module, "generate_tokens", self._looped("ar", ar_module.generate_tokens, 1))
        patches.set(denoise_module, "denoise", self._looped("dit", denoise_module.denoise, 0))

    def write(self, out_dir: str, header: str) -> list:
        paths = []
        what = {"ar": "AR decode steps (one token each: decoder step + lm_head + sampler + node callback)",
                "dit": "DiT steps (packed cond+uncond sweep + CFG + Euler update + node callback)"}
        for key in ("ar", "dit"):
            path = os.path.join(out_dir, f"profile_{key}.txt")
            table = self.prof[key].key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"{header}\n{what[key]}: {self.steps[key]} steps profiled; top ops by self CPU time\n"
                        f"(per step = total / {self.steps[key]})\n\n{table}\n")
            paths.append(path)
        return paths


# --------------------------------------------------------------------------------------
# Running sides: in this process (alternating) or each in its own subprocess
# --------------------------------------------------------------------------------------

def _weight_dtype(a):
    """(torch dtype of the official pipeline, the pack loader's weight_dtype)."""
    import torch
    return {"fp32": (torch.float32, "fp32"), "bf16": (torch.bfloat16, "bf16")}[a.dtype]


def make_side(which: str, folder: str, a, work: str):
    dtype, wd = _weight_dtype(a)
    if which == "official":
        return OfficialSide(folder, a.device, dtype, work)
    return PackSide(folder, a.device, wd, os.path.join(work, "comfy_base"))


def worker(a) -> dict:
    """One side alone in this (fresh) process: imports, load, warm-up, reps. Prints JSON."""
    import torch
    which, folder = a._worker
    cuda = a.device.startswith("cuda")
    work = tempfile.mkdtemp(prefix=f"glm-bench-{which}-")
    try:
        # RSS baseline without weights: official = diffusers + transformers + the pipeline's modules;
        # pack = the ComfyUI host with all its nodes and this pack loaded (weights load lazily, on first run)
        if which == "official":
            import transformers  # noqa: F401
            from diffusers import GlmImagePipeline  # noqa: F401
            import_rss = C.current_rss_mb()
            side = make_side(which, folder, a, work)
        else:
            side = make_side(which, folder, a, work)
            import_rss = C.current_rss_mb()
        for w in range(a.warmup):
            side.run(10_000 + w, a.warmup_res or a.res, a.warmup_steps or a.steps)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = [side.run(a.seed + i, a.res, a.steps) for i in range(a.reps)]
        out = {"side": which, "runs": runs, "import_rss_mb": import_rss, "peak_rss_mb": C.peak_rss_mb()}
        if cuda:
            out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def run_worker(which: str, folder: str, a, reps: int, warmup: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", which, folder, "--device", a.device, "--dtype", a.dtype,
           "--res", str(a.res), "--steps", str(a.steps), "--threads", str(a.threads), "--seed", str(a.seed),
           "--reps", str(reps), "--warmup", str(warmup), "--size", a.size]
    if a.warmup_res:
        cmd += ["--warmup-res", str(a.warmup_res)]
    if a.warmup_steps:
        cmd += ["--warmup-steps", str(a.warmup_steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=C.ROOT)
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{which} worker failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


def in_process(folder: str, a, work: str) -> dict:
    """Both sides loaded here; warm-up; reps alternate the order. Returns {side: [run, ...]}."""
    sides = {s: make_side(s, folder, a, work) for s in SIDES}
    for k, s in enumerate(SIDES):
        for w in range(a.warmup):
            sides[s].run(10_000 + 10 * k + w, a.warmup_res or a.res, a.warmup_steps or a.steps)
    runs = {s: [] for s in SIDES}
    for i in range(a.reps):
        for s in (SIDES if i % 2 == 0 else SIDES[::-1]):
            runs[s].append(sides[s].run(a.seed + i, a.res, a.steps))
            print(f"  rep {i + 1}/{a.reps} {s}: end to end {runs[s][-1]['wall']['e2e_s']:.2f} s", file=sys.stderr)
    if a.profile:
        prof = StepProfiler(a.device)
        sides["pack"].run(20_000, a.res, a.steps, profile=prof)
        runs["_profile_paths"] = prof.write(a.out, f"pack, {a.size} checkpoint, {a.res}x{a.res}, {a.steps} steps, "
                                            f"{a.device}, {a.threads} thread(s)")
    return runs


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def summarize(runs: dict, mem: dict, a, meta: dict) -> dict:
    tables = {}
    for kind in C.TIMERS:
        stages = {}
        for key, label, unit, better in STAGES:
            row = {"label": label, "unit": unit, "better": better}
            for s in SIDES:
                vals = [r[kind][key] for r in runs[s]]
                row[s] = C.median_best(vals, better)
                row[s + "_all"] = vals
            # pack / official per rep: for a rate, the speed-up; for a time, the time ratio
            row["ratio_pack_over_official"] = C.paired_ratio(row["pack_all"], row["official_all"])
            stages[key] = row
        tables[kind] = stages
    same = [o["grid_sha"] == p["grid_sha"] for o, p in zip(runs["official"], runs["pack"])]
    return {"meta": meta, "stages": tables["wall"], "stages_cpu_time": tables["cpu"], "memory": mem,
            "tokens_equal_per_rep": same, "ar_tokens": {s: runs[s][0]["ar_tokens"] for s in SIDES}}


def _fmt(v: float, unit: str) -> str:
    if v != v:
        return "n/a"
    if unit == "tokens/s":
        return f"{v:.1f} tok/s"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def _table(stages: dict) -> list:
    out = ["| stage | official median | official best | pack median | pack best | pack / official (paired median) |",
           "|---|---|---|---|---|---|"]
    for key in STAGE_KEYS:
        r = stages[key]
        ratio = r["ratio_pack_over_official"]
        rtxt = f"{ratio:.2f}× speed-up" if r["better"] == "higher" else f"{ratio:.2f}"
        out.append(f"| {r['label']} | {_fmt(r['official']['median'], r['unit'])} | {_fmt(r['official']['best'], r['unit'])} "
                   f"| {_fmt(r['pack']['median'], r['unit'])} | {_fmt(r['pack']['best'], r['unit'])} | {rtxt} |")
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    out = [f"### {m['size']} checkpoint, {m['res']}×{m['res']} text-to-image, {m['steps']} steps, CFG {C.GUIDANCE}, "
           f"{m['device']} {m['dtype']}, {m['threads']} thread(s)", "",
           f"{m['reps']} reps per side after {m['warmup']} warm-up run(s), {m['mode']}; "
           f"{m['when']}, torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, "
           f"{m['cpus']} CPU(s), load average (1 min) {m['load_average_start']} at the start, "
           f"{m['load_average_end']} at the end.", "",
           "Wall-clock time:", ""] + _table(res["stages"])
    if not m["device"].startswith("cuda"):
        out += ["", "CPU time of the process (`time.process_time`; with 1 thread ≈ the work done, much less "
                "sensitive than wall time to other processes sharing the cores):", ""] + _table(res["stages_cpu_time"])
    mem = res["memory"]
    if mem:
        out.append("")
        if "cuda_peak_gb" in mem.get("official", {}):
            out.append(f"Peak `torch.cuda.max_memory_allocated`: official {mem['official']['cuda_peak_gb']:.1f} GB, "
                       f"pack {mem['pack']['cuda_peak_gb']:.1f} GB.")
        o, p = mem["official"], mem["pack"]
        out.append(f"Peak RSS ({mem['how']}): official {o['peak_rss_mb']:.0f} MB, pack {p['peak_rss_mb']:.0f} MB "
                   f"(before any weights: official {o['import_rss_mb']:.0f} MB with diffusers + transformers imported, "
                   f"pack {p['import_rss_mb']:.0f} MB with the ComfyUI host and its nodes loaded; "
                   f"so load + run: official {o['peak_rss_mb'] - o['import_rss_mb']:.0f} MB, "
                   f"pack {p['peak_rss_mb'] - p['import_rss_mb']:.0f} MB).")
    tk = res["ar_tokens"]
    out += ["", f"AR tokens sampled: official {tk['official']} (preview + grid + end marker), pack {tk['pack']} "
            f"(no end marker). Same seed → same grid tokens, per rep: {res['tokens_equal_per_rep']}.",
            "'best' is the minimum time (maximum rate). Ratios < 1 (times) / > 1 (speed-up) favour the pack. "
            "The machine may be shared: medians and paired ratios are more trustworthy than single runs."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size", choices=["tiny", "medium", "full"], default=None,
                    help="checkpoint size (default: medium on CPU, full on CUDA)")
    ap.add_argument("--res", type=int, default=None, help="square image size in px (default 256; 1024 on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="DiT steps (default 8; 50 on CUDA)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per side (default 5; 1 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per side first (default 1)")
    ap.add_argument("--warmup-res", type=int, default=None, help="size of the warm-up runs (default: --res)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up runs (default: --steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="weights and compute of both sides (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isolate", action="store_true",
                    help="run each side in its own subprocess, one after the other (always on CUDA)")
    ap.add_argument("--no-rss", action="store_true", help="CPU: skip the per-side peak-RSS subprocesses")
    ap.add_argument("--profile", action="store_true",
                    help="also write profile_{ar,dit}.txt to --out (torch.profiler over the pack's AR / DiT steps)")
    ap.add_argument("--out", default=RESULTS, help="folder for latest.md / latest.json (default bench/results)")
    ap.add_argument("--folder", default=None,
                    help="an existing GLM-Image checkpoint folder to use instead of writing one (--size then only "
                         "labels the report)")
    ap.add_argument("--keep-checkpoint", action="store_true",
                    help="--size full: keep the written folder (its path is printed) for a later --folder run")
    ap.add_argument("--_worker", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    cuda = a.device.startswith("cuda")
    a.size = a.size or ("full" if cuda else "medium")
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.res = a.res or (1024 if cuda else 256)
    a.steps = a.steps or (50 if cuda else 8)
    a.reps = a.reps if a.reps is not None else (1 if cuda else 5)
    if cuda and a.warmup_res is None and a.res > 256:
        a.warmup_res, a.warmup_steps = 256, a.warmup_steps or 2    # warm kernels cheaply: one full run is ~1 min
    if a.res % 32 or a.res < 256:
        ap.error("--res must be a multiple of 32, at least 256 (the nodes' range)")
    if a.size == "full" and not cuda:
        ap.error("--size full needs --device cuda (the real model in fp32 needs ~70 GB of RAM)")
    if a.profile and (a.isolate or cuda):
        ap.error("--profile runs in-process (CPU without --isolate)")

    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    if a._worker:
        print(json.dumps(worker(a)))
        return 0
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")

    os.makedirs(a.out, exist_ok=True)
    tmp = None
    if a.folder:
        folder = os.path.abspath(a.folder)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            ap.error(f"--folder {a.folder}: no model_index.json there (not a GLM-Image checkpoint folder)")
    elif a.size == "full":
        from glm_image_core.testing.tiny_checkpoint import write_checkpoint
        # on the checkout's disk (/tmp may be a RAM disk): ~35 GB, removed at the end
        os.makedirs(os.path.join(C.ROOT, ".cache"), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="glm-bench-full-", dir=os.path.join(C.ROOT, ".cache"))
        t = time.perf_counter()
        folder = write_checkpoint(os.path.join(tmp, "GLM-Image-full"), "full", seed=0,
                                  max_shard_bytes=5 * 1024 ** 3, dtype=_weight_dtype(a)[0], device=a.device)
        torch.cuda.empty_cache()
        print(f"wrote the full-size random {a.dtype} checkpoint to {folder} in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
        if a.keep_checkpoint:
            tmp = None
    else:
        folder = C.cached_checkpoint(a.size)

    isolate = a.isolate or cuda
    dtype, _ = _weight_dtype(a)
    meta = {"size": a.size, "folder": folder, "res": a.res, "steps": a.steps, "reps": a.reps, "warmup": a.warmup,
            "threads": a.threads, "device": a.device if not cuda else f"{a.device} ({torch.cuda.get_device_name()})",
            "dtype": str(dtype).replace("torch.", ""), "seed": a.seed, "cpus": os.cpu_count(),
            "torch": torch.__version__, "diffusers": _version("diffusers"), "transformers": _version("transformers"),
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_start": round(os.getloadavg()[0], 2),
            "mode": ("each side in its own subprocess, one after the other" if isolate
                     else "both sides in one process, alternating")}
    work = tempfile.mkdtemp(prefix="glm-bench-")
    try:
        mem = {}
        if isolate:
            w = {s: run_worker(s, folder, a, a.reps, a.warmup) for s in SIDES}
            runs = {s: w[s]["runs"] for s in SIDES}
            mem = {s: {k: v for k, v in w[s].items() if k not in ("runs", "side")} for s in SIDES}
            mem["how"] = "each side's own process: imports, load, warm-up, reps"
        else:
            runs = in_process(folder, a, work)
            if not a.no_rss:
                mem = {s: {k: v for k, v in run_worker(s, folder, a, 1, 0).items() if k not in ("runs", "side")}
                       for s in SIDES}
                mem["how"] = "each side alone in a fresh process: imports, load, one run"
        meta["load_average_end"] = round(os.getloadavg()[0], 2)
        profiles = runs.pop("_profile_paths", None)
        res = summarize(runs, mem, a, meta)
        res["command"] = "bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if profiles:
            res["profiles"] = [os.path.relpath(p, C.ROOT) for p in profiles]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    md = markdown(res)
    print(md)
    with open(os.path.join(a.out, "latest.md"), "w", encoding="utf-8") as f:
        f.write(f"Command: `{res['command'].strip()}`\n\n{md}")
    with open(os.path.join(a.out, "latest.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    return 0


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
