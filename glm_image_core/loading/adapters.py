"""LoRA files for GLM-Image's networks: which layer each key names, and the scale a PEFT adapter asks for.

No LoRA math lives here: ComfyUI's weight adapters (``comfy/weight_adapter``) apply the tensors. This
module only says which network weight a LoRA key patches, and what ``alpha`` to hand ComfyUI so that
its scale (``alpha / rank``) is the one the adapter was trained with:

* PEFT (``save_pretrained``: ``adapter_model.safetensors`` + ``adapter_config.json``): keys
  ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, no alpha in the file; the scale is
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module where
  ``alpha_pattern`` / ``rank_pattern`` say so;
* ComfyUI's own format (``<module>.lora_up.weight`` / ``lora_down.weight`` / ``alpha``, what
  ``SaveLoRA`` writes) and the diffusers / kohya names others use (``vision_language_encoder.<module>``,
  ``lora_te_<module with _>``), with their alpha in the file when they carry one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import CheckpointError

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"

# The per-module tensor names of the LoRA formats ComfyUI's LoRAAdapter reads (weight_adapter/lora.py),
# longest first so that a module name never keeps part of a suffix.
SUFFIXES = tuple(sorted((
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight", "_lora.down.weight",
    ".lora_A.weight", ".lora_B.weight", ".lora.up.weight", ".lora.down.weight", ".lora_A", ".lora_B",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".lora_A.default.weight",
    ".lora_B.default.weight", ".alpha", ".dora_scale", ".reshape_weight"), key=len, reverse=True))
DOWN = (".lora_down.weight", "_lora.down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_A",
        ".lora_linear_layer.down.weight", ".lora_A.default.weight")
UP = (".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora.up.weight", ".lora_B",
      ".lora_linear_layer.up.weight", ".lora_B.default.weight")


def split_key(key: str) -> Tuple[str, str]:
    """(the LoRA's name of the module, the tensor's suffix); suffix "" for a key of no known form."""
    for s in SUFFIXES:
        if key.endswith(s):
            return key[:-len(s)], s
    return key, ""


def key_forms(module: str, prefixes: Iterable[str] = ()) -> List[str]:
    """The names a LoRA may give a network module: as is (ComfyUI's format), PEFT's, each of the
    network's diffusers prefixes (``prefixes``), and kohya's underscored ``lora_te_`` form."""
    return [module, PEFT_PREFIX + module] + [f"{p}.{module}" for p in prefixes] + \
        ["lora_te_" + module.replace(".", "_")]


def key_map(modules: Iterable[str], prefixes: Iterable[str] = ()) -> Dict[str, str]:
    """{LoRA module name: network weight key} for the network's Linear modules, ComfyUI's ``key_map``
    argument of ``comfy.lora.load_lora``."""
    return {form: f"{m}.weight" for m in modules for form in key_forms(m, prefixes)}


@dataclass(frozen=True)
class PeftConfig:
    """What ``adapter_config.json`` says about the scale (and what the pack cannot apply)."""
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    peft_type: str = "LORA"

    def alpha_for(self, module: str, rank: int) -> float:
        """ComfyUI's ``alpha`` for ``module`` (its rank read from the tensors) so that ComfyUI's
        ``alpha / rank`` is PEFT's scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` (rsLoRA)."""
        alpha = float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha * math.sqrt(rank) if self.use_rslora else alpha


def _pattern_value(patterns: Dict[str, float], module: str, default):
    """PEFT's per-module override: the first pattern that matches the module name's tail (peft's
    ``get_pattern_key``: ``(.*\\.)?<pattern>$``)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_peft_config(text: str, where: str) -> PeftConfig:
    """``adapter_config.json``'s scale settings; a CheckpointError for what is not a LoRA adapter."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} is not a PEFT adapter config (a JSON object)")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointError(f"{where}: peft_type {kind} is not a LoRA; this loader reads LoRA adapters only")
    try:
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: needs an integer 'r' and a number 'lora_alpha' "
                              f"(got r={cfg.get('r')!r}, lora_alpha={cfg.get('lora_alpha')!r})") from None
    if r <= 0:
        raise CheckpointError(f"{where}: r must be positive, got {r}")
    return PeftConfig(r=r, lora_alpha=alpha, use_rslora=bool(cfg.get("use_rslora")), use_dora=bool(cfg.get("use_dora")),
                      alpha_pattern=dict(cfg.get("alpha_pattern") or {}), rank_pattern=dict(cfg.get("rank_pattern") or {}),
                      peft_type=kind)


