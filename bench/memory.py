"""GLM-Image device-memory plan (and, on a CUDA GPU, its measurement) for a text-to-image run under
ComfyUI's model management.

    .venv/bin/python bench/memory.py                      # the plan (any machine): tables + JSON
    .venv/bin/python bench/memory.py --execute            # + run the stages with random full-size weights
    .venv/bin/python bench/memory.py --size tiny --execute --device cpu   # the execute path, tiny, on CPU

The plan builds the full-size networks (real GLM-Image configs, glm_image_core.loading.memory_plan) on the
meta device, counts their parameters, and adds the activation estimates of each stage: the AR's
text part with its KV cache (an edit first loads the AR's vision part alone to tokenise a
reference), the glyph encoder, one DiT step with CFG (cond + uncond in one sweep) and the VAE decode, for AR/DiT weights in bf16 and in fp8 (the loader's fp8 rule), loaded whole or
partially (lowvram: only the layers in flight on the device). ComfyUI evicts each stage before the
next when the card is short, so the run's peak is the largest stage.

--execute runs each stage with random weights through ComfyUI's own machinery (ModelPatcher,
comfy.ops, load_models_gpu with the same memory_required the nodes pass) and records
torch.cuda.max_memory_allocated per stage and the time; then it reruns the whole chain with the
card limited to a few sizes (ComfyUI is told to keep the rest free, its --reserve-vram mechanism),
so ComfyUI itself evicts and partially loads. The AR decodes only --ar-steps tokens (the KV cache
is allocated for the whole grid up front, so memory is the same); its time is extrapolated.

Output: Markdown on stdout and in bench/results/memory.md, everything in bench/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from glm_image_core.loading import memory_plan as mp  # noqa: E402
from glm_image_core.loading.registry import NETWORKS  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
TINY = os.path.join(ROOT, ".cache", "models", "diffusers", "GLM-Image-tiny")
PROMPT = 'A photo of a cat holding a sign that says "hello", ' * 6        # ~300 bytes
CARDS_GIB = (8, 10, 12, 16, 24, 32, 48, 80)


def configs_of(size: str) -> dict:
    if size == "full":
        return mp.full_size_configs()
    from glm_image_core.testing.tiny_checkpoint import configs_for
    files = configs_for(size)
    return {c: files[NETWORKS[c].config_file] for c in mp.NETWORK_IDS}


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

def md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def sizes_table(stats) -> str:
    rows = []
    for c in mp.NETWORK_IDS[:1] + (mp.AR_TEXT, mp.AR_VISION) + mp.NETWORK_IDS[1:]:
        s = stats[c]
        comp = "bf16" if s.fp8able else "bf16 (stays bf16)"
        rows.append([mp.COMPONENT_NAMES[c], f"{s.total / 1e9:.3f} B", f"{s.fp8able / max(s.total, 1):.0%}",
                     mp.gib(s.bytes("fp32")), mp.gib(s.bytes("bf16")), mp.gib(s.bytes("fp16")),
                     mp.gib(s.bytes("fp8")) if s.fp8able else comp,
                     f"{s.largest_layer_name} ({s.largest_layer / 1e6:.1f} M)",
                     f"{s.unused_in_t2i / 1e9:.2f} B" if s.unused_in_t2i else "–"])
    return md_table(["component", "parameters", "fp8-able", "fp32 GiB", "bf16 GiB", "fp16 GiB", "fp8 GiB",
                     "largest streamed layer", "unused by t2i"], rows)


STAGE_HEAD = ["weights", "stage", "stored as", "weights GiB", "activations GiB", "cast copy GiB",
              "peak (whole) GiB", "peak (lowvram) GiB", "card for whole load GiB"]


def stage_row(wd: str, s) -> list:
    return [wd, s.name, s.weight_dtype, mp.gib(s.weights), mp.gib(s.activations), mp.gib(s.cast_buffer),
            mp.gib(s.full), mp.gib(s.lowvram()), mp.gib(s.card_full())]


def plan_table(plans) -> str:
    rows = []
    for wd, plan in plans.items():
        rows += [stage_row(wd, s) for s in plan.stages]
        rows.append([wd, "**run peak**", "", "", "", "", f"**{mp.gib(plan.peak_full)}**",
                     f"**{mp.gib(plan.peak_lowvram())}**", f"**{mp.gib(plan.card_full)}**"])
    return md_table(STAGE_HEAD, rows)


def vision_stage_table(edit_plans) -> str:
    """The first stage of each edit plan: the AR's vision part tokenising the reference."""
    return md_table(STAGE_HEAD, [stage_row(wd, plan.stages[0]) for wd, plan in edit_plans.items()])


