"""GLM-Image DiT sampling loop, reproducing ``GlmImagePipeline.__call__`` (diffusers 0.42.x) steps
6-8: optional reference KV-cache write, unshifted timesteps ``t - 1`` for the DiT, CFG with the
empty-glyph / dropped-prior / no-reference unconditional pass, and the float32 Euler update with
the shifted sigmas. Deterministic: no random numbers are drawn.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ..networks.dit import GlmImageDiT, ReferenceKVCache
from .schedule import glm_sigmas, glm_timesteps, mu_for_latent

Reference = Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]


def upsample_token_grid(grid_ids: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """AR token grid [B, gh, gw] (or [gh, gw]) -> DiT prior ids [B, (factor*gh)*(factor*gw)] by nearest
    neighbour, exactly the pipeline's ``_upsample_token_ids`` (interpolate on float, back to long)."""
    g = grid_ids if grid_ids.dim() == 3 else grid_ids.reshape(1, *grid_ids.shape[-2:])
    b, gh, gw = g.shape
    up = torch.nn.functional.interpolate(g.view(b, 1, gh, gw).float(), scale_factor=factor, mode="nearest")
    return up.to(torch.long).view(b, -1)


def batch_to(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    """``t`` with batch ``b``: as is, or a batch-1 tensor expanded."""
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ValueError(f"{what} has batch {t.shape[0]}, expected 1 or {b}")


def dit_timestep(t: torch.Tensor) -> torch.Tensor:
    """What the DiT is fed for the pipeline's (unshifted) timestep ``t``: ``t - 1`` (the official
    pipeline's quirk; ``schedule.unshifted_timestep`` recovers ``t`` from a sigma)."""
    return t - 1


@torch.no_grad()
def build_reference_cache(dit: GlmImageDiT, reference: Sequence[Reference], dtype=None,
                          device=None, callback: Optional[Callable[[int, int], None]] = None) -> ReferenceKVCache:
    """Run the DiT once per reference at timestep 0 in cache-"write" mode (pipeline step 6).

    ``reference``: list of (normalised reference latent [1, C, h, w], its upsampled prior ids
    [1, N_ref] or [N_ref], (H_ref, W_ref) in pixels). Zero-length glyph, prior not dropped,
    crop (0, 0); the references' K/V append in list order. ``callback(done, total)`` runs after
    each reference is written; an exception raised there propagates (the cache is local: nothing
    half-written survives).
    """
    dtype = dtype or dit.compute_dtype
    cache = dit.new_kv_cache()
    cache.set_mode("write")
    for i, item in enumerate(reference):
        try:
            ref_latent, ref_ids, (ref_h, ref_w) = item
        except (TypeError, ValueError):
            raise ValueError(f"reference[{i}] must be (latent, prior ids, (height, width))") from None
        dev = device or ref_latent.device
        ref_latent = ref_latent.to(dev)
        if ref_latent.dim() == 3:
            ref_latent = ref_latent.unsqueeze(0)
        if ref_latent.shape[0] != 1:
            raise ValueError(f"reference[{i}] latent must have batch 1, got {tuple(ref_latent.shape)}")
        ids = ref_ids.to(dev).long()
        n = (ref_latent.shape[-2] // dit.patch_size) * (ref_latent.shape[-1] // dit.patch_size)
        if ids.numel() != n:
            raise ValueError(f"reference[{i}]: {ids.numel()} prior ids for a {ref_latent.shape[-2]}x"
                             f"{ref_latent.shape[-1]} latent (needs {n})")
        empty = torch.zeros(1, 0, dit.text_embed_dim, device=dev, dtype=dtype)
        ctx = dit.project_glyph(empty, dtype)
        prior = dit.project_prior(ids.reshape(-1), False, dtype)
        temb = dit.time_embed(torch.zeros((1,), device=dev), torch.tensor([[int(ref_h), int(ref_w)]], device=dev),
                              torch.zeros((1, 2), device=dev), dtype)
        dit.forward_multi(ref_latent.to(dtype), [ctx], [prior], temb, ["write"], cache)
        cache.num_references += 1
        if callback is not None:
            callback(i + 1, len(reference))
    cache.set_mode(None)
    return cache


@torch.no_grad()
def denoise(dit: GlmImageDiT, latents: torch.Tensor, prior_token_ids: torch.Tensor, cond_glyph: torch.Tensor,
            uncond_glyph: Optional[torch.Tensor], target_hw: Tuple[int, int], steps: int, cfg: float,
            scheduler_cfg: Optional[dict], reference: Union[None, Sequence[Reference], ReferenceKVCache] = None,
            callback: Optional[Callable[[int, int, torch.Tensor], None]] = None, *,
            crop_coords: Tuple[int, int] = (0, 0), compute_dtype: Optional[torch.dtype] = None,
            packed_cfg: bool = True, sigmas: Optional[torch.Tensor] = None,
            timesteps: Optional[torch.Tensor] = None, callback_x0: bool = False,
            reference_callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Denoise normalised latents with the GLM-Image DiT; returns normalised float32 latents.

    ``latents`` [B, C, h, w] (initial noise, normalised space); ``prior_token_ids`` [B, N] (or [1, N])
    upsampled AR ids, N = (h/2)(w/2); ``cond_glyph`` [B or 1, L, text_dim]; ``uncond_glyph`` the
    empty-text glyph [B or 1, L', text_dim] (needed when ``cfg > 1``); ``target_hw`` (H, W) pixels;
    ``reference``: list of (latent, ids, (H, W)) as in ``build_reference_cache``, or a prebuilt
    ``ReferenceKVCache``. ``cfg <= 1`` runs the conditional pass only (the pipeline's rule).
    ``callback(step_index, total_steps, latents)`` runs after every step; exceptions propagate (use it
    for progress / interrupts). With ``callback_x0=True`` it gets a 4th argument, the step's clean-image
    prediction ``x0 = x - sigma * v`` (normalised, float32) for previews. ``reference_callback(done,
    total)`` runs after each reference's cache write (see ``build_reference_cache``).
    ``packed_cfg`` runs the cond and uncond passes in one sweep (same numerics, faster on CPU; holds
    both passes' activations at once, so ``False`` lowers peak memory). ``timesteps`` / ``sigmas``
    override the schedule (DiT timesteps before the ``- 1``; sigmas with the terminal value).
    Returns the final normalised latents (float32, on the latents' device).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched = dict(scheduler_cfg or {})
    if sched.get("stochastic_sampling"):
        raise NotImplementedError("stochastic_sampling schedulers are not supported")
    dtype = compute_dtype or dit.compute_dtype
    device = latents.device
    latents = latents.to(torch.float32)
    B, C, h, w = latents.shape
    p = dit.patch_size
    if C != dit.in_channels:
        raise ValueError(f"latents have {C} channels, the DiT expects {dit.in_channels}")
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the DiT patch size {p}")
    N = (h // p) * (w // p)
    ids = prior_token_ids.to(device).long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    elif ids.dim() > 2:
        ids = ids.reshape(ids.shape[0], -1)
    if ids.shape[-1] != N:
        raise ValueError(f"prior_token_ids have {ids.shape[-1]} tokens per sample, the {h}x{w} latent needs {N} "
                         "(height and width must be multiples of 32 pixels)")
    ids = batch_to(ids, B, "prior_token_ids")
    do_cfg = cfg > 1
    if do_cfg and uncond_glyph is None:
        raise ValueError("uncond_glyph is required when cfg > 1")

    # Reference-image KV cache (written once, read by every conditional pass).
    cache: Optional[ReferenceKVCache] = None
    if isinstance(reference, ReferenceKVCache):
        cache = reference if not reference.is_empty() else None
    elif reference:
        cache = build_reference_cache(dit, reference, dtype, device, callback=reference_callback)
    cond_mode = "read" if cache is not None else None
    uncond_mode = "skip" if cache is not None else None

    # Schedule: unshifted DiT timesteps, shifted Euler sigmas.
    if timesteps is None:
        timesteps = glm_timesteps(steps, sched)
    if sigmas is None:
        sigmas = glm_sigmas(steps, sched, mu=mu_for_latent(h, w, p, sched))
    timesteps = timesteps.to(device=device, dtype=torch.float32)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    n_steps = len(timesteps)
    if len(sigmas) != n_steps + 1:
        raise ValueError("sigmas must have one more entry than timesteps")

    H, W = int(target_hw[0]), int(target_hw[1])
    target_size = torch.tensor([[H, W]], dtype=dtype, device=device).repeat(B, 1)
    crop = torch.tensor([list(crop_coords)], dtype=dtype, device=device).repeat(B, 1)

    # Step-invariant projections, computed once.
    ctx_c = dit.project_glyph(batch_to(cond_glyph.to(device), B, "cond_glyph"), dtype)
    prior_c = dit.project_prior(ids, False, dtype)
    if do_cfg:
        ctx_u = dit.project_glyph(batch_to(uncond_glyph.to(device), B, "uncond_glyph"), dtype)
        prior_u = dit.project_prior(ids, True, dtype)
        priors = torch.stack([prior_c, prior_u]) if packed_cfg else None

    for i in range(n_steps):
        t = timesteps[i]
        x_in = latents.to(dtype)
        timestep = dit_timestep(t.expand(B))
        temb = dit.time_embed(timestep, target_size, crop, dtype)
        if not do_cfg:
            v = dit.forward_multi(x_in, [ctx_c], [prior_c], temb, [cond_mode], cache)[0].float()
        else:
            if packed_cfg:
                vc, vu = dit.forward_multi(x_in, [ctx_c, ctx_u], priors, temb, [cond_mode, uncond_mode], cache)
            else:
                vc = dit.forward_multi(x_in, [ctx_c], [prior_c], temb, [cond_mode], cache)[0]
                vu = dit.forward_multi(x_in, [ctx_u], [prior_u], temb, [uncond_mode], cache)[0]
            vc, vu = vc.float(), vu.float()
            v = vu + cfg * (vc - vu)
        dt = sigmas[i + 1] - sigmas[i]
        x0 = latents - sigmas[i] * v if (callback is not None and callback_x0) else None
        latents = latents + dt * v
        if callback is not None:
            if callback_x0:
                callback(i, n_steps, latents, x0)
            else:
                callback(i, n_steps, latents)
    return latents