@dataclass
class Matched:
    """A LoRA file sorted against a network: {network weight key: the LoRA's module name} and what fits nothing."""
    modules: Dict[str, str]
    unmatched: List[str]


def match(keys: Iterable[str], kmap: Dict[str, str]) -> Matched:
    """Which network weight each key of the file patches (``kmap``: :func:`key_map`), and the keys of
    no known form or of a module the network does not have."""
    modules: Dict[str, str] = {}
    unmatched = []
    for k in keys:
        name, suffix = split_key(k)
        if suffix and name in kmap:
            modules[kmap[name]] = name
        else:
            unmatched.append(k)
    return Matched(modules, sorted(unmatched))


def check_shapes(lora: Dict[str, Tuple[int, ...]], matched: Matched, weight_shapes: Dict[str, Tuple[int, ...]],
                 what: str) -> Dict[str, int]:
    """{LoRA module name: rank}; a CheckpointError naming the first pair of tensors whose shapes do not
    fit the layer (an adapter for another base model: other widths)."""
    ranks = {}
    for weight_key, name in matched.modules.items():
        down = next((name + s for s in DOWN if name + s in lora), None)
        up = next((name + s for s in UP if name + s in lora), None)
        if down is None or up is None:
            raise CheckpointError(f"{what}: {name} has {'no down (lora_A)' if down is None else 'no up (lora_B)'} "
                                  "tensor: the file is incomplete")
        out_f, in_f = weight_shapes[weight_key][:2]
        d, u = lora[down], lora[up]
        if len(d) != 2 or len(u) != 2 or d[1] != in_f or u[0] != out_f or u[1] != d[0]:
            raise CheckpointError(
                f"{what}: {down} {tuple(d)} and {up} {tuple(u)} do not fit the layer {weight_key} "
                f"({out_f} × {in_f}): the LoRA was made for another model (or another size of GLM-Image)")
        ranks[name] = d[0]
    return ranks


def peft_alphas(config: PeftConfig, ranks: Dict[str, int]) -> Dict[str, float]:
    """{``<LoRA module name>.alpha``: ComfyUI's alpha} for a PEFT file (its tensors carry none)."""
    out = {}
    for name, rank in ranks.items():
        module = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        out[f"{name}.alpha"] = config.alpha_for(module, rank)
    return out


def describe_unmatched(unmatched: List[str], network_title: str, hints: Tuple[Tuple[Tuple[str, ...], str], ...]) -> str:
    """The error for keys that fit no layer: how many, the first few, and what they look like."""
    guess = next((what for marks, what in hints if any(m in k for k in unmatched for m in marks)), None)
    shown = ", ".join(repr(k) for k in unmatched[:6]) + (" …" if len(unmatched) > 6 else "")
    msg = f"{len(unmatched)} LoRA key(s) fit no layer of the {network_title}: {shown}"
    return msg + (f". They look like a LoRA for {guess}" if guess else "")


def adapter_warnings(config: Optional[PeftConfig]) -> List[str]:
    """What the pack cannot apply from a PEFT config, as refusals (DoRA's magnitude vectors)."""
    if config is not None and config.use_dora:
        return ["use_dora: DoRA adapters rescale each weight by a learned magnitude, which this loader does not "
                "apply; merge the adapter into a LoRA-free checkpoint (peft merge_and_unload) or train a plain LoRA"]
    return []
