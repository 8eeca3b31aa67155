"""GLM-Image DiT (``GlmImageTransformer2DModel``) in plain PyTorch.

State-dict keys are identical to diffusers' ``GlmImageTransformer2DModel``; the numerics follow
its op order (fp32 CPU parity is bit-exact with one thread). Every Linear/Embedding is built
through ``operations`` (``torch.nn`` or ComfyUI's ``comfy.ops.*``), so weights may be stored in
another dtype/device and cast per forward.

Speed-ups that keep the reference numerics:

* ``forward_multi`` runs several *passes* over the same latents and timestep in one sweep
  (the cond/uncond passes of CFG): the image streams of all passes share one GEMM per layer,
  the timestep embedding and the AdaLN modulations are computed once, while attention,
  context-stream feed-forward and KV-cache handling stay per pass (so glyph sequences of
  different lengths never need padding).
* The glyph projection and prior projection are pure functions of inputs that are constant
  across denoising steps; ``project_glyph`` / ``project_prior`` let the sampler compute them once.
* RoPE tables are computed once per latent size (in fp32 on CPU, like the reference) and cached.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .common import default_compute_dtype

# Official GLM-Image DiT values (transformer/config.json); used only for keys a config lacks.
DEFAULT_DIT_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 30,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "text_embed_dim": 1472,
    "time_embed_dim": 512,
    "condition_dim": 256,
    "prior_vq_quantizer_codebook_size": 16384,
    # Not in the diffusers config (constants of the diffusers implementation):
    "norm_eps": 1e-5,          # every (non-affine) LayerNorm, incl. q/k norm
    "rope_theta": 10000.0,
    "ff_mult": 4,              # block feed-forward inner size = ff_mult * inner_dim
    "timestep_max_period": 10000,
}

CACHE_MODES = (None, "skip", "write", "read")


# --------------------------------------------------------------------------------------
# Reference-image KV cache
# --------------------------------------------------------------------------------------

class ReferenceKVCache:
    """Per-layer post-RoPE keys/values of reference images (the i2i conditioning).

    ``mode``: ``None``/``"skip"`` (ignored), ``"write"`` (append this forward's K/V along the
    sequence axis: several references concatenate in write order, each with the RoPE of its own
    grid starting at (0, 0)), ``"read"`` (prepend the cached K/V to this forward's K/V).
    Cached tensors are ``[Bc, S_ref, heads, head_dim]``; on read they are expanded to the batch
    (``Bc == 1``), used as-is (``Bc == B``) or repeated per sample (``B % Bc == 0``).
    """

    def __init__(self, num_layers: int):
        self.num_layers = int(num_layers)
        self.mode: Optional[str] = None
        self.k: List[Optional[torch.Tensor]] = [None] * self.num_layers
        self.v: List[Optional[torch.Tensor]] = [None] * self.num_layers
        self.num_references = 0

    def set_mode(self, mode: Optional[str]) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"invalid KV-cache mode {mode!r}; expected one of {CACHE_MODES}")
        self.mode = mode

    @property
    def num_tokens(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[1])

    def is_empty(self) -> bool:
        return self.k[0] is None

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=1)
            self.v[layer] = torch.cat([self.v[layer], v], dim=1)

    def get(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.k[layer], self.v[layer]
        if ck is None:
            return k, v
        b, bc = k.shape[0], ck.shape[0]
        if ck.device != k.device or ck.dtype != k.dtype:
            ck, cv = ck.to(device=k.device, dtype=k.dtype), cv.to(device=v.device, dtype=v.dtype)
        if bc == 1:
            ck, cv = ck.expand(b, -1, -1, -1), cv.expand(b, -1, -1, -1)
        elif bc != b:
            if b % bc:
                raise ValueError(f"cannot match {bc} cached reference sample(s) to batch size {b}")
            ck, cv = ck.repeat_interleave(b // bc, dim=0), cv.repeat_interleave(b // bc, dim=0)
        return torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)

    def to(self, device=None, dtype=None) -> "ReferenceKVCache":
        """Move/cast the cached tensors in place; returns self."""
        self.k = [None if t is None else t.to(device=device, dtype=dtype) for t in self.k]
        self.v = [None if t is None else t.to(device=device, dtype=dtype) for t in self.v]
        return self

    def clear(self) -> None:
        self.k = [None] * self.num_layers
        self.v = [None] * self.num_layers
        self.mode = None
        self.num_references = 0


# --------------------------------------------------------------------------------------
# Building blocks (module paths mirror diffusers so the state-dict keys match)
# --------------------------------------------------------------------------------------

class _ActProj(nn.Module):
    """diffusers ``GELU`` / ``LinearActivation``: ``act(proj(x))``."""

    def __init__(self, din, dout, act, ops, dtype, device):
        super().__init__()
        if act not in ("gelu", "gelu_tanh", "silu"):
            raise ValueError(act)
        self.proj = ops.Linear(din, dout, bias=True, dtype=dtype, device=device)
        self.act = act

    def forward(self, x):
        x = self.proj(x)
        if self.act == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        return F.gelu(x) if self.act == "gelu" else F.silu(x)


class _FeedForward(nn.Module):
    """diffusers ``FeedForward``: ``net = [act_proj, Dropout, Linear]``."""

    def __init__(self, din, dinner, dout, act, ops, dtype, device):
        super().__init__()
        self.net = nn.ModuleList([_ActProj(din, dinner, act, ops, dtype, device), nn.Identity(),
                                  ops.Linear(dinner, dout, bias=True, dtype=dtype, device=device)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class _TwoLayerMLP(nn.Module):
    """diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection`` with SiLU."""

    def __init__(self, din, dhidden, dout, ops, dtype, device):
        super().__init__()
        self.linear_1 = ops.Linear(din, dhidden, bias=True, dtype=dtype, device=device)
        self.linear_2 = ops.Linear(dhidden, dout, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _ImageProjector(nn.Module):
    def __init__(self, in_channels, hidden, patch, ops, dtype, device):
        super().__init__()
        self.patch_size = patch
        self.proj = ops.Linear(in_channels * patch * patch, hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3, 5).flatten(1, 2)
        return self.proj(x)


class _TimeConditionEmbed(nn.Module):
    def __init__(self, time_dim, condition_dim, ops, dtype, device):
        super().__init__()
        self.timestep_embedder = _TwoLayerMLP(time_dim, time_dim, time_dim, ops, dtype, device)
        self.condition_embedder = _TwoLayerMLP(4 * condition_dim, time_dim, time_dim, ops, dtype, device)


class _AdaNormZero(nn.Module):
    def __init__(self, time_dim, dim, ops, dtype, device):
        super().__init__()
        self.linear = ops.Linear(time_dim, 12 * dim, bias=True, dtype=dtype, device=device)


class _AdaNormOut(nn.Module):
    def __init__(self, time_dim, dim, ops, dtype, device):
        super().__init__()
        self.linear = ops.Linear(time_dim, 2 * dim, bias=True, dtype=dtype, device=device)


class _Attention(nn.Module):
    def __init__(self, dim, heads, head_dim, ops, dtype, device):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = ops.Linear(dim, inner, bias=True, dtype=dtype, device=device)
        self.to_k = ops.Linear(dim, inner, bias=True, dtype=dtype, device=device)
        self.to_v = ops.Linear(dim, inner, bias=True, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([ops.Linear(inner, dim, bias=True, dtype=dtype, device=device), nn.Identity()])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """diffusers ``get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos | sin]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device)
    exponent = exponent / half
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def _rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """In-place rotate-half RoPE in fp32, bit-identical to diffusers ``apply_rotary_emb(use_real_unbind_dim=-2)``.

    ``x``: [B, N, H, D] (a view is fine); ``cos``/``sin_signed``: [N, 1, D] fp32, where
    ``sin_signed = [-sin[:D/2], sin[D/2:]]`` so that ``cat(x2, x1) * sin_signed == cat(-x2, x1) * sin``.
    """
    half = x.shape[-1] // 2
    xf = x.float()
    swapped = torch.cat([xf[..., half:], xf[..., :half]], dim=-1)
    out = xf * cos
    out += swapped * sin_signed  # same rounding as (a + b): addition is commutative and exact-rounded
    x.copy_(out)


