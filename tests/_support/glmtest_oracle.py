"""Helpers to build the reference (oracle) pipeline: diffusers 0.42.1 + transformers 5.17.0.

Only tests and benchmarks import this module. See docs/architecture.md, "Design notes".
"""
import torch

# End-to-end parity tolerances, pack vs the official pipeline on the tiny checkpoint, CPU fp32. Each is
# shown to catch a half-bf16-ulp error in one weight tensor by tests/parity/test_negative_controls.py.
IMAGE_TOL = 1e-4     # pixels in [0, 1], stock VAEDecode vs the pipeline (measured ≈ 1e-6)
LATENT_TOL = 1e-5    # raw latents after the denoise loop (measured ≤ 1e-6)
LOGITS_TOL = 2e-6    # AR logits: one fp32 ulp at their scale (|logit| ≈ 16); measured 0.0 (bit-identical)


def realign(module: torch.nn.Module) -> torch.nn.Module:
    """Clone every parameter/buffer: safetensors mmaps tensors at unaligned offsets, which makes
    CPU GEMMs round differently (1 ulp). Cloning makes loaded weights bit-identical in use."""
    for p in module.parameters():
        p.data = p.data.clone()
    for b in module.buffers():
        b.data = b.data.clone()
    return module


def load_reference_pipeline(folder: str):
    """diffusers GlmImagePipeline from an official-layout folder, fp32, CPU, parameters re-aligned."""
    from diffusers import GlmImagePipeline
    pipe = GlmImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    for name in ("vision_language_encoder", "text_encoder", "transformer", "vae"):
        realign(getattr(pipe, name))
    pipe.set_progress_bar_config(disable=True)
    return pipe
