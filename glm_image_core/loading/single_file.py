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

:func:`open_single_file` checks such a file and returns a ``sources.SingleFileSource``: the same view
(official file paths + weight files) as an official folder's ``sources.FolderSource``, so one set of
functions (``glm_image_core.loading.sources``) builds every loader's assets from either.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from ..quantization import gguf_file, gguf_quant
from . import registry
from .registry import NETWORKS, TensorInfo
from .sources import FolderSource, SingleFileSource

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


# --------------------------------------------------------------------------------------
# Detection from tensors
# --------------------------------------------------------------------------------------

def identify(tensors: TensorInfo) -> Tuple[Optional[str], str]:
    """(GLM-Image network id or None, a description of what the tensors look like): the registry's
    signatures first, then the families a wrong file most likely comes from."""
    found, description = registry.identify(tensors)
    if found is not None:
        return found, description
    keys = set(tensors)
    emb = registry.t5_embedding_shape(tensors)
    if emb is not None:
        vocab = emb[0] if emb else "?"
        return None, (f"a T5 text encoder with a {vocab}-token vocabulary (e.g. T5-XXL of Flux/SD3), "
                      "not GLM-Image's byte-level ByT5 glyph encoder")
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
        if registry.has_prefix(keys, prefix):
            return None, desc
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    return None, f"not a GLM-Image file (unrecognised tensors: {sample}{' …' if len(keys) > 4 else ''})"


def wrong_component_message(path: str, expected: str, found: Optional[str], description: str) -> str:
    want = NETWORKS[expected]
    msg = (f"{os.path.basename(path)} is not a {want.title}: it looks like {description}. "
           f"Expected a {want.title} single file in models/{want.comfy_folder}/.")
    if found is not None:
        other = NETWORKS[found]
        msg += f" Load it with the {other.title} loader (it belongs in models/{other.comfy_folder}/)."
    return msg


def open_single_file(path: str, expected: str) -> SingleFileSource:
    """Check that ``path`` is a single file (safetensors, or GGUF for the DiT and the AR) of component
    ``expected`` (detected from its tensors) with GLM-Image metadata; raise a CheckpointError saying
    what is wrong otherwise."""
    if expected not in NETWORKS:
        raise ValueError(f"unknown component {expected!r}; one of {', '.join(NETWORKS)}")
    meta, tensors = ckpt.weights_header(path)
    found, description = identify(tensors)
    if found != expected:
        raise ckpt.CheckpointError(wrong_component_message(path, expected, found, description))
    want = NETWORKS[expected]
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
    missing = [r for r in want.single_file_required if r not in files]
    if missing:
        raise ckpt.CheckpointError(f"{os.path.basename(path)}: metadata lacks {', '.join(missing)}; {CONVERT_HINT}")
    return SingleFileSource(path, expected, files, meta)


# --------------------------------------------------------------------------------------
# Conversion: official folder -> one file per component (streamed, one tensor in memory at a time)
# --------------------------------------------------------------------------------------