class GlmImageBlock(nn.Module):
    def __init__(self, dim, heads, head_dim, time_dim, ff_inner, eps, ops, dtype, device):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.norm1 = _AdaNormZero(time_dim, dim, ops, dtype, device)
        self.attn1 = _Attention(dim, heads, head_dim, ops, dtype, device)
        self.ff = _FeedForward(dim, ff_inner, dim, "gelu_tanh", ops, dtype, device)

    def forward(self, X: torch.Tensor, ctxs: List[torch.Tensor], temb: torch.Tensor,
                rope: Tuple[torch.Tensor, torch.Tensor], modes: Sequence[Optional[str]],
                kv_cache: Optional[ReferenceKVCache], layer: int, last: bool = False):
        """``X``: [P, B, N, D] image streams of P passes; ``ctxs``: P context streams [B, L_p, D]."""
        P, B, N, D = X.shape
        eps = self.eps
        attn = self.attn1
        H, hd = attn.heads, attn.head_dim
        emb = self.norm1.linear(temb)
        (sh, csh, sc, csc, g, cg, sh2, csh2, sc2, csc2, g2, cg2) = [e.unsqueeze(1) for e in emb.chunk(12, dim=1)]

        # 1. AdaLN-Zero + joint attention (per pass: [context, image] tokens)
        nx = F.layer_norm(X, (D,), eps=eps) * (1 + sc) + sh
        parts = []
        for p in range(P):
            parts.append(F.layer_norm(ctxs[p], (D,), eps=eps) * (1 + csc) + csh)
            parts.append(nx[p])
        inp = torch.cat(parts, dim=1)                                   # [B, T, D]
        q = F.layer_norm(attn.to_q(inp).unflatten(2, (H, hd)), (hd,), eps=eps)
        k = F.layer_norm(attn.to_k(inp).unflatten(2, (H, hd)), (hd,), eps=eps)
        v = attn.to_v(inp).unflatten(2, (H, hd))
        cos, sin_signed = rope
        outs, off = [], 0
        for p in range(P):
            L = ctxs[p].shape[1]
            S = L + N
            qp, kp, vp = q[:, off:off + S], k[:, off:off + S], v[:, off:off + S]
            _rope_(qp[:, L:], cos, sin_signed)
            _rope_(kp[:, L:], cos, sin_signed)
            mode = modes[p]
            if kv_cache is not None and mode == "write":
                kv_cache.store(layer, kp, vp)
            elif kv_cache is not None and mode == "read":
                kp, vp = kv_cache.get(layer, kp, vp)
            o = attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2))
            outs.append(o.transpose(1, 2))
            off += S
        o = outs[0] if P == 1 else torch.cat(outs, dim=1)
        a = attn.to_out[0](o.flatten(2, 3).to(q.dtype))                # [B, T, D]
        # Free the attention activations before the feed-forward: at 1024² in bf16 they are ~0.45 GiB
        # a step that would otherwise stay alive through this block's peak (its MLP hidden states).
        del inp, q, k, v, qp, kp, vp, o, outs

        inplace = not (torch.is_grad_enabled() and (X.requires_grad or a.requires_grad))
        new_ctxs, xs, off = [], [], 0
        for p in range(P):
            L = ctxs[p].shape[1]
            if inplace:
                X[p] += a[:, off + L:off + L + N] * g
            else:
                xs.append(X[p] + a[:, off + L:off + L + N] * g)
            new_ctxs.append(None if last else ctxs[p] + a[:, off:off + L] * cg)
            off += L + N
        del a
        if not inplace:
            X = torch.stack(xs)
            del xs

        # 2. Feed-forward: image streams of all passes in one GEMM, context per pass
        nx = F.layer_norm(X, (D,), eps=eps) * (1 + sc2) + sh2
        if inplace:
            X += self.ff(nx) * g2
        else:
            X = X + self.ff(nx) * g2
        if not last:   # the context stream after the last block is never used
            for p in range(P):
                c = new_ctxs[p]
                nc = F.layer_norm(c, (D,), eps=eps) * (1 + csc2) + csh2
                new_ctxs[p] = c + self.ff(nc) * cg2
        return X, new_ctxs


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------

