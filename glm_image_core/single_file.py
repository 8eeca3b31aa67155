"""Single-file GLM-Image checkpoints: one safetensors file per component, for ComfyUI's usual
model folders (``diffusion_models/`` for the DiT, ``text_encoders/`` for the AR model and the glyph
encoder, ``vae/`` for the VAE).

A single file holds the component's tensors under their official names plus, in the safetensors
metadata, the official files the component needs beside its weights (configs, tokenizer and
processor files), keyed by their path in the official folder and stored as text:

* ``glm_image.format``: ``glm-image-single-file``; ``glm_image.format_version``: ``1``;
* ``glm_image.component``: ``dit`` | ``ar`` | ``glyph_encoder`` | ``vae``;
* ``glm_image.files``: JSON ``{"transformer/config.json": "<file text>", ...}``;
* ``glm_image.source``: the official folder's name and pipeline class;
* ``glm_image.dtype``: the dtype asked at conversion (``as_stored``, ``bf16``, ``fp8_e4m3fn`` ...).

The component type is always detected from the tensors (key names and shapes), never taken on
trust from a file name or the metadata; anything else is refused with a message that says which
file, what it looks like and what was expected. Files without this metadata are recognised but
refused with the conversion command (their configs cannot be derived from tensor shapes: head
counts, epsilons, the schedule, latent statistics and tokenizers are not in the tensors).

:class:`FolderSource` and :class:`SingleFileSource` give the same view (official file paths +
weight files) of an official folder and of a single file, so one set of functions builds every
loader's assets from either.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import checkpoint as ckpt

FORMAT = "glm-image-single-file"
FORMAT_VERSION = "1"
META_FORMAT = "glm_image.format"
META_VERSION = "glm_image.format_version"
META_COMPONENT = "glm_image.component"
META_FILES = "glm_image.files"
META_SOURCE = "glm_image.source"
META_DTYPE = "glm_image.dtype"

CONVERT_HINT = ("convert the official GLM-Image folder with `python scripts/convert_to_single_file.py "
                "models/diffusers/GLM-Image --out <dir>` (it writes the configs and tokenizer files into the "
                "file's metadata), or load the folder with Load GLM-Image")


@dataclass(frozen=True)
class Component:
    """One single-file component: where it comes from and goes to, and what it carries beside its weights."""
    id: str
    title: str                   # in messages: "GLM-Image DiT"
    folder: str                  # its folder in the official layout
    comfy_folder: str            # ComfyUI models/ folder it belongs in
    required: Tuple[str, ...]    # official files it must carry (paths in the official layout)
    optional: Tuple[str, ...] = ()


COMPONENTS: Dict[str, Component] = {c.id: c for c in (
    Component("dit", "GLM-Image DiT (diffusion transformer)", "transformer", "diffusion_models",
              ("transformer/config.json", "scheduler/scheduler_config.json", "vae/config.json")),
    Component("ar", "GLM-Image AR model (vision_language_encoder)", "vision_language_encoder", "text_encoders",
              ("vision_language_encoder/config.json", "processor/tokenizer.json"),
              ("vision_language_encoder/generation_config.json", "processor/tokenizer_config.json",
               "processor/processor_config.json", "processor/preprocessor_config.json",
               "processor/chat_template.jinja")),
    Component("glyph_encoder", "GLM-Image glyph encoder (ByT5, text_encoder)", "text_encoder", "text_encoders",
              ("text_encoder/config.json",),
              ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "tokenizer/added_tokens.json")),
    Component("vae", "GLM-Image VAE", "vae", "vae", ("vae/config.json",)),
)}

BYT5_VOCAB = 384   # 3 specials + 256 bytes + 125 sentinels: ByT5's embedding rows


# --------------------------------------------------------------------------------------
# Detection from tensors
# --------------------------------------------------------------------------------------

TensorInfo = Dict[str, Tuple[str, Tuple[int, ...]]]   # key -> (safetensors dtype name, shape)


def _has(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def identify(tensors: TensorInfo) -> Tuple[Optional[str], str]:
    """(GLM-Image component id or None, a description of what the tensors look like)."""
    keys = set(tensors)

    def shape(k):
        return tensors[k][1] if k in tensors else None

    if {"image_projector.proj.weight", "prior_token_embedding.weight"} <= keys and \
            "transformer_blocks.0.attn1.to_q.weight" in keys:
        n = len({k.split(".")[1] for k in keys if k.startswith("transformer_blocks.")})
        return "dit", f"a GLM-Image DiT ({n} blocks, hidden size {shape('image_projector.proj.weight')[0]})"
    if "lm_head.weight" in keys and _has(keys, "model.language_model.layers.") and _has(keys, "model.visual.") \
            and _has(keys, "model.vqmodel."):
        n = len({k.split(".")[3] for k in keys if k.startswith("model.language_model.layers.")})
        return "ar", f"a GLM-Image AR model ({n} decoder layers, vision tower, VQ codebook)"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys and "encoder.final_layer_norm.weight" in keys:
        emb = shape("shared.weight") or shape("encoder.embed_tokens.weight")
        if emb is not None and emb[0] == BYT5_VOCAB and not _has(keys, "decoder."):
            return "glyph_encoder", f"a GLM-Image glyph encoder (ByT5 encoder, d_model {emb[1]})"
        vocab = emb[0] if emb is not None else "?"
        return None, (f"a T5 text encoder with a {vocab}-token vocabulary (e.g. T5-XXL of Flux/SD3), "
                      "not GLM-Image's byte-level ByT5 glyph encoder")
    if {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= keys and _has(keys, "decoder.up_blocks."):
        c = shape("decoder.conv_in.weight")[1]
        return "vae", f"a diffusers AutoencoderKL VAE with {c} latent channels"
    # Not GLM-Image: name the family where it is obvious, to make the message useful.
    known = (
        ("model.diffusion_model.double_blocks.", "a Flux checkpoint (DiT in ComfyUI/BFL layout)"),
        ("double_blocks.", "a Flux DiT (ComfyUI/BFL layout)"),
        ("single_transformer_blocks.", "a diffusers Flux-style DiT"),
        ("model.diffusion_model.input_blocks.", "an SD1.x/SDXL checkpoint (UNet in LDM layout)"),
        ("input_blocks.", "an SD1.x/SDXL UNet (LDM layout)"),
        ("down_blocks.", "a diffusers UNet (SD1.x/SDXL)"),
        ("joint_blocks.", "an SD3 MMDiT"),
        ("decoder.up.", "an LDM-layout VAE (SD/SDXL/Flux; ComfyUI's own Load VAE reads it)"),
        ("first_stage_model.", "a full SD checkpoint (UNet + VAE + text encoder)"),
        ("text_model.encoder.layers.", "a CLIP text encoder"),
        ("model.layers.", "a decoder-only language model (Llama/Qwen style)"),
    )
    for prefix, desc in known:
        if _has(keys, prefix):
            return None, desc
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    return None, f"not a GLM-Image file (unrecognised tensors: {sample}{' …' if len(keys) > 4 else ''})"


def wrong_component_message(path: str, expected: str, found: Optional[str], description: str) -> str:
    want = COMPONENTS[expected]
    msg = (f"{os.path.basename(path)} is not a {want.title}: it looks like {description}. "
           f"Expected a {want.title} single file in models/{want.comfy_folder}/.")
    if found is not None:
        other = COMPONENTS[found]
        msg += f" Load it with the {other.title} loader (it belongs in models/{other.comfy_folder}/)."
    return msg


# --------------------------------------------------------------------------------------
# Sources: an official folder or a single file, seen the same way
# --------------------------------------------------------------------------------------

class Source:
    name: str

    def text(self, rel: str) -> Optional[str]:
        raise NotImplementedError

    def has(self, rel: str) -> bool:
        return self.text(rel) is not None

    def json(self, rel: str, required: bool = True) -> Optional[dict]:
        t = self.text(rel)
        if t is None:
            if required:
                raise ckpt.CheckpointError(f"{self.name}: missing {rel}")
            return None
        try:
            return json.loads(t)
        except json.JSONDecodeError as e:
            raise ckpt.CheckpointError(f"{self.name}: {rel} is not valid JSON ({e})") from None

    def weight_files(self, component: str) -> List[str]:
        raise NotImplementedError


class FolderSource(Source):
    """An official diffusers-style GLM-Image folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.name = folder

    def text(self, rel: str) -> Optional[str]:
        p = os.path.join(self.folder, *rel.split("/"))
        if not os.path.isfile(p):
            return None
        with open(p, "r", encoding="utf-8") as f:
            return f.read()

    def weight_files(self, component: str) -> List[str]:
        return ckpt.weight_files(os.path.join(self.folder, COMPONENTS[component].folder))


