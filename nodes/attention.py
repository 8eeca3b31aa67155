"""ComfyUI's attention selection for the GLM networks.

The networks call ``glm_image_core.networks.attention.attention`` (torch SDPA by default, the parity reference).
When the user picked an attention by flag, ComfyUI's choice (``comfy.ldm.modules.attention.
optimized_attention``: sage, flash, split, sub-quadratic, ...) is installed there instead, adapted to
what those functions take on every ComfyUI we support: equal query and key/value heads (0.3.75 has no
GQA argument), a float additive mask of 2 or 4 dimensions (no ``is_causal``, no boolean masks) and the
1/sqrt(d) scale (another scale is folded into q).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

import comfy.ldm.modules.attention as attention_module
from comfy.cli_args import args

from ..glm_image_core.networks import attention as core_attention

log = logging.getLogger("GLM-Image")

# ComfyUI's flags that pick an attention other than torch's SDPA (getattr: not every host has each)
FLAGS = ("use_sage_attention", "use_flash_attention", "use_split_cross_attention", "use_quad_cross_attention",
         "use_ck_attention")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def adapt(fn: Callable) -> Callable:
    """``fn`` (one of ComfyUI's attention functions) with :func:`glm_image_core.networks.attention.sdpa`'s
    signature: q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> [B, H, Lq, D]."""

    def run(q, k, v, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None, causal: bool = False):
        heads, d = q.shape[1], q.shape[-1]
        if k.shape[1] != heads:
            rep = heads // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        lq, lk = q.shape[2], k.shape[2]
        if causal:
            mask = torch.full((lq, lk), float("-inf"), dtype=q.dtype, device=q.device).triu(1 + lk - lq)
        elif mask is not None:
            mask = _additive(mask, q.dtype)
            if mask.dim() < 4:
                mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if scale is not None and scale != d ** -0.5:
            q = q * (scale * d ** 0.5)
        return fn(q, k, v, heads, mask=mask, skip_reshape=True, skip_output_reshape=True)

    run.comfy_function = fn
    return run


def selected(cli_args, functions) -> Optional[Callable]:
    """ComfyUI's attention (``functions``: its attention module) when a flag in ``cli_args`` picked
    one other than torch's SDPA, else None."""
    if not any(getattr(cli_args, f, False) for f in FLAGS):
        return None
    fn = functions.optimized_attention
    if fn is functions.attention_pytorch:   # what the flag resolved to on this machine: SDPA itself
        return None
    return fn


def install() -> None:
    """Route GLM's attention through the user's pick (called once, when ComfyUI imports the pack)."""
    fn = selected(args, attention_module)
    if fn is None:
        core_attention.use(None)
        return
    core_attention.use(adapt(fn))
    log.info("GLM-Image: attention through ComfyUI's %s (the attention flag given)", fn.__name__)
