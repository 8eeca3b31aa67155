"""Glyph conditioning of GLM-Image: quoted-text extraction, ByT5 byte tokenizer and the
ByT5 (T5 encoder) "Glyph" text encoder, reproducing ``GlmImagePipeline._get_glyph_embeds``.

Plain PyTorch: no transformers import. Parameter names are those of transformers'
``T5EncoderModel`` (``shared.weight``, ``encoder.block.{i}.layer.{0,1}...``,
``encoder.final_layer_norm.weight``); ``encoder.embed_tokens.weight`` is tied to ``shared``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from ..loading.checkpoint import CheckpointError, read_json, storage_dtypes, weight_files
from ..loading.build import build_loaded, default_compute_dtype

MAX_GLYPH_TOKENS = 2048  # the pipeline's max_sequence_length default

# --------------------------------------------------------------------------------------
# Quoted text
# --------------------------------------------------------------------------------------

_QUOTE_PATTERNS = (
    re.compile(r"'([^']*)'"),
    re.compile("\u201c([^\u201c\u201d]*)\u201d"),
    re.compile(r'"([^"]*)"'),
    re.compile(r"「([^「」]*)」"),
)


def extract_glyph_texts(prompt: str) -> List[str]:
    """Texts to render, exactly like diffusers ``GlmImagePipeline.get_glyph_texts``.

    Grouped by quote type, not by position: all '…' spans, then “…”, then "…", then 「…」.
    Apostrophes pair up like quotes (``don't … it's`` yields ``"t … it"``), as upstream.
    Returns ``[""]`` when the prompt has no quoted text (what the pipeline then encodes).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    texts: List[str] = []
    for pat in _QUOTE_PATTERNS:
        texts.extend(pat.findall(prompt))
    return texts if texts else [""]


# --------------------------------------------------------------------------------------
# ByT5 tokenizer
# --------------------------------------------------------------------------------------

