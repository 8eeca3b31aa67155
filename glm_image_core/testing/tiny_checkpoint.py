"""Random-weight GLM-Image checkpoints in the exact official (diffusers-style) layout.

Writes ``model_index.json`` and the seven subfolders with the official file names, config
keys and tensor names, so the same folder loads in this pack and in the reference
``diffusers.GlmImagePipeline``. Used by the tests (``tiny``), the demo (``tiny``) and the
benchmarks (``medium``). Plain PyTorch + ``tokenizers``; nothing is downloaded.

The AR tokenizer is a byte-level BPE with no merges whose byte tokens sit at ``16512 + byte``
(the text-id range of the real tokenizer) and whose special tokens have GLM-Image's real ids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable, Dict, Iterator, Tuple

import torch

from ..loading.checkpoint import SAFETENSORS_DTYPES
from ..loading.configs import CODEBOOK_SIZE, FULL_SIZE, SPECIAL_TOKENS, official_configs

# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------

# size name -> (AR text, AR vision, VQ, DiT, T5, VAE) settings
SIZES: Dict[str, dict] = {
    "full": FULL_SIZE,
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, mrope_section=[2, 1, 1]),
        vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, image_size=64),
        vq=dict(embed_dim=24, num_embeddings=CODEBOOK_SIZE),
        dit=dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, time_embed_dim=16, condition_dim=8),
        t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        vae=dict(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4),
    ),
    "medium": dict(
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=1024, image_size=64),
        vq=dict(embed_dim=256, num_embeddings=CODEBOOK_SIZE),
        dit=dict(num_layers=8, attention_head_dim=64, num_attention_heads=8, time_embed_dim=256, condition_dim=128),
        t5=dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4),
        vae=dict(block_out_channels=[32, 64, 128, 128], layers_per_block=2, norm_num_groups=32),
    ),
}

# The official AR depth (40 decoder layers) at a tiny width: a decode step costs almost nothing in
# arithmetic, so its time is per-token overhead (kernel launches, Python, syncs); bench/bench_ar.py.
SIZES["deep"] = dict(SIZES["tiny"], text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=40,
                                              num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 1, 1]))
# Tiny variants of the AR's attention geometry, for seed parity beyond the default tiny config: a GQA
# ratio of 4 with other unequal MRoPE sections, and a head_dim of 32 without GQA.
SIZES["tiny-gqa4"] = dict(SIZES["tiny"], text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=1,
                                                   mrope_section=[1, 2, 1]))
SIZES["tiny-hd32"] = dict(SIZES["tiny"], text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=2, num_key_value_heads=2,
                                                   mrope_section=[3, 3, 2]))


def configs_for(size: str) -> Dict[str, dict]:
    """All config files (relative path -> dict) of a checkpoint of the given size."""
    if size not in SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}; choose one of {sorted(SIZES)}")
    return official_configs(SIZES[size])


# --------------------------------------------------------------------------------------
# Tensor names and shapes, derived from the configs
# --------------------------------------------------------------------------------------

Shape = Tuple[int, ...]


def _linear(name: str, out_f: int, in_f: int, bias: bool = True) -> Iterator[Tuple[str, Shape]]:
    yield f"{name}.weight", (out_f, in_f)
    if bias:
        yield f"{name}.bias", (out_f,)


def ar_shapes(cfg: dict) -> Iterator[Tuple[str, Shape]]:
    t, v, q = cfg["text_config"], cfg["vision_config"], cfg["vq_config"]
    h, inter = t["hidden_size"], t["intermediate_size"]
    hd = t.get("head_dim") or h // t["num_attention_heads"]
    nq, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    yield from _linear("lm_head", t["vision_vocab_size"], h, bias=False)
    lm = "model.language_model"
    yield f"{lm}.embed_tokens.weight", (t["vocab_size"], h)
    for i in range(t["num_hidden_layers"]):
        p = f"{lm}.layers.{i}"
        for n in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"):
            yield f"{p}.{n}.weight", (h,)
        yield from _linear(f"{p}.self_attn.q_proj", nq * hd, h)
        yield from _linear(f"{p}.self_attn.k_proj", nkv * hd, h)
        yield from _linear(f"{p}.self_attn.v_proj", nkv * hd, h)
        yield from _linear(f"{p}.self_attn.o_proj", h, nq * hd, bias=False)
        yield from _linear(f"{p}.mlp.gate_up_proj", 2 * inter, h, bias=False)
        yield from _linear(f"{p}.mlp.down_proj", h, inter, bias=False)
    yield f"{lm}.norm.weight", (h,)
    vh, ps = v["hidden_size"], v["patch_size"]
    yield "model.visual.patch_embed.proj.weight", (vh, v["in_channels"], ps, ps)
    yield "model.visual.patch_embed.proj.bias", (vh,)
    yield "model.visual.embeddings.position_embedding.weight", ((v["image_size"] // ps) ** 2, vh)
    for i in range(v["depth"]):
        p = f"model.visual.blocks.{i}"
        for n in ("norm1", "norm2"):
            yield f"{p}.{n}.weight", (vh,)
            yield f"{p}.{n}.bias", (vh,)
        yield from _linear(f"{p}.attn.qkv", 3 * vh, vh)
        yield from _linear(f"{p}.attn.proj", vh, vh)
        yield from _linear(f"{p}.mlp.fc1", v["intermediate_size"], vh)
        yield from _linear(f"{p}.mlp.fc2", vh, v["intermediate_size"])
    yield "model.vqmodel.quantize.embedding.weight", (q["num_embeddings"], q["embed_dim"])
    yield "model.vqmodel.quant_conv.weight", (q["embed_dim"], q["latent_channels"], 1, 1)
    yield "model.vqmodel.quant_conv.bias", (q["embed_dim"],)
    yield "model.vqmodel.post_quant_conv.weight", (q["latent_channels"], q["embed_dim"], 1, 1)
    yield "model.vqmodel.post_quant_conv.bias", (q["latent_channels"],)


def dit_shapes(cfg: dict) -> Iterator[Tuple[str, Shape]]:
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, te, cd = cfg["patch_size"], cfg["time_embed_dim"], cfg["condition_dim"]
    yield from _linear("image_projector.proj", D, cfg["in_channels"] * p * p)
    yield from _linear("glyph_projector.net.0.proj", D, cfg["text_embed_dim"])
    yield from _linear("glyph_projector.net.2", D, D)
    yield "prior_token_embedding.weight", (cfg["prior_vq_quantizer_codebook_size"], D)
    yield from _linear("prior_projector.net.0.proj", D, D)
    yield from _linear("prior_projector.net.2", D, D)
    yield from _linear("time_condition_embed.timestep_embedder.linear_1", te, te)
    yield from _linear("time_condition_embed.timestep_embedder.linear_2", te, te)
    yield from _linear("time_condition_embed.condition_embedder.linear_1", te, 4 * cd)
    yield from _linear("time_condition_embed.condition_embedder.linear_2", te, te)
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}"
        yield from _linear(f"{b}.norm1.linear", 12 * D, te)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            yield from _linear(f"{b}.attn1.{n}", D, D)
        yield from _linear(f"{b}.ff.net.0.proj", 4 * D, D)
        yield from _linear(f"{b}.ff.net.2", D, 4 * D)
    yield from _linear("norm_out.linear", 2 * D, te)
    yield from _linear("proj_out", p * p * cfg["out_channels"], D)


def t5_shapes(cfg: dict) -> Iterator[Tuple[str, Shape]]:
    d, inner, ff = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    yield "shared.weight", (cfg["vocab_size"], d)
    for i in range(cfg["num_layers"]):
        p = f"encoder.block.{i}.layer"
        for n in ("q", "k", "v"):
            yield f"{p}.0.SelfAttention.{n}.weight", (inner, d)
        yield f"{p}.0.SelfAttention.o.weight", (d, inner)
        if i == 0:
            yield f"{p}.0.SelfAttention.relative_attention_bias.weight", (cfg["relative_attention_num_buckets"],
                                                                          cfg["num_heads"])
        yield f"{p}.0.layer_norm.weight", (d,)
        yield f"{p}.1.DenseReluDense.wi_0.weight", (ff, d)
        yield f"{p}.1.DenseReluDense.wi_1.weight", (ff, d)
        yield f"{p}.1.DenseReluDense.wo.weight", (d, ff)
        yield f"{p}.1.layer_norm.weight", (d,)
    yield "encoder.final_layer_norm.weight", (d,)


def vae_shapes(cfg: dict) -> Iterator[Tuple[str, Shape]]:
    ch, L, z = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]

    def conv(name, o, i, k=3):
        yield f"{name}.weight", (o, i, k, k)
        yield f"{name}.bias", (o,)

    def norm(name, c):
        yield f"{name}.weight", (c,)
        yield f"{name}.bias", (c,)

    def resnet(name, i, o):
        yield from norm(f"{name}.norm1", i)
        yield from conv(f"{name}.conv1", o, i)
        yield from norm(f"{name}.norm2", o)
        yield from conv(f"{name}.conv2", o, o)
        if i != o:
            yield from conv(f"{name}.conv_shortcut", o, i, 1)

    def mid(prefix, c):
        for r in range(2):
            yield from resnet(f"{prefix}.mid_block.resnets.{r}", c, c)
        if cfg.get("mid_block_add_attention", True):
            a = f"{prefix}.mid_block.attentions.0"
            yield from norm(f"{a}.group_norm", c)
            for n in ("to_q", "to_k", "to_v", "to_out.0"):
                yield from _linear(f"{a}.{n}", c, c)

    yield from conv("encoder.conv_in", ch[0], cfg["in_channels"])
    prev = ch[0]
    for b, c in enumerate(ch):
        for r in range(L):
            yield from resnet(f"encoder.down_blocks.{b}.resnets.{r}", prev if r == 0 else c, c)
        prev = c
        if b < len(ch) - 1:
            yield from conv(f"encoder.down_blocks.{b}.downsamplers.0.conv", c, c)
    yield from mid("encoder", ch[-1])
    yield from norm("encoder.conv_norm_out", ch[-1])
    yield from conv("encoder.conv_out", 2 * z, ch[-1])
    if cfg.get("use_quant_conv", True):
        yield from conv("quant_conv", 2 * z, 2 * z, 1)
    if cfg.get("use_post_quant_conv", True):
        yield from conv("post_quant_conv", z, z, 1)
    rch = list(reversed(ch))
    yield from conv("decoder.conv_in", rch[0], z)
    yield from mid("decoder", rch[0])
    prev = rch[0]
    for b, c in enumerate(rch):
        for r in range(L + 1):
            yield from resnet(f"decoder.up_blocks.{b}.resnets.{r}", prev if r == 0 else c, c)
        prev = c
        if b < len(ch) - 1:
            yield from conv(f"decoder.up_blocks.{b}.upsamplers.0.conv", c, c)
    yield from norm("decoder.conv_norm_out", rch[-1])
    yield from conv("decoder.conv_out", cfg["out_channels"], rch[-1])


# --------------------------------------------------------------------------------------
# Random values
# --------------------------------------------------------------------------------------

def _init_tensor(name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """A random value that keeps activations O(1) through a deep random network (float32, on the
    generator's device)."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1:
        is_norm = any(k in name for k in ("norm", "layernorm", "layer_norm"))
        if leaf == "weight" and is_norm:
            return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=gen.device)
        return 0.02 * torch.randn(shape, generator=gen, device=gen.device)
    if "embed_tokens" in name or "shared.weight" in name or "prior_token_embedding" in name \
            or "position_embedding" in name or "quantize.embedding" in name:
        return torch.randn(shape, generator=gen, device=gen.device)
    if "relative_attention_bias" in name:
        return 0.5 * torch.randn(shape, generator=gen, device=gen.device)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen, device=gen.device) / math.sqrt(fan_in)


