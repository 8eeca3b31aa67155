"""GLM-Image Text → Semantic Tokens: the AR sampler."""

from __future__ import annotations

import torch
from .api import io, ui

import comfy.model_management as mm
import comfy.utils

from ..glm_image_core.generation import ar_generate
from ..glm_image_core.loading import memory_plan
from ..glm_image_core.generation.tokens import GLMTokens
from .types import CATEGORY, GlmAR, GlmReference, GlmTokens

MIN_SIZE, MAX_SIZE, SIZE_STEP = 256, 2048, 32


def size_error(name: str, value: int) -> str | None:
    if not isinstance(value, int) or value % SIZE_STEP or not (MIN_SIZE <= value <= MAX_SIZE):
        return (f"{name} must be a multiple of {SIZE_STEP} between {MIN_SIZE} and {MAX_SIZE} "
                f"(GLM-Image works on a 32-pixel token grid), got {value!r}")
    return None


def decode_mode(component) -> str:
    """How the AR decodes (``glm_image_core.generation.ar_generate.StaticDecode``): on the CPU the exact step (bit
    parity with the official pipeline); on a GPU the static, sync-free step, replayed as a CUDA graph
    when every weight stays resident (not under ``--lowvram`` streaming or dynamic VRAM)."""
    if component.load_device.type == "cpu":
        return "exact"
    if component.load_device.type == "cuda" and component.fully_resident():
        return "graphs"
    return "static"


def token_grid_image(grid: torch.Tensor) -> torch.Tensor:
    """A colour map of token ids [B,h,w] -> IMAGE [B,h*s,w*s,3] for the node's preview (hash -> hue)."""
    g = grid.to(torch.int64)
    h = (g * 2654435761) % 4294967296                      # Knuth multiplicative hash, spreads neighbours
    rgb = torch.stack([(h >> 8) & 255, (h >> 16) & 255, (h >> 24) & 255], dim=-1).float() / 255.0
    scale = max(1, 256 // max(g.shape[1], g.shape[2]))
    rgb = rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return rgb.clamp(0, 1)


class GLMImageTextToTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageTextToTokens",
            display_name="GLM-Image Text → Semantic Tokens",
            category=CATEGORY,
            description="Runs GLM-Image's autoregressive model: writes a small preview grid, then the full "
                        "semantic-token grid (one token per 32×32 pixels). The same seed gives the same tokens "
                        "as the official pipeline.",
            inputs=[
                GlmAR.Input("ar", tooltip="From Load GLM-Image."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to draw. Put text you want rendered in quotes, e.g. a sign that says \"OPEN\"."),
                io.Int.Input("width", default=1024, min=MIN_SIZE, max=MAX_SIZE, step=SIZE_STEP,
                             tooltip="Image width in pixels (multiple of 32)."),
                io.Int.Input("height", default=1024, min=MIN_SIZE, max=MAX_SIZE, step=SIZE_STEP,
                             tooltip="Image height in pixels (multiple of 32)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Sampling seed (same seed → same tokens as the official pipeline)."),
                io.Float.Input("temperature", default=0.9, min=0.05, max=2.0, step=0.01,
                               tooltip="Softmax temperature of the token sampler (official: 0.9)."),
                io.Float.Input("top_p", default=0.75, min=0.01, max=1.0, step=0.01,
                               tooltip="Nucleus sampling mass (official: 0.75)."),
                io.Int.Input("top_k", default=0, min=0, max=16512,
                             tooltip="Keep only the k most likely tokens; 0 = off (official)."),
                io.Int.Input("batch_size", default=1, min=1, max=16,
                             tooltip="Number of token grids to sample from the same prompt."),
                GlmReference.Input("reference", optional=True,
                                   tooltip="Reference images (from GLM-Image Reference Edit) for editing."),
            ],
            outputs=[GlmTokens.Output("tokens", display_name="tokens",
                                      tooltip="Semantic token grid (H/32 × W/32) plus its prompt, size and seed.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None) -> bool | str:
        # A linked width/height (e.g. from a primitive node) is None here: execute() checks its value.
        # ComfyUI shows the one message under every input, so it names each bad one.
        errors = [size_error(n, v) for n, v in (("width", width), ("height", height)) if v is not None]
        return "; ".join(e for e in errors if e) or True

    @classmethod
    def execute(cls, ar, prompt, width, height, seed, temperature, top_p, top_k, batch_size,
                reference=None) -> io.NodeOutput:
        for name, v in (("width", width), ("height", height)):
            err = size_error(name, v)
            if err:
                raise ValueError(err)
        if reference is not None:
            reference.check_compatible_ar(ar)
        # Room for the activations next to the weights: ComfyUI evicts (or partially loads) to fit both.
        model = ar.model.load(memory_required=memory_plan.ar_activation_bytes(
            ar.config["text_config"], len(ar.tokenizer.encode(prompt)), width, height, batch_size,
            ar.model.compute_dtype.itemsize,
            reference_tokens=0 if reference is None else sum(g.numel() for g in reference.ar_token_grids())))
        pbar = comfy.utils.ProgressBar(1, node_id=cls.hidden.unique_id)

        def on_token(done: int, total: int, phase: str) -> None:
            # progress first, then the check: it reports exactly the work done when a Cancel lands
            pbar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        result = ar_generate.generate_tokens(
            model, ar.tokenizer, prompt, width=width, height=height, seed=seed, temperature=temperature,
            top_p=top_p, top_k=top_k, batch_size=batch_size,
            reference_grids=None if reference is None else reference.ar_token_grids(),
            callback=on_token, device=ar.model.load_device, dtype=ar.model.compute_dtype,
            decode=decode_mode(ar.model))
        tokens = GLMTokens(
            grid=result.grid.cpu(), preview=None if result.preview is None else result.preview.cpu(),
            width=width, height=height, prompt=prompt, seed=seed,
            sampling={"temperature": temperature, "top_p": top_p, "top_k": top_k, "batch_size": batch_size},
            codebook_size=ar.codebook_size, source=ar.name,
            num_references=0 if reference is None else len(reference))
        preview = ui.PreviewImage(token_grid_image(tokens.grid), cls=cls)
        return io.NodeOutput(tokens, ui=preview)
