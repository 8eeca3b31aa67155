"""The attention every GLM network calls (AR text and vision, DiT, glyph encoder).

``attention(q, k, v, mask, scale, causal)`` on ``[B, heads, L, D]`` tensors, with fewer key/value heads
than query heads allowed (GQA), is ``torch.nn.functional.scaled_dot_product_attention`` unless the host
installs another with :func:`use`. The node pack installs ComfyUI's attention there when the user picked
one by flag (``--use-sage-attention``, ``--use-flash-attention``, ...; see ``nodes/attention.py``), so
the flags apply to GLM-Image too; with no flag this stays torch's SDPA, the parity reference.
One process-wide choice, like ComfyUI's own ``optimized_attention``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
         scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """torch's SDPA: ``mask`` additive (float) or boolean (True = attend), broadcast to
    [B, heads, Lq, Lk]; ``scale`` defaults to D**-0.5."""
    gqa = k.shape[1] != q.shape[1]
    kw = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kw)


AttentionFn = Callable[..., torch.Tensor]
_current: AttentionFn = sdpa


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """The installed attention (see the module docstring); [B, heads, Lq, D] out."""
    return _current(q, k, v, mask, scale, causal)


def use(fn: Optional[AttentionFn]) -> AttentionFn:
    """Install ``fn`` (same signature as :func:`sdpa`) for every GLM network; None restores SDPA.
    Returns the previous one."""
    global _current
    prev, _current = _current, (fn or sdpa)
    return prev


def current() -> AttentionFn:
    return _current
