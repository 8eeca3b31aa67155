"""Teacher forcing (glm_image_core.generation.ar_training) is the sampler's own sequence: one causal
forward over the prompt and the written tokens gives, at every step, the logits the sampler saw."""
import os

import pytest
import torch

from glm_image_core.generation import ar_generate, ar_prompt, ar_training
from glm_image_core.loading.registry import NETWORKS


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"), parts=("text",))


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return ar_prompt.GlmTokenizer.from_folder(os.path.join(tiny_ckpt, "processor"))


def example(model, tokenizer, out, w, h, prompt):
    return ar_training.teacher_forced(tokenizer, prompt, w, h, out.preview[0], out.grid[0],
                                      model.image_start_token_id, model.image_end_token_id)


@pytest.mark.parametrize("w,h", [(256, 256), (384, 256)])
def test_teacher_forced_logits_are_the_samplers(model, tokenizer, w, h):
    out = ar_generate.generate_tokens(model, tokenizer, "a cat on a mat", w, h, seed=3, return_logits=True)
    ex = example(model, tokenizer, out, w, h, "a cat on a mat")
    assert ex.num_targets == out.num_generated and ex.first == out.num_prompt_tokens - 1
    with torch.no_grad():
        tf = ar_training.teacher_forced_logits(model, ex)
    assert tf.shape == out.logits[0].shape
    # equal to float rounding (one-row decode products vs the whole sequence's; |logit| ~ 5)
    assert (tf - out.logits[0]).abs().max() < 1e-4, (tf - out.logits[0]).abs().max()
    loss, acc = ar_training.token_loss(tf, ex.targets)
    assert torch.isfinite(loss) and 0 <= acc <= 1


def test_a_shifted_target_is_not_the_samplers(model, tokenizer):
    """The check above can fail: the same tokens one position off give other logits."""
    out = ar_generate.generate_tokens(model, tokenizer, "a cat", 256, 256, seed=3, return_logits=True)
    ex = example(model, tokenizer, out, 256, 256, "a cat")
    ex.positions = torch.cat([ex.positions[:, :1], ex.positions[:, :-1]], dim=1)
    with torch.no_grad():
        tf = ar_training.teacher_forced_logits(model, ex)
    assert (tf - out.logits[0]).abs().max() > 1e-2


def test_grids_of_another_size_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="preview.*do not fit 256×256"):
        ar_training.teacher_forced(tokenizer, "x", 256, 256, torch.zeros(2, 2, dtype=torch.long),
                                   torch.zeros(8, 8, dtype=torch.long), 16384, 16385)


def test_checkpointing_keeps_the_gradients(model, tokenizer):
    out = ar_generate.generate_tokens(model, tokenizer, "a dog", 256, 256, seed=1)
    ex = example(model, tokenizer, out, 256, 256, "a dog")
    layer = model.language_model.layers[0].self_attn.q_proj
    grads = []
    for ckpt in (False, True):
        layer.weight.requires_grad_(True)
        ctx = ar_training.checkpointed(model.language_model.layers) if ckpt else torch.enable_grad()
        with ctx:
            loss, _ = ar_training.token_loss(ar_training.teacher_forced_logits(model, ex), ex.targets)
            loss.backward()
        grads.append(layer.weight.grad.clone())
        layer.weight.grad = None
        layer.weight.requires_grad_(False)
    assert "forward" not in model.language_model.layers[0].__dict__          # restored
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6) and grads[0].abs().sum() > 0
