"""A tiny real upscale model for the workflow tests: a RealESRGAN-compact (SRVGGNetCompact) state dict
with random weights, saved as safetensors. ComfyUI's UpscaleModelLoader loads it through spandrel like
any downloaded upscaler, so the chain workflow runs the stock ImageUpscaleWithModel for real."""
from __future__ import annotations

import os

NAME = "tiny-test-2x-compact.safetensors"    # the name the chain workflow's UpscaleModelLoader uses
SCALE = 2


def write_tiny_upscale_model(folder: str, name: str = NAME, scale: int = SCALE, feat: int = 8,
                             seed: int = 0) -> str:
    """Write <folder>/<name> (once) and return its path. Layout (spandrel's 'Compact' detection):
    body.0 conv 3->feat, body.1 PReLU, body.2 conv feat->feat, body.3 PReLU, body.4 conv
    feat->3*scale² (pixel shuffle)."""
    import torch
    from safetensors.torch import save_file
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.1).contiguous()
    sd = {
        "body.0.weight": rnd(feat, 3, 3, 3), "body.0.bias": rnd(feat),
        "body.1.weight": torch.full((feat,), 0.25),
        "body.2.weight": rnd(feat, feat, 3, 3), "body.2.bias": rnd(feat),
        "body.3.weight": torch.full((feat,), 0.25),
        "body.4.weight": rnd(3 * scale * scale, feat, 3, 3), "body.4.bias": rnd(3 * scale * scale),
    }
    tmp = path + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)
    return path