def cards_table(plans) -> str:
    return md_table(["GPU memory", "settings that work (planned)"],
                    [[f"{g} GB", mp.settings_for_card(plans, g)] for g in CARDS_GIB])


# --------------------------------------------------------------------------------------
# Execution (ComfyUI model management, random weights)
# --------------------------------------------------------------------------------------

def comfy_host(device: str):
    """Import the ComfyUI host (.host/ComfyUI) with the device policy asked for."""
    comfy_dir = os.environ.get("COMFYUI_DIR", os.path.join(ROOT, ".host", "ComfyUI"))
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    import comfy.model_management as mm
    return mm


def build_random(component: str, config: dict, weight_dtype: str, compute: torch.dtype, device, seed: int = 0):
    """The network with comfy.ops layers and random weights (std 0.02, norms 1) stored per the
    loader's rule for ``weight_dtype`` (fp8: the registry entry's fp8_keys in float8_e4m3fn, the rest in compute).
    The AR is its text part, the network the nodes load for text → tokens."""
    import comfy.ops
    from glm_image_core.loading import checkpoint as ckpt
    fp8 = weight_dtype == "fp8" and NETWORKS[component].fp8_keys is not None
    storage = torch.float8_e4m3fn if fp8 else compute
    ops = comfy.ops.pick_operations(storage, compute, load_device=torch.device(device))
    parts = {"parts": ("text",)} if component == mp.AR else {}
    model = NETWORKS[component].skeleton(config, dtype=compute, device="meta", operations=ops, **parts)
    model.to_empty(device=device)
    rule = ckpt.storage_dtypes(storage, NETWORKS[component].fp8_keys, compute) if fp8 else None
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
            want = rule(name, p) if rule is not None else None
            if want is not None and want != p.dtype:
                p.data = p.data.to(want)
    return model.train(False).requires_grad_(False)


class _StopAR(Exception):
    pass


