"""GLM-Image's networks, one entry each: the one place for what the loaders, the single-file converter,
the memory plan, the nodes' dtype options and the checkpoint writer need to know about a network.

An entry (:class:`Network`) says where the network lives (its folder in the official layout, its
ComfyUI models/ folder as a single file and the official files a single file carries), its official
full-size config, which of its weights an fp8 load stores in fp8, the storage and compute dtypes it
takes, and how to build it: ``build(config, files, dtype, device, operations, compute_dtype)`` with
its weights streamed in from safetensors files (``loading.build.build_loaded``), or ``skeleton(config)``
without weights, for the memory plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..networks import ar_model, dit, glyph, vae
from . import configs
from .build import no_init_ops

# Storage dtypes by the names the nodes show; "default" (keep the file's) is not one of them.
STORAGE_DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8 = ("fp8_e4m3fn", "fp8_e5m2")


@dataclass(frozen=True)
class Network:
    id: str                                  # "ar" | "dit" | "glyph_encoder" | "vae"
    title: str                               # in messages
    folder: str                              # its folder in the official layout
    comfy_folder: str                        # the ComfyUI models/ folder of its single file
    single_file_required: Tuple[str, ...]    # official files a single file must carry (official paths)
    single_file_optional: Tuple[str, ...]
    fp8_keys: Optional[re.Pattern]           # weights an fp8 load stores in fp8; None: never fp8
    storage: Tuple[str, ...]                 # storage dtypes it takes (STORAGE_DTYPES names)
    compute: Tuple[torch.dtype, ...]         # compute dtypes it runs in
    builder: Callable[..., nn.Module]        # (config, files, dtype, device, operations, compute_dtype, what, **kw)
    skeleton_of: Callable[..., nn.Module]    # (config, dtype, device, operations) -> the module, no weights
    gguf_rows: Optional[re.Pattern] = None   # embedding tables a GGUF file stores as blocks too (read row by row)

    @property
    def config_file(self) -> str:
        return f"{self.folder}/config.json"

    def full_size_config(self) -> dict:
        """The official (zai-org/GLM-Image) config.json of this network."""
        return configs.official_configs(configs.FULL_SIZE)[self.config_file]

    @property
    def takes_gguf(self) -> bool:
        """Whether the network comes as a GGUF single file too: the big ones, whose block matrices fp8
        would also cover (the DiT and the AR); the glyph encoder and the VAE stay safetensors."""
        return self.fp8_keys is not None

    def gguf_blocks(self, key: str, shape: Sequence[int]) -> bool:
        """Whether a GGUF file stores this tensor as ggml blocks: the fp8-eligible matrices, and the
        embedding tables that are only read row by row (``gguf_ops.embedding_rows``)."""
        return len(shape) == 2 and any(p is not None and p.match(key) for p in (self.fp8_keys, self.gguf_rows))

    def storage_dtype(self, requested: Optional[torch.dtype]) -> Optional[torch.dtype]:
        """The dtype a request actually stores it in: one it does not take keeps the file's (None)."""
        if requested is None:
            return None
        return requested if requested in (STORAGE_DTYPES[n] for n in self.storage) else None

    def build(self, config: dict, files: Sequence[str], dtype: Optional[torch.dtype], device, operations=nn,
              compute_dtype: Optional[torch.dtype] = None, what: Optional[str] = None, **kw) -> nn.Module:
        """The network with its weights from ``files`` (strict keys), stored in ``dtype`` (see
        :meth:`storage_dtype`; None: as in the files), computing in ``compute_dtype``."""
        return self.builder(config, files, dtype, device, operations, compute_dtype, what or self.title, **kw)

    def skeleton(self, config: dict, dtype: torch.dtype = torch.float32, device="meta",
                 operations=None, **kw) -> nn.Module:
        """The network without weights (on the meta device it costs no memory), for sizes and plans;
        layers from ``operations`` (default: torch.nn without random init). ``kw``: the AR's ``parts``."""
        return self.skeleton_of(config, dtype, device, operations, **kw)


