"""What every network shares: the compute dtype that goes with a storage dtype."""

from __future__ import annotations

import torch


def default_compute_dtype(storage_dtype) -> torch.dtype:
    """Activations dtype for a given weight storage dtype: the same for fp32/fp16/bf16 (and fp64),
    float32 otherwise (e.g. fp8 storage cast per forward by ComfyUI's ops). Override with the
    model's ``compute_dtype`` attribute."""
    if storage_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return storage_dtype
    return torch.float32
