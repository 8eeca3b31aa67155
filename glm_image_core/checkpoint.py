"""Reading GLM-Image folders: configs (JSON) and weights (safetensors only, sharded or not).

Nothing here ever unpickles: ``.bin``/``.pt``/``.ckpt`` files are refused with a clear error.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open

PIPELINE_CLASS = "GlmImagePipeline"
COMPONENTS = ("vision_language_encoder", "processor", "text_encoder", "tokenizer", "transformer", "vae", "scheduler")
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A model folder or weight file is missing, malformed or of the wrong kind."""


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def is_glm_image_folder(folder: str) -> bool:
    """True when ``folder/model_index.json`` names ``GlmImagePipeline``."""
    p = os.path.join(folder, "model_index.json")
    if not os.path.isfile(p):
        return False
    try:
        return read_json(p).get("_class_name") == PIPELINE_CLASS
    except CheckpointError:
        return False


def check_glm_image_folder(folder: str, needed: Iterable[str] = COMPONENTS) -> dict:
    """Validate the top-level layout; return model_index. Raises CheckpointError naming what is missing."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"GLM-Image folder not found: {folder}")
    index = read_json(os.path.join(folder, "model_index.json"))
    if index.get("_class_name") != PIPELINE_CLASS:
        raise CheckpointError(f"{folder}/model_index.json names {index.get('_class_name')!r}, expected {PIPELINE_CLASS!r}")
    missing = [c for c in needed if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise CheckpointError(f"GLM-Image folder {folder} is missing component folder(s): {', '.join(missing)} "
                              f"(the official layout has {', '.join(COMPONENTS)})")
    return index


def weight_files(component_dir: str) -> List[str]:
    """The safetensors files of one component folder, in shard order. Refuses pickle-based weights."""
    if not os.path.isdir(component_dir):
        raise CheckpointError(f"component folder not found: {component_dir}")
    names = sorted(os.listdir(component_dir))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if indexes:
        index = read_json(os.path.join(component_dir, indexes[0]))
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{component_dir}/{indexes[0]} has an empty weight_map")
        paths = [os.path.join(component_dir, s) for s in shards]
        for p in paths:
            if not os.path.isfile(p):
                raise CheckpointError(f"shard listed in {indexes[0]} is missing: {p}")
        return paths
    st = [os.path.join(component_dir, n) for n in names if n.endswith(".safetensors")]
    if st:
        return st
    unsafe = [n for n in names if n.endswith(UNSAFE_WEIGHT_SUFFIXES)]
    if unsafe:
        raise CheckpointError(f"{component_dir} holds only pickle-based weights ({', '.join(unsafe)}); "
                              "this pack reads safetensors only and never unpickles files. "
                              "Convert them to .safetensors first.")
    raise CheckpointError(f"no .safetensors weights found in {component_dir}")


def load_safetensors(paths: Iterable[str], device: str | torch.device = "cpu",
                     dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Load and merge safetensors files; a truncated or corrupt file gives a CheckpointError naming it."""
    sd: Dict[str, torch.Tensor] = {}
    for p in paths:
        try:
            with safe_open(p, framework="pt", device=str(device)) as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    sd[k] = t
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt input
            raise CheckpointError(f"cannot read safetensors file {p}: {e} (truncated or not a safetensors file?)") from None
    return sd


def load_component(folder: str, component: str, device="cpu", dtype=None):
    """(config dict, state dict) of one component of an official GLM-Image folder."""
    cdir = os.path.join(folder, component)
    cfg_name = "scheduler_config.json" if component == "scheduler" else "config.json"
    cfg = read_json(os.path.join(cdir, cfg_name))
    return cfg, load_safetensors(weight_files(cdir), device=device, dtype=dtype)


def check_state_dict_keys(own: Dict[str, torch.Tensor], sd: Dict[str, torch.Tensor], what: str,
                          ignore_unexpected: Iterable[str] = ()) -> None:
    """Raise a readable CheckpointError when ``sd`` does not fit ``own`` (a module's state dict):
    missing, unexpected and mis-shaped keys. ``ignore_unexpected``: key prefixes present in official
    files but unused at inference (e.g. the VQ ``post_quant_conv``)."""
    ign = tuple(ignore_unexpected)
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own and not k.startswith(ign))
    shape_bad = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape_bad:
        def show(xs):
            return ", ".join(xs[:8]) + (f" … (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatch(es): {show(shape_bad)}")
        raise CheckpointError(f"weights do not match the {what}: " + "; ".join(parts))


def load_state_dict_strict(module: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str,
                           ignore_unexpected: Iterable[str] = ()) -> None:
    """``module.load_state_dict`` with a readable error for missing, unexpected and mis-shaped keys
    (see :func:`check_state_dict_keys`)."""
    own = module.state_dict()
    check_state_dict_keys(own, sd, what, ignore_unexpected)
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
