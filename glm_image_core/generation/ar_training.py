"""Teacher forcing for the AR: the exact sequence the sampler writes for a prompt and size, in one forward.

``generation.ar_generate.generate_tokens`` prefills the chat-templated prompt (``ar_prompt.build_prompt``)
and then feeds each sampled token back at its decode position (``ar_prompt.decode_positions``): the
preview grid, then the full grid. :func:`teacher_forced` lays out the same tokens with the same 3-axis
positions as one sequence, so one causal forward gives, at every step, the logits the sampler saw
before writing that token (``tests/core/test_ar_training.py`` checks this against the sampler's
own logits). The loss of an AR LoRA is the cross-entropy of an image's own tokens under those logits.

The end-of-image marker the official pipeline also asks for is not a target: the sampler never
writes it (it stops after the grid).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import ar_prompt


@dataclass
class TeacherForced:
    """One training example: ``input_ids`` [S] (the prompt, then every target but the last) at
    ``positions`` [3, S]; the logit at index ``first + k`` predicts ``targets[k]``."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    first: int

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())


def teacher_forced(tokenizer, prompt: str, width: int, height: int, preview: torch.Tensor, grid: torch.Tensor,
                   image_start_id: int, image_end_id: int) -> TeacherForced:
    """The sampler's sequence for ``prompt`` at ``width``×``height`` with ``preview`` [ph, pw] and
    ``grid`` [H/32, W/32] as the tokens it writes (text-to-image)."""
    layout = ar_prompt.build_prompt(tokenizer, prompt, width, height, image_start_id=image_start_id,
                                    image_end_id=image_end_id)
    want = [(layout.preview_h, layout.preview_w), (layout.token_h, layout.token_w)]
    got = [tuple(preview.shape), tuple(grid.shape)]
    if got != want:
        raise ValueError(f"token grids {got[0]} (preview) and {got[1]} do not fit {width}×{height}: the sampler "
                         f"writes a {want[0][0]}×{want[0][1]} preview, then a {want[1][0]}×{want[1][1]} grid")
    ids = layout.filled_ids()
    pre_pos, dec_pos = ar_prompt.layout_positions(layout, image_start_id, image_end_id)
    targets = torch.cat([preview.reshape(-1), grid.reshape(-1)]).to(torch.long).cpu()
    n = targets.numel()
    return TeacherForced(input_ids=torch.cat([ids, targets[:-1]]),
                         positions=torch.cat([pre_pos, dec_pos[:, :n - 1]], dim=1),
                         targets=targets, first=ids.numel() - 1)


def teacher_forced_logits(model, example: TeacherForced, device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Logits [n, V] (float32) that predict ``example.targets``, from one causal forward of ``model``
    (``networks.ar_model.GlmImageAR``, text part)."""
    device = device if device is not None else next(model.parameters()).device
    logits = model(example.input_ids.to(device)[None], example.positions.to(device), dtype=dtype)
    return logits[0, example.first:example.first + example.num_targets].float()


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(mean cross-entropy, top-1 accuracy) of ``targets`` [n] under ``logits`` [n, V]."""
    targets = targets.to(logits.device)
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.detach().argmax(-1) == targets).float().mean().item()
    return loss, accuracy


@contextlib.contextmanager
def checkpointed(layers) -> Iterator[None]:
    """Gradient checkpointing per layer while inside: each layer's activations are recomputed in the
    backward pass instead of kept (torch.utils.checkpoint), then the layers are restored."""
    originals = []
    for layer in layers:
        fwd = layer.forward
        originals.append((layer, "forward" in layer.__dict__, fwd))
        layer.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))(fwd)
    try:
        yield
    finally:
        for layer, had_own, fwd in originals:
            if had_own:
                layer.forward = fwd
            else:
                del layer.forward
