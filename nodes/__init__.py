"""The pack's V3 extension: one ComfyExtension listing every GLM-Image node."""
from typing_extensions import override

from .api import ComfyExtension, io

from . import attention, models, stock_model
from .ar import GLMImageTextToTokens
from .ar_lora import GLMImageARLoraLoader, GLMImageARLoraModelLoader
from .ar_train import GLMImageTrainARLoRA
from .decoder import GLMImageTokensToLatent
from .glyph import GLMImageGlyphText
from .image_tokens import GLMImageImageToTokens
from .loader import GLMImageLoader
from .reference import GLMImageReferenceEdit
from .sampling import GLMImageConditioning, GLMImageScheduler
from .single_file import NODES as SINGLE_FILE_NODES
from .tokens_io import GLMImageLoadTokens, GLMImageSaveTokens

NODES = [GLMImageLoader, GLMImageARLoraLoader, GLMImageARLoraModelLoader, GLMImageTextToTokens, GLMImageImageToTokens, GLMImageGlyphText, GLMImageReferenceEdit,
         GLMImageTokensToLatent, GLMImageConditioning, GLMImageScheduler, GLMImageSaveTokens,
         GLMImageLoadTokens, GLMImageTrainARLoRA] + SINGLE_FILE_NODES


attention.install()   # the user's attention flag applies to GLM's networks too
stock_model.install_lora_keys()   # diffusers/PEFT LoRA names for the DiT's MODEL
models.install_gguf_training()   # ComfyUI's Train LoRA on GGUF weights (QLoRA)


class GLMImageExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> GLMImageExtension:
    return GLMImageExtension()
