"""GLM-Image's networks, one :class:`Network` entry each: the one place for every fact about a network
that the loaders, the single-file detector and converter, the memory plan, the nodes and the bench
need (comfy/supported_models.py plays this part in ComfyUI).

An entry holds:

* its id (``"ar"``, ``"dit"``, ``"glyph_encoder"``, ``"vae"``: the one vocabulary of the nodes, the
  memory plan, the single files and the bench), titles for messages, its folder in the official
  layout and its ComfyUI ``models/`` folder as a single file;
* its single-file detection signature (:data:`TensorInfo` -> a description, or None);
* the storage and compute dtypes it takes, with the reason for the ones it refuses; :meth:`Network.build`
  enforces them, so no caller restates them;
* which of its weights an fp8 load stores in fp8 (and a GGUF file as ggml blocks);
* its architecture (the ``networks/`` class) and its builder, a named function that streams the
  weights in with ``build.build_loaded``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..networks import ar_model, dit, glyph, vae
from . import checkpoint as ckpt
from . import configs
from ..networks.common import default_compute_dtype
from .build import build_loaded, no_init_ops

# Storage dtypes by the names the nodes show; "default" (keep the file's) is not one of them.
STORAGE_DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8 = ("fp8_e4m3fn", "fp8_e5m2")
DTYPE_NAMES = {v: k for k, v in STORAGE_DTYPES.items()}

TensorInfo = Dict[str, Tuple[str, Tuple[int, ...]]]   # key -> (safetensors dtype name, shape)


@dataclass(frozen=True)
class Network:
    id: str                                  # "ar" | "dit" | "glyph_encoder" | "vae"
    title: str                               # in messages: "GLM-Image DiT (diffusion transformer)"
    short: str                               # in logs and tables: "DiT"
    folder: str                              # its folder in the official layout
    comfy_folder: str                        # the ComfyUI models/ folder of its single file
    single_file_required: Tuple[str, ...]    # official files a single file must carry (official paths)
    single_file_optional: Tuple[str, ...]
    signature: Callable[[TensorInfo], Optional[str]]   # what the tensors are, when they are this network
    architecture: Callable[..., nn.Module]   # (config, dtype, device, operations, compute_dtype, **kw)
    builder: Callable[..., nn.Module]        # (network, config, files, dtype, device, operations, compute_dtype, what, **kw)
    storage: Tuple[str, ...]                 # storage dtypes it takes (STORAGE_DTYPES names)
    compute: Tuple[torch.dtype, ...]         # compute dtypes it runs in
    fp8_keys: Optional[re.Pattern] = None    # weights an fp8 load stores in fp8; None: never fp8
    gguf_rows: Optional[re.Pattern] = None   # embedding tables a GGUF file stores as blocks too (read row by row)
    refused: str = ""                        # why the dtypes it does not take are refused
    # A pipeline-wide weight_dtype (Load GLM-Image) this network follows; others keep its file's dtype.
    follows: Tuple[str, ...] = ()
    ignore_unexpected: Tuple[str, ...] = ()  # official keys unused at inference (never loaded)
    aliases: Dict[str, str] = field(default_factory=dict)   # {file key: network key} for tied tables

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

    @property
    def weight_dtype_options(self) -> Tuple[str, ...]:
        """What a loader's weight_dtype offers: "default" (the file's) and the storage dtypes it takes."""
        return ("default",) + self.storage

    def storage_dtype(self, requested: Optional[torch.dtype]) -> Optional[torch.dtype]:
        """The dtype a request actually stores it in: one it does not take keeps the file's (None)."""
        if requested is None:
            return None
        return requested if requested in (STORAGE_DTYPES[n] for n in self.storage) else None

    def storage_for(self, pipeline_weight_dtype: str) -> str:
        """Its weight_dtype under a pipeline-wide request (Load GLM-Image): the request where it
        follows it, else "default" (as stored)."""
        return pipeline_weight_dtype if pipeline_weight_dtype in self.follows else "default"

    def check_dtypes(self, dtype: Optional[torch.dtype], compute_dtype: Optional[torch.dtype] = None) -> None:
        """A clear error for a storage or compute dtype this network does not take."""
        if dtype is not None and dtype not in (STORAGE_DTYPES[n] for n in self.storage):
            raise ValueError(f"the {self.title} cannot be stored in {DTYPE_NAMES.get(dtype, dtype)}: it takes "
                             f"{', '.join(self.storage)}{f' ({self.refused})' if self.refused else ''}")
        if compute_dtype is not None and compute_dtype not in self.compute:
            raise ValueError(f"the {self.title} cannot compute in {DTYPE_NAMES.get(compute_dtype, compute_dtype)}: "
                             f"it runs in {', '.join(DTYPE_NAMES[d] for d in self.compute)}"
                             f"{f' ({self.refused})' if self.refused else ''}")

    def build(self, config: dict, files: Sequence[str], dtype: Optional[torch.dtype] = None, device="cpu",
              operations=nn, compute_dtype: Optional[torch.dtype] = None, what: Optional[str] = None,
              **kw) -> nn.Module:
        """The network with its weights from ``files`` (strict keys), stored in ``dtype`` (None: fp32),
        computing in ``compute_dtype`` (None: the storage dtype's, ``networks.common.default_compute_dtype``).
        A dtype the network does not take is refused here, once for every caller."""
        self.check_dtypes(dtype, compute_dtype)
        return self.builder(self, config, files, dtype or torch.float32, device, operations, compute_dtype,
                            what or self.title, **kw)

    def load(self, component_dir: str, dtype: Optional[torch.dtype] = None, device="cpu", operations=nn,
             compute_dtype: Optional[torch.dtype] = None, **kw) -> nn.Module:
        """:meth:`build` from a component folder of the official layout (``config.json`` + its
        safetensors files, sharded or not)."""
        return self.build(ckpt.read_json(os.path.join(component_dir, "config.json")), ckpt.weight_files(component_dir),
                          dtype, device, operations, compute_dtype, f"{self.title} ({component_dir})", **kw)

    def skeleton(self, config: dict, dtype: torch.dtype = torch.float32, device="meta",
                 operations=None, **kw) -> nn.Module:
        """The network without weights (on the meta device it costs no memory), for sizes and plans;
        layers from ``operations`` (default: torch.nn without random init). ``kw``: the AR's ``parts``."""
        return self.architecture(config, dtype, device, operations or no_init_ops, dtype, **kw)


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------