class ByT5Tokenizer:
    """Byte-level ByT5 tokenizer (id = utf-8 byte + 3; pad 0, eos 1, unk 2; EOS appended).

    Matches transformers' slow ``ByT5Tokenizer`` including its added-token handling: the special
    strings (``<pad>``, ``</s>``, ``<unk>``, ``<extra_id_N>``) found in the text become their ids,
    with the configured left/right whitespace stripping, and no second EOS is appended when the
    text already ends with ``</s>``.
    """

    offset = 3

    def __init__(self, pad_token: str = "<pad>", eos_token: str = "</s>", unk_token: str = "<unk>",
                 added_tokens: Optional[Dict[int, dict]] = None, extra_ids: int = 125):
        self.pad_token, self.eos_token, self.unk_token = pad_token, eos_token, unk_token
        self.pad_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2
        # id -> {content, lstrip, rstrip}
        tokens: Dict[int, dict] = {
            0: {"content": pad_token, "lstrip": True, "rstrip": True},
            1: {"content": eos_token, "lstrip": True, "rstrip": True},
            2: {"content": unk_token, "lstrip": True, "rstrip": True},
        }
        if added_tokens is None:
            added_tokens = {259 + i: {"content": f"<extra_id_{i}>"} for i in range(int(extra_ids))}
        for i, t in added_tokens.items():
            i = int(i)
            strip = i in tokens   # pad/eos/unk strip surrounding whitespace unless the config says otherwise
            tokens[i] = {"content": t.get("content", tokens.get(i, {}).get("content")),
                         "lstrip": bool(t.get("lstrip", strip)), "rstrip": bool(t.get("rstrip", strip))}
        self.added_tokens_decoder = tokens
        self.added_tokens_encoder = {t["content"]: i for i, t in tokens.items()}
        alts = sorted(self.added_tokens_encoder, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")") if alts else None

    @classmethod
    def from_folder(cls, tokenizer_dir: Optional[str]) -> "ByT5Tokenizer":
        """Build from a ``tokenizer/`` folder (``tokenizer_config.json``, ``added_tokens.json``,
        ``special_tokens_map.json``; all optional). ``None`` gives the default ByT5 tokenizer."""
        if tokenizer_dir is None:
            return cls()
        if not os.path.isdir(tokenizer_dir):
            raise CheckpointError(f"tokenizer folder not found: {tokenizer_dir}")

        def maybe(name):
            p = os.path.join(tokenizer_dir, name)
            return read_json(p) if os.path.isfile(p) else {}

        return cls.from_configs(maybe("tokenizer_config.json"), maybe("special_tokens_map.json"),
                                maybe("added_tokens.json"), tokenizer_dir)

    @classmethod
    def from_configs(cls, cfg: dict, stm: dict, added_json: dict, where: str) -> "ByT5Tokenizer":
        """From the parsed ``tokenizer_config.json``, ``special_tokens_map.json`` and
        ``added_tokens.json`` ({} where absent); ``where`` names their source in errors."""
        cls_name = cfg.get("tokenizer_class")
        if cls_name and cls_name not in ("ByT5Tokenizer",):
            raise CheckpointError(f"{where}: tokenizer_class is {cls_name!r}, expected 'ByT5Tokenizer'")

        def content(key, default):
            v = cfg.get(key, stm.get(key, default))
            return v.get("content", default) if isinstance(v, dict) else (v or default)

        added: Dict[int, dict] = {}
        for i, t in (cfg.get("added_tokens_decoder") or {}).items():
            added[int(i)] = dict(t)
        for tok, i in added_json.items():
            added.setdefault(int(i), {"content": tok})
        if not added:
            extra = cfg.get("extra_ids", 125) or 0
            extra_tokens = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
            names = [t if isinstance(t, str) else t.get("content") for t in extra_tokens] or \
                [f"<extra_id_{i}>" for i in range(int(extra))]
            added = {259 + i: {"content": n} for i, n in enumerate(names)}
        return cls(content("pad_token", "<pad>"), content("eos_token", "</s>"), content("unk_token", "<unk>"),
                   added_tokens=added)

    def __len__(self) -> int:
        return max(256 + self.offset, max(self.added_tokens_decoder) + 1)

    def tokenize_ids(self, text: str) -> List[int]:
        """Ids of ``text`` without EOS or truncation."""
        if self._split_re is None or not text:
            return [b + self.offset for b in text.encode("utf-8")]
        pieces = [p for p in self._split_re.split(text)]
        # re.split with one capture group: odd indices are the added tokens
        is_tok = [i % 2 == 1 for i in range(len(pieces))]
        for i, piece in enumerate(pieces):
            if not is_tok[i]:
                continue
            t = self.added_tokens_decoder[self.added_tokens_encoder[piece]]
            if t["rstrip"] and i + 1 < len(pieces) and pieces[i + 1] and not is_tok[i + 1]:
                pieces[i + 1] = pieces[i + 1].lstrip()
            if t["lstrip"] and i > 0 and pieces[i - 1] and not is_tok[i - 1]:
                pieces[i - 1] = pieces[i - 1].rstrip()
        ids: List[int] = []
        for piece, tok in zip(pieces, is_tok):
            if not piece:
                continue
            if tok:
                ids.append(self.added_tokens_encoder[piece])
            else:
                ids.extend(b + self.offset for b in piece.encode("utf-8"))
        return ids

    def encode(self, text: str, max_length: Optional[int] = MAX_GLYPH_TOKENS, truncation: bool = True) -> List[int]:
        """``tokenizer(text, max_length=..., truncation=True).input_ids``: ids + EOS, at most ``max_length``."""
        ids = self.tokenize_ids(text)
        total = len(ids) + 1
        if truncation and max_length and total > max_length:
            ids = ids[:-(total - max_length)]
        if ids and ids[-1] == self.eos_token_id:
            warnings.warn(f"This sequence already has {self.eos_token}. In future versions this behavior may lead "
                          "to duplicated eos tokens being added.")
            return ids
        return ids + [self.eos_token_id]

    def __call__(self, texts, max_length: Optional[int] = MAX_GLYPH_TOKENS, truncation: bool = True) -> List[List[int]]:
        if isinstance(texts, str):
            texts = [texts]
        return [self.encode(t, max_length, truncation) for t in texts]


def load_glyph_tokenizer(tokenizer_dir: Optional[str]) -> ByT5Tokenizer:
    return ByT5Tokenizer.from_folder(tokenizer_dir)


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


def load_glyph_encoder(component_dir: str, dtype=torch.float32, device="cpu", operations=torch.nn,
                       compute_dtype=None) -> GlyphT5Encoder:
    """Build ``GlyphT5Encoder`` from ``text_encoder/config.json`` + safetensors (strict; the tied
    ``encoder.embed_tokens.weight`` may be present or absent)."""
    return build_glyph_encoder(read_json(os.path.join(component_dir, "config.json")), weight_files(component_dir),
                               dtype=dtype, device=device, operations=operations, compute_dtype=compute_dtype,
                               what="GLM-Image glyph encoder (text_encoder/)")


