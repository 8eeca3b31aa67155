"""Where a GLM-Image network's files come from, seen one way: an official folder
(:class:`FolderSource`) or one single-file checkpoint (:class:`SingleFileSource`, opened and checked by
``single_file.open_single_file``) both give the official files by their path in the official layout
and each network's weight files; from a source, :func:`ar_assets`, :func:`decoder_assets` and
:func:`glyph_tokenizer` build everything but the networks, and :func:`build_network` the networks
(``registry.NETWORKS``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..generation import ar_prompt
from ..generation.glyph_text import ByT5Tokenizer
from . import checkpoint as ckpt
from .registry import NETWORKS


# Pre-quantized releases (a diffusers / transformers ``quantization_config``): what each method is, and
# why the pack does not read it (README, "Quantized weights"). Their weights are not the official
# tensors: reading them as such would fail on shapes at best, so they are refused up front, by name.
PREQUANTIZED_METHODS = {
    "sdnq": ("SDNQ", "its layout (packed ints of any width, per-group scales and zero points, optional SVD terms, "
                     "Hadamard rotations, codebooks, per-layer dtypes) is defined by the sdnq package's code and "
                     "changes with its versions"),
    "auto-round": ("AutoRound", "its int4 packing (GPTQ-style qweight/qzeros/scales, per-layer overrides) is "
                                "defined by the auto-round package's export backends"),
    "gptq": ("GPTQ", ""), "awq": ("AWQ", ""), "bitsandbytes": ("bitsandbytes", ""), "torchao": ("torchao", ""),
    "quanto": ("optimum-quanto", ""), "compressed-tensors": ("compressed-tensors", ""), "fp8": ("fp8 (block)", ""),
}


def refuse_prequantized(q: Optional[dict], where: str) -> None:
    """A CheckpointError naming the quantization ``q`` (a ``quantization_config``) of a pre-quantized
    release, with what to use instead; nothing when ``q`` is None."""
    if not isinstance(q, dict):
        return
    method = str(q.get("quant_method", "unknown")).lower()
    title, why = PREQUANTIZED_METHODS.get(method, (method, ""))
    detail = ", ".join(f"{k} {q[k]}" for k in ("weights_dtype", "bits", "group_size") if k in q)
    raise ckpt.CheckpointError(
        f"{where} is a pre-quantized release ({title}{': ' + detail if detail else ''}), which this pack does not "
        f"read{' (' + why + ')' if why else ''}. Use the official bf16 weights (weight_dtype fp8_e4m3fn halves them), "
        "or convert them once to GGUF for small cards: scripts/convert_to_single_file.py <official folder> "
        "--dtype gguf_q4_k (README: Quantized weights).")


class Source:
    name: str

    def text(self, rel: str) -> Optional[str]:
        raise NotImplementedError

    def has(self, rel: str) -> bool:
        return self.text(rel) is not None

    def json(self, rel: str, required: bool = True) -> Optional[dict]:
        """A JSON file of the official layout; a network's config.json that carries a
        ``quantization_config`` (or sits beside SDNQ's quantization_config.json) is refused by name."""
        t = self.text(rel)
        if t is None:
            if required:
                raise ckpt.CheckpointError(f"{self.name}: missing {rel}")
            return None
        try:
            data = json.loads(t)
        except json.JSONDecodeError as e:
            raise ckpt.CheckpointError(f"{self.name}: {rel} is not valid JSON ({e})") from None
        if rel.endswith("/config.json") and isinstance(data, dict):
            folder = rel.rsplit("/", 1)[0]
            q, side = data.get("quantization_config"), self.text(f"{folder}/quantization_config.json")
            if q is None and side is not None:
                try:
                    q = json.loads(side)
                except json.JSONDecodeError:
                    q = {"quant_method": "unknown"}
            refuse_prequantized(q, f"{self.name} ({folder}/)")
        return data

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
        return ckpt.weight_files(os.path.join(self.folder, NETWORKS[component].folder))


class SingleFileSource(Source):
    """A single-file component checkpoint whose metadata carries the official files."""

    def __init__(self, path: str, component: str, files: Dict[str, str], metadata: Dict[str, str]):
        self.path, self.component, self.files, self.metadata = path, component, files, metadata
        self.name = path

    def text(self, rel: str) -> Optional[str]:
        return self.files.get(rel)

    def weight_files(self, component: str) -> List[str]:
        if component != self.component:
            raise ckpt.CheckpointError(f"{self.path} holds the {NETWORKS[self.component].title}, "
                                       f"not the {NETWORKS[component].title}")
        return [self.path]



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
    return ByT5Tokenizer.from_configs(src.json("tokenizer/tokenizer_config.json", False) or {},
                                      src.json("tokenizer/special_tokens_map.json", False) or {},
                                      src.json("tokenizer/added_tokens.json", False) or {},
                                      f"{src.name} (tokenizer/)")


def build_network(src: Source, network: str, dtype: Optional[torch.dtype], device, operations,
                  compute_dtype: Optional[torch.dtype] = None, **kw) -> torch.nn.Module:
    """The network ``network`` (a registry id) with its weights from ``src`` (strict key check), its
    config from ``src``: ``registry.Network.build`` (``kw``: the AR's ``parts``)."""
    net = NETWORKS[network]
    return net.build(src.json(net.config_file), src.weight_files(network), dtype, device, operations, compute_dtype,
                     f"{net.title} ({src.name})", **kw)
