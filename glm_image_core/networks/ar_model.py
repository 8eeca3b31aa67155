"""GLM-Image autoregressive model (``vision_language_encoder/``) in plain PyTorch.

Re-implements transformers' ``GlmImageForConditionalGeneration`` for inference:

* text decoder (GLM-4 style): sandwich RMSNorms, GQA attention with q/k/v bias and no o_proj bias,
  partial rotary embedding with 3-axis MRoPE sections (t, h, w), fused gate/up SiLU MLP;
* ``lm_head`` over the visual vocabulary (``vision_vocab_size``);
* vision tower: Conv2d patch embedding, learned position table bilinearly resampled to each image's
  grid (``grid_sample``, align_corners=False, border padding), pre-LN ViT blocks with full attention
  inside each image, no final norm;
* VQ: 1×1 ``quant_conv`` then the nearest L2-normalised codebook entry (cosine similarity).

State-dict keys equal the official files (``model.language_model.*``, ``model.visual.*``,
``model.vqmodel.*``, ``lm_head.weight``). ``model.vqmodel.post_quant_conv`` (only used to decode VQ
codes back to features, never at inference) is not built; its loader skips it (``loading.registry``).

The model can be built in parts (``parts=``, see :data:`AR_PARTS`): ``("text",)`` is the decoder +
``lm_head`` (all text-to-image needs), ``("vision",)`` the vision tower + VQ (tokenising reference
images). The keys stay the official ones, so the two parts together load exactly the full key set.

Every Linear / Conv2d / Embedding / LayerNorm is built through ``operations`` with ``dtype`` and
``device`` (ComfyUI passes ``comfy.ops.*``), so weights may be stored in another dtype or on another
device than the activations: weights used directly (RMSNorm weight, VQ codebook, position table,
embedding rows) are cast to the activations' device and dtype at use.

Numerics follow transformers op for op (fp32 RoPE tables, fp32 RMSNorm variance, SDPA with GQA),
so fp32 CPU logits match the reference to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantization import gguf_ops
from .attention import attention, cache_attention
from .common import default_compute_dtype

# The parts the model can be built from, and the state-dict key prefixes each one owns.
AR_PARTS = {"text": ("model.language_model.", "lm_head."), "vision": ("model.visual.", "model.vqmodel.")}
ALL_PARTS = tuple(AR_PARTS)


def check_parts(parts: Sequence[str]) -> Tuple[str, ...]:
    """``parts`` as a tuple in canonical order; a clear error for unknown or no parts."""
    bad = [p for p in parts if p not in AR_PARTS]
    if bad or not parts or isinstance(parts, str):
        raise ValueError(f"AR parts must be a non-empty subset of {ALL_PARTS}, got {parts!r}")
    return tuple(p for p in ALL_PARTS if p in parts)


def part_of_key(key: str) -> Optional[str]:
    """The part that owns state-dict ``key`` (None: no part, e.g. a stray key)."""
    for part, prefixes in AR_PARTS.items():
        if key.startswith(prefixes):
            return part
    return None


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` on ``like``'s device and dtype (no copy when already there)."""
    return t.to(device=like.device, dtype=like.dtype)


def _act(name: str):
    name = (name or "").lower()
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r} in the AR config")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