class Runner:
    """Runs the four stages of a t2i under ComfyUI's model management and measures them."""

    def __init__(self, mm, configs, weight_dtype: str, device: str, width: int, height: int, steps: int,
                 ar_steps: int, glyph_text: str):
        import comfy.model_patcher
        from glm_image_core.generation.ar_prompt import GlmTokenizer
        from glm_image_core.generation.glyph_text import load_glyph_tokenizer
        self.mm, self.configs, self.wd = mm, configs, weight_dtype
        self.load_device = mm.get_torch_device()
        self.offload = mm.unet_offload_device() if device != "cpu" else torch.device("cpu")
        self.compute = torch.bfloat16 if weight_dtype in ("bf16", "fp8") else mp_dtype(weight_dtype)
        self.width, self.height, self.steps, self.ar_steps, self.glyph_text = width, height, steps, ar_steps, glyph_text
        self.tokenizer = GlmTokenizer.from_folder(os.path.join(TINY, "processor"))
        self.byt5 = load_glyph_tokenizer(None)
        self.patchers = {}
        build_dev = self.load_device if self.load_device.type == "cuda" else "cpu"
        for c in mp.NETWORK_IDS:
            model = build_random(c, configs[c], weight_dtype, self.compute, build_dev).to(self.offload)
            self.patchers[c] = comfy.model_patcher.ModelPatcher(model, load_device=self.load_device,
                                                                offload_device=self.offload)
        if self.load_device.type == "cuda":
            torch.cuda.empty_cache()

    def _measure(self, fn):
        cuda = self.load_device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return out, dt, (torch.cuda.max_memory_allocated() if cuda else None)

    def _load(self, c, memory_required):
        p = self.patchers[c]
        self.mm.load_models_gpu([p], memory_required=memory_required)
        return p.model, {"loaded": p.loaded_size(), "size": p.model_size()}

    def run(self, evict_each: bool) -> dict:
        from glm_image_core.generation import ar_generate, denoise
        from glm_image_core.generation.glyph_text import encode_glyph_texts
        from glm_image_core.generation.tokens import upsample_grid
        mm, W, H, cb = self.mm, self.width, self.height, self.compute.itemsize
        dev = self.load_device
        out = {}

        def stage(name, fn):
            if evict_each:
                mm.unload_all_models()
                mm.soft_empty_cache()
            res, dt, peak = self._measure(fn)
            out[name]["seconds"] = dt
            out[name]["max_memory_allocated"] = peak
            return res

        # AR: KV cache for the whole grid; stopped after ar_steps tokens (memory is set by then)
        tcfg = self.configs["ar"]["text_config"]
        n_prompt = len(self.tokenizer.encode(PROMPT))
        req = mp.ar_activation_bytes(tcfg, n_prompt, W, H, 1, cb)
        out["ar"] = {"memory_required": req}
        _, n_gen = mp.ar_sequence(n_prompt, W, H)
        done = {"n": 0}

        def ar():
            model, info = self._load("ar", req)
            out["ar"].update(info)

            def cb_(i, total, phase):
                done["n"] = i
                if i >= self.ar_steps:
                    raise _StopAR()
            t = time.perf_counter()
            try:
                ar_generate.generate_tokens(model, self.tokenizer, PROMPT, W, H, seed=0, callback=cb_,
                                            device=dev, dtype=self.compute)
            except _StopAR:
                pass
            return time.perf_counter() - t
        ar_t = stage("ar", ar)
        out["ar"]["tokens_run"] = done["n"]
        out["ar"]["seconds_extrapolated"] = ar_t * n_gen / max(done["n"], 1)

        # glyph encoder
        out["glyph"] = {"memory_required": 0}

        def glyph():
            model, info = self._load("glyph_encoder", 0)
            out["glyph"].update(info)
            with torch.no_grad():
                cond = encode_glyph_texts(model, self.byt5, [self.glyph_text], device=dev, dtype=self.compute)
                unc = encode_glyph_texts(model, self.byt5, [""], device=dev, dtype=self.compute)
            return cond, unc
        cond, unc = stage("glyph", glyph)

        # DiT: `steps` CFG steps (cond + uncond in one sweep)
        req = mp.dit_activation_bytes(self.configs["dit"], W, H, max(cond.shape[1], unc.shape[1]), 1, 2, cb)
        out["dit"] = {"memory_required": req}

        def dit():
            model, info = self._load("dit", req)
            out["dit"].update(info)
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(1, 16, H // 8, W // 8, generator=g).to(dev)
            grid = torch.randint(0, 16384, (1, H // 32, W // 32), generator=g)
            with torch.no_grad():
                return denoise.denoise(model, noise, upsample_grid(grid).to(dev), cond, unc, (H, W), self.steps, 1.5,
                                       {"use_dynamic_shifting": True, "base_shift": 0.25, "max_shift": 0.75},
                                       compute_dtype=self.compute)
        lat = stage("dit", dit)
        out["dit"]["seconds_per_step"] = out["dit"]["seconds"] / self.steps

        # VAE decode
        req = mp.vae_decode_activation_bytes(self.configs["vae"], W, H, 1, cb)
        out["vae"] = {"memory_required": req}

        def vae():
            model, info = self._load("vae", req)
            out["vae"].update(info)
            with torch.no_grad():
                return model.decode(lat.to(self.compute)).float().cpu()
        img = stage("vae", vae)
        out["image_finite"] = bool(torch.isfinite(img).all())
        return out


def mp_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def execute(args, configs) -> dict:
    mm = comfy_host(args.device)
    results = {"device": str(mm.get_torch_device()), "runs": []}
    if mm.get_torch_device().type == "cuda":
        results["device_name"] = torch.cuda.get_device_name()
        results["total_vram"] = mm.get_total_memory(mm.get_torch_device())
    for wd in args.weights:
        runner = Runner(mm, configs, wd, args.device, args.width, args.height, args.steps, args.ar_steps,
                        "hello")
        t = time.perf_counter()
        per_stage = runner.run(evict_each=True)
        results["runs"].append({"weights": wd, "card": None, "stages": per_stage,
                                "wall_seconds": time.perf_counter() - t})
        print(f"[memory] {wd}, stages alone: " + json.dumps(per_stage), flush=True)
        if mm.get_torch_device().type == "cuda":
            total = mm.get_total_memory(mm.get_torch_device())
            default_reserve = mm.EXTRA_RESERVED_VRAM
            for card in args.cards:
                # ComfyUI believes only `card` GiB exist: it keeps the rest free (--reserve-vram)
                mm.EXTRA_RESERVED_VRAM = int(max(total - card * mp.GIB, 0) + default_reserve)
                mm.unload_all_models()
                mm.soft_empty_cache()
                t = time.perf_counter()
                try:
                    chain = runner.run(evict_each=False)
                    err = None
                except torch.cuda.OutOfMemoryError as e:
                    chain, err = None, f"OOM: {e}"[:300]
                results["runs"].append({"weights": wd, "card": card, "stages": chain, "error": err,
                                        "wall_seconds": time.perf_counter() - t})
                print(f"[memory] {wd}, card {card} GiB: " + json.dumps(chain or err), flush=True)
            mm.EXTRA_RESERVED_VRAM = default_reserve
        mm.unload_all_models()
        del runner
        mm.soft_empty_cache()
    return results


def measured_table(results) -> str:
    rows = []
    for r in results["runs"]:
        st = r.get("stages")
        if not st:
            rows.append([r["weights"], f"{r['card']} GiB" if r["card"] else "alone", r.get("error") or ""] + [""] * 4)
            continue
        cells = []
        for k in ("ar", "glyph", "dit", "vae"):
            peak = st[k].get("max_memory_allocated")
            frac = st[k]["loaded"] / max(st[k]["size"], 1)
            cells.append(f"{mp.gib(peak)} ({frac:.0%} loaded)" if peak is not None else f"– ({frac:.0%} loaded)")
        e2e = st["ar"]["seconds_extrapolated"] + st["glyph"]["seconds"] + st["dit"]["seconds_per_step"] * 50 \
            + st["vae"]["seconds"]
        rows.append([r["weights"], f"{r['card']} GiB" if r["card"] else "alone"] + cells + [f"{e2e:.1f}"])
    return md_table(["weights", "card limit", "AR GiB", "glyph GiB", "DiT GiB", "VAE GiB",
                     "t2i seconds (50 steps, AR extrapolated)"], rows)


# --------------------------------------------------------------------------------------
# CPU check of the activation estimates (peak RSS of a fresh process, fp32, reduced sizes)
# --------------------------------------------------------------------------------------

CPU_CHECKS = {            # stage -> (pixels, what is reduced to keep it to seconds on a CPU)
    "ar": (1024, "2 of 40 decoder layers, 1 of 40 ViT blocks; prefill + 4 tokens"),
    "dit": (512, "1 of 30 blocks; one CFG step"),
    "vae": (256, "whole decoder"),
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:       # 5: reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def cpu_check_one(stage: str) -> dict:
    """Run one reduced full-width stage in fp32 on the CPU after a warm-up call; the rise of the
    process's peak RSS over the call vs this stage's activation estimate."""
    import copy
    torch.set_grad_enabled(False)
    px = CPU_CHECKS[stage][0]
    cf = copy.deepcopy(mp.full_size_configs())
    g = torch.Generator().manual_seed(0)

    def random_model(component, config):
        m = NETWORKS[component].skeleton(config, device="cpu")
        for p in m.parameters():
            p.normal_(0.0, 0.02, generator=g)
        return m

    if stage == "ar":
        from glm_image_core.generation import ar_generate
        from glm_image_core.generation.ar_prompt import GlmTokenizer
        cfg = cf["ar"]
        cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["depth"] = 2, 1
        model = random_model("ar", cfg)
        tok = GlmTokenizer.from_folder(os.path.join(TINY, "processor"))

        def stop_after(k):
            def cb(i, total, phase):
                if i >= k:
                    raise _StopAR()
            return cb

        def run(prompt, size):
            try:
                ar_generate.generate_tokens(model, tok, prompt, size, size, 0, callback=stop_after(4))
            except _StopAR:
                pass
        run("x", 64)
        estimate = mp.ar_activation_bytes(cfg["text_config"], len(tok.encode(PROMPT)), px, px, 1, 4)
        call = lambda: run(PROMPT, px)                                          # noqa: E731
    elif stage == "dit":
        from glm_image_core.generation import denoise
        from glm_image_core.generation.tokens import upsample_grid
        cfg = dict(cf["dit"], num_layers=1)
        model = random_model("dit", cfg)
        L = 129
        cond, unc = torch.randn(1, L, 1472, generator=g), torch.randn(1, L, 1472, generator=g)
        sched = {"use_dynamic_shifting": True, "base_shift": 0.25, "max_shift": 0.75}

        def run(size, ctx):
            noise = torch.randn(1, 16, size // 8, size // 8, generator=g)
            grid = torch.randint(0, 16384, (1, size // 32, size // 32), generator=g)
            denoise.denoise(model, noise, upsample_grid(grid), cond[:, :ctx], unc[:, :ctx], (size, size), 1, 1.5, sched)
        run(64, 3)
        estimate = mp.dit_activation_bytes(cfg, px, px, L, 1, 2, 4)
        call = lambda: run(px, L)                                                # noqa: E731
    else:
        model = random_model("vae", cf["vae"])
        model.decode(torch.randn(1, 16, 4, 4, generator=g))
        estimate = mp.vae_decode_activation_bytes(cf["vae"], px, px, 1, 4)
        z = torch.randn(1, 16, px // 8, px // 8, generator=g)
        call = lambda: model.decode(z)                                           # noqa: E731
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    t = time.perf_counter()
    call()
    seconds = time.perf_counter() - t
    measured = _status_bytes("VmHWM") - base
    return {"stage": stage, "pixels": px, "reduced": CPU_CHECKS[stage][1], "estimate": estimate,
            "measured_peak_rss_rise": measured, "ratio": measured / estimate, "seconds": seconds}


def cpu_check() -> list:
    import subprocess
    out = []
    for stage in CPU_CHECKS:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-check-stage", stage],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"CPU check of {stage} failed:\n{r.stderr[-2000:]}")
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"[memory] CPU check {stage}: " + out[-1]["reduced"] + f": estimate {out[-1]['estimate'] / mp.MIB:.0f} MiB, "
              f"peak RSS +{out[-1]['measured_peak_rss_rise'] / mp.MIB:.0f} MiB", file=sys.stderr, flush=True)
    return out


def cpu_check_table(rows) -> str:
    return md_table(["stage", "size", "reduced to", "estimate MiB (fp32)", "measured peak RSS rise MiB", "ratio"],
                    [[r["stage"], f"{r['pixels']}²", r["reduced"], f"{r['estimate'] / mp.MIB:.0f}",
                      f"{r['measured_peak_rss_rise'] / mp.MIB:.0f}", f"{r['ratio']:.2f}"] for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="full", choices=["full", "medium", "tiny"])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=256, help="AR prompt length planned for")
    ap.add_argument("--glyph-tokens", type=int, default=128, help="ByT5 bytes of the quoted text planned for")
    ap.add_argument("--execute", action="store_true", help="run the stages (default: when CUDA is available)")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--weights", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8", "fp32"])
    ap.add_argument("--cards", nargs="*", type=float, default=[24, 16, 12], help="card sizes (GiB) to simulate")
    ap.add_argument("--steps", type=int, default=2, help="DiT steps run per measurement")
    ap.add_argument("--ar-steps", type=int, default=16, help="AR tokens decoded per measurement")
    ap.add_argument("--cpu-check", action="store_true",
                    help="also measure the activation estimates on the CPU (reduced full-width stages, ~1-3 min)")
    ap.add_argument("--cpu-check-stage", choices=list(CPU_CHECKS), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(RESULTS, "memory.json"))
    ap.add_argument("--markdown", default=os.path.join(RESULTS, "memory.md"))
    args = ap.parse_args(argv)
    if args.cpu_check_stage:                      # one check, in its own process (clean peak RSS)
        print(json.dumps(cpu_check_one(args.cpu_check_stage)))
        return 0

    configs = configs_of(args.size)
    stats = mp.component_stats(configs)
    plans = {wd: mp.plan_run(configs, stats, wd, args.width, args.height, args.prompt_tokens, args.glyph_tokens)
             for wd in ("bf16", "fp8")}
    edit_plans = {wd: mp.plan_run(configs, stats, wd, args.width, args.height, args.prompt_tokens, args.glyph_tokens,
                                  reference=(args.width, args.height)) for wd in ("bf16", "fp8")}
    md = [f"# GLM-Image device memory plan ({args.size} size, {args.width}×{args.height} text-to-image)", "",
          "Planned figures (glm_image_core/loading/memory_plan.py), not measurements. GiB = 2^30 bytes. "
          "'card for whole load' adds ComfyUI's free-memory reserve and ~0.5 GiB CUDA context.", "",
          "## Parameters per component", "", sizes_table(stats), "",
          "## Stages (ComfyUI evicts each stage before the next; lowvram = only layers in flight on the device)", "",
          plan_table(plans), "",
          "## Reference Edit: the AR's vision part (loaded only to tokenise a reference; the other stages as above)",
          "", vision_stage_table(edit_plans), "",
          "## GPU memory → settings", "", cards_table(plans), ""]
    out = {"size": args.size, "width": args.width, "height": args.height, "torch": torch.__version__,
           "machine": platform.machine(), "configs": configs,
           "parameters": {c: vars(s) | {"total": s.total, "bytes": {d: s.bytes(d) for d in mp.DTYPE_BYTES}}
                          for c, s in stats.items()},
           "plans": {wd: p.to_dict() for wd, p in plans.items()},
           "edit_plans": {wd: p.to_dict() for wd, p in edit_plans.items()},
           "cards": {str(g): mp.settings_for_card(plans, g) for g in CARDS_GIB}}

    rows, when = None, ""
    if args.cpu_check:
        rows = cpu_check()
    elif os.path.isfile(args.json):               # keep the last CPU check (it takes minutes) in the report
        try:
            with open(args.json, encoding="utf-8") as f:
                rows = json.load(f).get("cpu_check")
            when = " (from an earlier --cpu-check run)"
        except (OSError, ValueError):
            rows = None
    if rows:
        out["cpu_check"] = rows
        md += [f"## Activation estimates checked on a CPU{when} (fp32, fresh process, after a warm-up call)", "",
               cpu_check_table(rows), ""]
    execute_now = (args.execute or args.device == "cuda") and not args.plan_only
    if execute_now:
        if args.device == "cpu" and args.size == "full":
            print("[memory] --execute on the CPU runs only small configs (--size tiny/medium)", file=sys.stderr)
            return 2
        if not os.path.isdir(os.path.join(TINY, "processor")):
            print(f"[memory] --execute needs the tiny checkpoint's tokenizer at {TINY} (make tiny)", file=sys.stderr)
            return 2
        res = execute(args, configs)
        out["measured"] = res
        md += [f"## Measured on {res.get('device_name', res['device'])} (random weights, "
               f"torch.cuda.max_memory_allocated per stage)", "", measured_table(res), ""]
    text = "\n".join(md)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, default=str)
    with open(args.markdown, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"[memory] wrote {os.path.relpath(args.json, ROOT)} and {os.path.relpath(args.markdown, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
