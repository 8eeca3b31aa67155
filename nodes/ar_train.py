"""GLM-Image Train AR LoRA: a LoRA for the AR, learnt from (image, caption) pairs in a graph.

Each image's own tokens are the targets: the vision tower + VQ codebook tokenise it at its grid (as
Image → Semantic Tokens does) and at the preview grid the sampler writes first (the image resized to
it); the loss is the teacher-forced cross-entropy of that sequence after the chat-templated caption
(``glm_image_core.generation.ar_training``: exactly the sampler's sequence and positions).

The adapters are ComfyUI's own (``comfy.weight_adapter``'s LoRA ``create_train``, what Train LoRA uses),
hung on a clone of the AR text part's patcher as weight wrappers; the pack writes no LoRA math. The
result is a LORA_MODEL in ComfyUI's format (``<module>.lora_up/lora_down.weight`` + ``alpha``): save it
with the stock Save LoRA, load it with Load GLM-Image AR LoRA. The vision tower stays frozen: the AR reads only its VQ ids (an
argmax), so no token loss reaches it.
"""

from __future__ import annotations

import contextlib
import logging

import torch

import comfy.model_management as mm
import comfy.utils
import comfy.weight_adapter

from ..glm_image_core.generation import ar_prompt, ar_training, image_proc
from .api import io
from .image_tokens import dataset_inputs, pair_captions, split_images
from .models import GLMARModel, LazyComponent
from .reference import tokenize_image
from .types import CATEGORY, GlmAR

log = logging.getLogger("GLM-Image")

# The AR text part's layers a LoRA trains by default: attention and MLP of every decoder layer (the
# names PEFT users target; lm_head and the embeddings stay frozen).
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_up_proj", "mlp.down_proj")
LORA_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LORA = comfy.weight_adapter.adapter_maps["LoRA"]      # ComfyUI's LoRA adapter (Train LoRA's default algorithm)


def preview_tokens(ar: GLMARModel, image: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """VQ ids [ph, pw] of ``image`` resized to the preview grid's size, tokenised as any image is."""
    small = image_proc.resize_image(image, ph * ar_prompt.GRID_FACTOR, pw * ar_prompt.GRID_FACTOR)
    ids = tokenize_image(ar, small)
    if tuple(ids.shape) != (ph, pw):
        raise ValueError(f"the image processor tokenises the {pw * ar_prompt.GRID_FACTOR}x{ph * ar_prompt.GRID_FACTOR} "
                         f"preview as a {ids.shape[1]}x{ids.shape[0]} grid, not the {pw}x{ph} the sampler writes: "
                         "its min_pixels/max_pixels exclude that size")
    return ids


def training_examples(ar: GLMARModel, images: list, captions: list, fit: str, node_id=None) -> list:
    """One teacher-forced example per (image, caption): its tokens at the preview and the full grid."""
    pbar = comfy.utils.ProgressBar(len(images), node_id=node_id)
    out = []
    for i, (pic, text) in enumerate(zip(images, captions)):
        mm.throw_exception_if_processing_interrupted()
        if not torch.isfinite(pic).all():
            raise ValueError(f"image {i + 1} contains NaN or infinite values; images must hold finite pixel "
                             "values (0..1)")
        try:
            crop, (h, w), _ = image_proc.fit_token_grid(int(pic.shape[1]), int(pic.shape[2]), ar.processor_config, fit)
        except ValueError as e:
            raise ValueError(f"image {i + 1}: {e}") from None
        pic = image_proc.fit_image(pic, crop, (h, w))
        grid = tokenize_image(ar, pic)
        ph, pw = ar_prompt.preview_grid(h // ar_prompt.GRID_FACTOR, w // ar_prompt.GRID_FACTOR)
        out.append(ar_training.teacher_forced(ar.tokenizer, text, w, h, preview_tokens(ar, pic, ph, pw), grid.cpu(),
                                              int(ar.config.get("image_start_token_id", 16384)),
                                              int(ar.config.get("image_end_token_id", 16385))))
        pbar.update(1)
    return out


def adapter_shape(layer, device) -> torch.Tensor:
    """What ComfyUI's ``create_train`` reads of a layer (shape and device): its logical weight shape, also
    for GGUF blocks (an expanded scalar on ``device``: no memory)."""
    shape = tuple(layer.ggml[1]) if getattr(layer, "ggml", None) is not None else tuple(layer.weight.shape)
    return torch.empty((), device=device).expand(shape)


def train_ar_lora(ar: GLMARModel, examples: list, steps: int, learning_rate: float, rank: int, alpha: float,
                  seed: int, gradient_checkpointing: bool, lora_dtype: torch.dtype, node_id=None):
    """(LoRA state dict in ComfyUI's format, loss per step): AdamW on ComfyUI LoRA adapters of the AR text
    part's attention and MLP layers, one example per step in a seeded shuffled order."""
    with torch.inference_mode(False), torch.enable_grad():
        # A copy of the text part built here, outside ComfyUI's inference mode: autograd cannot save the
        # inference tensors the graph's own AR holds (its norms' and lm_head's weights) for the backward.
        component: LazyComponent = ar.model.fresh()
        patcher = component.patcher
        network = patcher.glm_network
        device, dtype = component.load_device, patcher.glm_compute_dtype
        lora_sd, adapters = {}, []
        torch.manual_seed(seed)                       # ComfyUI's create_train draws its init from torch's RNG
        for name, layer in network.named_modules():
            if name.startswith("model.language_model.layers.") and name.endswith(TARGETS):
                adapter = LORA.create_train(adapter_shape(layer, device), rank=rank, alpha=alpha).to(torch.float32)
                adapter.train().requires_grad_(True)
                adapter.alpha.requires_grad_(False)
                patcher.add_weight_wrapper(f"{name}.weight", adapter)
                adapters.append(adapter)
                lora_sd.update({f"{name}.{p}": t for p, t in adapter.named_parameters()})
        if not adapters:
            raise ValueError("the AR has no decoder layer to train (its config has no text layers)")
        examples = [ar_training.TeacherForced(e.input_ids.clone(), e.positions.clone(), e.targets.clone(), e.first)
                    for e in examples]
        try:
            mm.load_models_gpu([patcher], memory_required=patcher.glm_scratch_bytes, force_full_load=True)
            params = [p for a in adapters for p in a.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=learning_rate)
            order_gen = torch.Generator().manual_seed(seed)
            losses, order = [], []
            pbar = comfy.utils.ProgressBar(steps, node_id=node_id)
            layers = network.language_model.layers
            with ar_training.checkpointed(layers) if gradient_checkpointing else contextlib.nullcontext():
                for step in range(steps):
                    mm.throw_exception_if_processing_interrupted()
                    if not order:
                        order = torch.randperm(len(examples), generator=order_gen).tolist()
                    ex = examples[order.pop()]
                    loss, accuracy = ar_training.token_loss(
                        ar_training.teacher_forced_logits(network, ex, device, dtype), ex.targets)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.item()))
                    pbar.update_absolute(step + 1, steps)
                    _progress_text(f"step {step + 1}/{steps}: loss {losses[-1]:.4f}, token accuracy {accuracy:.3f}",
                                   node_id)
        finally:
            unload(patcher)
        return {k: v.detach().to(lora_dtype).cpu() for k, v in lora_sd.items()}, losses