@dataclass
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    vision_vocab_size: int
    rms_norm_eps: float
    attention_bias: bool
    hidden_act: str
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: List[int]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, t: dict) -> "TextConfig":
        hidden = int(t.get("hidden_size", 4096))
        heads = int(t.get("num_attention_heads", 32))
        kv = t.get("num_key_value_heads")
        head_dim = t.get("head_dim") or hidden // heads
        rp = dict(t.get("rope_parameters") or {})
        rs = dict(t.get("rope_scaling") or {})      # older configs keep mrope_section here
        rope_type = rp.get("rope_type", rs.get("rope_type", rs.get("type", "default")))
        if rope_type not in ("default", "mrope", None):
            raise ValueError(f"unsupported rope_type {rope_type!r} in the AR text config")
        theta = float(rp.get("rope_theta", t.get("rope_theta", 10000.0)))
        partial = float(rp.get("partial_rotary_factor", t.get("partial_rotary_factor", 1.0)))
        section = rp.get("mrope_section", rs.get("mrope_section", [8, 12, 12]))
        cfg = cls(hidden_size=hidden, intermediate_size=int(t.get("intermediate_size", 13696)),
                  num_layers=int(t.get("num_hidden_layers", 40)), num_heads=heads,
                  num_kv_heads=int(kv if kv is not None else heads), head_dim=int(head_dim),
                  vocab_size=int(t.get("vocab_size", 168064)),
                  vision_vocab_size=int(t.get("vision_vocab_size", 16512)),
                  rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)), attention_bias=bool(t.get("attention_bias", True)),
                  hidden_act=str(t.get("hidden_act", "silu")), rope_theta=theta, partial_rotary_factor=partial,
                  mrope_section=[int(s) for s in section])
        if sum(cfg.mrope_section) * 2 != cfg.rotary_dim:
            raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim*partial_rotary_factor/2 = "
                             f"{cfg.rotary_dim // 2}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads "
                             f"{cfg.num_kv_heads}")
        return cfg


# --------------------------------------------------------------------------------------
# Text decoder
# --------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """GLM RMSNorm (variance in fp32, ``weight * x.to(in_dtype)``); weight cast to the input at use."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return _cast(self.weight, x) * h.to(in_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Partial rotary (first ``cos.shape[-1]`` dims, rotate-half) of q, k [B, heads, L, D];
    cos/sin [B, L, rot]. transformers' formula, kept for reference and tests."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``[-sin_lo, sin_hi]``: with it, ``rotate_half(x) * sin == roll_half(x) * signed_sin`` exactly
    (negation is exact), saving the negation kernel."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotary_fused(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """Partial rotary of x [B, heads, L, D] (q and k concatenated on the head axis) with cos and
    :func:`signed_sin` [B, 1, L, rot]; bit-identical to :func:`apply_rotary`, fewer kernels."""
    rot = cos.shape[-1]
    half = rot // 2
    xr = x[..., :rot]
    rolled = torch.cat([xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rolled * sin_s, x[..., rot:]], dim=-1)


class KVCache:
    """Pre-allocated static key/value cache: per layer, k[i] and v[i] [B, kv_heads, max_len, head_dim].

    One tensor per layer, not one stacked tensor: a compiled decode step writes one row of each in
    place, and a write into a slice of one big input tensor would make the compiler copy it whole.

    ``key_columns=True`` stores each layer's keys as [B, kv_heads, head_dim, max_len], seen through a
    transposed view with the usual shape: the compiled one-row attention (``attention.cache_attention``)
    then sums over head_dim with the cache rows contiguous, so its loops run along the rows instead of
    reducing each row across the lanes of one vector. Same values, same shape; for the compiled step
    only (GPU attention kernels want the head_dim contiguous)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device, key_columns: bool = False):
        shape = (batch, kv_heads, max_len, head_dim)
        if key_columns:
            self.k = [torch.zeros(batch, kv_heads, head_dim, max_len, dtype=dtype, device=device).transpose(-1, -2)
                      for _ in range(num_layers)]
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        b = cfg.attention_bias
        self.q_proj = operations.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=b, dtype=dtype, device=device)
        self.k_proj = operations.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=b, dtype=dtype, device=device)
        self.v_proj = operations.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=b, dtype=dtype, device=device)
        self.o_proj = operations.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None, start=0, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``start``: the cache row of x's first token. With ``attn_mask`` (static decode, see
        ``ar_generate.StaticDecode``) ``start`` is a device tensor [L] of rows and the attention spans
        the whole cache under the mask: every shape is the cache's, whatever the position."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        # q and k rotated together (cos / signed sin are [B, 1, L, rot], prepared once per forward)
        qk = rotary_fused(torch.cat([q, k], dim=1), cos, sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        if attn_mask is not None:
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            ck[:, :, start] = k        # an index_put_, which the compiler keeps in place
            cv[:, :, start] = v
            out = cache_attention(q, ck, cv, attn_mask, self.scaling)
            return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))
        if cache is not None:
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            ck[:, :, start:start + L] = k
            cv[:, :, start:start + L] = v
            if start > 0:       # attend to everything cached so far (the new tokens included)
                k = ck[:, :, :start + L]
                v = cv[:, :, :start + L]
        causal = L > 1
        if causal and start > 0:
            # several new tokens after a cached prefix: explicit mask (not used by the generator)
            mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = attention(q, k, v, mask, self.scaling)
        else:
            out = attention(q, k, v, None, self.scaling, causal)
        out = out.transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(out)


