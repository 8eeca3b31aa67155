#!/usr/bin/env python
"""DiT benchmark: this pack's GLM-Image DiT + sampler vs diffusers, same weights, same process.

Writes the random-weight "medium" checkpoint (tiny_checkpoint.write_checkpoint) to a temp dir,
then times, alternating implementation each repetition:

* one CFG step (cond + uncond DiT pass + guidance + Euler update), the way each sampler runs it:
  diffusers = two ``GlmImageTransformer2DModel`` calls as in ``GlmImagePipeline.__call__``;
  ours = ``denoise``'s step body (one packed sweep over both passes, step-invariant projections
  precomputed) and, for information, ours with the two passes run one after the other;
* the whole N-step decode from prompt to latents: ``GlmImagePipeline(prior_token_ids=..., latents=...,
  output_type="latent")`` (glyph encoding + DiT loop; no AR, no VAE) vs our glyph encoder + ``denoise``;

reports median / min and the ratio ours / diffusers, checks the two decodes agree, and measures
peak RSS of each implementation in a fresh subprocess. Prints a Markdown table.

Usage: python bench/bench_dit.py [--reps 7] [--size 256] [--steps 8] [--threads N] [--config medium]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import GUIDANCE, PROMPT, ROOT, current_rss_mb, peak_rss_mb, timed  # noqa: E402
from glm_image_core.loading.registry import NETWORKS  # noqa: E402


def _inputs(size: int):
    import torch
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, size // 8, size // 8, generator=g)
    ids = torch.randint(0, 16384, (1, (size // 16) ** 2), generator=g)
    return latents, ids


def load_diffusers(folder: str):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from glmtest_oracle import realign
    from transformers import ByT5Tokenizer, T5EncoderModel
    tr = realign(GlmImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32))
    te = realign(T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32))
    tok = ByT5Tokenizer.from_pretrained(folder, subfolder="tokenizer")
    sc = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = GlmImagePipeline(tokenizer=tok, processor=None, text_encoder=te, vision_language_encoder=None, vae=None,
                            transformer=tr.eval(), scheduler=sc)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_ours(folder: str):

    from glm_image_core.generation.glyph_text import load_glyph_tokenizer
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    return dict(dit=NETWORKS["dit"].load(os.path.join(folder, "transformer")),
                enc=NETWORKS["glyph_encoder"].load(os.path.join(folder, "text_encoder")),
                tok=load_glyph_tokenizer(os.path.join(folder, "tokenizer")), sched=sched)


def decode_diffusers(pipe, latents, ids, size, steps):
    return pipe(prompt=PROMPT, prior_token_ids=ids, latents=latents.clone(), height=size, width=size,
                num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="latent").images


def decode_ours(o, latents, ids, size, steps, packed=True):
    import torch
    from glm_image_core.generation.denoise import denoise
    from glm_image_core.generation.glyph_text import glyph_for_prompt, uncond_glyph
    c = glyph_for_prompt(o["enc"], o["tok"], PROMPT, "cpu", torch.float32)
    u = uncond_glyph(o["enc"], o["tok"], "cpu", torch.float32)
    return denoise(o["dit"], latents.clone(), ids, c, u, (size, size), steps, GUIDANCE, o["sched"], packed_cfg=packed)


def step_fns(pipe, o, latents, ids, size):
    """Closures running one CFG step for each implementation (inputs prepared as each sampler does)."""
    import torch
    from glm_image_core.generation.glyph_text import glyph_for_prompt, uncond_glyph
    dev = torch.device("cpu")
    pe, ne = pipe.encode_prompt(PROMPT, True, device=dev, dtype=torch.float32)
    tr = pipe.transformer
    t = torch.tensor(999.0)
    target = torch.tensor([[size, size]], dtype=torch.float32)
    crop = torch.zeros(1, 2)
    d_c = torch.zeros_like(ids, dtype=torch.bool)
    d_u = torch.ones_like(ids, dtype=torch.bool)
    dt = torch.tensor(-0.1)

    def ref_step():
        x = latents.to(tr.dtype)
        ts = t.expand(1) - 1
        c = tr(hidden_states=x, encoder_hidden_states=pe, prior_token_id=ids, prior_token_drop=d_c, timestep=ts,
               target_size=target, crop_coords=crop, return_dict=False)[0].float()
        u = tr(hidden_states=x, encoder_hidden_states=ne, prior_token_id=ids, prior_token_drop=d_u, timestep=ts,
               target_size=target, crop_coords=crop, return_dict=False)[0].float()
        v = u + GUIDANCE * (c - u)
        return latents + dt * v

    dit = o["dit"]
    gc = glyph_for_prompt(o["enc"], o["tok"], PROMPT, "cpu", torch.float32)
    gu = uncond_glyph(o["enc"], o["tok"], "cpu", torch.float32)
    ctx_c, ctx_u = dit.project_glyph(gc), dit.project_glyph(gu)
    pr_c, pr_u = dit.project_prior(ids, False), dit.project_prior(ids, True)
    priors = torch.stack([pr_c, pr_u])

    def our_step(packed=True):
        x = latents.to(dit.compute_dtype)
        temb = dit.time_embed(t.expand(1) - 1, target, crop)
        if packed:
            c, u = dit.forward_multi(x, [ctx_c, ctx_u], priors, temb)
        else:
            c = dit.forward_multi(x, [ctx_c], [pr_c], temb)[0]
            u = dit.forward_multi(x, [ctx_u], [pr_u], temb)[0]
        c, u = c.float(), u.float()
        v = u + GUIDANCE * (c - u)
        return latents + dt * v

    return ref_step, our_step, lambda: our_step(False)


def rss_child(impl: str, folder: str, size: int, steps: int) -> None:
    """Fresh process: RSS after imports, after loading, and peak after one decode (MB)."""
    import torch
    if impl == "diffusers":
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    else:
        import glm_image_core.generation.denoise  # noqa: F401
    base = current_rss_mb()
    latents, ids = _inputs(size)
    with torch.inference_mode():
        m = load_diffusers(folder) if impl == "diffusers" else load_ours(folder)
        loaded = current_rss_mb()
        (decode_diffusers if impl == "diffusers" else decode_ours)(m, latents, ids, size, steps)
    print(json.dumps({"impl": impl, "imports_mb": base, "loaded_mb": loaded, "peak_mb": peak_rss_mb()}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--config", default="medium", choices=["tiny", "medium"])
    ap.add_argument("--folder", default=None, help="use an existing checkpoint folder instead of writing one")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-implementation RSS subprocesses")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.size % 32:
        ap.error("--size must be a multiple of 32")
    if a.rss_child:
        rss_child(a.rss_child, a.folder, a.size, a.steps)
        return 0

    tmp = None
    folder = a.folder
    if folder is None:
        from glm_image_core.testing.tiny_checkpoint import write_checkpoint
        tmp = tempfile.TemporaryDirectory(prefix="glm_bench_")
        folder = write_checkpoint(os.path.join(tmp.name, f"GLM-Image-{a.config}"), a.config, seed=0)

    latents, ids = _inputs(a.size)
    pipe, ours = load_diffusers(folder), load_ours(folder)
    res = {k: [] for k in ("ref_step", "our_step", "our_step_unpacked", "ref_decode", "our_decode")}
    with torch.inference_mode():
        ref_step, our_step, our_step_unpacked = step_fns(pipe, ours, latents, ids, a.size)
        s_ref, s_our = ref_step(), our_step()                   # warm-up + step agreement
        step_diff = (s_ref - s_our).abs().max().item()
        our_step_unpacked()
        for _ in range(a.reps):
            for key, fn in (("ref_step", ref_step), ("our_step", our_step), ("our_step_unpacked", our_step_unpacked)):
                res[key].append(timed(fn)[0])
        d_ref = decode_diffusers(pipe, latents, ids, a.size, a.steps)
        d_our = decode_ours(ours, latents, ids, a.size, a.steps)
        decode_diff = (d_ref - d_our).abs().max().item()
        for _ in range(max(3, a.reps // 2)):
            res["ref_decode"].append(timed(lambda: decode_diffusers(pipe, latents, ids, a.size, a.steps))[0])
            res["our_decode"].append(timed(lambda: decode_ours(ours, latents, ids, a.size, a.steps))[0])
    shared_peak = peak_rss_mb()
    from glm_image_core.generation.glyph_text import glyph_for_prompt
    glyph_len = glyph_for_prompt(ours["enc"], ours["tok"], PROMPT).shape[1]

    rss = {}
    if not a.no_rss:
        for impl in ("diffusers", "ours"):
            cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", impl, "--folder", folder,
                   "--size", str(a.size), "--steps", str(a.steps)] + (["--threads", str(a.threads)] if a.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rss[impl] = json.loads(out.stdout.strip().splitlines()[-1])

    med = {k: statistics.median(v) for k, v in res.items()}
    mn = {k: min(v) for k, v in res.items()}
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    print(f"\n## GLM-Image DiT benchmark ({a.config} config, {a.size}x{a.size}, {a.steps} steps, CFG {GUIDANCE})\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s); "
          f"{a.reps} alternating reps for the step, {len(res['ref_decode'])} for the decode; "
          f"glyph tokens: cond {glyph_len}, uncond 1 (unequal, so diffusers cannot batch the two passes)")
    print()
    print("| measurement | diffusers median | ours median | ratio (median) | diffusers min | ours min | ratio (min) |")
    print("|---|---|---|---|---|---|---|")
    rows = [("one CFG step (cond+uncond)", "ref_step", "our_step"),
            ("one CFG step, ours unpacked (2 sweeps)", "ref_step", "our_step_unpacked"),
            (f"whole {a.steps}-step decode (glyph + loop)", "ref_decode", "our_decode")]
    for name, r, o in rows:
        print(f"| {name} | {ms(med[r])} | {ms(med[o])} | {med[o] / med[r]:.3f} | {ms(mn[r])} | {ms(mn[o])} | "
              f"{mn[o] / mn[r]:.3f} |")
    print()
    print(f"Agreement: one step max |diff| = {step_diff:.2e}; whole decode max |diff| = {decode_diff:.2e}")
    if rss:
        print()
        print("| peak RSS (fresh process) | after imports | after load | peak after decode |")
        print("|---|---|---|---|")
        for impl in ("diffusers", "ours"):
            r = rss[impl]
            print(f"| {impl} | {r['imports_mb']:.0f} MB | {r['loaded_mb']:.0f} MB | {r['peak_mb']:.0f} MB |")
    print(f"\n(peak RSS of this benchmark process with both implementations loaded: {shared_peak:.0f} MB)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
