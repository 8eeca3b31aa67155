"""GLM-Image Reference Edit: reference images for editing, style transfer and multi-subject generation.

Each reference is fitted to the 32-pixel grid, VAE-encoded (posterior mode, normalised by the
latent statistics) for the DiT's key/value cache, and tokenised by the AR's vision tower + VQ
codebook for the AR prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from .api import io

import comfy.model_management as mm

from ..glm_image_core.generation import ar_generate, ar_prompt, image_proc
from ..glm_image_core.loading import memory_plan
from ..glm_image_core.generation.tokens import upsample_grid
from .types import CATEGORY, GlmAR, GlmDecoder, GlmReference

log = logging.getLogger("GLM-Image")


@dataclass
class ReferenceImage:
    image: torch.Tensor           # [1, H, W, 3] float 0..1, already fitted to the grid
    ar_ids: torch.Tensor          # [H/32, W/32] int64 VQ ids (the AR's view of the image)
    latent: torch.Tensor          # [1, C, H/8, W/8] float32, normalised (the DiT's space)
    note: str = ""                # what was changed to fit the grid, if anything

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])


@dataclass
class References:
    """Payload of the GLM_REFERENCE socket: references in order (chained ones first)."""
    items: list = field(default_factory=list)
    ar_name: str = ""
    decoder_name: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def ar_token_grids(self) -> list:
        return [r.ar_ids for r in self.items]

    def dit_inputs(self, decoder, device) -> list:
        """[(normalised latent, upsampled prior ids [1, N], (H, W) pixels)] for the DiT's cache write."""
        return [(r.latent.to(device), upsample_grid(r.ar_ids[None]).to(device), (r.height, r.width))
                for r in self.items]

    def check_compatible_ar(self, ar) -> None:
        if self.ar_name and self.ar_name != ar.name:
            raise ValueError(f"reference was tokenised by model {self.ar_name!r}, but this AR is {ar.name!r}; "
                             "connect the same Load GLM-Image node to both")

    def check_compatible_decoder(self, decoder, tokens) -> None:
        if self.decoder_name and self.decoder_name != decoder.name:
            raise ValueError(f"reference was encoded for model {self.decoder_name!r}, but this decoder is "
                             f"{decoder.name!r}; connect the same Load GLM-Image node to both")
        for r in self.items:
            if r.latent.shape[1] != decoder.latent_channels:
                raise ValueError(f"reference latent has {r.latent.shape[1]} channels, the decoder expects "
                                 f"{decoder.latent_channels}")


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] with C in {1,3,4} -> RGB (alpha dropped, gray repeated)."""
    if image.dim() != 4:
        raise ValueError(f"image must be a ComfyUI IMAGE [B,H,W,C], got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c == 3:
        return image
    if c == 4:
        return image[..., :3]
    if c == 1:
        return image.expand(-1, -1, -1, 3)
    raise ValueError(f"image must have 1, 3 or 4 channels, got {c}")


def tokenize_image(ar, image: torch.Tensor) -> torch.Tensor:
    """VQ ids [H/32, W/32] of one image already fitted to the grid: the AR's vision tower, loaded by
    ComfyUI with room for its activations, + the VQ codebook."""
    h, w = int(image.shape[1]), int(image.shape[2])
    patches = (h // ar_prompt.GRID_FACTOR) * (w // ar_prompt.GRID_FACTOR)
    model = ar.vision.load(memory_required=memory_plan.vision_activation_bytes(
        ar.config, patches, ar.vision.compute_dtype.itemsize))
    return ar_generate.tokenize_reference(model, image, ar.processor_config, device=ar.vision.load_device,
                                          dtype=ar.vision.compute_dtype)


class GLMImageReferenceEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageReferenceEdit",
            display_name="GLM-Image Reference Edit",
            category=CATEGORY,
            description="Turns reference images into GLM-Image edit conditioning: VQ tokens for the AR and a "
                        "key/value cache for the DiT. Each batch entry is one reference; chain nodes through "
                        "'reference' to add references of other sizes. Connect the output to both Text → "
                        "Semantic Tokens and Semantic Tokens → Latent.",
            inputs=[
                GlmAR.Input("ar", tooltip="From Load GLM-Image (its vision tower tokenises the reference)."),
                GlmDecoder.Input("decoder", tooltip="From Load GLM-Image (latent statistics)."),
                io.Vae.Input("vae", tooltip="From Load GLM-Image (encodes the reference)."),
                io.Image.Input("image", tooltip="Reference image(s); each batch entry is one reference."),
                GlmReference.Input("reference", optional=True,
                                   tooltip="Earlier references (they come first, in order)."),
            ],
            outputs=[GlmReference.Output("reference_out", display_name="reference",
                                         tooltip="Reference conditioning for both GLM-Image stages.")],
        )

    @classmethod
    def execute(cls, ar, decoder, vae, image, reference=None) -> io.NodeOutput:
        if image is None or image.shape[0] == 0:
            raise ValueError("image batch is empty: give at least one reference image")
        image = to_rgb(image).float()
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values; a reference image must hold finite pixel "
                             "values (0..1)")
        if reference is not None:
            reference.check_compatible_ar(ar)
        items = list(reference.items) if reference is not None else []
        for b in range(image.shape[0]):
            mm.throw_exception_if_processing_interrupted()
            img = image[b:b + 1]
            h, w = int(img.shape[1]), int(img.shape[2])
            th, tw, note = image_proc.fit_reference_size(h, w, ar.processor_config)
            if (th, tw) != (h, w):
                img = image_proc.resize_image(img, th, tw)
                log.info("GLM-Image reference %d: %s", len(items) + 1, note)
            raw = vae.encode(img)
            latent = decoder.normalize(raw.float().cpu())
            # Every time: the VAE encode above may have made ComfyUI unload the AR on a small card.
            ids = tokenize_image(ar, img)
            items.append(ReferenceImage(image=img.cpu(), ar_ids=ids.cpu(), latent=latent, note=note))
        return io.NodeOutput(References(items=items, ar_name=ar.name, decoder_name=decoder.name))