def random_tensors(shapes: Iterator[Tuple[str, Shape]], seed: int, dtype: torch.dtype = torch.float32,
                   device="cpu") -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, value) one tensor at a time, drawn in order from one generator: the values depend only on
    (shapes, seed, device), never on how they are grouped into files."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes:
        yield name, _init_tensor(name, shape, gen).to(dtype).contiguous()


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------

def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 byte-to-unicode table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def glm_tokenizer_json() -> dict:
    """processor/tokenizer.json: byte-level BPE without merges, real special-token ids."""
    vocab = {"<|dit_token_16384|>": 16384, "<|dit_token_16385|>": 16385}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = 16512 + b
    for tok, i in SPECIAL_TOKENS.items():
        vocab.setdefault(tok, i)
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for tok, i in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


GLM_TOKENIZER_CONFIG = {
    "backend": "tokenizers", "bos_token": "<|dit_token_16384|>", "eos_token": "<|dit_token_16385|>",
    "extra_special_tokens": [], "grid_bos_token": "<sop>", "grid_eos_token": "<eop>", "image_token": "<|image|>",
    "model_max_length": 1000000000000000019884624838656, "pad_token": "<|endoftext|>", "padding_side": "left",
    "processor_class": "GlmImageProcessor", "tokenizer_class": "TokenizersBackend",
}

