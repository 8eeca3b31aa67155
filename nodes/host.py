"""What differs between the ComfyUI versions the pack supports (0.3.75 … 0.33), in one place.

- ComfyUI >= 0.16 has "dynamic VRAM": ``comfy.model_patcher.CoreModelPatcher`` is the patcher core
  uses for its own models (``ModelPatcherDynamic`` when dynamic VRAM is on, else ``ModelPatcher``;
  ``main.py`` swaps it in after import, so it is read at call time), and
  ``comfy.model_management.archive_model_dtypes`` records each weight's dtype, which the dynamic
  loader casts to when it moves weights. Older hosts have neither.
"""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.model_patcher


def core_model_patcher() -> type:
    """The ModelPatcher class ComfyUI uses for its own models right now."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def new_patcher(model: torch.nn.Module, load_device: torch.device, offload_device: torch.device,
                disable_dynamic: bool = False, patcher_class=None):
    """Wrap a loaded network as ComfyUI wraps its own: record the dtype every weight is stored in
    (the dynamic loader casts to it; construction-time dtypes differ under mixed fp8 storage), then
    the host's core patcher class (the plain ModelPatcher when ``disable_dynamic``, as core's loaders),
    derived by ``patcher_class(cls)`` when given."""
    archive = getattr(mm, "archive_model_dtypes", None)
    if archive is not None:
        archive(model)
    cls = comfy.model_patcher.ModelPatcher if disable_dynamic else core_model_patcher()
    patcher = cls(model, load_device=load_device, offload_device=offload_device)
    if patcher_class is not None:
        # derived from the class actually made: ModelPatcherDynamic makes a plain ModelPatcher on a CPU
        patcher.__class__ = patcher_class(type(patcher))
    return patcher


def main_devices() -> tuple:
    """(load device, offload device) of every GLM-Image network: ComfyUI's main torch device in
    every VRAM mode (--lowvram/--novram stream layers to it through comfy.ops instead of running a
    10B AR on the CPU in fp32), offloaded where diffusion models are."""
    return mm.get_torch_device(), mm.unet_offload_device()
