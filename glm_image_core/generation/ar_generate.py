"""GLM-Image AR sampling: the semantic-token grid for text-to-image and edits, seed-compatible with
the official pipeline.

Seed parity
-----------
``diffusers.GlmImagePipeline`` seeds the *global* torch RNG with ``torch.manual_seed(seed)`` and calls
``generate(do_sample=True)``, which per step applies temperature → top-k → top-p (transformers'
warpers, on the full ``lm_head`` width) → softmax → ``torch.multinomial(probs, 1)``. We never touch the
global RNG: a private ``torch.Generator(device).manual_seed(seed)`` gives the same stream.

``torch.multinomial(p, 1)`` is implemented (CPU and CUDA, ATen ``multinomial_out`` fast path) as
``argmax(p / q)`` with ``q = torch.empty_like(p).exponential_(1, generator)``: exactly one exponential
draw per vocabulary entry per step. We sample that way explicitly (``tests/parity`` checks the
identity on the installed torch) and take the argmax over the **codebook ids only** (``< codebook
size``). Consequences:

* the random stream is the pipeline's: one ``[B, V]`` exponential draw per step, nothing else;
* whenever the unrestricted winner is a codebook id the token is *identical* to the pipeline's;
* the end marker (EOS, 16385), the image-start id and the other non-codebook visual ids are never
  emitted: where the pipeline would pick one, we pick the codebook id with the largest ``p/q``
  (the pipeline would stop early on EOS and then crash on the short grid, or crash on an id that
  is not a row of the DiT's prior embedding). Later tokens then follow our (valid) choice;
* a complete grid is always produced (no early stop): exactly ``preview + grid`` tokens for t2i and
  ``grid`` tokens for an edit; the pipeline's final extra token (the end marker) is not sampled;
* if top-k/top-p leave no codebook id with probability > 0 (possible only with extreme settings), the
  codebook id with the largest logit is taken (deterministic, no extra draw).

Batches: ``batch_size=B`` samples B grids of one prompt from one generator, one ``[B, V]`` draw per
step: the same tokens as the pipeline given the prompt repeated B times (``prompt=[p]*B``).

Fast decode
-----------
Pre-allocated static KV cache, one prefill, then one-token steps; all decode MRoPE cos/sin are
computed once; logits only for the last position; top-k skipped when 0 or ≥ vocab (the official
16512 is a no-op); top-p needs only the sorted *values* (no argsort; exact, see
:func:`top_p_remove_mask`). On a CPU the one-row decode is memory-bandwidth bound (every weight is
read once per token); there, load the model with ``NETWORKS["ar"].load(..., cpu_gemv_layout=True)`` (big fp32
weights stored column-major: ~1.35x faster steps, float-rounding-level logit differences).
``bench/bench_ar.py`` measures it against transformers' ``generate``.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import ar_prompt, image_proc

log = logging.getLogger(__name__)

PHASE_PREFILL = "prefill"
PHASE_PREVIEW = "preview"
PHASE_GRID = "grid"


@dataclass
class ARResult:
    """Output of :func:`generate_tokens`.

    grid: [B, H/32, W/32] int64 codebook ids. preview: [B, ph, pw] (t2i) or None (edit).
    replaced: per sample, the steps where the unrestricted sampler's winner was not a codebook id
    (the pipeline would have emitted EOS / a non-codebook id there).
    """
    grid: torch.Tensor
    preview: Optional[torch.Tensor]
    input_ids: torch.Tensor
    num_prompt_tokens: int
    num_generated: int
    replaced: List[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logits: Optional[torch.Tensor] = None     # [B, n, V] raw float32 logits (return_logits=True only)

    @property
    def tokens_per_second(self) -> float:
        t = self.prefill_seconds + self.decode_seconds
        return self.num_generated / t if t > 0 else 0.0


class CodebookSampler:
    """Temperature → top-k → top-p → softmax → exponential-race sampling restricted to codebook ids.

    Mirrors transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and
    ``torch.multinomial(probs, 1)`` (see the module docstring). ``restrict=False`` returns the
    unrestricted winner (the pipeline's token) instead: for tests only.
    """

    def __init__(self, temperature: float, top_p: float, top_k: int, vocab_size: int, codebook_size: int,
                 generator: torch.Generator, restrict: bool = True, sync_free: bool = False):
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not (0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.vocab_size = vocab_size
        self.codebook_size = min(codebook_size, vocab_size)
        self.generator = generator
        self.restrict = restrict
        # sync_free: the top-p mask by transformers' own sort + scatter (bit-identical, all on the
        # device) instead of the faster CPU path, which reads one flag back to the host per token
        self.sync_free = sync_free
        self._q = None

    def __call__(self, logits: torch.Tensor):
        """tokens [B] int64 and a bool mask [B] of rows where the restriction changed the winner."""
        scores = logits
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p < 1.0:
            mask = (top_p_remove_mask_reference if self.sync_free else top_p_remove_mask)(scores, self.top_p)
            scores = scores.masked_fill(mask, -float("inf"))
        probs = torch.nn.functional.softmax(scores, dim=-1)
        if self._q is None or self._q.shape != probs.shape or self._q.device != probs.device:
            self._q = torch.empty_like(probs)
        q = self._q.exponential_(1, generator=self.generator)
        race = probs / q
        if not self.restrict:
            full = race.argmax(dim=-1)
            return full, torch.zeros_like(full, dtype=torch.bool)
        best, tok = race[:, :self.codebook_size].max(dim=-1)
        # The unrestricted winner (argmax: the first of equal maxima, and codebook ids come first) is
        # not a codebook id exactly when a later id beats the best codebook one.
        replaced = race[:, self.codebook_size:].amax(dim=-1) > best if race.shape[-1] > self.codebook_size \
            else torch.zeros_like(best, dtype=torch.bool)
        # no codebook id left with p > 0: take the most likely codebook id (no extra draw); on the
        # CPU the check costs nothing, elsewhere it must not read back (sync_free)
        if self.sync_free or not bool((best > 0).all()):
            tok = torch.where(best > 0, tok, logits[:, :self.codebook_size].argmax(dim=-1))
        return tok, replaced


def top_p_remove_mask_reference(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper`` removal mask, verbatim (min_tokens_to_keep=1)."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = 0
    return remove.scatter(1, sorted_idx, remove)


def top_p_remove_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same mask as :func:`top_p_remove_mask_reference`, bit for bit, without the argsort.

    The reference removes a prefix of the ascending order: its cumulative sums (softmax of the
    *sorted values*, then cumsum; both depend only on the sorted values, not on the order of equal
    ones) are non-decreasing. So only the sorted values are needed: with J removed and v the J-th
    smallest value, the removed set is ``scores <= v`` unless v's tie group straddles the cut (then
    which equal-valued ids are removed depends on the sort's tie order, and we defer to the
    reference). On CPU the values come from numpy's vectorised sort (about 4x faster than torch's
    argsort here); elsewhere from ``torch.sort``.
    """
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        return _top_p_remove_mask_cpu(scores, top_p)
    sorted_vals = torch.sort(scores, descending=False).values
    cum = sorted_vals.softmax(dim=-1).cumsum(dim=-1)
    rem = cum <= (1 - top_p)
    rem[..., -1] = False
    j = rem.sum(dim=-1, keepdim=True)                                   # [B, 1] removed count
    v = sorted_vals.gather(-1, (j - 1).clamp(min=0))                    # largest removed value
    nxt = sorted_vals.gather(-1, j.clamp(max=sorted_vals.shape[-1] - 1))  # smallest kept value
    if bool(((j > 0) & (nxt == v)).any()):                              # a tie straddles the cut
        return top_p_remove_mask_reference(scores, top_p)
    return (scores <= v) & (j > 0)


def _top_p_remove_mask_cpu(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """:func:`top_p_remove_mask` on the CPU: the sort by numpy, and the cut found by a binary search of
    the cumulative sums (non-decreasing: non-negative terms) instead of four full-width passes. The
    softmax and cumsum stay torch's, whose roundings the reference's comparison sees; the threshold is
    compared in float32, as torch compares a float32 tensor with a Python float."""
    sorted_np = np.sort(scores.detach().contiguous().numpy(), axis=-1)
    cum = torch.from_numpy(sorted_np).softmax(dim=-1).cumsum(dim=-1).numpy()
    thr = np.float32(1 - top_p)
    cuts = []
    for b in range(sorted_np.shape[0]):
        if not np.isfinite(cum[b, -1]):                  # NaN logits: the reference's own answer
            return top_p_remove_mask_reference(scores, top_p)
        j = int(np.searchsorted(cum[b, :-1], thr, side="right"))    # removed count (the last id stays)
        if j and sorted_np[b, j] == sorted_np[b, j - 1]:             # a tie straddles the cut
            return top_p_remove_mask_reference(scores, top_p)
        cuts.append(float(sorted_np[b, j - 1]) if j else None)
    if len(cuts) == 1:
        return scores <= cuts[0] if cuts[0] is not None else torch.zeros_like(scores, dtype=torch.bool)
    v = torch.tensor([c if c is not None else 0.0 for c in cuts], dtype=scores.dtype).view(-1, 1)
    keep_all = torch.tensor([c is None for c in cuts]).view(-1, 1)
    return (scores <= v) & ~keep_all


def _generator(seed: int, device) -> torch.Generator:
    """A private generator on ``device`` seeded like ``torch.manual_seed(seed)`` seeds the default one."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return g


def _model_device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


def generate_tokens(model, tokenizer, prompt: str, width: int, height: int, seed: int,
                    temperature: float = 0.9, top_p: float = 0.75, top_k: int = 0, batch_size: int = 1,
                    reference_grids: Optional[Sequence[torch.Tensor]] = None,
                    callback: Optional[Callable[[int, int, str], None]] = None, compile: bool = False,
                    device=None, dtype: Optional[torch.dtype] = None, restrict_to_codebook: bool = True,
                    return_logits: bool = False, decode: str = "auto") -> ARResult:
    """Sample the semantic-token grid(s) of ``prompt`` at ``width``×``height`` (multiples of 32).

    ``model``: :class:`glm_image_core.networks.ar_model.GlmImageAR`; ``tokenizer``:
    :class:`glm_image_core.generation.ar_prompt.GlmTokenizer`. ``reference_grids``: VQ id grids ``[gh, gw]`` of
    the reference images (from :func:`tokenize_reference`), in order; None/empty = text-to-image.
    ``top_k=0`` (or ≥ the lm_head size) disables top-k. ``callback(done, total, phase)`` is called
    once after the prefill (``done=0``, phase ``"prefill"``) and after every sampled token (phase
    ``"preview"`` or ``"grid"``); an exception raised there stops generation and propagates (nothing
    is left behind: the cache and generator are local). A prompt that, with the image grid, needs
    more positions than the model's context (``max_position_embeddings``) is refused up front.
    ``device``/``dtype``: where and in which dtype to compute (default: the model's device and
    ``model.compute_dtype``). ``compile=True`` runs the decode step through ``torch.compile``.
    ``decode``: one of :data:`DECODE_MODES` (see :class:`StaticDecode`); ``"auto"`` is ``"graphs"`` on
    CUDA and ``"exact"`` elsewhere.
    ``restrict_to_codebook=False`` / ``return_logits`` are for parity tests only.
    See the module docstring for the exact sampling semantics.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    for name, v in (("width", width), ("height", height)):
        if v % ar_prompt.GRID_FACTOR or v < ar_prompt.GRID_FACTOR:
            raise ValueError(f"{name} must be a positive multiple of {ar_prompt.GRID_FACTOR}, got {v}")
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = dtype or getattr(model, "compute_dtype", torch.float32)
    refs = list(reference_grids or [])
    layout = ar_prompt.build_prompt(tokenizer, prompt, width, height, references=refs or None,
                                    image_start_id=model.image_start_token_id,
                                    image_end_id=model.image_end_token_id)
    ids = layout.filled_ids()
    if int(ids.max()) >= model.text_config.vocab_size:
        raise ValueError(f"prompt token id {int(ids.max())} is outside the AR vocabulary "
                         f"({model.text_config.vocab_size}); tokenizer and model do not match")
    pre_pos, dec_pos = ar_prompt.layout_positions(layout, model.image_start_token_id, model.image_end_token_id)
    check_context(model, int(max(pre_pos.max(), dec_pos.max())) + 1, ids.numel(), width, height)
    n_gen = layout.num_generate
    n_preview = layout.preview_h * layout.preview_w
    L = ids.numel()
    B = int(batch_size)
    lm = model.language_model
    sampler = CodebookSampler(temperature, top_p, top_k, model.text_config.vision_vocab_size,
                              model.codebook_size, _generator(seed, device), restrict=restrict_to_codebook)
    out = torch.empty(B, n_gen, dtype=torch.long, device=device)
    replaced = torch.zeros(B, dtype=torch.long, device=device)
    logits_log = [] if return_logits else None

    if decode == "auto":
        decode = "graphs" if device.type == "cuda" else "exact"
    static = decode != "exact"
    sampler.sync_free = static and device.type != "cpu"     # a host read costs nothing on the CPU

    with torch.no_grad():
        cache = model.new_cache(B, cache_capacity(L + n_gen) if static else L + n_gen, dtype=dtype, device=device,
                                key_columns=static and bool(compile))
        _sync(device)
        t0 = time.perf_counter()
        inp = ids.to(device)[None].expand(B, L)
        logits = model(inp, pre_pos.to(device), cache=cache, start=0, last_only=True, dtype=dtype)
        # every decode step's rotary table at once: token k is fed back at decode column k
        dec_cols = dec_pos[:, :max(n_gen - 1, 1)].to(device)
        if static:
            step = StaticDecode(model, cache, dec_cols, L, dtype, graphs=decode == "graphs", compile=compile)
        else:
            cos_all, sin_all = lm.rope(dec_cols, dtype)   # [1, n, rot]
            step = _make_step(model, cache, compile)
        _sync(device)
        t1 = time.perf_counter()
        if callback is not None:
            callback(0, n_gen, PHASE_PREFILL)
        for i in range(n_gen):
            if i > 0:
                if static:
                    logits = step(out[:, i - 1:i])
                else:
                    logits = step(out[:, i - 1:i], cos_all[:, i - 1:i], sin_all[:, i - 1:i], L + i - 1)
            last = logits[:, -1].to(torch.float32)
            if logits_log is not None:
                logits_log.append(last.clone())
            tok, rep = sampler(last)
            out[:, i] = tok
            replaced += rep
            if callback is not None:
                callback(i + 1, n_gen, PHASE_PREVIEW if i < n_preview else PHASE_GRID)
        _sync(device)
        t2 = time.perf_counter()

    grid = out[:, n_preview:].reshape(B, layout.token_h, layout.token_w).contiguous()
    preview = out[:, :n_preview].reshape(B, layout.preview_h, layout.preview_w).contiguous() if n_preview else None
    res = ARResult(grid=grid, preview=preview, input_ids=ids, num_prompt_tokens=L, num_generated=n_gen,
                   replaced=[int(x) for x in replaced.tolist()], prefill_seconds=t1 - t0, decode_seconds=t2 - t1)
    if logits_log is not None:
        res.logits = torch.stack(logits_log, dim=1)         # [B, n_gen, V] raw logits (float32)
    return res


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the prefill/decode times are the work's, not the launches'
    (twice per generation; the decode loop itself never waits)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_context(model, positions: int, prompt_tokens: int, width: int, height: int) -> None:
    """Refuse a prompt whose positions (text, then the image grids) exceed the AR's context."""
    limit = (getattr(model, "config", None) or {}).get("text_config", {}).get("max_position_embeddings")
    if limit and positions > int(limit):
        raise ValueError(f"prompt too long: its {prompt_tokens} tokens plus the {width}x{height} image grid need "
                         f"{positions} positions, more than the AR model's context of {int(limit)} "
                         "(max_position_embeddings); shorten the prompt")


def _make_step(model, cache, compile: bool):
    lm = model.language_model
    lm_head = model.lm_head

    def step(tok, cos, sin, start: int):
        x = lm.embed(tok, cos.dtype, tok.device)
        h = lm(x, cos, sin, cache, start, last_only=True)
        return lm_head(h)

    if compile:
        return torch.compile(step, dynamic=True)
    return step


DECODE_MODES = ("auto", "exact", "static", "graphs")
CACHE_BUCKET = 512


def cache_capacity(positions: int) -> int:
    """KV-cache rows for ``positions`` (prompt + generated tokens), rounded up to a multiple of
    :data:`CACHE_BUCKET`: image sizes whose prompt and grid fall in one bucket share every shape of
    the static decode step, so one compiled graph / CUDA graph serves them all."""
    return -(-int(positions) // CACHE_BUCKET) * CACHE_BUCKET


def _static_step(model, cache, tok, col, row, cos_t, sin_t, rows, dtype):
    """One decode step of fixed shapes: token ``tok`` [B, 1], fed at decode column ``col`` and cache
    row ``row`` (device tensors [1], advanced in place), attends the whole cache under the mask
    ``rows <= row``. Module-level so that ``torch.compile`` caches one graph per shape."""
    lm = model.language_model
    x = lm.embed(tok, dtype, tok.device)
    cos = cos_t.index_select(1, col)
    sin = sin_t.index_select(1, col)
    # additive (0 / -inf), made once here: a bool mask would be converted again in every layer
    mask = torch.zeros_like(cos_t[0, :, 0]).masked_fill(rows > row, float("-inf")).view(1, 1, 1, -1)
    logits = model.lm_head(lm(x, cos, sin, cache, row, last_only=True, attn_mask=mask))
    col += 1
    row += 1
    return logits


_COMPILED_STEP = {}


def _inductor_options() -> Optional[dict]:
    """Inductor's own pass that writes one-row products with small weights (at most 2048 wide, CPU
    only) as fused multiply-and-sum loops instead of BLAS calls, whose fixed cost (5-9 µs each, six
    per layer) dominates a compiled step when the layers are narrow; wide weights keep BLAS. None
    where this torch has no such pass."""
    if importlib.util.find_spec("torch._inductor.fx_passes.decompose_mem_bound_mm") is None:
        return None
    return {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


class StaticDecode:
    """The decode step built for GPUs: every shape fixed by the cache's capacity (bucketed, see
    :func:`cache_capacity`), positions and rotary rows as device tensors advanced on the device, KV
    rows written in place, attention over the whole cache with a position mask, no value read back
    to the host. So the step can be captured once and replayed:

    * ``graphs=True`` on CUDA: a CUDA graph, captured at the first call and replayed for every token
      (falls back to eager, with one log line, when capture is not possible, e.g. weights streamed
      from the CPU under ``--lowvram``);
    * ``compile=True`` (or a backend name or callable): ``torch.compile(fullgraph=True,
      dynamic=False)``, one graph per bucket; after the first token the guards are not evaluated
      again (same objects). The one-row attention is traced as products and sums
      (``attention.cache_attention``, over keys stored by column: ``KVCache(key_columns=True)``)
      and, with inductor, the narrow one-row products become multiply-and-sum loops
      (:func:`_inductor_options`): the step is a few fused loops rather than ~300 BLAS and SDPA
      calls of fixed cost each.

    Numerics: the same operations as the exact step except that attention spans the masked cache
    (its reductions run over more, zero-weighted, terms), so logits may differ from the exact mode
    at the float-rounding level. ``tests/core/test_ar_static_decode.py`` measures it; the exact mode
    stays the parity reference.
    """

    def __init__(self, model, cache, dec_cols: torch.Tensor, first_row: int, dtype: torch.dtype,
                 graphs: bool = False, compile=False):
        lm = model.language_model
        device = cache.k[0].device
        cap = cache.max_len
        cos, sin = lm.rope(dec_cols, dtype)                                   # [1, n, rot]
        pad = (0, 0, 0, cap - cos.shape[1])                                   # rows up to the capacity
        self.args = dict(model=model, cache=cache,
                         tok=torch.zeros(cache.k[0].shape[0], 1, dtype=torch.long, device=device),
                         col=torch.zeros(1, dtype=torch.long, device=device),
                         row=torch.full((1,), int(first_row), dtype=torch.long, device=device),
                         cos_t=F.pad(cos, pad), sin_t=F.pad(sin, pad),
                         rows=torch.arange(cap, device=device), dtype=dtype)
        self.fn = _static_step
        self.compiled = bool(compile)
        self.calls = 0
        if compile:
            backend = "inductor" if compile is True else compile     # a backend name or callable
            if backend not in _COMPILED_STEP:
                _COMPILED_STEP[backend] = torch.compile(_static_step, fullgraph=True, dynamic=False, backend=backend,
                                                        options=_inductor_options() if backend == "inductor" else None)
            self.fn = _COMPILED_STEP[backend]
        self.want_graph = graphs and device.type == "cuda" and _all_on(model, device)
        if graphs and device.type == "cuda" and not self.want_graph:
            log.info("GLM-Image AR: weights not all on %s (streamed); decoding without CUDA graphs", device)
        self.graph = None
        self.out = None

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] after feeding ``tok`` [B, 1]; with a CUDA graph the returned tensor is a
        static buffer that the next call overwrites."""
        self.args["tok"].copy_(tok)
        if self.want_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.out
        self.calls += 1
        if self.compiled and self.calls > 1:
            # Same objects and shapes as the first call, whose guards passed: checking the ~500 guards
            # (one per weight) again every token would cost more than the compiled step saves.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.fn(**self.args)
        return self.fn(**self.args)

    def _capture(self) -> None:
        a = self.args
        saved = a["col"].clone(), a["row"].clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):     # warm-up (lazy inits, workspace), not captured
                self.fn(**a)
            torch.cuda.current_stream().wait_stream(side)
            # the warm-up wrote a cache row that the real step rewrites before reading it
            a["col"].copy_(saved[0])
            a["row"].copy_(saved[1])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.fn(**a)
            self.graph = graph
        except Exception as e:                 # e.g. a host sync or a CPU weight inside an op
            log.warning("GLM-Image AR: CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
            a["col"].copy_(saved[0])
            a["row"].copy_(saved[1])
            self.want_graph = False
            self.out = None


def _all_on(model, device: torch.device) -> bool:
    """Whether every decoder and lm_head weight already lives on ``device`` (nothing streamed)."""
    params = list(model.language_model.parameters()) + list(model.lm_head.parameters())
    index = device.index if device.index is not None else torch.cuda.current_device()   # "cuda" is the current one
    return all(p.device.type == device.type and p.device.index == index for p in params)


# --------------------------------------------------------------------------------------
# Reference images
# --------------------------------------------------------------------------------------

def _check_patch(model, processor_cfg: dict) -> None:
    p = int(processor_cfg["patch_size"])
    vp = int(model.config["vision_config"]["patch_size"])
    if p != vp:
        raise ValueError(f"image processor patch_size {p} differs from the vision tower's {vp}")


def tokenize_references(model, images: Sequence[torch.Tensor], processor_cfg: dict, device=None,
                        dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """VQ id grids [gh, gw] (int64) of several reference images, run through the vision tower together
    (packed, attention within each image) exactly like transformers' ``get_image_features`` +
    ``get_image_tokens``. Images: float 0..1 or uint8, [H,W,3] / [1,H,W,3] / [3,H,W]."""
    _check_patch(model, processor_cfg)
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = dtype or getattr(model, "compute_dtype", torch.float32)
    rows, grids = [], []
    for img in images:
        r, g = image_proc.preprocess_reference(img, processor_cfg)
        rows.append(r)
        grids.append(g)
    with torch.no_grad():
        feats = model.image_features(torch.cat(rows).to(device), grids, dtype=dtype)
        return [t.to(torch.long) for t in model.image_tokens(feats, grids)]


def tokenize_reference(model, image: torch.Tensor, processor_cfg: dict, device=None,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """VQ id grid [gh, gw] (int64) of one reference image (vision tower + VQ codebook).

    The grid is ``smart_resize``'s size / patch: (H/32, W/32) for a reference fitted with
    :func:`glm_image_core.generation.image_proc.fit_reference_size`."""
    return tokenize_references(model, [image], processor_cfg, device=device, dtype=dtype)[0]