def build_streamed(net: Network, config: dict, files: Sequence[str], dtype: torch.dtype, device, operations,
                   compute_dtype: Optional[torch.dtype], what: str, keep=None, **kw) -> nn.Module:
    """The network built on the meta device, its weights streamed in tensor by tensor: fp8-eligible
    weights in ``dtype`` when it is fp8, the rest in the compute dtype (``checkpoint.storage_dtypes``)."""
    compute = compute_dtype or default_compute_dtype(dtype)
    return build_loaded(lambda ops: net.architecture(config, dtype, "meta", ops, compute_dtype, **kw), operations,
                        files, what, storage=ckpt.storage_dtypes(dtype, net.fp8_keys, compute), device=device,
                        keep=keep, aliases=net.aliases, ignore_unexpected=net.ignore_unexpected)


def build_ar(net: Network, config: dict, files: Sequence[str], dtype: torch.dtype, device, operations,
             compute_dtype: Optional[torch.dtype], what: str, parts: Sequence[str] = ar_model.ALL_PARTS,
             cpu_gemv_layout: bool = False) -> nn.Module:
    """The AR, or some of its parts (``ar_model.AR_PARTS``): keys of the parts not built are never
    read; keys of no part stay in, to be reported as unexpected. ``cpu_gemv_layout``: see
    ``ar_model.relayout_for_cpu_gemv`` (a CPU decode speed-up; off by default for exact parity)."""
    parts = ar_model.check_parts(parts)
    if parts != ar_model.ALL_PARTS:
        what = f"{what}, {'+'.join(parts)} part"
    model = build_streamed(net, config, files, dtype, device, operations, compute_dtype, what, parts=parts,
                           keep=lambda k: ar_model.part_of_key(k) in parts + (None,))
    if cpu_gemv_layout:
        ar_model.relayout_for_cpu_gemv(model)
    return model


