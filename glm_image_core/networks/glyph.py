"""GLM-Image's glyph encoder: the ByT5 (T5 encoder) network that encodes the prompt's quoted text
(``text_encoder/``), in plain PyTorch: no transformers import.

Parameter names are those of transformers' ``T5EncoderModel`` (``shared.weight``,
``encoder.block.{i}.layer.{0,1}...``, ``encoder.final_layer_norm.weight``);
``encoder.embed_tokens.weight`` is tied to ``shared``. The text side (quote extraction, the byte
tokenizer, embedding a prompt) is ``generation.glyph_text``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .common import default_compute_dtype


# --------------------------------------------------------------------------------------
# T5 encoder
# --------------------------------------------------------------------------------------

DEFAULT_T5_CONFIG = {   # official GLM-Image text_encoder (byt5-small-like); defaults for missing keys
    "vocab_size": 384, "d_model": 1472, "d_kv": 64, "d_ff": 3584, "num_layers": 12, "num_heads": 6,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
}


def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


_T5_ACTS = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class _T5LayerNorm(nn.Module):
    """T5 RMS norm: fp32 variance, no mean subtraction, no bias."""

    def __init__(self, d, eps, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype, device=device))
        self.variance_epsilon = eps

    def forward(self, x):
        in_dtype = x.dtype
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if in_dtype in (torch.float16, torch.bfloat16):
            x = x.to(in_dtype)
        return self.weight.to(device=x.device, dtype=x.dtype) * x


class _T5Attention(nn.Module):
    def __init__(self, c, has_bias, ops, dtype, device):
        super().__init__()
        d, self.n_heads, self.d_kv = c["d_model"], c["num_heads"], c["d_kv"]
        inner = self.n_heads * self.d_kv
        self.num_buckets = c["relative_attention_num_buckets"]
        self.max_distance = c["relative_attention_max_distance"]
        self.q = ops.Linear(d, inner, bias=False, dtype=dtype, device=device)
        self.k = ops.Linear(d, inner, bias=False, dtype=dtype, device=device)
        self.v = ops.Linear(d, inner, bias=False, dtype=dtype, device=device)
        self.o = ops.Linear(inner, d, bias=False, dtype=dtype, device=device)
        if has_bias:
            self.relative_attention_bias = ops.Embedding(self.num_buckets, self.n_heads, dtype=dtype, device=device)

    @staticmethod
    def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
        relative_buckets = 0
        if bidirectional:
            num_buckets //= 2
            relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
            relative_position = torch.abs(relative_position)
        else:
            relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        relative_position_if_large = max_exact + (
            torch.log(relative_position.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        relative_position_if_large = torch.min(
            relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
        relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
        return relative_buckets

    def compute_bias(self, q_len, k_len, device, dtype):
        ctx = torch.arange(q_len, dtype=torch.long, device=device)[:, None]
        mem = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
        buckets = self.relative_position_bucket(mem - ctx, bidirectional=True, num_buckets=self.num_buckets,
                                                max_distance=self.max_distance)
        values = self.relative_attention_bias(buckets).to(dtype)      # [q, k, heads]
        return values.permute([2, 0, 1]).unsqueeze(0)                   # [1, heads, q, k]

    def forward(self, h, attn_bias):
        B, S, _ = h.shape
        q = self.q(h).view(B, S, -1, self.d_kv).transpose(1, 2)
        k = self.k(h).view(B, S, -1, self.d_kv).transpose(1, 2)
        v = self.v(h).view(B, S, -1, self.d_kv).transpose(1, 2)
        o = attention(q, k, v, attn_bias, 1.0)        # T5: no 1/sqrt(d) scaling
        o = o.transpose(1, 2).contiguous().reshape(B, S, -1).contiguous()
        return self.o(o)


class _T5LayerSelfAttention(nn.Module):
    def __init__(self, c, has_bias, ops, dtype, device):
        super().__init__()
        self.SelfAttention = _T5Attention(c, has_bias, ops, dtype, device)
        self.layer_norm = _T5LayerNorm(c["d_model"], c["layer_norm_epsilon"], dtype, device)

    def forward(self, h, attn_bias):
        return h + self.SelfAttention(self.layer_norm(h), attn_bias)


class _T5DenseGatedActDense(nn.Module):
    def __init__(self, c, act, ops, dtype, device):
        super().__init__()
        self.wi_0 = ops.Linear(c["d_model"], c["d_ff"], bias=False, dtype=dtype, device=device)
        self.wi_1 = ops.Linear(c["d_model"], c["d_ff"], bias=False, dtype=dtype, device=device)
        self.wo = ops.Linear(c["d_ff"], c["d_model"], bias=False, dtype=dtype, device=device)
        self.act = act

    def forward(self, h):
        return self.wo(self.act(self.wi_0(h)) * self.wi_1(h))


class _T5DenseActDense(nn.Module):
    def __init__(self, c, act, ops, dtype, device):
        super().__init__()
        self.wi = ops.Linear(c["d_model"], c["d_ff"], bias=False, dtype=dtype, device=device)
        self.wo = ops.Linear(c["d_ff"], c["d_model"], bias=False, dtype=dtype, device=device)
        self.act = act

    def forward(self, h):
        return self.wo(self.act(self.wi(h)))


class _T5LayerFF(nn.Module):
    def __init__(self, c, gated, act, ops, dtype, device):
        super().__init__()
        cls = _T5DenseGatedActDense if gated else _T5DenseActDense
        self.DenseReluDense = cls(c, act, ops, dtype, device)
        self.layer_norm = _T5LayerNorm(c["d_model"], c["layer_norm_epsilon"], dtype, device)

    def forward(self, h):
        return h + self.DenseReluDense(self.layer_norm(h))


def _clamp_fp16(h):
    if h.dtype == torch.float16:
        clamp_value = torch.where(torch.isinf(h).any(), torch.finfo(h.dtype).max - 1000, torch.finfo(h.dtype).max)
        h = torch.clamp(h, min=-clamp_value, max=clamp_value)
    return h


class _T5Block(nn.Module):
    def __init__(self, c, has_bias, gated, act, ops, dtype, device):
        super().__init__()
        self.layer = nn.ModuleList([_T5LayerSelfAttention(c, has_bias, ops, dtype, device),
                                    _T5LayerFF(c, gated, act, ops, dtype, device)])

    def forward(self, h, attn_bias):
        h = _clamp_fp16(self.layer[0](h, attn_bias))
        return _clamp_fp16(self.layer[1](h))


class _T5Stack(nn.Module):
    def __init__(self, c, gated, act, ops, dtype, device):
        super().__init__()
        self.block = nn.ModuleList([_T5Block(c, i == 0, gated, act, ops, dtype, device) for i in range(c["num_layers"])])
        self.final_layer_norm = _T5LayerNorm(c["d_model"], c["layer_norm_epsilon"], dtype, device)


def _t5_act(c: dict):
    ffp = str(c.get("feed_forward_proj", "gated-gelu"))
    info = ffp.split("-")
    gated = info[0] == "gated" and len(info) == 2
    act_name = "gelu_new" if ffp == "gated-gelu" else c.get("dense_act_fn", info[-1])
    if act_name not in _T5_ACTS:
        raise ValueError(f"unsupported T5 activation {act_name!r} (feed_forward_proj={ffp!r})")
    return gated, _T5_ACTS[act_name]


class GlyphT5Encoder(nn.Module):
    """ByT5 ``T5EncoderModel``: ``forward(input_ids [B, S], attention_mask [B, S]) -> [B, S, d_model]``."""

    def __init__(self, config: dict, dtype=None, device=None, operations=torch.nn, compute_dtype=None):
        super().__init__()
        c = dict(DEFAULT_T5_CONFIG)
        c.update({k: v for k, v in (config or {}).items() if v is not None})
        self.config = c
        self.d_model = int(c["d_model"])
        self.compute_dtype = default_compute_dtype(dtype) if compute_dtype is None else compute_dtype
        gated, act = _t5_act(c)
        self.shared = operations.Embedding(c["vocab_size"], c["d_model"], dtype=dtype, device=device)
        self.encoder = _T5Stack(c, gated, act, operations, dtype, device)
        self._bias_cache: Dict[tuple, torch.Tensor] = {}

    def position_bias(self, seq_len: int, device, dtype) -> torch.Tensor:
        key = (int(seq_len), str(device), dtype)
        hit = self._bias_cache.get(key)
        if hit is None:
            attn0 = self.encoder.block[0].layer[0].SelfAttention
            hit = attn0.compute_bias(seq_len, seq_len, device, dtype)
            if len(self._bias_cache) > 8:
                self._bias_cache.clear()
            self._bias_cache[key] = hit
        return hit

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = self.compute_dtype
        h = self.shared(input_ids).to(dtype)
        S = input_ids.shape[1]
        bias = self.position_bias(S, h.device, dtype)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            keep = attention_mask.to(device=h.device).bool()[:, None, None, :].expand(-1, 1, S, S)
            bias = torch.where(keep, bias, torch.finfo(dtype).min)
        for blk in self.encoder.block:
            h = blk(h, bias)
        return self.encoder.final_layer_norm(h)