class GlmImageDiT(nn.Module):
    """``GlmImageTransformer2DModel`` with identical parameter names.

    ``forward(hidden_states, encoder_hidden_states, prior_token_id, prior_token_drop, timestep,
    target_size, crop_coords, kv_cache=None)`` returns the flow velocity [B, C, h, w].
    """

    def __init__(self, config: dict, dtype=None, device=None, operations=torch.nn, compute_dtype=None):
        super().__init__()
        cfg = dict(DEFAULT_DIT_CONFIG)
        cfg.update({k: v for k, v in (config or {}).items() if not str(k).startswith("_") and v is not None})
        self.config = cfg
        ops = operations
        self.patch_size = p = int(cfg["patch_size"])
        self.in_channels = int(cfg["in_channels"])
        self.out_channels = int(cfg["out_channels"])
        self.num_layers = int(cfg["num_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.head_dim = int(cfg["attention_head_dim"])
        self.inner_dim = D = self.heads * self.head_dim
        self.text_embed_dim = int(cfg["text_embed_dim"])
        self.time_embed_dim = T = int(cfg["time_embed_dim"])
        self.condition_dim = int(cfg["condition_dim"])
        self.eps = float(cfg["norm_eps"])
        self.rope_theta = float(cfg["rope_theta"])
        self.max_period = cfg["timestep_max_period"]
        self.compute_dtype = default_compute_dtype(dtype) if compute_dtype is None else compute_dtype

        self.image_projector = _ImageProjector(self.in_channels, D, p, ops, dtype, device)
        self.glyph_projector = _FeedForward(self.text_embed_dim, D, D, "gelu", ops, dtype, device)
        self.prior_token_embedding = ops.Embedding(int(cfg["prior_vq_quantizer_codebook_size"]), D,
                                                   dtype=dtype, device=device)
        self.prior_projector = _FeedForward(D, D, D, "silu", ops, dtype, device)
        self.time_condition_embed = _TimeConditionEmbed(T, self.condition_dim, ops, dtype, device)
        ff_inner = int(cfg["ff_mult"] * D)
        self.transformer_blocks = nn.ModuleList([
            GlmImageBlock(D, self.heads, self.head_dim, T, ff_inner, self.eps, ops, dtype, device)
            for _ in range(self.num_layers)])
        self.norm_out = _AdaNormOut(T, D, ops, dtype, device)
        self.proj_out = ops.Linear(D, p * p * self.out_channels, bias=True, dtype=dtype, device=device)
        self._rope_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- cached / reusable pieces -----------------------------------------------------

    def rope(self, grid_h: int, grid_w: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for a patch grid, [grid_h*grid_w, 1, head_dim] fp32, cached.

        Computed on CPU with the exact expressions of diffusers ``GlmImageRotaryPosEmbed``.
        """
        key = (int(grid_h), int(grid_w), str(torch.device(device)))
        hit = self._rope_cache.get(key)
        if hit is not None:
            return hit
        dim, theta = self.head_dim, self.rope_theta
        dim_h = dim_w = dim // 2
        h_inv = 1.0 / (theta ** (torch.arange(0, dim_h, 2, dtype=torch.float32)[: (dim_h // 2)].float() / dim_h))
        w_inv = 1.0 / (theta ** (torch.arange(0, dim_w, 2, dtype=torch.float32)[: (dim_w // 2)].float() / dim_w))
        fh = torch.outer(torch.arange(grid_h), h_inv).unsqueeze(1).expand(grid_h, grid_w, -1)
        fw = torch.outer(torch.arange(grid_w), w_inv).unsqueeze(0).expand(grid_h, grid_w, -1)
        freqs = torch.cat([fh, fw], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1).reshape(grid_h * grid_w, -1)
        cos, sin = freqs.cos(), freqs.sin()
        half = dim // 2
        sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        out = (cos.unsqueeze(1).to(device).contiguous(), sin_signed.unsqueeze(1).to(device).contiguous())
        if len(self._rope_cache) > 16:
            self._rope_cache.clear()
        self._rope_cache[key] = out
        return out

    def project_glyph(self, encoder_hidden_states: torch.Tensor, dtype=None) -> torch.Tensor:
        """``glyph_projector`` of ByT5 states [B, L, text_dim] -> context tokens [B, L, D]."""
        dtype = dtype or self.compute_dtype
        return self.glyph_projector(encoder_hidden_states.to(dtype))

    def project_prior(self, prior_token_id: torch.Tensor, prior_token_drop=False, dtype=None) -> torch.Tensor:
        """``prior_projector(prior_token_embedding(ids) [* 0 where dropped])`` -> [..., N, D]."""
        dtype = dtype or self.compute_dtype
        ids = prior_token_id.long()
        # Looked up through the layer's class: a host that swaps the forward of every layer with a 2-D
        # weight for a Linear adapter's (ComfyUI 0.33's Train LoRA in bypass mode calls F.linear on the
        # ids) must not reach a lookup table. Weight patches still apply inside the class's forward.
        table = self.prior_token_embedding
        emb = type(table).forward(table, ids).to(dtype)
        if isinstance(prior_token_drop, torch.Tensor):
            drop = prior_token_drop.to(device=emb.device, dtype=torch.bool)
            if drop.numel() == 1 and drop.shape != ids.shape:
                drop = drop.reshape(()).expand(ids.shape)
            if bool(drop.any()):
                emb = emb.clone()
                emb[drop] *= 0.0
        elif prior_token_drop:
            emb = emb * 0.0
        return self.prior_projector(emb)

    def time_embed(self, timestep, target_size, crop_coords, dtype=None, device=None) -> torch.Tensor:
        """SiLU(timestep MLP + size/crop MLP) -> temb [B, time_embed_dim]."""
        dtype = dtype or self.compute_dtype
        timestep, target_size, crop_coords = (torch.as_tensor(t, device=device) for t in (timestep, target_size, crop_coords))
        if timestep.dim() == 0:
            timestep = timestep.reshape(1)
        target_size = target_size.reshape(-1, 2)
        crop_coords = crop_coords.reshape(-1, 2)
        tp = timestep_embedding(timestep, self.time_embed_dim, self.max_period)
        cp = timestep_embedding(crop_coords.flatten(), self.condition_dim, self.max_period).view(crop_coords.size(0), -1)
        sp = timestep_embedding(target_size.flatten(), self.condition_dim, self.max_period).view(target_size.size(0), -1)
        tce = self.time_condition_embed
        t_emb = tce.timestep_embedder(tp.to(dtype))
        c_emb = tce.condition_embedder(torch.cat([cp, sp], dim=1).to(dtype))
        return F.silu(t_emb + c_emb)

    # ---- forward ---------------------------------------------------------------------

    def forward_multi(self, hidden_states: torch.Tensor, contexts: Sequence[torch.Tensor],
                      priors: Union[torch.Tensor, Sequence[torch.Tensor]], temb: torch.Tensor,
                      cache_modes: Optional[Sequence[Optional[str]]] = None,
                      kv_cache: Optional[ReferenceKVCache] = None) -> List[torch.Tensor]:
        """Run P passes over the same latents and timestep embedding in one sweep.

        ``contexts[p]``: projected glyph tokens [B, L_p, D] (``project_glyph``); ``priors``: projected
        prior tokens, [P, B, N, D] or a list of P tensors broadcastable to [B, N, D] (``project_prior``);
        ``temb``: ``time_embed(...)`` [B, T]; ``cache_modes[p]`` in {None, "skip", "write", "read"}.
        Returns P velocities [B, C, h, w] in the compute dtype. Each pass is numerically the
        single-pass ``forward`` (bit-identical with one CPU thread).
        """
        P = len(contexts)
        modes = list(cache_modes) if cache_modes is not None else [None] * P
        if len(modes) != P:
            raise ValueError("cache_modes must have one entry per pass")
        for m in modes:
            if m not in CACHE_MODES:
                raise ValueError(f"invalid KV-cache mode {m!r}")
        dtype = temb.dtype
        x = hidden_states.to(dtype)
        B, C, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the DiT patch size {p}")
        hp, wp = h // p, w // p
        N = hp * wp
        pri = list(priors.unbind(0)) if isinstance(priors, torch.Tensor) and priors.dim() == 4 else priors
        if isinstance(pri, torch.Tensor) or len(pri) != P:
            raise ValueError(f"priors must be [P, B, N, D] or a list of {P} tensors (one per pass)")
        for pr in pri:
            if pr.shape[-2] != N:
                raise ValueError(f"{pr.shape[-2]} prior tokens for a {h}x{w} latent (needs {N}); GLM-Image sizes "
                                 "must be multiples of 32 pixels")
        img = self.image_projector(x)                                     # [B, N, D]
        if isinstance(priors, torch.Tensor) and priors.dim() == 4 and priors.shape[1] == B:
            X = img.unsqueeze(0) + priors.to(dtype)
        else:
            X = torch.stack([(img + pr.to(dtype)).expand(B, N, self.inner_dim) for pr in pri])
        ctxs = [c.to(dtype).expand(B, -1, -1) if c.shape[0] != B else c.to(dtype) for c in contexts]
        rope = self.rope(hp, wp, x.device)
        nb = len(self.transformer_blocks)
        for i, blk in enumerate(self.transformer_blocks):
            X, ctxs = blk(X, ctxs, temb, rope, modes, kv_cache, i, last=(i == nb - 1))
        emb = self.norm_out.linear(temb.to(dtype))
        scale, shift = emb.chunk(2, dim=1)
        X = F.layer_norm(X, (self.inner_dim,), eps=self.eps) * (1 + scale)[:, None, :] + shift[:, None, :]
        out = self.proj_out(X)                                             # [P, B, N, p*p*C]
        out = out.reshape(P, B, hp, wp, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        return list(out.unbind(0))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                prior_token_id: torch.Tensor, prior_token_drop, timestep, target_size, crop_coords,
                kv_cache: Optional[ReferenceKVCache] = None) -> torch.Tensor:
        """One DiT pass, numerically identical to diffusers ``GlmImageTransformer2DModel.forward``."""
        dtype = self.compute_dtype
        device = hidden_states.device
        ctx = self.project_glyph(encoder_hidden_states.to(device), dtype)
        prior = self.project_prior(prior_token_id.to(device), prior_token_drop, dtype)
        temb = self.time_embed(timestep, target_size, crop_coords, dtype, device)
        mode = kv_cache.mode if kv_cache is not None else None
        return self.forward_multi(hidden_states, [ctx], [prior], temb, [mode], kv_cache)[0]

    def new_kv_cache(self) -> ReferenceKVCache:
        return ReferenceKVCache(self.num_layers)