class SingleFileSource(Source):
    """A single-file component checkpoint whose metadata carries the official files."""

    def __init__(self, path: str, component: str, files: Dict[str, str], metadata: Dict[str, str]):
        self.path, self.component, self.files, self.metadata = path, component, files, metadata
        self.name = path

    def text(self, rel: str) -> Optional[str]:
        return self.files.get(rel)

    def weight_files(self, component: str) -> List[str]:
        if component != self.component:
            raise ckpt.CheckpointError(f"{self.path} holds the {COMPONENTS[self.component].title}, "
                                       f"not the {COMPONENTS[component].title}")
        return [self.path]


def open_single_file(path: str, expected: str) -> SingleFileSource:
    """Check that ``path`` is a safetensors single file of component ``expected`` (detected from its
    tensors) with GLM-Image metadata; raise a CheckpointError saying what is wrong otherwise."""
    if expected not in COMPONENTS:
        raise ValueError(f"unknown component {expected!r}; one of {', '.join(COMPONENTS)}")
    meta, tensors = ckpt.safetensors_header(path)
    found, description = identify(tensors)
    if found != expected:
        raise ckpt.CheckpointError(wrong_component_message(path, expected, found, description))
    want = COMPONENTS[expected]
    if meta.get(META_FORMAT) != FORMAT:
        raise ckpt.CheckpointError(
            f"{os.path.basename(path)} looks like {description} but has no GLM-Image metadata (its configs"
            f"{' and tokenizer' if expected in ('ar', 'glyph_encoder') else ''} are not in the file and cannot "
            f"be derived from tensor shapes): {CONVERT_HINT}")
    version = meta.get(META_VERSION)
    if version != FORMAT_VERSION:
        raise ckpt.CheckpointError(f"{os.path.basename(path)}: GLM-Image single-file format version {version!r} is "
                                   f"not supported (this pack reads version {FORMAT_VERSION}); {CONVERT_HINT}")
    if meta.get(META_COMPONENT) != expected:
        raise ckpt.CheckpointError(f"{os.path.basename(path)}: its tensors are a {want.title} but its metadata says "
                                   f"{meta.get(META_COMPONENT)!r}; the file is inconsistent, {CONVERT_HINT}")
    try:
        files = json.loads(meta.get(META_FILES, ""))
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("not an object of strings")
    except ValueError as e:
        raise ckpt.CheckpointError(f"{os.path.basename(path)}: metadata {META_FILES} is malformed ({e}); "
                                   f"{CONVERT_HINT}") from None
    missing = [r for r in want.required if r not in files]
    if missing:
        raise ckpt.CheckpointError(f"{os.path.basename(path)}: metadata lacks {', '.join(missing)}; {CONVERT_HINT}")
    return SingleFileSource(path, expected, files, meta)


