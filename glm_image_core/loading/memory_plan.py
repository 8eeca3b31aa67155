"""Device-memory estimates for GLM-Image: weight bytes per component and dtype, activation bytes per
stage, and the plan of a whole text-to-image run when ComfyUI evicts each stage before the next.

Two users:

* the nodes pass the activation estimates as ``memory_required`` to ComfyUI's ``load_models_gpu``
  (so ComfyUI frees, or partially loads, enough to leave room for the activations of the call);
* ``bench/memory.py`` prints the plan for the full-size model (and measures it on a CUDA GPU).

The activation formulas count the tensors alive at the peak of each stage's forward as this
package computes it (eager PyTorch, one op at a time); they are estimates, written so that each
term can be read against the code it describes. Attention is assumed to use a fused SDPA kernel
(flash / memory-efficient, what CUDA picks for bf16/fp16): no [L, L] score matrix; with
``attention_scores=True`` the math kernel's fp32 scores are added.

Plain PyTorch; never imports comfy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from ..generation.ar_generate import cache_capacity
from ..networks.ar_model import AR_PARTS, TextConfig
from ..generation.ar_prompt import GRID_FACTOR, preview_grid, target_grid
from .registry import NETWORKS
from ..networks.dit import DEFAULT_DIT_CONFIG
from ..networks.vae import VaeConfig

GIB = 1024 ** 3
MIB = 1024 ** 2

# Bytes per element of each storage dtype this plan knows.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# ComfyUI 0.3.75 constants (comfy/model_management.py) that decide when a model is partially loaded:
# load_models_gpu keeps max(minimum_inference_memory(), memory_required + EXTRA_RESERVED_VRAM) free
# next to the weights; with less, the model is loaded partially (lowvram).
COMFY_EXTRA_RESERVED = 400 * MIB
COMFY_MIN_INFERENCE = int(0.8 * GIB) + COMFY_EXTRA_RESERVED
# What a CUDA process holds besides torch's allocations (context, cuBLAS workspaces); not seen by
# torch.cuda.max_memory_allocated. A typical figure, not measured here.
CUDA_CONTEXT = 512 * MIB


# --------------------------------------------------------------------------------------
# The full-size configurations (zai-org/GLM-Image; docs/architecture.md, "Design notes")
# --------------------------------------------------------------------------------------

def full_size_configs() -> Dict[str, dict]:
    """config.json of each network of the official checkpoint, keyed by network id."""
    return {n: NETWORKS[n].full_size_config() for n in NETWORK_IDS}


# The networks the plan covers, by the registry's ids: AR, glyph encoder, DiT, VAE.
NETWORK_IDS = ("ar", "glyph_encoder", "dit", "vae")
AR = "ar"
# The AR is loaded as two networks (nodes: GLMARModel.model / .vision; ar_model.AR_PARTS): the text
# part for the AR stage, the vision part only when a Reference Edit tokenises a reference.
AR_TEXT, AR_VISION = "ar_text", "ar_vision"
COMPONENT_NAMES = {**{n: NETWORKS[n].short for n in NETWORK_IDS},
                   AR_TEXT: "AR text part", AR_VISION: "AR vision part"}


def ar_part_key(part: str) -> str:
    """The :func:`component_stats` key of one AR part (``"text"`` or ``"vision"``)."""
    return f"{AR}_{part}"


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

# Layers whose weight ComfyUI's comfy.ops can store in fp8 and cast per call (and stream in lowvram).
CASTABLE = (nn.Linear, nn.Conv2d, nn.Embedding)
# Embedding tables this package reads by row lookup where the table lives (ar_model.TextModel.embed),
# never cast or copied whole: they are no lowvram stream unit.
ROW_LOOKUP = ("model.language_model.embed_tokens",)


@dataclass
class WeightStats:
    """Element counts of one network, split by how its tensors are stored in an fp8 load."""
    fp8able: int = 0          # 2-D weights an fp8 load stores in fp8 (the registry entry's fp8_keys)
    other: int = 0            # everything else: kept in the compute dtype by an fp8 load
    largest_layer: int = 0    # elements of the largest streamable layer (weight + bias): the lowvram unit
    largest_layer_name: str = ""
    largest_fp8_layer: int = 0   # elements of the largest fp8 weight: the per-call cast copy
    loose: int = 0            # elements outside Linear/Conv2d/Embedding layers (norm weights, tables)
    unused_in_t2i: int = 0    # elements never read by text-to-image (the AR's vision tower + VQ)

    @property
    def total(self) -> int:
        return self.fp8able + self.other

    def bytes(self, weight_dtype: str, compute_dtype: str = "bf16") -> int:
        """Stored bytes for a ``weight_dtype`` load (``fp8``: the fp8 rule, the rest in ``compute_dtype``)."""
        if weight_dtype == "fp8":
            return self.fp8able * 1 + self.other * DTYPE_BYTES[compute_dtype]
        return self.total * DTYPE_BYTES[weight_dtype]


def weight_stats(model: nn.Module, fp8_keys=None) -> WeightStats:
    """Counts over the parameters and persistent buffers of ``model`` (its state dict)."""
    s = WeightStats()
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        own.update({k: b for k, b in m.named_buffers(recurse=False)
                    if k not in getattr(m, "_non_persistent_buffers_set", ())})
        layer = 0
        for pname, p in own.items():
            n = p.numel()
            layer += n
            key = f"{name}.{pname}" if name else pname
            if fp8_keys is not None and p.dim() == 2 and fp8_keys.match(key):
                s.fp8able += n
                s.largest_fp8_layer = max(s.largest_fp8_layer, n)
            else:
                s.other += n
        if not isinstance(m, CASTABLE):
            s.loose += layer
        elif layer > s.largest_layer and name not in ROW_LOOKUP:
            s.largest_layer, s.largest_layer_name = layer, name
    if hasattr(model, "model") and hasattr(model.model, "visual"):
        s.unused_in_t2i = sum(p.numel() for p in model.model.visual.parameters()) + \
            sum(p.numel() for p in model.model.vqmodel.parameters())
    return s


def component_stats(configs: Dict[str, dict]) -> Dict[str, WeightStats]:
    """:func:`weight_stats` of every component, built on the meta device from ``configs``, plus each
    AR part on its own (keys :data:`AR_TEXT`, :data:`AR_VISION`)."""
    stats = {c: weight_stats(NETWORKS[c].skeleton(configs[c]), NETWORKS[c].fp8_keys) for c in NETWORK_IDS}
    for part in AR_PARTS:
        stats[ar_part_key(part)] = weight_stats(NETWORKS[AR].skeleton(configs[AR], parts=(part,)),
                                                NETWORKS[AR].fp8_keys)
    return stats


# --------------------------------------------------------------------------------------
# Activations (bytes), per stage
# --------------------------------------------------------------------------------------

def ar_sequence(prompt_tokens: int, width: int, height: int, reference_tokens: int = 0) -> tuple:
    """(prompt length fed to prefill, tokens generated) of a t2i (or edit) AR run."""
    th, tw = target_grid(width, height)
    if reference_tokens:                       # edit: no preview grid; the reference ids are in the prompt
        n_gen = th * tw
        prompt = prompt_tokens + reference_tokens + 2 + 8
    else:
        ph, pw = preview_grid(th, tw)
        n_gen = th * tw + ph * pw
        prompt = prompt_tokens + 12            # <sop>h w<eop><sop>h w<eop><|dit_token_16384|> markers
    return prompt, n_gen


def ar_activation_bytes(text_config: dict, prompt_tokens: int, width: int, height: int, batch: int = 1,
                        dtype_bytes: int = 2, reference_tokens: int = 0, attention_scores: bool = True) -> int:
    """Peak activation bytes of ``ar_generate.generate_tokens``: the static KV cache for the whole
    sequence (rounded up to the static decode's bucket, what a GPU allocates), plus the widest moment of the prefill (residual, norm output, q/k/v, fused gate/up MLP
    and its product; by default also fp32 [heads, L, L] attention scores, as SDPA with GQA may take
    the math kernel), plus the fp32 sampler rows over the visual vocabulary. Checked on CPU (fp32,
    full width, 2 layers): peak RSS rises by ~1.8× this figure, ~50 MiB absolute; small next to
    the weights either way."""
    c = TextConfig.from_dict(text_config)
    L, n_gen = ar_sequence(prompt_tokens, width, height, reference_tokens)
    kv = 2 * c.num_layers * batch * c.num_kv_heads * cache_capacity(L + n_gen) * c.head_dim * dtype_bytes
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    attn = batch * L * (2 * c.hidden_size + qkv + c.num_heads * c.head_dim)
    mlp = batch * L * (2 * c.hidden_size + 2 * c.intermediate_size + c.intermediate_size)
    prefill = max(attn, mlp) * dtype_bytes
    if attention_scores:
        prefill += batch * c.num_heads * L * L * 4
    rope = 2 * (L + n_gen) * c.rotary_dim * 4 * 2                      # prefill + decode tables
    sampler = 4 * batch * c.vision_vocab_size * 4                      # logits, exponential draw, ratios
    return int(kv + prefill + rope + sampler)


def vision_activation_bytes(config: dict, patches: int, dtype_bytes: int = 2, attention_scores: bool = True) -> int:
    """Peak activation bytes of tokenising one reference of ``patches`` patches
    (``ar_generate.tokenize_references``): a ViT block (ar_model.VisionBlock) holds its input, the
    norm, qkv and the per-head q/k/v copies, the attention output and its contiguous copies and the
    projection, or the MLP's fc1 output and activation; by default plus the fp32 [heads, N, N] scores
    and softmax of the math attention kernel. The VQ step (VectorQuantizer.indices) then holds the
    normalised codebook and the [N, codebook] distances. Input pixel rows are fp32."""
    v, q = config["vision_config"], config["vq_config"]
    C, inter, heads = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["num_heads"])
    N = patches
    block = N * max(2 * C + 3 * C + 3 * C + 3 * C, 2 * C + 2 * inter) * dtype_bytes
    if attention_scores:
        block += 2 * heads * N * N * 4
    rows = N * 3 * int(v["patch_size"]) ** 2 * 4
    K, E = int(q["num_embeddings"]), int(q["embed_dim"])
    vq = (2 * K * E + 3 * N * K + 2 * N * E) * dtype_bytes
    return int(rows + max(block, vq))


def dit_activation_bytes(dit_config: dict, width: int, height: int, text_tokens: int, batch: int = 1,
                         passes: int = 2, dtype_bytes: int = 2, reference_tokens: int = 0,
                         attention_scores: bool = False) -> int:
    """Peak activation bytes of one ``GlmImageDiT.forward_multi`` step (``passes`` = 2 with CFG: the
    cond and uncond passes run in one sweep), plus what the denoise loop keeps across steps.

    Per block (dit.GlmImageBlock.forward), P passes, B images, N image tokens, L text tokens, D wide,
    T = P(L+N) joint tokens. The attention tensors are locals of the block, alive until it returns,
    so the peak is in the feed-forward: X and its norm [P,B,N,D]; the joint input, q, k, v, the
    per-pass attention outputs, their concatenation and the output projection [B,T,D]; the GELU
    input and output [P,B,N,4D], the feed-forward output and its gated copy [P,B,N,D].
    Loop state: projected priors [P,B,N,D], the fp32 latents/noise/velocity [B,C,h,w], RoPE tables.
    Edits add the reference K/V cache: layers × 2 × [B, R, D]. Checked on CPU (fp32, full width,
    one block, 512²): the process's peak RSS rises by ~1.2× this figure."""
    cfg = dict(DEFAULT_DIT_CONFIG)
    cfg.update(dit_config)
    D = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    F_ = int(cfg["ff_mult"] * D)
    p = int(cfg["patch_size"])
    h, w = height // 8, width // 8
    N = (h // p) * (w // p)
    P, B, L = passes, batch, text_tokens
    T = P * (L + N)
    block = (B * D * (2 * P * N + 7 * T) + B * P * N * (2 * F_ + 2 * D)) * dtype_bytes
    if attention_scores:
        block += B * int(cfg["num_attention_heads"]) * (L + N) * (L + N + reference_tokens) * 4
    loop = P * B * N * D * dtype_bytes + 4 * B * int(cfg["in_channels"]) * h * w * 4 + 2 * N * int(cfg["attention_head_dim"]) * 4
    ref = int(cfg["num_layers"]) * 2 * B * reference_tokens * D * dtype_bytes
    return int(block + loop + ref)


def glyph_activation_bytes(t5_config: dict, text_tokens: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Peak activation bytes of the ByT5 glyph encoder: hidden, norm, q/k/v/o, gated FF (2 × d_ff),
    and the [heads, S, S] position bias + scores (fp32)."""
    d, ff, heads = int(t5_config["d_model"]), int(t5_config["d_ff"]), int(t5_config["num_heads"])
    inner = heads * int(t5_config["d_kv"])
    S = text_tokens
    per_token = max(2 * d + 4 * inner, 2 * d + 3 * ff)
    scores = 3 * batch * heads * S * S * 4
    return int(batch * S * per_token * dtype_bytes + scores)


def vae_decode_activation_bytes(vae_config: dict, width: int, height: int, batch: int = 1,
                                dtype_bytes: int = 2) -> int:
    """Peak activation bytes of ``GlmImageVAE.decode`` at ``width``×``height``, walking the decoder
    (vae.Decoder): a ResNet block holds its input plus three tensors of max(cin, cout) channels
    (norm, activation, conv output); an upsampler its input plus the ×2 interpolation and its conv
    output; the output head norm, activation and the 3-channel image. Output [B,3,H,W] in fp32."""
    c = VaeConfig(vae_config)
    rch = list(reversed(c.block_out_channels))
    s = c.scale_factor
    res = (height // s) * (width // s)                 # elements per channel at the current level
    peak = 0
    prev = rch[0]
    for _ in range(2):                                 # mid block resnets
        peak = max(peak, res * (prev + 3 * prev))
    for i, ch in enumerate(rch):
        for j in range(c.layers_per_block + 1):
            cin = prev if j == 0 else ch
            peak = max(peak, res * (cin + 3 * max(cin, ch)))
        prev = ch
        if i < len(rch) - 1:
            peak = max(peak, res * ch + 2 * (4 * res) * ch)
            res *= 4
    peak = max(peak, res * (3 * rch[-1] + c.out_channels))
    return int(batch * (peak * dtype_bytes + c.out_channels * res * 4))


# --------------------------------------------------------------------------------------
# The plan of a run
# --------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    component: str             # network id (loading.registry)
    weight_dtype: str          # storage dtype of this stage's weights
    weights: int               # bytes of the whole network
    activations: int           # bytes (estimate) at the peak of the call
    cast_buffer: int           # bytes of per-call weight copies (fp8 → compute dtype; one layer in flight)
    stream_unit: int           # bytes (compute dtype) of the largest castable layer: the lowvram stream unit
    resident_floor: int        # bytes outside streamable layers (norm weights...), counted as resident in lowvram
    network: str = ""          # the :func:`component_stats` key of the network loaded (default: ``component``)

    @property
    def network_name(self) -> str:
        return COMPONENT_NAMES[self.network or self.component]

    @property
    def full(self) -> int:
        """Allocated device bytes with the whole network loaded."""
        return self.weights + self.activations + self.cast_buffer

    def lowvram(self, streams: int = 0) -> int:
        """Allocated device bytes with every streamable layer left in RAM (``--novram``-like): the
        non-streamable tensors, the activations and the layer copies in flight (1 + async streams)."""
        return self.resident_floor + self.activations + (1 + streams) * self.stream_unit

    def card_full(self) -> int:
        """Device memory a card needs for ComfyUI to load this stage whole (no partial load)."""
        return self.weights + self.cast_buffer + max(COMFY_MIN_INFERENCE, self.activations + COMFY_EXTRA_RESERVED) \
            + CUDA_CONTEXT


@dataclass
class RunPlan:
    width: int
    height: int
    weight_dtype: str
    compute_dtype: str
    stages: List[Stage] = field(default_factory=list)

    @property
    def peak_full(self) -> int:
        return max(s.full for s in self.stages)

    def peak_lowvram(self, streams: int = 0) -> int:
        return max(s.lowvram(streams) for s in self.stages)

    @property
    def card_full(self) -> int:
        return max(s.card_full() for s in self.stages)

    def card_lowvram(self, streams: int = 0) -> int:
        return self.peak_lowvram(streams) + COMFY_EXTRA_RESERVED + CUDA_CONTEXT

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "weight_dtype": self.weight_dtype,
                "compute_dtype": self.compute_dtype,
                "stages": [dict(name=s.name, component=s.component, network=s.network or s.component,
                                weight_dtype=s.weight_dtype, weights=s.weights,
                                activations=s.activations, cast_buffer=s.cast_buffer, stream_unit=s.stream_unit,
                                resident_floor=s.resident_floor, full=s.full, lowvram=s.lowvram(),
                                card_full=s.card_full()) for s in self.stages],
                "peak_full": self.peak_full, "peak_lowvram": self.peak_lowvram(),
                "card_full": self.card_full, "card_lowvram": self.card_lowvram()}


def plan_run(configs: Dict[str, dict], stats: Dict[str, WeightStats], weight_dtype: str = "bf16",
             width: int = 1024, height: int = 1024, prompt_tokens: int = 256, glyph_tokens: int = 128,
             cfg_passes: int = 2, batch: int = 1, reference: Optional[Tuple[int, int]] = None) -> RunPlan:
    """The stages of a text-to-image run and their device memory, for AR/DiT weights stored in
    ``weight_dtype`` (``bf16``, ``fp16``, ``fp32`` or ``fp8``; compute in bf16, fp32 for fp32).
    The glyph encoder and the VAE stay in the compute dtype (the loader keeps them out of fp8).
    ``stats``: :func:`component_stats`; ``glyph_tokens``: ByT5 bytes of the quoted text. The AR stage
    loads only the AR's text part. ``reference`` (width, height): an edit, which first tokenises one
    reference of that size with the AR's vision part (a stage of its own)."""
    compute = "fp32" if weight_dtype == "fp32" else ("fp16" if weight_dtype == "fp16" else "bf16")
    cb = DTYPE_BYTES[compute]
    plan = RunPlan(width, height, weight_dtype, compute)

    def stage(name, comp, wdt, acts, network=""):
        st = stats[network or comp]
        fp8 = wdt == "fp8" and st.fp8able > 0
        wdt = wdt if fp8 or wdt != "fp8" else compute
        stored = st.bytes(wdt, compute)
        cast = st.largest_fp8_layer * cb if fp8 else 0
        floor = st.loose * (cb if fp8 else DTYPE_BYTES[wdt])
        plan.stages.append(Stage(name, comp, wdt, stored, int(acts), cast, st.largest_layer * cb, floor, network))

    if reference is not None:
        rw, rh = reference
        stage(f"AR vision: tokenise a {rw}×{rh} reference", AR, weight_dtype,
              vision_activation_bytes(configs[AR], (rh // GRID_FACTOR) * (rw // GRID_FACTOR), cb), AR_VISION)
    stage("AR: text → tokens (KV cache)", AR, weight_dtype,
          ar_activation_bytes(configs[AR]["text_config"], prompt_tokens, width, height,
                              batch, cb), AR_TEXT)
    stage("glyph encoder", "glyph_encoder", compute,
          glyph_activation_bytes(configs["glyph_encoder"], glyph_tokens + 1, 1, cb))
    stage(f"DiT step (CFG batch {cfg_passes})", "dit", weight_dtype,
          dit_activation_bytes(configs["dit"], width, height, glyph_tokens + 1, batch, cfg_passes, cb))
    stage(f"VAE decode {width}×{height}", "vae", compute,
          vae_decode_activation_bytes(configs["vae"], width, height, batch, cb))
    return plan


def gib(n: Optional[float]) -> str:
    return "–" if n is None else f"{n / GIB:.2f}"


def resident_fraction(stage: Stage, card: int) -> float:
    """Share of ``stage``'s weights ComfyUI keeps on a card of ``card`` bytes when it loads it
    partially (load_models_gpu: the free memory less max(minimum_inference_memory, memory_required +
    reserve), and one streamed layer in flight)."""
    room = card - CUDA_CONTEXT - max(COMFY_MIN_INFERENCE, stage.activations + COMFY_EXTRA_RESERVED) \
        - stage.stream_unit - stage.cast_buffer
    return max(0.0, min(1.0, room / stage.weights)) if stage.weights else 1.0


def settings_for_card(plans: Dict[str, RunPlan], card_gib: float) -> str:
    """Which loader setting runs a whole t2i on a card of ``card_gib`` GiB (per the plans)."""
    card = card_gib * GIB
    for wd, label in (("bf16", "bf16 (default), all stages loaded whole"),
                      ("fp8", "fp8_e4m3fn weights, all stages loaded whole")):
        if wd in plans and plans[wd].card_full <= card:
            return label
    for wd, label in (("fp8", "fp8_e4m3fn weights + partial loading (ComfyUI picks it; or --lowvram)"),
                      ("bf16", "bf16 + partial loading (ComfyUI picks it; or --lowvram)")):
        if wd in plans and plans[wd].card_lowvram() <= card:
            worst = min(plans[wd].stages, key=lambda st: resident_fraction(st, card))
            return f"{label}; {resident_fraction(worst, card):.0%} of the {worst.network_name} " \
                   "weights resident, the rest streamed per layer"
    return "not enough: use --novram or --cpu"
