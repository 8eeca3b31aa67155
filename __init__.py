"""ComfyUI-GLM-Image: GLM-Image (zai-org) natively in ComfyUI.

ComfyUI loads this package through its V3 entrypoint (`comfy_entrypoint`). The imports of the
node modules are guarded the way ComfyUI-GGUF does it, so `glm_image_core` (plain PyTorch) and
this package can be imported by tools and tests outside ComfyUI.
"""

WEB_DIRECTORY = "./js"

try:
    import comfy.utils  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:  # outside ComfyUI: nothing to register
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
