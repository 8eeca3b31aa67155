"""Layers that keep GGUF block-quantized weights in memory and dequantize them where they are used.

A GGUF single file stores the DiT's and AR's block matrices (and the AR's token embedding table) as
ggml blocks (``gguf_quant``). Loaded through :func:`quantized_ops`, such a weight stays a plain
``uint8 [rows, row_bytes]`` parameter of its layer — what any host moves between devices, counts and
pages like any other tensor — and the layer remembers the quant type and the logical shape
(``layer.ggml``). A Linear dequantizes its blocks in each forward, on the input's device and in the
input's dtype, multiplies and drops the float copy: one layer's weight at a time, never the whole
model. An Embedding gathers the block rows of the ids first and dequantizes only those rows
(:func:`embedding_rows`): ggml blocks never cross a row, so a row of blocks is a row of weights.

``quantized_ops(base)`` derives the namespace from any ``operations`` namespace (torch.nn, this
package's no-init ops, or ComfyUI's ``comfy.ops`` classes, which the nodes subclass further so that
ComfyUI's own cast/offload path moves the blocks): Linear and Embedding change, and the namespace
gains ``quantized_weight``, the factory ``loading.build.build_loaded`` hands each block-quantized tensor to.
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


class QuantizedWeightMixin:
    """Put before a Linear or Embedding class: accepts a :class:`QuantizedWeight` for ``weight`` at
    load time and keeps its blocks as the (uint8) weight."""
    ggml: Optional[Tuple[gguf_quant.QuantType, Tuple[int, ...]]] = None

    def _declared_weight_shape(self) -> Tuple[int, ...]:
        if hasattr(self, "num_embeddings"):
            return (self.num_embeddings, self.embedding_dim)
        return (self.out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, QuantizedWeight):
            if tuple(w.shape) != self._declared_weight_shape():
                error_msgs.append(f"{key}: quantized weight of shape {tuple(w.shape)}, the layer is "
                                  f"{self._declared_weight_shape()}")
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


def embedding_rows(layer: nn.Module, ids: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The rows of ``ids`` of an embedding table, looked up where the table lives, then moved to
    ``device`` (default: the table's) in ``dtype``; only those rows are dequantized when the table holds
    blocks, and a float table is never cast whole."""
    w = layer.weight
    rows = F.embedding(ids.to(w.device), w)
    ggml = getattr(layer, "ggml", None)
    if ggml is not None:
        qt, (_, dim) = ggml
        rows = gguf_quant.dequantize(rows, qt, (*ids.shape, dim), dtype)
    return rows.to(device=device if device is not None else rows.device, dtype=dtype)


def _plain_quantized(base_linear: type, base_embedding: type) -> Tuple[type, type]:
    class QuantizedLinear(QuantizedWeightMixin, base_linear):
        def forward(self, x):
            if self.ggml is None:
                return super().forward(x)
            bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            return F.linear(x, self.dequantized(self.weight.to(x.device), x.dtype), bias)

    class QuantizedEmbedding(QuantizedWeightMixin, base_embedding):
        def forward(self, ids):
            if self.ggml is None:
                return super().forward(ids)
            return embedding_rows(self, ids, torch.float32)
    QuantizedLinear.__name__ = f"Quantized{base_linear.__name__}"
    QuantizedEmbedding.__name__ = f"Quantized{base_embedding.__name__}"
    return QuantizedLinear, QuantizedEmbedding


def quantized_ops(base, linear: Optional[type] = None, embedding: Optional[type] = None):
    """``base`` (an operations namespace) with a Linear and an Embedding that take GGUF blocks, and
    the ``quantized_weight`` factory. ``linear`` / ``embedding``: the classes to use instead of the
    plain ones (derived from :class:`QuantizedWeightMixin`; ComfyUI's, from the nodes)."""
    if base is nn:
        from ..loading.build import no_init_ops
        base = no_init_ops
    plain_linear, plain_embedding = _plain_quantized(base.Linear, base.Embedding)
    linear, embedding = linear or plain_linear, embedding or plain_embedding
    for cls in (linear, embedding):
        if not issubclass(cls, QuantizedWeightMixin):
            raise TypeError(f"{cls.__name__} does not take quantized weights")
    return type(f"gguf_{base.__name__}", (base,), {"Linear": linear, "Embedding": embedding,
                                                   "quantized_weight": staticmethod(QuantizedWeight)})


def quantized_layers(model: nn.Module):
    """(name, layer) of every layer holding GGUF blocks (by the attribute, not the class: the nodes
    import this package under the pack's name, tests under its own)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "ggml", None) is not None]


def dequant_scratch_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Memory a forward needs beyond the weights for dequantizing its widest quantized Linear (an
    embedding dequantizes only the rows it looks up): ggml's formulas run in float32 (the result and
    about one intermediate of the layer's size) before the cast to ``dtype``. 0 without quantized
    Linear layers."""
    n = max((math.prod(m.ggml[1]) for _, m in quantized_layers(model) if not hasattr(m, "num_embeddings")),
            default=0)
    return n * (2 * 4 + torch.empty(0, dtype=dtype).element_size())