# --------------------------------------------------------------------------------------
# Architectures: (config, dtype, device, operations, compute_dtype, **kw) -> the module
# --------------------------------------------------------------------------------------

def ar_architecture(config, dtype, device, operations, compute_dtype, parts=ar_model.ALL_PARTS):
    m = ar_model.GlmImageAR(config, dtype=dtype, device=device, operations=operations, parts=parts)
    if compute_dtype is not None:
        m.compute_dtype = compute_dtype
    return m


def dit_architecture(config, dtype, device, operations, compute_dtype):
    return dit.GlmImageDiT(config, dtype=dtype, device=device, operations=operations, compute_dtype=compute_dtype)


def glyph_encoder_architecture(config, dtype, device, operations, compute_dtype):
    return glyph.GlyphT5Encoder(config, dtype=dtype, device=device, operations=operations, compute_dtype=compute_dtype)


def vae_architecture(config, dtype, device, operations, compute_dtype):
    return vae.GlmImageVAE(config, dtype=dtype, device=device, operations=operations)   # runs in its storage dtype


# --------------------------------------------------------------------------------------
# Single-file signatures: TensorInfo -> a description when the tensors are this network
# --------------------------------------------------------------------------------------

BYT5_VOCAB = 384   # 3 specials + 256 bytes + 125 sentinels: ByT5's embedding rows


def has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def dit_signature(tensors: TensorInfo) -> Optional[str]:
    keys = set(tensors)
    if {"image_projector.proj.weight", "prior_token_embedding.weight",
            "transformer_blocks.0.attn1.to_q.weight"} <= keys:
        n = len({k.split(".")[1] for k in keys if k.startswith("transformer_blocks.")})
        return f"a GLM-Image DiT ({n} blocks, hidden size {tensors['image_projector.proj.weight'][1][0]})"
    return None


def ar_signature(tensors: TensorInfo) -> Optional[str]:
    keys = set(tensors)
    if "lm_head.weight" in keys and has_prefix(keys, "model.language_model.layers.") and has_prefix(keys, "model.visual.") \
            and has_prefix(keys, "model.vqmodel."):
        n = len({k.split(".")[3] for k in keys if k.startswith("model.language_model.layers.")})
        return f"a GLM-Image AR model ({n} decoder layers, vision tower, VQ codebook)"
    return None


def t5_embedding_shape(tensors: TensorInfo) -> Optional[Tuple[int, ...]]:
    """The token table's shape of a T5 encoder's tensors; None when they are not a T5 encoder."""
    if "encoder.block.0.layer.0.SelfAttention.q.weight" not in tensors or \
            "encoder.final_layer_norm.weight" not in tensors:
        return None
    emb = tensors.get("shared.weight") or tensors.get("encoder.embed_tokens.weight")
    return tuple(emb[1]) if emb is not None else ()


def glyph_encoder_signature(tensors: TensorInfo) -> Optional[str]:
    emb = t5_embedding_shape(tensors)
    if emb and emb[0] == BYT5_VOCAB and not has_prefix(tensors, "decoder."):
        return f"a GLM-Image glyph encoder (ByT5 encoder, d_model {emb[1]})"
    return None


