"""VAE timings on CPU: our GlmImageVAE vs diffusers AutoencoderKL on the same weights, and the cost
of the lazy latent-preview fit.

    OMP_NUM_THREADS=8 .venv/bin/python bench/bench_vae.py [--size medium] [--px 256] [--full-fit]

--full-fit also builds the real-size GLM-Image VAE config (406M random parameters, fp32, about
1.6 GB of RAM) to time the preview fit on CPU, its worst case (no GPU).
"""
import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "_support")]

from glm_image_core.loading.configs import GLM_LATENTS_MEAN, GLM_LATENTS_STD  # noqa: E402
from glm_image_core.testing.tiny_checkpoint import configs_for, write_checkpoint  # noqa: E402
from glm_image_core.networks.vae import GlmImageVAE, fit_latent_to_rgb# noqa: E402
from glm_image_core.loading.registry import NETWORKS  # noqa: E402


def best_of(fn, n=3):
    fn()                                   # warm-up
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def fit(model):
    return fit_latent_to_rgb(model.decode, 16, model.scale_factor, GLM_LATENTS_MEAN, GLM_LATENTS_STD)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium", choices=["tiny", "medium"])
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--full-fit", action="store_true")
    a = ap.parse_args()
    from diffusers import AutoencoderKL
    from glmtest_oracle import realign
    work = tempfile.mkdtemp(prefix="glm-bench-vae-")
    atexit.register(shutil.rmtree, work, True)
    folder = write_checkpoint(os.path.join(work, "GLM-Image-" + a.size), a.size, seed=0)
    ours = NETWORKS["vae"].load(os.path.join(folder, "vae"))
    ref = realign(AutoencoderKL.from_pretrained(folder, subfolder="vae").eval())
    z = torch.randn(1, 16, a.px // 8, a.px // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t_ref = best_of(lambda: ref.decode(z).sample)
        t_ours = best_of(lambda: ours.decode(z))
        diff = (ours.decode(z) - ref.decode(z).sample).abs().max().item()
        print(f"{a.size} VAE decode {a.px}x{a.px}, CPU fp32, {torch.get_num_threads()} threads: "
              f"ours {t_ours * 1e3:.1f} ms, diffusers {t_ref * 1e3:.1f} ms, ratio ours/diffusers "
              f"{t_ours / t_ref:.3f}, max|diff| {diff:.2e}")
        print(f"{a.size} VAE preview fit: {best_of(lambda: fit(ours), n=1) * 1e3:.1f} ms")
        if a.full_fit:
            cfg = dict(configs_for("tiny")["vae/config.json"], block_out_channels=[128, 512, 1024, 1024],
                       layers_per_block=3, norm_num_groups=32)
            full = GlmImageVAE(cfg, dtype=torch.float32).eval()
            n = sum(p.numel() for p in full.parameters())
            print(f"real-size VAE ({n / 1e6:.0f}M params) preview fit, CPU fp32: {best_of(lambda: fit(full), n=1):.2f} s")


if __name__ == "__main__":
    main()