CONVERT_DTYPES = {"as_stored": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# GGUF single files (.gguf): the weights fp8 would store in fp8 (the Linear layers of the DiT's and AR's
# repeated blocks) as ggml blocks; every other tensor, and a row that is not whole blocks, as stored.
GGUF_TYPES = {"gguf_q8_0": gguf_quant.Q8_0, "gguf_q5_k": gguf_quant.Q5_K, "gguf_q4_k": gguf_quant.Q4_K}
_ST_DTYPES = ckpt.SAFETENSORS_DTYPES
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


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


def _single_file_assets(folder: str, component: str) -> Tuple[FolderSource, Dict[str, str]]:
    """The folder as a source, and the text files a single file of ``component`` carries."""
    ckpt.check_glm_image_folder(folder, needed=())
    comp = NETWORKS[component]
    src = FolderSource(folder)
    files = {}
    for rel in comp.single_file_required + comp.single_file_optional:
        t = src.text(rel)
        if t is not None:
            files[rel] = t
            if rel.endswith(".json"):
                src.json(rel)            # valid JSON, and not a pre-quantized release (refused by name)
    missing = [r for r in comp.single_file_required if r not in files]
    if missing:
        raise ckpt.CheckpointError(f"{folder}: missing {', '.join(missing)} (needed for the {comp.title})")
    return src, files


def _metadata(folder: str, component: str, files: Dict[str, str], dtype_label: str) -> Dict[str, str]:
    index = ckpt.read_json(os.path.join(folder, "model_index.json"))
    return {META_FORMAT: FORMAT, META_VERSION: FORMAT_VERSION, META_COMPONENT: component,
            META_FILES: json.dumps(files, ensure_ascii=False),
            META_SOURCE: f"{os.path.basename(os.path.normpath(folder))} ({index.get('_class_name')}, "
                         f"diffusers {index.get('_diffusers_version', '?')})",
            META_DTYPE: dtype_label}


def _shard_tensors(src: FolderSource, component: str):
    """(shard, key, stored dtype, shape) of a component's tensors, in shard order, each key once."""
    seen = set()
    for shard in src.weight_files(component):
        _, tensors = ckpt.safetensors_header(shard)
        for key, (st_dtype, shape) in sorted(tensors.items()):
            if key in seen:
                raise ckpt.CheckpointError(f"{key} appears in two shards of {NETWORKS[component].folder}/")
            seen.add(key)
            stored = _ST_DTYPES.get(st_dtype)
            if stored is None:
                raise ckpt.CheckpointError(f"{shard}: tensor {key} has unsupported dtype {st_dtype}")
            yield shard, key, stored, shape


def _reader(shard: str, key: str, dtype: Optional[torch.dtype] = None) -> Callable[[], torch.Tensor]:
    """Reads one tensor when called (the converters' entries: one tensor in memory at a time). As
    stored, it is a view of the mapped file (``checkpoint.iter_safetensors``): no copy, and its pages
    are file-backed and released with it."""
    def load():
        return next(t for _, t in ckpt.iter_safetensors([shard], dtype=dtype, keep=lambda k: k == key))
    return load


def convert_component(folder: str, component: str, out_path: str, dtype: Optional[torch.dtype] = None,
                      dtype_name: str = "as_stored") -> dict:
    """Write one component of an official folder as a single file. Returns a summary
    (tensors, bytes, dtypes). Tensors are read from their shard one at a time."""
    if dtype_name in GGUF_TYPES:
        return convert_component_gguf(folder, component, out_path, dtype_name)
    comp = NETWORKS[component]
    src, files = _single_file_assets(folder, component)
    dtype = comp.storage_dtype(dtype)
    rule = ckpt.storage_dtypes(dtype, comp.fp8_keys, None)
    entries = []
    counts: Dict[str, int] = {}
    for shard, key, stored, shape in _shard_tensors(src, component):
        probe = torch.empty((0,) * len(shape), dtype=stored)   # the rule looks only at dtype and rank
        target = ckpt.storage_dtype_of(rule, key, probe) or stored
        entries.append((key, target, shape, _reader(shard, key, target)))
        counts[_ST_NAMES[target]] = counts.get(_ST_NAMES[target], 0) + 1
    metadata = {"format": "pt", **_metadata(folder, component, files, dtype_name if dtype is not None else "as_stored")}
    write_streamed_safetensors(out_path, entries, metadata)
    return {"component": component, "path": out_path, "tensors": len(entries), "dtypes": counts,
            "bytes": os.path.getsize(out_path)}


def convert_component_gguf(folder: str, component: str, out_path: str, dtype_name: str) -> dict:
    """Write the DiT or the AR of an official folder as one GGUF file (``GGUF_TYPES``), tensor by tensor:
    the fp8-eligible weights and the row-read embedding tables as ggml blocks (``Network.gguf_blocks``,
    ``gguf_quant.block_type_for``), the rest as stored (bf16 / fp16 / fp32). The metadata are the
    safetensors single file's, as GGUF strings."""
    qt = GGUF_TYPES[dtype_name]
    comp = NETWORKS[component]
    if not comp.takes_gguf:
        raise ckpt.CheckpointError(f"GGUF conversion is for the DiT and the AR; the {comp.title} is small and stays "
                                   "a safetensors file (convert it with --dtype as_stored / bf16 / fp32)")
    src, files = _single_file_assets(folder, component)
    entries, counts = [], {}
    for shard, key, stored, shape in _shard_tensors(src, component):
        if stored not in gguf_file.GGML_TYPE_OF_DTYPE:
            raise ckpt.CheckpointError(f"{shard}: tensor {key} is {stored}, which GGUF files do not hold "
                                       "unquantized (F32, F16, BF16)")
        as_blocks = gguf_quant.block_type_for(shape, qt) if comp.gguf_blocks(key, shape) else None
        ggml_type = as_blocks.ggml_type if as_blocks else gguf_file.GGML_TYPE_OF_DTYPE[stored]
        entries.append(gguf_file.Entry(key, tuple(int(x) for x in shape), ggml_type, _reader(shard, key)))
        name = gguf_file.type_name(ggml_type)
        counts[name] = counts.get(name, 0) + 1
    gguf_file.write_gguf(out_path, entries, _metadata(folder, component, files, dtype_name))
    return {"component": component, "path": out_path, "tensors": len(entries), "dtypes": counts,
            "bytes": os.path.getsize(out_path)}
