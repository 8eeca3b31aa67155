"""One way to build a network and put its weights in: meta build → read tensors → cast → assign.

Every GLM-Image network (AR, DiT, glyph encoder, VAE) is loaded by :func:`build_loaded`, so loading
behaves the same whatever ``operations`` namespace builds the layers:

* the file's keys and shapes are checked against what the network *declares* (its state dict when
  built from its config with plain torch layers on the meta device), never against the instance
  being loaded: ComfyUI's ``comfy.ops`` layers under dynamic VRAM (ComfyUI >= 0.16) are created with
  ``weight = bias = None`` (Linear) or meta weights (Embedding) and only get weights through
  ``_load_from_state_dict``, so their own ``state_dict()`` lacks them;
* the weights go in through ``load_state_dict(..., assign=True)``, the path ComfyUI's ops implement
  for lazy layers (and what its core loaders do for dynamic patchers), so no second copy is made;
* afterwards every declared key must hold a real (non-meta) tensor of its declared shape.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import checkpoint as ckpt


# Operations without random init (what ComfyUI's ``disable_weight_init`` does): building a
# multi-billion-parameter model with torch's default init would take minutes.
def _without_init(layer: type) -> type:
    return type(f"NoInit{layer.__name__}", (layer,), {"reset_parameters": lambda self: None})


class no_init_ops:
    """``operations`` namespace like torch.nn but leaving parameters uninitialised (weights are
    loaded right after construction)."""
    Linear = _without_init(nn.Linear)
    Embedding = _without_init(nn.Embedding)
    LayerNorm = _without_init(nn.LayerNorm)
    Conv2d = _without_init(nn.Conv2d)
    GroupNorm = _without_init(nn.GroupNorm)


def loading_ops(operations):
    """``operations`` to build a network that is about to be loaded: torch.nn without its init."""
    return no_init_ops if operations is nn else operations


Shapes = Dict[str, Tuple[int, ...]]


def declared_shapes(make: Callable[[object], nn.Module]) -> Shapes:
    """{key: shape} the network declares: ``make(no_init_ops)`` (a build on the meta device with plain
    torch layers) and its state dict. Independent of how any host allocates its layers."""
    with torch.device("meta"):
        ref = make(no_init_ops)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def build_loaded(make: Callable[[object], nn.Module], operations, files: Sequence[str], what: str,
                 storage: ckpt.StorageDtype = None, device="cpu", keep: Optional[Callable[[str], bool]] = None,
                 aliases: Optional[Dict[str, str]] = None, ignore_unexpected: Iterable[str] = ()) -> nn.Module:
    """Build a network and load its weights from safetensors ``files`` (a folder's shards or one file)
    or one GGUF single file: its block-quantized tensors go through ``operations.quantized_weight``
    (``checkpoint.QuantizedFactory``) when the namespace has one, else they are dequantized at load.

    ``make(operations) -> nn.Module`` builds it on the meta device (it passes ``device="meta"``);
    ``storage``: how each floating tensor is stored (``checkpoint.storage_dtypes``); ``device``: where
    the weights go; ``keep``: the keys to read (others are never read from disk); ``aliases``:
    {file key: network key} used when the network key itself is absent (e.g. a tied embedding);
    ``ignore_unexpected``: key prefixes of the official files unused at inference. Tensors kept in the
    file's dtype on the CPU stay in the file's pages (see ``checkpoint.iter_safetensors``).

    Streams: the keys and shapes are checked from the files' headers before any weight is read,
    then each tensor is read, cast, placed and assigned to its layer before the next is read, so
    the peak is the loaded network plus one tensor. Raises :class:`checkpoint.CheckpointError`
    naming missing, unexpected and mis-shaped keys.
    """
    declared = declared_shapes(make)
    found: Dict[str, Tuple[int, ...]] = {}
    for path in files:
        for k, (_, shape) in ckpt.weights_header(path)[1].items():
            if keep is None or keep(k):
                found[k] = shape
    rename = {a: b for a, b in (aliases or {}).items() if a in found and b not in found}
    found = {rename.get(k, k): v for k, v in found.items()}
    ckpt.check_state_dict_keys(declared, found, what, ignore_unexpected)

    model = make(loading_ops(operations))
    owner = {k: k.rpartition(".") for k in declared}          # key -> (module path, ".", param name)
    pending: Dict[str, Dict[str, torch.Tensor]] = {}          # module path -> its tensors read so far
    need: Dict[str, int] = {}
    for k, (mod, _, _) in owner.items():
        need[mod] = need.get(mod, 0) + 1
    wanted = lambda k: rename.get(k, k) in declared and (keep is None or keep(k))   # noqa: E731
    quantized = getattr(operations, "quantized_weight", None)
    for k, t in ckpt.iter_weights(files, device=device, dtype=storage, keep=wanted, quantized=quantized):
        k = rename.get(k, k)
        mod, _, name = owner[k]
        group = pending.setdefault(mod, {})
        group[name] = t
        del t
        if len(group) == need[mod]:        # a layer's tensors are all there: hand them over
            module = model.get_submodule(mod) if mod else model
            module.load_state_dict(pending.pop(mod), strict=False, assign=True)
    _check_loaded(model, declared, what)
    return model.train(False).requires_grad_(False)


def _check_loaded(model: nn.Module, declared: Shapes, what: str) -> None:
    """Every declared key holds a real tensor of its declared shape (a layer that ignored
    ``assign`` or lost a weight would otherwise fail much later, or compute on zeros)."""
    got = model.state_dict()

    def shape_of(k: str) -> Tuple[int, ...]:         # a GGUF-quantized weight: its logical shape
        mod, _, name = k.rpartition(".")
        layer = model.get_submodule(mod) if mod else model
        quantized = name == "weight" and getattr(layer, "ggml", None) is not None
        return tuple(layer.ggml[1]) if quantized else tuple(got[k].shape)
    bad = [k for k, shape in declared.items()
           if k not in got or got[k] is None or got[k].is_meta or shape_of(k) != shape]
    if bad:
        raise ckpt.CheckpointError(f"loading the {what} left {len(bad)} weight(s) unset: "
                                   f"{', '.join(bad[:8])}{' …' if len(bad) > 8 else ''}")
