"""GLM-Image AR prompt: tokenizer, prompt layout, token grids and 3-axis MRoPE positions.

Plain Python + ``tokenizers`` + torch; mirrors transformers' ``GlmImageProcessor`` (prompt layout,
``_get_target_shape``) and ``GlmImageModel.get_rope_index`` (prefill and decode positions) without
importing transformers.

Prompt layout (architecture doc §4.2):

* text-to-image: ``{prompt}<sop>{H/32} {W/32}<eop><sop>{ph} {pw}<eop><|dit_token_16384|>``; grids
  ``[(H/32, W/32), (ph, pw)]``; the AR writes the small preview grid first, then the full grid.
* edit: for every reference ``<|dit_token_16384|>`` + ``gh*gw`` × ``<|image|>`` + ``<|dit_token_16385|>``,
  then ``{prompt}<sop>{H/32} {W/32}<eop><|dit_token_16384|>``; grids ``[ref grids…, (H/32, W/32)]``.
  The ``<|image|>`` placeholders are replaced by the reference's VQ ids before the forward pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..loading.checkpoint import CheckpointError, read_json

GRID_FACTOR = 32            # pixels per AR token (processor ``_get_target_shape``)

# Defaults of the official tokenizer_config.json (used when a key is missing).
DEFAULT_SPECIAL = {
    "bos_token": "<|dit_token_16384|>",
    "eos_token": "<|dit_token_16385|>",
    "image_token": "<|image|>",
    "grid_bos_token": "<sop>",
    "grid_eos_token": "<eop>",
}


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------

def target_grid(width: int, height: int) -> Tuple[int, int]:
    """(rows, cols) of the AR token grid for an image of ``width``×``height`` pixels: (H//32, W//32).

    Like the processor, each side is floored to a multiple of 32 first.
    """
    if width < GRID_FACTOR or height < GRID_FACTOR:
        raise ValueError(f"image size {width}x{height} is too small: both sides must be at least {GRID_FACTOR} px")
    return (height // GRID_FACTOR), (width // GRID_FACTOR)


def preview_grid(token_h: int, token_w: int) -> Tuple[int, int]:
    """The small t2i preview grid the AR writes first: ``(int(sqrt(r)*16), int(sqrt(1/r)*16))``, r = h/w."""
    ratio = token_h / token_w
    half = GRID_FACTOR // 2
    return int(math.sqrt(ratio) * half), int(math.sqrt(1 / ratio) * half)


def max_new_tokens(width: int, height: int, edit: bool = False) -> int:
    """Tokens the official pipeline asks ``generate`` for: full grid (+ preview grid for t2i) + 1 (EOS)."""
    th, tw = target_grid(width, height)
    if edit:
        return th * tw + 1
    ph, pw = preview_grid(th, tw)
    return th * tw + ph * pw + 1


# --------------------------------------------------------------------------------------
# Processor folder
# --------------------------------------------------------------------------------------

def read_processor_config(processor_dir: str) -> dict:
    """Image-processor settings from ``processor/processor_config.json`` ("image_processor" key, newer
    transformers) or ``processor/preprocessor_config.json`` (older), normalised to::

        patch_size, merge_size, temporal_patch_size, min_pixels, max_pixels, image_mean, image_std,
        rescale_factor, resample, do_resize, do_rescale, do_normalize, do_convert_rgb

    ``min_pixels``/``max_pixels`` come from ``min_pixels``/``max_pixels`` when present, else from
    ``size.shortest_edge``/``size.longest_edge`` (the processor stores pixel counts there).
    Missing values fall back to the transformers class defaults (CLIP mean/std, bicubic, 1/255).
    """
    p1 = os.path.join(processor_dir, "processor_config.json")
    p2 = os.path.join(processor_dir, "preprocessor_config.json")
    return processor_config_from(read_json(p1) if os.path.isfile(p1) else None,
                                 read_json(p2) if os.path.isfile(p2) else None, processor_dir)


def processor_config_from(processor_config: Optional[dict], preprocessor_config: Optional[dict],
                          where: str) -> dict:
    """:func:`read_processor_config` from the parsed files (None where absent); ``where`` names
    their source in errors (a folder or a single-file checkpoint)."""
    raw = None
    if processor_config is not None:
        d = processor_config
        raw = d.get("image_processor") if isinstance(d.get("image_processor"), dict) else None
        if raw is None and ("patch_size" in d or "size" in d):
            raw = d
    if raw is None and preprocessor_config is not None:
        raw = preprocessor_config
    if raw is None:
        raise CheckpointError(f"no image-processor settings in {where} (looked for processor_config.json "
                              "with an 'image_processor' entry and preprocessor_config.json)")
    size = dict(raw.get("size") or {})
    min_pixels = raw.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    max_pixels = raw.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    if min_pixels is None or max_pixels is None:
        raise CheckpointError(f"image-processor settings in {where} give no pixel range "
                              "(size.shortest_edge/longest_edge or min_pixels/max_pixels)")
    cfg = {
        "patch_size": int(raw.get("patch_size", 14)),
        "merge_size": int(raw.get("merge_size", 2)),
        "temporal_patch_size": int(raw.get("temporal_patch_size", 2)),
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "image_mean": [float(x) for x in raw.get("image_mean", [0.48145466, 0.4578275, 0.40821073])],
        "image_std": [float(x) for x in raw.get("image_std", [0.26862954, 0.26130258, 0.27577711])],
        "rescale_factor": float(raw.get("rescale_factor", 1 / 255)),
        "resample": int(raw.get("resample", 3)),
        "do_resize": bool(raw.get("do_resize", True)),
        "do_rescale": bool(raw.get("do_rescale", True)),
        "do_normalize": bool(raw.get("do_normalize", True)),
        "do_convert_rgb": bool(raw.get("do_convert_rgb", True)),
    }
    if cfg["merge_size"] != 1 or cfg["temporal_patch_size"] != 1:
        raise CheckpointError(f"image processor in {where} has merge_size={cfg['merge_size']}, "
                              f"temporal_patch_size={cfg['temporal_patch_size']}; GLM-Image needs 1 and 1")
    return cfg


class GlmTokenizer:
    """The AR's text tokenizer (``processor/tokenizer.json``) through the ``tokenizers`` library.

    ``encode`` behaves like transformers' ``TokenizersBackend`` (the post-processor runs when
    ``add_special_tokens`` is true); special-token strings come from ``tokenizer_config.json``.
    """

    def __init__(self, tokenizer, special: dict):
        self._tok = tokenizer
        self.special = dict(special)
        self.bos_token = self.special["bos_token"]
        self.image_token = self.special["image_token"]
        self.grid_bos_token = self.special["grid_bos_token"]
        self.grid_eos_token = self.special["grid_eos_token"]
        self.image_token_id = self._id(self.image_token)
        self.bos_token_id = self._id(self.bos_token)

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"the AR tokenizer has no token {token!r}")
        return int(i)

    @classmethod
    def from_folder(cls, processor_dir: str) -> "GlmTokenizer":
        path = os.path.join(processor_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"missing file: {path}")
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
        cfg_path = os.path.join(processor_dir, "tokenizer_config.json")
        tok = cls.from_strings(text, read_json(cfg_path) if os.path.isfile(cfg_path) else None, path)
        check_chat_template(processor_dir, tok)
        return tok

    @classmethod
    def from_strings(cls, tokenizer_json: str, tokenizer_config: Optional[dict], where: str) -> "GlmTokenizer":
        """From the text of ``tokenizer.json`` and the parsed ``tokenizer_config.json`` (None: absent);
        ``where`` names their source in errors."""
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise CheckpointError(f"cannot read tokenizer {where}: {e}") from None
        special = dict(DEFAULT_SPECIAL)
        if tokenizer_config is not None:
            for k in special:
                v = tokenizer_config.get(k)
                if isinstance(v, dict):        # AddedToken serialisation
                    v = v.get("content")
                if isinstance(v, str) and v:
                    special[k] = v
        return cls(tok, special)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(i)

    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> List[int]:
        """Token ids of ``text``. ``add_special_tokens=None`` follows the processor's
        ``apply_chat_template``: special tokens are added unless the text starts with the bos token."""
        if add_special_tokens is None:
            add_special_tokens = not text.startswith(self.bos_token)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)


# --------------------------------------------------------------------------------------
# Prompt layout
# --------------------------------------------------------------------------------------

@dataclass
class PromptLayout:
    """An AR prompt ready for the model.

    ``input_ids``: token ids with ``<|image|>`` placeholders (replace them with ``reference_ids``
    flattened in order; see :meth:`filled_ids`). ``grids``: [(h, w)] in processor order (reference
    grids first, then the target grid(s); t2i: full grid then preview). ``decode_grids``: grids the
    AR writes, in writing order (t2i: preview then full; edit: full).
    """
    input_ids: List[int]
    grids: List[Tuple[int, int]]
    num_references: int
    token_h: int
    token_w: int
    preview_h: int = 0
    preview_w: int = 0
    image_token_id: int = 167855
    text: str = ""
    reference_ids: List[torch.Tensor] = field(default_factory=list)

    @property
    def is_edit(self) -> bool:
        return self.num_references > 0

    @property
    def decode_grids(self) -> List[Tuple[int, int]]:
        n = len(self.grids) - self.num_references
        return [self.grids[-i] for i in range(1, n + 1)]

    @property
    def num_generate(self) -> int:
        """Grid tokens to generate (the official pipeline asks for one more: the end marker)."""
        return sum(h * w for h, w in self.decode_grids)

    def filled_ids(self) -> torch.Tensor:
        """input_ids [L] (int64) with each ``<|image|>`` replaced by the reference VQ ids, in order."""
        ids = torch.tensor(self.input_ids, dtype=torch.long)
        if self.num_references == 0:
            return ids
        mask = ids == self.image_token_id
        vq = torch.cat([r.reshape(-1).to(torch.long).cpu() for r in self.reference_ids]) if self.reference_ids \
            else torch.zeros(0, dtype=torch.long)
        if int(mask.sum()) != vq.numel():
            raise ValueError(f"prompt has {int(mask.sum())} image placeholders but the references give "
                             f"{vq.numel()} VQ ids")
        ids[mask] = vq
        return ids


def _grid_hw(g) -> Tuple[int, int]:
    if isinstance(g, torch.Tensor):
        if g.dim() == 2:
            return int(g.shape[0]), int(g.shape[1])
        g = g.tolist()
    g = list(g)
    if len(g) == 3:           # (t, h, w)
        g = g[1:]
    if len(g) != 2:
        raise ValueError(f"a reference grid must be (h, w), (1, h, w) or an [h, w] id tensor, got {g!r}")
    return int(g[0]), int(g[1])


def image_markers(tokenizer: GlmTokenizer, image_start_id: Optional[int] = None,
                  image_end_id: Optional[int] = None) -> Tuple[str, str]:
    """The token strings around a reference image: the tokenizer's tokens for the model's
    ``image_start_token_id`` / ``image_end_token_id`` (16384 / 16385)."""
    start = tokenizer.id_to_token(16384 if image_start_id is None else image_start_id) or tokenizer.bos_token
    end = tokenizer.id_to_token(16385 if image_end_id is None else image_end_id) or DEFAULT_SPECIAL["eos_token"]
    return start, end


# --------------------------------------------------------------------------------------
# The chat template
# --------------------------------------------------------------------------------------

TEMPLATE_PROBE = "a probe prompt"


def find_chat_template(processor_dir: str) -> Optional[Tuple[str, str]]:
    """(template text, where) from ``chat_template.jinja``, ``chat_template.json`` or the
    ``chat_template`` key of ``tokenizer_config.json``, first found; None when there is none."""
    path = os.path.join(processor_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(processor_dir, name)
        if os.path.isfile(path):
            t = read_json(path).get("chat_template")
            if isinstance(t, str) and t:
                return t, f"{path} (key chat_template)"
    return None


def check_chat_template(processor_dir: str, tokenizer: GlmTokenizer) -> None:
    """Refuse a checkpoint whose chat template renders prompts otherwise than the pack lays them out.

    The official pipeline renders the user message through the processor's chat template and then
    appends the grid tokens; the pack builds the same text itself (:func:`build_prompt`). So the
    template is rendered here as transformers renders it (sandboxed Jinja, trim/lstrip blocks, no
    generation prompt) for a text-only and a one-reference message, and must give exactly the pack's
    text; otherwise the tokens would silently differ from the official ones."""
    found = find_chat_template(processor_dir)
    if found is None:
        return
    text, where = found
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    start, end = image_markers(tokenizer)
    cases = [("a text-only prompt", [{"type": "text", "text": TEMPLATE_PROBE}], TEMPLATE_PROBE),
             ("a prompt with one reference image", [{"type": "image"}, {"type": "text", "text": TEMPLATE_PROBE}],
              f"{start}{tokenizer.image_token}{end}{TEMPLATE_PROBE}")]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(text)
        for what, content, want in cases:
            got = template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=False,
                                  **tokenizer.special)
            if got != want:
                raise CheckpointError(
                    f"the chat template in {where} renders {what} as {got!r}, but GLM-Image's prompt layout "
                    f"(which this pack builds) is {want!r}; this checkpoint formats prompts differently, so the "
                    "pack would not reproduce its tokens. Use the official GLM-Image processor files.")
    except TemplateError as e:
        raise CheckpointError(f"cannot render the chat template in {where}: {e}") from None


def build_prompt(tokenizer: GlmTokenizer, prompt: str, width: int, height: int,
                 references: Optional[Sequence] = None, image_start_id: Optional[int] = None,
                 image_end_id: Optional[int] = None) -> PromptLayout:
    """The AR prompt for t2i (``references`` empty/None) or an edit.

    ``references``: per reference either its VQ id grid ``[gh, gw]`` (a tensor; the ids are kept in
    the layout for :meth:`PromptLayout.filled_ids`) or just its grid size ``(gh, gw)``.
    Token strings for the image start/end markers are the tokenizer's tokens for the model's
    ``image_start_token_id`` / ``image_end_token_id`` (16384 / 16385).
    """
    th, tw = target_grid(width, height)
    start_tok, end_tok = image_markers(tokenizer, image_start_id, image_end_id)
    sop, eop, bos = tokenizer.grid_bos_token, tokenizer.grid_eos_token, tokenizer.bos_token
    refs = list(references or [])
    grids = [_grid_hw(r) for r in refs]
    if refs:
        head = "".join(f"{start_tok}{tokenizer.image_token * (h * w)}{end_tok}" for h, w in grids)
        rendered = head + prompt            # what the chat template renders
        text = f"{rendered}{sop}{th} {tw}{eop}{bos}"
        layout_grids = grids + [(th, tw)]
        ph = pw = 0
    else:
        ph, pw = preview_grid(th, tw)
        rendered = prompt
        text = f"{prompt}{sop}{th} {tw}{eop}{sop}{ph} {pw}{eop}{bos}"
        layout_grids = [(th, tw), (ph, pw)]
    add_special = not rendered.startswith(tokenizer.bos_token)
    ids = tokenizer.encode(text, add_special_tokens=add_special)
    ref_ids = [r for r in refs if isinstance(r, torch.Tensor) and r.dim() == 2]
    return PromptLayout(input_ids=ids, grids=layout_grids, num_references=len(refs), token_h=th, token_w=tw,
                        preview_h=ph, preview_w=pw, image_token_id=tokenizer.image_token_id, text=text,
                        reference_ids=ref_ids if len(ref_ids) == len(refs) else [])


# --------------------------------------------------------------------------------------
# MRoPE positions (transformers GlmImageModel.get_rope_index)
# --------------------------------------------------------------------------------------

def prefill_positions(input_ids: Sequence[int] | torch.Tensor, grids: Sequence[Tuple[int, int]],
                      image_start_id: int = 16384, image_end_id: int = 16385) -> Tuple[torch.Tensor, int]:
    """3-axis positions [3, L] (int64) of a prompt, and the next free position.

    Text tokens (start/end markers included) share one running index on all axes. The tokens of the
    i-th complete image (between its start and end markers) get (p, p+row, p+col) where p is the
    running index, which then advances by max(h, w).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    L = ids.numel()
    starts = (torch.nonzero(ids == image_start_id).reshape(-1) + 1).tolist()
    ends = torch.nonzero(ids == image_end_id).reshape(-1).tolist()
    pieces = []
    cur = 0
    prev_end = 0
    for i, (s, e) in enumerate(zip(starts, ends)):
        if i >= len(grids):
            break
        n_text = s - prev_end
        pieces.append(torch.arange(cur, cur + n_text).expand(3, -1))
        cur += n_text
        h, w = grids[i]
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        pieces.append(torch.stack([torch.full((h * w,), cur), cur + rows, cur + cols]))
        cur += max(h, w)
        prev_end = e
    n_text = L - prev_end
    pieces.append(torch.arange(cur, cur + n_text).expand(3, -1))
    cur += n_text
    pos = torch.cat(pieces, dim=1).to(torch.long)
    if pos.shape[1] != L:
        raise ValueError(f"image grids do not match the prompt: {pos.shape[1]} positions for {L} tokens "
                         "(an image's placeholder count differs from its grid)")
    return pos, cur


def decode_positions(start: int, decode_grids: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Positions [3, N+1] of the generated tokens: grid after grid (in writing order) from ``start``,
    (p, p+row, p+col) per cell, p advancing by max(h, w); then one end-marker position.
    Generated token k is fed back at column k."""
    t, hh, ww = [], [], []
    p = start
    for h, w in decode_grids:
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        t.append(torch.full((h * w,), p))
        hh.append(p + rows)
        ww.append(p + cols)
        p += max(h, w)
    t.append(torch.tensor([p]))
    hh.append(torch.tensor([p]))
    ww.append(torch.tensor([p]))
    return torch.stack([torch.cat(t), torch.cat(hh), torch.cat(ww)]).to(torch.long)


def layout_positions(layout: PromptLayout, image_start_id: int = 16384,
                     image_end_id: int = 16385) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prefill positions [3, L], decode positions [3, num_generate + 1]) of a prompt layout."""
    pre, nxt = prefill_positions(layout.input_ids, layout.grids, image_start_id, image_end_id)
    return pre, decode_positions(nxt, layout.decode_grids)