CHAT_TEMPLATE = ("{%- for m in messages -%}{%- if m.content is string -%}{{ m.content }}{%- else -%}"
                 "{%- for item in m.content -%}{%- if item.type == 'image' -%}"
                 "<|dit_token_16384|><|image|><|dit_token_16385|>{%- elif item.type == 'text' -%}"
                 "{{ item.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}")


def byt5_tokenizer_files() -> Dict[str, dict]:
    """tokenizer/ (ByT5Tokenizer): no vocab file, 125 extra ids after the 3 specials + 256 bytes."""
    def tok(content, special, strip):
        return {"content": content, "lstrip": strip, "normalized": strip, "rstrip": strip,
                "single_word": False, "special": special}
    decoder = {"0": tok("<pad>", False, True), "1": tok("</s>", False, True), "2": tok("<unk>", False, True)}
    extra = {}
    for i in range(125):
        decoder[str(259 + i)] = tok(f"<extra_id_{i}>", True, False)
        extra[f"<extra_id_{i}>"] = 259 + i
    cfg = {"added_tokens_decoder": decoder, "eos_token": "</s>", "extra_ids": 0,
           "extra_special_tokens": [f"<extra_id_{i}>" for i in range(125)], "model_max_length": 1000000000000000019884624838656,
           "pad_token": "<pad>", "tokenizer_class": "ByT5Tokenizer", "unk_token": "<unk>"}
    return {"tokenizer/tokenizer_config.json": cfg,
            "tokenizer/added_tokens.json": dict(sorted(extra.items()))}


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------

