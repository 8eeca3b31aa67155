"""Linear layers that keep GGUF block-quantized weights in memory and dequantize them per forward.

A GGUF single file stores the DiT's and AR's block matrices as ggml blocks (``gguf_quant``). Loaded
through :func:`quantized_ops`, such a weight stays a plain ``uint8 [out_features, row_bytes]``
parameter of its Linear — what any host moves between devices, counts and pages like any other
tensor — and the layer remembers the quant type and the logical shape (``layer.ggml``). Each forward
dequantizes the blocks on the input's device into the input's dtype, multiplies, and drops the
float copy: one layer's weight at a time, never the whole model.

``quantized_ops(base)`` derives the namespace from any ``operations`` namespace (torch.nn, this
package's no-init ops, or ComfyUI's ``comfy.ops`` classes, which the nodes subclass further so that
ComfyUI's own cast/offload path moves the blocks): only ``Linear`` changes, and the namespace gains
``quantized_weight``, the factory ``loading.build_loaded`` hands each block-quantized tensor to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gguf_quant


@dataclass(frozen=True)
class QuantizedWeight:
    """One block-quantized weight on its way from the file to its layer (not a tensor: only a
    layer that knows ggml blocks may take it, anything else fails loudly)."""
    raw: torch.Tensor                  # uint8 [rows, row_bytes], the file's bytes
    qt: gguf_quant.QuantType
    shape: Tuple[int, ...]             # the logical (float) shape

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


class QuantizedLinearMixin:
    """Put before a Linear class: accepts a :class:`QuantizedWeight` for ``weight`` at load time."""
    ggml: Optional[Tuple[gguf_quant.QuantType, Tuple[int, ...]]] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, QuantizedWeight):
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{key}: quantized weight of shape {tuple(w.shape)}, the layer is "
                                  f"{(self.out_features, self.in_features)}")
                return
            self.ggml = (w.qt, tuple(w.shape))
            self.weight = nn.Parameter(w.raw, requires_grad=False)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if key in missing_keys:
                missing_keys.remove(key)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def dequantized(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This layer's blocks (``raw``, on any device) as a float weight in ``dtype``."""
        qt, shape = self.ggml
        return gguf_quant.dequantize(raw, qt, shape, dtype)

    @property
    def logical_weight_shape(self) -> Tuple[int, ...]:
        return self.ggml[1] if self.ggml is not None else tuple(self.weight.shape)


def _plain_quantized_linear(base_linear: type) -> type:
    class QuantizedLinear(QuantizedLinearMixin, base_linear):
        def forward(self, x):
            if self.ggml is None:
                return super().forward(x)
            bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            return F.linear(x, self.dequantized(self.weight.to(x.device), x.dtype), bias)
    QuantizedLinear.__name__ = f"Quantized{base_linear.__name__}"
    return QuantizedLinear


def quantized_ops(base, linear: Optional[type] = None):
    """``base`` (an operations namespace) with a Linear that takes GGUF blocks and the
    ``quantized_weight`` factory. ``linear``: the Linear class to use instead of the plain one
    (must derive from :class:`QuantizedLinearMixin`; ComfyUI's, from the nodes)."""
    if base is nn:
        from .loading import no_init_ops
        base = no_init_ops
    if linear is None:
        linear = _plain_quantized_linear(base.Linear)
    elif not issubclass(linear, QuantizedLinearMixin):
        raise TypeError(f"{linear.__name__} does not take quantized weights")
    return type(f"gguf_{base.__name__}", (base,), {"Linear": linear, "quantized_weight": staticmethod(QuantizedWeight)})


def quantized_layers(model: nn.Module):
    """(name, layer) of every Linear holding GGUF blocks (by the attribute, not the class: the nodes
    import this package under the pack's name, tests under its own)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "ggml", None) is not None]


def dequant_scratch_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Memory a forward needs beyond the weights for dequantizing its widest quantized layer: ggml's
    formulas run in float32 (the result and about one intermediate of the layer's size) before the
    cast to ``dtype``. 0 for a network without quantized layers."""
    n = max((math.prod(m.ggml[1]) for _, m in quantized_layers(model)), default=0)
    return n * (2 * 4 + torch.empty(0, dtype=dtype).element_size())
