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


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Attention of the new rows ``q`` over a whole static KV cache ``k``/``v`` under the additive
    ``mask`` (the static decode step, ``ar_generate.StaticDecode``): the installed attention, except
    while ``torch.compile`` traces one new row with torch's SDPA installed. There it is written as
    products, a softmax and sums (:func:`one_row_attention`), which inductor fuses into a few loops
    of its own, whereas SDPA stays an opaque call with a fixed cost of ≈ 40 µs on a CPU: 40 layers
    of it were a quarter of a compiled step at the official depth (``bench/bench_ar.py --checkpoint
    deep``). The same terms are summed, in another order: float-rounding-level differences."""
    if q.shape[2] == 1 and _current is sdpa and torch.compiler.is_compiling():
        return one_row_attention(q, k, v, mask, scale)
    return _current(q, k, v, mask, scale, False)


def one_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: Optional[float] = None) -> torch.Tensor:
    """SDPA of one query row per head (q [B, H, 1, D]) over k/v [B, KV, N, D] (KV divides H: GQA)
    with an additive ``mask`` broadcast to [B, H, 1, N], as elementwise products and sums."""
    B, H, _, D = q.shape
    kv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, kv, H // kv, 1, D)                          # query heads grouped by key head
    scores = (qg * k.unsqueeze(2)).sum(-1) * scale                # [B, KV, H/KV, N]
    p = (scores.reshape(B, H, 1, -1) + mask).softmax(-1).reshape(B, kv, H // kv, -1, 1)
    return (p * v.unsqueeze(2)).sum(-2).reshape(B, H, 1, D)


def use(fn: Optional[AttentionFn]) -> AttentionFn:
    """Install ``fn`` (same signature as :func:`sdpa`) for every GLM network; None restores SDPA.
    Returns the previous one."""
    global _current
    prev, _current = _current, (fn or sdpa)
    return prev


def current() -> AttentionFn:
    return _current
