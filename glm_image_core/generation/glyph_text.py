"""Glyph conditioning of GLM-Image: quoted-text extraction, the ByT5 byte tokenizer and the glyph
embeddings of a prompt, reproducing ``GlmImagePipeline._get_glyph_embeds``; the encoder network is
``networks.glyph``.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..loading.checkpoint import read_json
from ..networks.glyph import GlyphT5Encoder

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