COMPONENT_WEIGHTS: Dict[str, Tuple[str, str, Callable[[dict], Iterator[Tuple[str, Shape]]], int]] = {
    # component: (config file, weights file, shape function, seed offset)
    "text_encoder": ("text_encoder/config.json", "text_encoder/model.safetensors", t5_shapes, 1),
    "vision_language_encoder": ("vision_language_encoder/config.json",
                                "vision_language_encoder/model.safetensors", ar_shapes, 2),
    "transformer": ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", dit_shapes, 3),
    "vae": ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", vae_shapes, 4),
}


def _keep_sampling_in_codebook(w: torch.Tensor, ar_cfg: dict, scale: float = 3.0) -> None:
    """Make the random AR behave like the trained one in the image phase: the rows of ``w`` (lm_head) past the
    codebook (EOS 16385 and the other non-image ids) get logit 0 and the codebook rows are scaled up,
    so top-p (0.75) never keeps a non-codebook id. The official pipeline would otherwise sample such
    an id now and then and crash (a short grid / out-of-range prior id), and no seed-parity test
    could be run against it. Tests of the pack's never-short-grid guarantee build adversarial heads
    of their own."""
    n = int(ar_cfg["vq_config"]["num_embeddings"])
    w[n:] = 0.0
    w[:n] *= scale


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_checkpoint(folder: str, size: str = "tiny", seed: int = 0, max_shard_bytes: int | None = None,
                     dtype: torch.dtype = torch.float32, device="cpu") -> str:
    """Write a complete random GLM-Image folder. Deterministic for a given (size, seed, device, dtype).

    Weights are written one tensor at a time (never a whole state dict in memory: the full size is
    ~36 GB in bf16). ``max_shard_bytes`` splits the AR and DiT weights into ``model-0000i-of-0000n``
    shards with a ``*.safetensors.index.json`` (the layout of the official checkpoint); None writes
    one file each. ``dtype``: storage dtype of the weights; ``device``: where the random values are
    drawn (other devices give other values than the CPU). Returns ``folder``.
    """
    cfgs = configs_for(size)
    for rel, obj in cfgs.items():
        _write_json(os.path.join(folder, rel), obj)
    _write_json(os.path.join(folder, "processor/tokenizer.json"), glm_tokenizer_json())
    _write_json(os.path.join(folder, "processor/tokenizer_config.json"), GLM_TOKENIZER_CONFIG)
    with open(os.path.join(folder, "processor/chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    for rel, obj in byt5_tokenizer_files().items():
        _write_json(os.path.join(folder, rel), obj)
    for comp, (cfg_rel, w_rel, shapes_fn, offset) in COMPONENT_WEIGHTS.items():
        shapes = list(shapes_fn(cfgs[cfg_rel]))
        path = os.path.join(folder, w_rel)
        shard = max_shard_bytes if comp in ("vision_language_encoder", "transformer") else None
        with StreamedSafetensors(path, shapes, dtype, shard) as out:
            for name, t in random_tensors(shapes, seed * 100 + offset, dtype, device):
                if name == "lm_head.weight":
                    _keep_sampling_in_codebook(t, cfgs[cfg_rel])
                out.write(name, t)
                del t
    return folder


class StreamedSafetensors:
    """Safetensors files written one tensor at a time, in any order: the headers (names, dtypes,
    shapes, offsets) are laid out first from the shapes, then each tensor's bytes go to its place.
    With ``max_shard_bytes``: shards + index json as ``save_pretrained(max_shard_size=...)`` writes
    them (keys sorted, a shard closed before it would pass the limit); else one file at ``path``."""

    def __init__(self, path: str, shapes, dtype: torch.dtype, max_shard_bytes: int | None = None):
        self.dtype = dtype
        st_dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
        esize = torch.empty((), dtype=dtype).element_size()
        nbytes = {k: math.prod(shape) * esize for k, shape in shapes}
        shape_of = dict(shapes)
        groups, cur, cur_bytes = [], [], 0
        for k in sorted(nbytes):
            if max_shard_bytes and cur and cur_bytes + nbytes[k] > max_shard_bytes:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append(k)
            cur_bytes += nbytes[k]
        groups.append(cur)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        base, ext = os.path.splitext(os.path.basename(path))
        n = len(groups)
        names = [os.path.basename(path)] if not max_shard_bytes else [f"{base}-{i:05d}-of-{n:05d}{ext}"
                                                                       for i in range(1, n + 1)]
        self._where: Dict[str, Tuple[object, int]] = {}
        self._files = []
        for name, keys in zip(names, groups):
            header, pos = {"__metadata__": {"format": "pt"}}, 0
            for k in keys:
                header[k] = {"dtype": st_dtype, "shape": list(shape_of[k]), "data_offsets": [pos, pos + nbytes[k]]}
                pos += nbytes[k]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)           # data section 8-byte aligned
            f = open(os.path.join(folder, name), "wb")
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + pos)
            self._files.append(f)
            for k in keys:
                self._where[k] = (f, 8 + len(raw) + header[k]["data_offsets"][0])
        if max_shard_bytes:
            _write_json(os.path.join(folder, f"{base}{ext}.index.json"),
                        {"metadata": {"total_size": sum(nbytes.values())},
                         "weight_map": {k: nm for nm, keys in zip(names, groups) for k in sorted(keys)}})
        self._left = set(nbytes)

    def write(self, name: str, t: torch.Tensor) -> None:
        f, off = self._where[name]
        t = t.detach().to("cpu", self.dtype).contiguous()
        f.seek(off)
        f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
        self._left.discard(name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for f in self._files:
            f.close()
        if exc_type is None and self._left:
            raise RuntimeError(f"tensors never written: {sorted(self._left)[:5]}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a random-weight GLM-Image folder in the official layout.")
    ap.add_argument("folder")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=None,
                    help="split AR and DiT weights into shards of at most this size (the official folder: 5e9)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="storage dtype of the weights")
    a = ap.parse_args(argv)
    write_checkpoint(a.folder, a.size, a.seed, a.shard_bytes, dtype=DTYPES[a.dtype])
    print(a.folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