# --------------------------------------------------------------------------------------
# Assets (everything but the network) built from a source
# --------------------------------------------------------------------------------------

def latent_stats(vae_config: dict, channels: int, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel ``latents_mean``/``latents_std`` (identity when absent) as fp32."""
    mean = torch.tensor(vae_config.get("latents_mean") or [0.0] * channels, dtype=torch.float32)
    std = torch.tensor(vae_config.get("latents_std") or [1.0] * channels, dtype=torch.float32)
    if mean.numel() != channels or std.numel() != channels:
        raise ckpt.CheckpointError(f"{where}: vae/config.json latents_mean/std have {mean.numel()}/{std.numel()} "
                                   f"values; the DiT has {channels} latent channels")
    return mean, std


@dataclass
class ARAssets:
    config: dict
    generation_config: dict
    tokenizer: object            # ar_prompt.GlmTokenizer
    processor_config: dict


def ar_assets(src: Source) -> ARAssets:
    from . import ar_prompt
    tok_text = src.text("processor/tokenizer.json")
    if tok_text is None:
        raise ckpt.CheckpointError(f"{src.name}: missing processor/tokenizer.json")
    return ARAssets(
        config=src.json("vision_language_encoder/config.json"),
        generation_config=src.json("vision_language_encoder/generation_config.json", required=False) or {},
        tokenizer=ar_prompt.GlmTokenizer.from_strings(tok_text, src.json("processor/tokenizer_config.json", False),
                                                      f"{src.name} (processor/tokenizer.json)"),
        processor_config=ar_prompt.processor_config_from(src.json("processor/processor_config.json", False),
                                                         src.json("processor/preprocessor_config.json", False),
                                                         f"{src.name} (processor/)"))


@dataclass
class DecoderAssets:
    dit_config: dict
    scheduler_config: dict
    latents_mean: torch.Tensor
    latents_std: torch.Tensor


def decoder_assets(src: Source) -> DecoderAssets:
    dit_config = src.json("transformer/config.json")
    c = int(dit_config.get("in_channels", 16))
    mean, std = latent_stats(src.json("vae/config.json"), c, src.name)
    return DecoderAssets(dit_config, src.json("scheduler/scheduler_config.json"), mean, std)


def glyph_tokenizer(src: Source):
    from .glyph import ByT5Tokenizer
    return ByT5Tokenizer.from_configs(src.json("tokenizer/tokenizer_config.json", False) or {},
                                      src.json("tokenizer/special_tokens_map.json", False) or {},
                                      src.json("tokenizer/added_tokens.json", False) or {},
                                      f"{src.name} (tokenizer/)")


def builder(src: Source, component: str, ar_parts: Optional[Sequence[str]] = None) -> Callable[..., torch.nn.Module]:
    """``build(dtype, device, operations, compute_dtype=None)`` -> the component's network with its
    weights loaded from ``src`` (strict key check). ``ar_parts``: for ``"ar"``, the parts to build
    (``ar_model.AR_PARTS``; default all)."""
    if ar_parts is not None and component != "ar":
        raise ValueError(f"ar_parts applies to the AR only, not {component!r}")
    files = src.weight_files(component)
    what = f"{COMPONENTS[component].title} ({src.name})"
    if component == "dit":
        from .dit import build_dit
        cfg = src.json("transformer/config.json")
        return lambda dt, dev, ops, compute_dtype=None: build_dit(cfg, files, dt, dev, ops, compute_dtype, what)
    if component == "ar":
        from .ar_model import ALL_PARTS, build_ar
        cfg = src.json("vision_language_encoder/config.json")
        parts = tuple(ar_parts or ALL_PARTS)
        return lambda dt, dev, ops, compute_dtype=None: build_ar(cfg, files, dt, dev, ops,
                                                                 compute_dtype=compute_dtype, what=what, parts=parts)
    if component == "glyph_encoder":
        from .glyph import build_glyph_encoder
        cfg = src.json("text_encoder/config.json")
        return lambda dt, dev, ops, compute_dtype=None: build_glyph_encoder(cfg, files, dt, dev, ops,
                                                                            compute_dtype, what)
    if component == "vae":
        from .vae import build_vae
        cfg = src.json("vae/config.json")
        return lambda dt, dev, ops, compute_dtype=None: build_vae(cfg, files, dt, dev, ops, what)
    raise ValueError(f"unknown component {component!r}")


# --------------------------------------------------------------------------------------
# Conversion: official folder -> one file per component (streamed, one tensor in memory at a time)
# --------------------------------------------------------------------------------------

CONVERT_DTYPES = {"as_stored": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_ST_DTYPES = ckpt.SAFETENSORS_DTYPES
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def fp8_weight_keys(component: str) -> Optional[re.Pattern]:
    """The keys a component stores in fp8 when fp8 is asked (None: never fp8)."""
    if component == "dit":
        from .dit import FP8_WEIGHT_KEYS
        return FP8_WEIGHT_KEYS
    if component == "ar":
        from .ar_model import FP8_WEIGHT_KEYS
        return FP8_WEIGHT_KEYS
    return None


def conversion_dtype(component: str, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype a component is actually converted to: the glyph encoder and the VAE are small and
    numerically sensitive (T5; GLM's VAE overflows in fp16), so they take only bf16/fp32 and keep
    their stored dtype for fp16/fp8 requests."""
    if component in ("glyph_encoder", "vae") and dtype not in (None, torch.bfloat16, torch.float32):
        return None
    return dtype


def write_streamed_safetensors(path: str, entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...],
                                                                  Callable[[], torch.Tensor]]],
                               metadata: Dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor: ``entries`` are (name, dtype, shape, load) and
    ``load()`` is called once per tensor while writing, so only one tensor is in memory at a time
    (safetensors' own ``save_file`` needs the whole state dict)."""
    header: Dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dt, shape, _ in entries:
        n = dt.itemsize
        for s in shape:
            n *= int(s)
        header[name] = {"dtype": _ST_NAMES[dt], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dt, shape, load in entries:
            t = load()
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise ckpt.CheckpointError(f"{name}: got {t.dtype} {tuple(t.shape)}, announced {dt} {tuple(shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)   # no byte copy
            del t
    os.replace(tmp, path)


def convert_component(folder: str, component: str, out_path: str, dtype: Optional[torch.dtype] = None,
                      dtype_name: str = "as_stored") -> dict:
    """Write one component of an official folder as a single file. Returns a summary
    (tensors, bytes, dtypes). Tensors are read from their shard one at a time."""
    from safetensors import safe_open
    ckpt.check_glm_image_folder(folder, needed=())
    comp = COMPONENTS[component]
    src = FolderSource(folder)
    files = {}
    for rel in comp.required + comp.optional:
        t = src.text(rel)
        if t is not None:
            files[rel] = t
    missing = [r for r in comp.required if r not in files]
    if missing:
        raise ckpt.CheckpointError(f"{folder}: missing {', '.join(missing)} (needed for the {comp.title})")
    dtype = conversion_dtype(component, dtype)
    rule = ckpt.storage_dtypes(dtype, fp8_weight_keys(component), None)
    entries = []
    seen = set()
    counts: Dict[str, int] = {}
    for shard in src.weight_files(component):
        _, tensors = ckpt.safetensors_header(shard)
        for key, (st_dtype, shape) in sorted(tensors.items()):
            if key in seen:
                raise ckpt.CheckpointError(f"{key} appears in two shards of {comp.folder}/")
            seen.add(key)
            stored = _ST_DTYPES.get(st_dtype)
            if stored is None:
                raise ckpt.CheckpointError(f"{shard}: tensor {key} has unsupported dtype {st_dtype}")
            probe = torch.empty((0,) * len(shape), dtype=stored)   # the rule looks only at dtype and rank
            target = ckpt.storage_dtype_of(rule, key, probe) or stored

            def load(shard=shard, key=key, target=target):
                with safe_open(shard, framework="pt") as f:
                    return f.get_tensor(key).to(target)
            entries.append((key, target, shape, load))
            counts[_ST_NAMES[target]] = counts.get(_ST_NAMES[target], 0) + 1
    index = ckpt.read_json(os.path.join(folder, "model_index.json"))
    metadata = {"format": "pt", META_FORMAT: FORMAT, META_VERSION: FORMAT_VERSION, META_COMPONENT: component,
                META_FILES: json.dumps(files, ensure_ascii=False),
                META_SOURCE: f"{os.path.basename(os.path.normpath(folder))} ({index.get('_class_name')}, "
                             f"diffusers {index.get('_diffusers_version', '?')})",
                META_DTYPE: dtype_name if dtype is not None else "as_stored"}
    write_streamed_safetensors(out_path, entries, metadata)
    return {"component": component, "path": out_path, "tensors": len(entries), "dtypes": counts,
            "bytes": os.path.getsize(out_path)}