def _build_ar(config, files, dtype, device, operations, compute_dtype, what, parts=None):
    return ar_model.build_ar(config, files, dtype=dtype or torch.float32, device=device, operations=operations,
                             compute_dtype=compute_dtype, what=what, parts=tuple(parts or ar_model.ALL_PARTS))


def _build_vae(config, files, dtype, device, operations, compute_dtype, what):
    return vae.build_vae(config, files, dtype, device, operations, what)   # runs in its storage dtype


NETWORKS: Dict[str, Network] = {n.id: n for n in (
    Network("dit", "GLM-Image DiT (diffusion transformer)", "transformer", "diffusion_models",
            ("transformer/config.json", "scheduler/scheduler_config.json", "vae/config.json"), (),
            fp8_keys=dit.FP8_WEIGHT_KEYS, storage=("bf16", "fp16", "fp32") + FP8,
            compute=(torch.bfloat16, torch.float16, torch.float32),
            builder=lambda c, f, dt, dev, ops, cd, what: dit.build_dit(c, f, dt or torch.float32, dev, ops, cd, what),
            skeleton_of=lambda c, dt, dev, ops: dit.GlmImageDiT(c, dtype=dt, device=dev, operations=ops or no_init_ops,
                                                                compute_dtype=dt)),
    Network("ar", "GLM-Image AR model (vision_language_encoder)", "vision_language_encoder", "text_encoders",
            ("vision_language_encoder/config.json", "processor/tokenizer.json"),
            ("vision_language_encoder/generation_config.json", "processor/tokenizer_config.json",
             "processor/processor_config.json", "processor/preprocessor_config.json",
             "processor/chat_template.jinja"),
            fp8_keys=ar_model.FP8_WEIGHT_KEYS, storage=("bf16", "fp16", "fp32") + FP8,
            compute=(torch.bfloat16, torch.float16, torch.float32), builder=_build_ar,
            skeleton_of=lambda c, dt, dev, ops, parts=None: ar_model.GlmImageAR(
                c, dtype=dt, device=dev, operations=ops or nn, parts=parts or ar_model.ALL_PARTS),
            # the 168064 x 4096 token table (1.3 GiB in bf16): a lookup dequantizes only its rows
            gguf_rows=re.compile(r"model\.language_model\.embed_tokens\.weight$")),
    # The T5 glyph encoder is small and numerically sensitive: never fp8.
    Network("glyph_encoder", "GLM-Image glyph encoder (ByT5, text_encoder)", "text_encoder", "text_encoders",
            ("text_encoder/config.json",),
            ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "tokenizer/added_tokens.json"),
            fp8_keys=None, storage=("bf16", "fp16", "fp32"), compute=(torch.bfloat16, torch.float16, torch.float32),
            builder=lambda c, f, dt, dev, ops, cd, what: glyph.build_glyph_encoder(c, f, dt or torch.float32, dev, ops,
                                                                                   cd, what),
            skeleton_of=lambda c, dt, dev, ops: glyph.GlyphT5Encoder(c, dtype=dt, device=dev,
                                                                     operations=ops or no_init_ops, compute_dtype=dt)),
    # GLM-Image's VAE overflows in fp16 (NaN / black images): bf16 and fp32 only, never fp8.
    Network("vae", "GLM-Image VAE", "vae", "vae", ("vae/config.json",), (),
            fp8_keys=None, storage=("bf16", "fp32"), compute=(torch.bfloat16, torch.float32), builder=_build_vae,
            skeleton_of=lambda c, dt, dev, ops: vae.GlmImageVAE(c, dtype=dt, device=dev,
                                                                operations=ops or no_init_ops)),
)}

BY_FOLDER: Dict[str, Network] = {n.folder: n for n in NETWORKS.values()}


def network(key: str) -> Network:
    """The entry of a network by id (``"dit"``) or by its official folder (``"transformer"``)."""
    n = NETWORKS.get(key) or BY_FOLDER.get(key)
    if n is None:
        raise ValueError(f"unknown GLM-Image network {key!r}; one of {', '.join(NETWORKS)} "
                         f"(folders {', '.join(BY_FOLDER)})")
    return n