def vae_signature(tensors: TensorInfo) -> Optional[str]:
    keys = set(tensors)
    if {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= keys and has_prefix(keys, "decoder.up_blocks."):
        return f"a diffusers AutoencoderKL VAE with {tensors['decoder.conv_in.weight'][1][1]} latent channels"
    return None


# --------------------------------------------------------------------------------------
# The networks
# --------------------------------------------------------------------------------------

FLOATS = ("bf16", "fp16", "fp32")
ALL_COMPUTE = (torch.bfloat16, torch.float16, torch.float32)

NETWORKS: Dict[str, Network] = {n.id: n for n in (
    Network("dit", "GLM-Image DiT (diffusion transformer)", "DiT", "transformer", "diffusion_models",
            ("transformer/config.json", "scheduler/scheduler_config.json", "vae/config.json"), (),
            signature=dit_signature, architecture=dit_architecture, builder=build_streamed,
            storage=FLOATS + FP8, compute=ALL_COMPUTE, follows=FLOATS + FP8,
            # the Linear layers of the blocks (~90% of the parameters)
            fp8_keys=re.compile(r"transformer_blocks\.\d+\.")),
    Network("ar", "GLM-Image AR model (vision_language_encoder)", "AR model", "vision_language_encoder",
            "text_encoders",
            ("vision_language_encoder/config.json", "processor/tokenizer.json"),
            ("vision_language_encoder/generation_config.json", "processor/tokenizer_config.json",
             "processor/processor_config.json", "processor/preprocessor_config.json",
             "processor/chat_template.jinja"),
            signature=ar_signature, architecture=ar_architecture, builder=build_ar,
            storage=FLOATS + FP8, compute=ALL_COMPUTE, follows=FLOATS + FP8,
            # the Linear layers of the decoder and ViT blocks; norms (1-D), embeddings, the VQ codebook
            # and lm_head stay in the compute dtype
            fp8_keys=re.compile(r"model\.(language_model\.layers|visual\.blocks)\.\d+\."),
            # the 168064 x 4096 token table (1.3 GiB in bf16): a lookup dequantizes only its rows
            gguf_rows=re.compile(r"model\.language_model\.embed_tokens\.weight$"),
            # only decodes VQ codes back to features, never used at inference: not built
            ignore_unexpected=("model.vqmodel.post_quant_conv.",)),
    Network("glyph_encoder", "GLM-Image glyph encoder (ByT5, text_encoder)", "glyph encoder", "text_encoder",
            "text_encoders", ("text_encoder/config.json",),
            ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "tokenizer/added_tokens.json"),
            signature=glyph_encoder_signature, architecture=glyph_encoder_architecture, builder=build_streamed,
            storage=FLOATS, compute=ALL_COMPUTE,
            refused="no fp8: the T5 glyph encoder is small and numerically sensitive",
            follows=("fp32",),   # kept as stored unless the pipeline asks for fp32
            # the official file may hold the shared table under its encoder alias only
            aliases={"encoder.embed_tokens.weight": "shared.weight"},
            ignore_unexpected=("encoder.embed_tokens.weight",)),
    Network("vae", "GLM-Image VAE", "VAE", "vae", "vae", ("vae/config.json",), (),
            signature=vae_signature, architecture=vae_architecture, builder=build_streamed,
            storage=("bf16", "fp32"), compute=(torch.bfloat16, torch.float32),
            refused="no fp16: GLM-Image's VAE overflows in fp16 (NaN/black images); no fp8"),
)}

BY_FOLDER: Dict[str, Network] = {n.folder: n for n in NETWORKS.values()}


def network(key: str) -> Network:
    """The entry of a network by id (``"dit"``) or by its official folder (``"transformer"``)."""
    n = NETWORKS.get(key) or BY_FOLDER.get(key)
    if n is None:
        raise ValueError(f"unknown GLM-Image network {key!r}; one of {', '.join(NETWORKS)} "
                         f"(folders {', '.join(BY_FOLDER)})")
    return n


def identify(tensors: TensorInfo) -> Tuple[Optional[str], Optional[str]]:
    """(network id, description) of the network whose signature the tensors match, or (None, None)."""
    for net in NETWORKS.values():
        description = net.signature(tensors)
        if description is not None:
            return net.id, description
    return None, None
