"""Semantic token grids (the AR's output) and their file format.

A token file is a safetensors file (ids only: ``grid`` [B, H/32, W/32] int64 and, when the AR
wrote one, ``preview`` [B, ph, pw] int64) whose safetensors metadata holds one JSON string
under ``glm_image_tokens``: ``{"format_version": 1, "width", "height", "prompt", "seed",
"sampling": {...}, "codebook_size", "source"}``. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
METADATA_KEY = "glm_image_tokens"
TOKEN_FILE_SUFFIX = ".glmtokens.safetensors"


class TokenFileError(ValueError):
    """A token file is unreadable, of another format version, or inconsistent."""


@dataclass
class GLMTokens:
    """What flows through a ``GLM_TOKENS`` socket."""
    grid: torch.Tensor                        # [B, H/32, W/32] int64, codebook ids
    width: int                                # target image size in pixels
    height: int
    prompt: str = ""
    seed: int = 0
    sampling: dict = field(default_factory=dict)   # temperature, top_p, top_k, ...
    preview: Optional[torch.Tensor] = None    # [B, ph, pw] int64 (text-to-image only)
    codebook_size: int = 16384                # ids must be < this (the checkpoint's VQ codebook)
    source: str = ""                          # checkpoint the tokens came from (informational)
    num_references: int = 0                   # edits: how many reference images conditioned the AR

    @property
    def batch_size(self) -> int:
        return int(self.grid.shape[0])

    def validate(self) -> "GLMTokens":
        g = self.grid
        if g.dim() != 3 or g.dtype != torch.int64:
            raise TokenFileError(f"token grid must be int64 [B, H/32, W/32], got {g.dtype} {tuple(g.shape)}")
        if self.width % 32 or self.height % 32 or not (32 <= self.width <= 4096 and 32 <= self.height <= 4096):
            raise TokenFileError(f"token size {self.width}x{self.height} is not a multiple of 32 in 32..4096")
        if tuple(g.shape[1:]) != (self.height // 32, self.width // 32):
            raise TokenFileError(f"token grid {tuple(g.shape[1:])} does not match {self.width}x{self.height} "
                                 f"(expected {(self.height // 32, self.width // 32)})")
        for name, t in (("grid", g), ("preview", self.preview)):
            if t is None:
                continue
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.codebook_size):
                raise TokenFileError(f"token {name} has ids outside the codebook [0, {self.codebook_size}): "
                                     f"min {int(t.min())}, max {int(t.max())}")
        if self.preview is not None and (self.preview.dim() != 3 or self.preview.dtype != torch.int64
                                         or self.preview.shape[0] != g.shape[0]):
            raise TokenFileError(f"preview grid must be int64 [B, ph, pw] with B={g.shape[0]}, "
                                 f"got {self.preview.dtype} {tuple(self.preview.shape)}")
        return self

    def metadata(self) -> dict:
        return {"format_version": FORMAT_VERSION, "width": self.width, "height": self.height,
                "prompt": self.prompt, "seed": self.seed, "sampling": self.sampling,
                "codebook_size": self.codebook_size, "source": self.source,
                "num_references": self.num_references}


def save_tokens(tokens: GLMTokens, path: str) -> str:
    tokens.validate()
    tensors = {"grid": tokens.grid.detach().cpu().contiguous()}
    if tokens.preview is not None:
        tensors["preview"] = tokens.preview.detach().cpu().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(tokens.metadata(), ensure_ascii=False)})
    return path


def load_tokens(path: str) -> GLMTokens:
    """Read and validate a token file (version, shapes, id range)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta_raw = (f.metadata() or {}).get(METADATA_KEY)
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise TokenFileError(f"cannot read token file {os.path.basename(path)}: {e} "
                             "(truncated or not a GLM-Image token file?)") from None
    if meta_raw is None:
        raise TokenFileError(f"{os.path.basename(path)} has no '{METADATA_KEY}' metadata: not a GLM-Image token file")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        raise TokenFileError(f"{os.path.basename(path)}: token metadata is not valid JSON") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise TokenFileError(f"{os.path.basename(path)} has token format_version {version!r}; "
                             f"this pack reads version {FORMAT_VERSION}")
    if "grid" not in keys:
        raise TokenFileError(f"{os.path.basename(path)} has no 'grid' tensor")
    try:
        tok = GLMTokens(grid=tensors["grid"], width=int(meta["width"]), height=int(meta["height"]),
                        prompt=str(meta.get("prompt", "")), seed=int(meta.get("seed", 0)),
                        sampling=dict(meta.get("sampling", {})), preview=tensors.get("preview"),
                        codebook_size=int(meta.get("codebook_size", 16384)), source=str(meta.get("source", "")),
                        num_references=int(meta.get("num_references", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise TokenFileError(f"{os.path.basename(path)}: bad token metadata ({e})") from None
    return tok.validate()


def upsample_grid(grid: torch.Tensor) -> torch.Tensor:
    """[B, h, w] d32 ids -> [B, 4*h*w] DiT prior ids (nearest ×2, row-major), as the pipeline does."""
    up = torch.nn.functional.interpolate(grid[:, None].float(), scale_factor=2, mode="nearest")
    return up.to(torch.int64).flatten(1)