def build_glyph_encoder(config: dict, files: Sequence[str], dtype=torch.float32, device="cpu", operations=torch.nn,
                        compute_dtype=None, what: str = "GLM-Image glyph encoder") -> GlyphT5Encoder:
    """``GlyphT5Encoder`` from a config dict and safetensors files (a folder's or one single file).
    The T5 encoder is small and numerically sensitive: an fp8 request stores it in the compute dtype."""
    def make(ops):
        return GlyphT5Encoder(config, dtype=dtype, device="meta", operations=ops, compute_dtype=compute_dtype)

    compute = compute_dtype or default_compute_dtype(dtype)
    return build_loaded(make, operations, files, what, storage=storage_dtypes(dtype, None, compute), device=device,
                        # the official file may hold the shared table under its encoder alias only
                        aliases={"encoder.embed_tokens.weight": "shared.weight"},
                        ignore_unexpected=("encoder.embed_tokens.weight",))


# --------------------------------------------------------------------------------------
# Glyph embeddings
# --------------------------------------------------------------------------------------

def _param_device(module: nn.Module):
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def encode_glyph_texts(encoder: GlyphT5Encoder, tokenizer: ByT5Tokenizer, texts: Sequence[str],
                       device=None, dtype=None, max_length: int = MAX_GLYPH_TOKENS) -> torch.Tensor:
    """Glyph embeddings ``[1, sum L, d_model]`` of a list of spans, exactly like the pipeline's
    ``_get_glyph_embeds`` for one prompt.

    Quirk kept: ``[pad] * ((len(input_ids) + 1) % 2)`` counts *spans*, so with an even number of
    spans every span gets a leading pad id 0 that is kept (mask 1). Spans are right-padded to a
    common length, encoded with the mask, and the masked-in states concatenated in order.
    ``device``: where to run and return (default: the encoder's); ``dtype``: output dtype.
    """
    texts = list(texts) or [""]
    device = torch.device(device) if device is not None else _param_device(encoder)
    ids = tokenizer(texts, max_length=max_length, truncation=True)
    pad = tokenizer.pad_token_id
    ids = [[pad] * ((len(ids) + 1) % 2) + x for x in ids]
    n = max(len(x) for x in ids)
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], device=device)
    input_ids = torch.tensor([x + [pad] * (n - len(x)) for x in ids], device=device)
    states = encoder(input_ids, attention_mask=mask)
    out = states[mask.bool()].unsqueeze(0)
    return out.to(device=device, dtype=dtype or out.dtype)


def glyph_for_prompt(encoder: GlyphT5Encoder, tokenizer: ByT5Tokenizer, prompt: str, device=None, dtype=None,
                     max_length: int = MAX_GLYPH_TOKENS) -> torch.Tensor:
    """Prompt -> quoted spans -> glyph embeddings [1, L, d_model]."""
    return encode_glyph_texts(encoder, tokenizer, extract_glyph_texts(prompt), device, dtype, max_length)


def uncond_glyph(encoder: GlyphT5Encoder, tokenizer: ByT5Tokenizer, device=None, dtype=None,
                 batch_size: int = 1) -> torch.Tensor:
    """The unconditional glyph embedding: the encoding of ``[""]`` ([batch, 1, d_model])."""
    e = encode_glyph_texts(encoder, tokenizer, [""], device, dtype)
    return e.expand(batch_size, -1, -1).contiguous() if batch_size != 1 else e


def pad_glyph_batch(embeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """Left-pad per-prompt glyph embeddings [1, L_i, d] with zero vectors and stack -> [B, max L, d]
    (the pipeline's batching; the zeros take part in attention, as upstream)."""
    n = max(e.shape[1] for e in embeds)
    out = []
    for e in embeds:
        if e.shape[1] < n:
            e = torch.cat([torch.zeros(e.shape[0], n - e.shape[1], e.shape[2], device=e.device, dtype=e.dtype), e], dim=1)
        out.append(e)
    return torch.cat(out, dim=0)


def encode_glyph_batch(encoder: GlyphT5Encoder, tokenizer: ByT5Tokenizer, prompts: Sequence[str], device=None,
                       dtype=None, max_length: int = MAX_GLYPH_TOKENS) -> torch.Tensor:
    """Glyph embeddings of several prompts, left zero-padded to a common length ([B, L, d])."""
    embeds = [glyph_for_prompt(encoder, tokenizer, p, device, None, max_length) for p in prompts]
    out = pad_glyph_batch(embeds)
    return out.to(dtype=dtype or out.dtype)