class TextMLP(nn.Module):
    def __init__(self, cfg: TextConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        self.gate_up_proj = operations.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = operations.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype, device=device)
        self.act = _act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class TextDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.self_attn = TextAttention(cfg, layer_idx, dtype=dtype, device=device, operations=operations)
        self.mlp = TextMLP(cfg, dtype=dtype, device=device, operations=operations)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, device=device)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, device=device)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, device=device)

    def forward(self, x, cos, sin, cache=None, start=0, attn_mask=None):
        residual = x
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, start, attn_mask)
        x = residual + self.post_self_attn_layernorm(h)
        residual = x
        h = self.mlp(self.post_attention_layernorm(x))
        return residual + self.post_mlp_layernorm(h)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = operations.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList([TextDecoderLayer(cfg, i, dtype=dtype, device=device, operations=operations)
                                     for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        """Embedding rows of ``ids`` looked up where the table lives, then moved/cast (no full-table cast;
        a GGUF table dequantizes only these rows)."""
        return gguf_ops.embedding_rows(self.embed_tokens, ids, dtype, device)

    def inv_freq(self, device) -> torch.Tensor:
        dim = self.cfg.rotary_dim
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(
            device=device, dtype=torch.float) / dim))

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, L, rot] (``dtype``) for 3-axis positions [3, B, L] (or [3, L])."""
        if position_ids.dim() == 2:
            position_ids = position_ids[:, None]
        inv = self.inv_freq(position_ids.device)
        freqs = position_ids.to(torch.float32)[..., None] * inv          # [3, B, L, rot/2]
        cos, sin = freqs.cos(), freqs.sin()

        def recompose(f):
            parts = f.split(self.cfg.mrope_section, dim=-1)
            f = torch.cat([m[i % 3] for i, m in enumerate(parts)], dim=-1)
            return torch.cat([f, f], dim=-1)
        return recompose(cos).to(dtype), recompose(sin).to(dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None, start=0, last_only: bool = False,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder stack on embeddings x [B, L, H] with rotary tables cos/sin [B or 1, L, rot]
        (from :meth:`rope`); returns the final-normed hidden states (last position only if asked).
        ``start``/``attn_mask``: see :meth:`TextAttention.forward`."""
        cos = cos.unsqueeze(1)
        sin = signed_sin(sin).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, start, attn_mask)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)


# --------------------------------------------------------------------------------------
# Vision tower + VQ
# --------------------------------------------------------------------------------------

class VisionAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        self.num_heads = heads
        self.head_dim = hidden // heads
        self.scaling = self.head_dim ** -0.5
        self.qkv = operations.Linear(hidden, hidden * 3, bias=bias, dtype=dtype, device=device)
        self.proj = operations.Linear(hidden, hidden, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q = q.transpose(0, 1).unsqueeze(0)
        k = k.transpose(0, 1).unsqueeze(0)
        v = v.transpose(0, 1).unsqueeze(0)
        outs = []
        for qi, ki, vi in zip(q.split(list(lengths), 2), k.split(list(lengths), 2), v.split(list(lengths), 2)):
            o = attention(qi, ki, vi, None, self.scaling)
            outs.append(o.transpose(1, 2).contiguous())
        out = torch.cat(outs, dim=1).reshape(n, -1).contiguous()
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str, dtype=None, device=None, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(hidden, inter, dtype=dtype, device=device)
        self.fc2 = operations.Linear(inter, hidden, dtype=dtype, device=device)
        self.act = _act(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, v: dict, dtype=None, device=None, operations=nn):
        super().__init__()
        hidden, eps = int(v["hidden_size"]), float(v.get("layer_norm_eps", 1e-6))
        self.norm1 = operations.LayerNorm(hidden, eps=eps, dtype=dtype, device=device)
        self.norm2 = operations.LayerNorm(hidden, eps=eps, dtype=dtype, device=device)
        self.attn = VisionAttention(hidden, int(v["num_heads"]), bool(v.get("attention_bias", True)),
                                    dtype=dtype, device=device, operations=operations)
        self.mlp = VisionMLP(hidden, int(v["intermediate_size"]), v.get("hidden_act", "gelu"),
                             dtype=dtype, device=device, operations=operations)

    def forward(self, x, lengths):
        x = x + self.attn(self.norm1(x), lengths)
        return x + self.mlp(self.norm2(x))


class VisionPatchEmbed(nn.Module):
    def __init__(self, v: dict, dtype=None, device=None, operations=nn):
        super().__init__()
        self.patch_size = int(v["patch_size"])
        self.in_channels = int(v.get("in_channels", 3))
        self.embed_dim = int(v["hidden_size"])
        k = [self.patch_size, self.patch_size]
        self.proj = operations.Conv2d(self.in_channels, self.embed_dim, kernel_size=k, stride=k, dtype=dtype, device=device)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        x = rows.view(-1, self.in_channels, self.patch_size, self.patch_size)
        return self.proj(x).view(-1, self.embed_dim)


class VisionEmbeddings(nn.Module):
    def __init__(self, v: dict, dtype=None, device=None, operations=nn):
        super().__init__()
        n = (int(v["image_size"]) // int(v["patch_size"])) ** 2
        self.position_embedding = operations.Embedding(n, int(v["hidden_size"]), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, grids: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """Add the learned position table resampled (bilinear, align_corners=False, border) to each grid."""
        w = self.position_embedding.weight
        side = int(round(math.sqrt(w.shape[0])))
        table = w.to(device=x.device, dtype=torch.float32).view(side, side, -1).permute(2, 0, 1).unsqueeze(0)
        hs, ws, ths, tws = [], [], [], []
        for gh, gw in grids:
            hs.append(torch.arange(gh, device=x.device).repeat_interleave(gw))
            ws.append(torch.arange(gw, device=x.device).repeat(gh))
            ths.append(torch.full((gh * gw,), float(gh), device=x.device))
            tws.append(torch.full((gh * gw,), float(gw), device=x.device))
        h_c, w_c, t_h, t_w = torch.cat(hs), torch.cat(ws), torch.cat(ths), torch.cat(tws)
        norm_w = ((w_c + 0.5) / t_w) * 2 - 1
        norm_h = ((h_c + 0.5) / t_h) * 2 - 1
        grid = torch.stack((norm_w, norm_h), dim=-1).unsqueeze(0).unsqueeze(2)
        pos = F.grid_sample(table, grid, mode="bilinear", align_corners=False, padding_mode="border")
        pos = pos.squeeze(0).squeeze(-1).permute(1, 0)
        return x + pos.to(x.dtype)


class VisionModel(nn.Module):
    def __init__(self, v: dict, dtype=None, device=None, operations=nn):
        super().__init__()
        if int(v.get("spatial_merge_size", 1)) != 1:
            raise ValueError("GLM-Image's vision tower needs spatial_merge_size 1")
        self.patch_embed = VisionPatchEmbed(v, dtype=dtype, device=device, operations=operations)
        self.embeddings = VisionEmbeddings(v, dtype=dtype, device=device, operations=operations)
        self.blocks = nn.ModuleList([VisionBlock(v, dtype=dtype, device=device, operations=operations)
                                     for _ in range(int(v["depth"]))])

    def forward(self, rows: torch.Tensor, grids: Sequence[Tuple[int, int]]) -> torch.Tensor:
        lengths = [int(h) * int(w) for h, w in grids]
        x = self.patch_embed(rows)
        x = self.embeddings(x, grids)
        for blk in self.blocks:
            x = blk(x, lengths)
        return x


class VectorQuantizer(nn.Module):
    def __init__(self, q: dict, dtype=None, device=None, operations=nn):
        super().__init__()
        self.embedding_dim = int(q["embed_dim"])
        self.embedding = operations.Embedding(int(q["num_embeddings"]), self.embedding_dim, dtype=dtype, device=device)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook ids of z [N, embed_dim] by L2-normalised squared distance (= cosine)."""
        z = F.normalize(z, p=2, dim=-1)
        e = F.normalize(_cast(self.embedding.weight, z), p=2, dim=-1)
        d = (torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", z, e.transpose(0, 1)))
        return torch.argmin(d, dim=1)


class VQModel(nn.Module):
    def __init__(self, q: dict, dtype=None, device=None, operations=nn):
        super().__init__()
        self.quantize = VectorQuantizer(q, dtype=dtype, device=device, operations=operations)
        self.quant_conv = operations.Conv2d(int(q["latent_channels"]), int(q["embed_dim"]), 1, dtype=dtype, device=device)

    def encode_ids(self, feats: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """VQ ids [gh*gw] of one image's vision features [gh*gw, C]."""
        x = feats.view(1, gh, gw, feats.shape[-1]).permute(0, 3, 1, 2).contiguous()
        x = self.quant_conv(x)
        x = x.permute(0, 2, 3, 1).contiguous().view(-1, self.quantize.embedding_dim)
        return self.quantize.indices(x)


class _Inner(nn.Module):
    def __init__(self, config: dict, tcfg: TextConfig, parts: Sequence[str], dtype=None, device=None, operations=nn):
        super().__init__()
        if "vision" in parts:
            self.visual = VisionModel(config["vision_config"], dtype=dtype, device=device, operations=operations)
        if "text" in parts:
            self.language_model = TextModel(tcfg, dtype=dtype, device=device, operations=operations)
        if "vision" in parts:
            self.vqmodel = VQModel(config["vq_config"], dtype=dtype, device=device, operations=operations)


class GlmImageAR(nn.Module):
    """GLM-Image AR model: ``GlmImageAR(config, dtype=None, device=None, operations=torch.nn, parts=ALL_PARTS)``.

    ``config`` is ``vision_language_encoder/config.json`` as a dict. ``compute_dtype`` (default: the
    construction dtype, or float32) is the dtype of activations; set it when the weights are stored
    in another dtype (ComfyUI manual cast). ``parts``: ``"text"`` (decoder + lm_head: :meth:`forward`)
    and/or ``"vision"`` (vision tower + VQ: :meth:`image_features`, :meth:`image_tokens`).
    """

    def __init__(self, config: dict, dtype=None, device=None, operations=nn, parts: Sequence[str] = ALL_PARTS):
        super().__init__()
        self.parts = check_parts(parts)
        for k in ("text_config", "vision_config", "vq_config"):
            if not isinstance(config.get(k), dict):
                raise ValueError(f"AR config has no {k!r} section")
        self.config = config
        self.text_config = TextConfig.from_dict(config["text_config"])
        v, q = config["vision_config"], config["vq_config"]
        if int(q["latent_channels"]) != int(v["hidden_size"]):
            raise ValueError(f"vq_config.latent_channels ({q['latent_channels']}) must equal the vision hidden "
                             f"size ({v['hidden_size']})")
        self.image_token_id = int(config.get("image_token_id", 167855))
        self.image_start_token_id = int(config.get("image_start_token_id", 16384))
        self.image_end_token_id = int(config.get("image_end_token_id", 16385))
        self.codebook_size = int(q["num_embeddings"])
        self.compute_dtype = default_compute_dtype(dtype)
        self.model = _Inner(config, self.text_config, self.parts, dtype=dtype, device=device, operations=operations)
        if "text" in self.parts:
            self.lm_head = operations.Linear(self.text_config.hidden_size, self.text_config.vision_vocab_size,
                                             bias=False, dtype=dtype, device=device)

    # ---- helpers -------------------------------------------------------------------
    def _require(self, part: str) -> None:
        if part not in self.parts:
            what = "text generation (forward)" if part == "text" else "reference tokenising (image features/tokens)"
            raise RuntimeError(f"this AR model was built with parts={self.parts}; {what} needs the {part!r} part")

    @property
    def language_model(self) -> TextModel:
        self._require("text")
        return self.model.language_model

    @property
    def device(self) -> torch.device:
        # lm_head (text part): the embedding table may stay in RAM under a partial load
        head = self.lm_head if "text" in self.parts else self.model.vqmodel.quant_conv
        return head.weight.device

    @device.setter
    def device(self, value) -> None:
        # ComfyUI's ModelPatcher records where it moved the model by assigning `model.device`;
        # the real device is always read off the weights.
        pass

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None, key_columns: bool = False) -> KVCache:
        c = self.text_config
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim,
                       dtype or self.compute_dtype, device if device is not None else self.device,
                       key_columns=key_columns)

    # ---- text ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Optional[KVCache] = None,
                start: int = 0, last_only: bool = False, dtype=None) -> torch.Tensor:
        """Logits [B, L (or 1), vision_vocab] for ``input_ids`` [B, L] (image placeholders already
        replaced by VQ ids) at 3-axis ``position_ids`` [3, B, L] / [3, L]. With ``cache``, the keys and
        values are written at ``start``…``start+L`` and attention covers the cache up to there."""
        dtype = dtype or self.compute_dtype
        device = input_ids.device
        lm = self.language_model
        x = lm.embed(input_ids, dtype, device)
        cos, sin = lm.rope(position_ids.to(device), dtype)
        h = lm(x, cos, sin, cache, start, last_only)
        return self.lm_head(h)

    # ---- vision ----------------------------------------------------------------------
    def image_features(self, pixel_rows: torch.Tensor, grids: Sequence[Tuple[int, int]], dtype=None) -> torch.Tensor:
        """Vision-tower features [sum(h*w), C] of images packed as pixel rows [N, 3*p*p]."""
        self._require("vision")
        dtype = dtype or self.compute_dtype
        return self.model.visual(pixel_rows.to(dtype), [(int(h), int(w)) for h, w in grids])

    def image_tokens(self, features: torch.Tensor, grids: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """VQ id grids [h, w] (int64) per image from packed features."""
        self._require("vision")
        out = []
        for f, (h, w) in zip(features.split([int(h) * int(w) for h, w in grids]), grids):
            out.append(self.model.vqmodel.encode_ids(f, int(h), int(w)).view(int(h), int(w)))
        return out


def relayout_for_cpu_gemv(model: nn.Module, min_out: int = 2048) -> None:
    """Store big CPU fp32 Linear weights column-major (``W.t().contiguous().t()``: same shape and
    values, transposed strides). x @ W.T then reads W row by row contiguous, which MKL's one-row GEMM
    streams ~2-3x faster than its transposed GEMV on large matrices (the AR decode step is a chain of
    one-row products). Numerics differ from the row-major product only by float rounding."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.device.type == "cpu" \
                and w.dtype == torch.float32 and w.dim() == 2 and w.shape[0] >= min_out and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