def unload(patcher) -> None:
    """Take the training copy out of ComfyUI's loaded models now (its weights and adapters with it)."""
    for i in reversed(range(len(mm.current_loaded_models))):
        if mm.current_loaded_models[i].model is patcher:
            mm.current_loaded_models.pop(i).model_unload()


def _progress_text(text: str, node_id) -> None:
    """The loss under the node's progress bar (ComfyUI's progress text), and in the log every tenth of it."""
    log.debug("GLM-Image Train AR LoRA: %s", text)
    try:
        from server import PromptServer
        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:          # no server (a script): the log has it
        pass


class GLMImageTrainARLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageTrainARLoRA",
            display_name="GLM-Image Train AR LoRA",
            category=CATEGORY,
            description="Trains a LoRA for GLM-Image's autoregressive model (what is drawn and where) from images "
                        "and captions: each image's own semantic tokens (preview grid, then full grid) are learnt "
                        "after its caption, with ComfyUI's own LoRA adapters. Save it with Save LoRA; apply it "
                        "with Load GLM-Image AR LoRA.",
            is_input_list=True,
            inputs=[
                GlmAR.Input("ar", tooltip="From Load GLM-Image or Load GLM-Image AR."),
                *dataset_inputs("The prompt each image is learnt after."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps, one image each."),
                io.Float.Input("learning_rate", default=0.0003, min=1e-7, max=1.0, step=0.00001),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha: the change is scaled by alpha / rank."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds the adapters' initialisation and the order of the images."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each decoder layer's activations in the backward pass: far less "
                                         "memory, about a third more time."),
                io.Combo.Input("lora_dtype", options=list(LORA_DTYPES), default="bf16",
                               tooltip="dtype the trained LoRA is saved in (it trains in fp32)."),
            ],
            outputs=[io.Custom("LORA_MODEL").Output("lora", display_name="lora",
                                                    tooltip="Into Save LoRA, or Load GLM-Image AR LoRA after saving."),
                     io.Custom("LOSS_MAP").Output("loss_map", display_name="loss_map",
                                                  tooltip="The loss per step, for Plot Loss Graph.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, ar, image, caption=None, fit=None, steps=None, learning_rate=None, rank=None, alpha=None,
                seed=None, gradient_checkpointing=None, lora_dtype=None) -> io.NodeOutput:
        first = lambda v, d: (v or [d])[0]   # noqa: E731  (is_input_list: every input is a list)
        ar = ar[0]
        pictures = split_images(image)
        if not pictures:
            raise ValueError("no images: give at least one training image (the batch or dataset list is empty)")
        captions = pair_captions(caption, len(pictures))
        node_id = cls.hidden.unique_id
        examples = training_examples(ar, pictures, captions, first(fit, "crop"), node_id)
        lora, losses = train_ar_lora(ar, examples, int(first(steps, 200)), float(first(learning_rate, 3e-4)),
                                     int(first(rank, 8)), float(first(alpha, 8.0)), int(first(seed, 0)),
                                     bool(first(gradient_checkpointing, True)),
                                     LORA_DTYPES[first(lora_dtype, "bf16")], node_id)
        log.info("GLM-Image Train AR LoRA: %d steps on %d image(s), loss %.4f -> %.4f", len(losses), len(examples),
                 losses[0], losses[-1])
        return io.NodeOutput(lora, {"loss": losses})


NODES = [GLMImageTrainARLoRA]
