"""Negative controls for the end-to-end parity tolerances: each tolerance is shown to catch a small
real error on the tiny random checkpoint, so a pass under it means something.

Tolerances (glmtest_oracle, as the parity tests use them): image 1e-4 (host pipeline parity), latent
1e-5 (denoise parity), AR logits 2e-6 (AR parity; measured 0). A half-ulp error in the last decoder
layer moves the tiny AR's logits by only ≈ 4e-6 (≈ 5e-6 in layer 0), which is why the logits
tolerance is one fp32 ulp and not 1e-5. The error injected is one weight tensor scaled by (1 + 2^-9),
half a bf16 ulp, i.e. the size of one stray rounding in one tensor; plus another seed for the image.
Each control first checks that the unperturbed repeat is exact (so the distance measured is the
error's), then that the perturbed run exceeds the tolerance."""
import json
import os

import numpy as np
import torch

import glmtest_oracle
from glm_image_core.generation import ar_generate
from glm_image_core.networks import ar_model
from glm_image_core.generation.denoise import denoise

from glm_image_core.generation.glyph_text import glyph_for_prompt, load_glyph_tokenizer, uncond_glyph
from glm_image_core.loading.registry import NETWORKS

IMAGE_TOL, LATENT_TOL, LOGITS_TOL = glmtest_oracle.IMAGE_TOL, glmtest_oracle.LATENT_TOL, glmtest_oracle.LOGITS_TOL
SCALE = 1 + 2 ** -9
PROMPT = 'A poster with the words "GLM" on a red wall'


def perturbed(param: torch.nn.Parameter):
    class Ctx:
        def __enter__(self):
            self.orig = param.data.clone()
            param.data.mul_(SCALE)

        def __exit__(self, *exc):
            param.data.copy_(self.orig)
    return Ctx()


def test_image_tolerance_catches_a_half_ulp_vae_weight_and_another_seed(tiny_ckpt):
    pipe = glmtest_oracle.load_reference_pipeline(tiny_ckpt)
    ids, _, _ = pipe.generate_prior_tokens(prompt=PROMPT, height=128, width=128,
                                           generator=torch.Generator().manual_seed(0))

    def image(seed):
        out = pipe(prompt=PROMPT, prior_token_ids=ids, height=128, width=128, num_inference_steps=2,
                   guidance_scale=1.5, generator=torch.Generator().manual_seed(seed), output_type="np")
        return np.asarray(out.images, dtype=np.float64)

    base = image(0)
    assert np.abs(image(0) - base).max() == 0
    with perturbed(pipe.vae.decoder.conv_out.weight):
        d_weight = np.abs(image(0) - base).max()
    d_seed = np.abs(image(1) - base).max()
    print(f"image: half-ulp VAE conv_out weight -> {d_weight:.2e}, another seed -> {d_seed:.2e} (tol {IMAGE_TOL})")
    assert d_weight > IMAGE_TOL and d_seed > IMAGE_TOL


def test_latent_tolerance_catches_a_half_ulp_dit_weight(tiny_ckpt):
    dit = NETWORKS["dit"].load(f"{tiny_ckpt}/transformer")
    enc, tok = NETWORKS["glyph_encoder"].load(f"{tiny_ckpt}/text_encoder"), load_glyph_tokenizer(f"{tiny_ckpt}/tokenizer")
    with open(f"{tiny_ckpt}/scheduler/scheduler_config.json") as f:
        sched = json.load(f)
    g = torch.Generator().manual_seed(0)
    latents, ids = torch.randn(1, 16, 8, 12, generator=g), torch.randint(0, 16384, (1, 24), generator=g)
    c, u = glyph_for_prompt(enc, tok, PROMPT, "cpu", torch.float32), uncond_glyph(enc, tok, "cpu", torch.float32)

    def run():
        return denoise(dit, latents.clone(), ids, c, u, (64, 96), 3, 1.5, sched)

    base = run()
    assert torch.equal(run(), base)
    block_weight = next(p for n, p in dit.named_parameters() if n.startswith("transformer_blocks.1.") and p.dim() == 2)
    with perturbed(block_weight):
        d = (run() - base).abs().max().item()
    print(f"latent: half-ulp weight in DiT block 1 -> {d:.2e} (tol {LATENT_TOL})")
    assert d > LATENT_TOL


def test_logits_tolerance_catches_a_half_ulp_decoder_weight(tiny_ckpt, tok):
    m = NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"))

    def logits():
        return ar_generate.generate_tokens(m, tok, PROMPT, 64, 64, 0, return_logits=True).logits

    base = logits()
    assert torch.equal(logits(), base)
    layer_weight = m.language_model.layers[-1].mlp.down_proj.weight
    with perturbed(layer_weight):
        d = (logits() - base).abs().max().item()
    print(f"AR logits: half-ulp weight in the last decoder layer -> {d:.2e} (tol {LOGITS_TOL})")
    assert d > LOGITS_TOL
