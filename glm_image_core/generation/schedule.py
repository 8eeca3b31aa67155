"""GLM-Image sampling schedule: exactly what ``GlmImagePipeline`` + ``FlowMatchEulerDiscreteScheduler``
(diffusers 0.42.x) compute, driven by ``scheduler/scheduler_config.json``.

* DiT timesteps are the **unshifted** ``int(linspace(num_train_timesteps, 1, N+1)[:-1])``
  (the model is fed ``t - 1``).
* Euler sigmas are ``t / num_train_timesteps`` passed through the resolution-dependent time shift
  (``mu = sqrt(seq / base_seq) * max_shift + base_shift``), then a terminal 0 is appended.

The arithmetic is done with numpy in float32 exactly like the reference, so the sigmas are
bit-identical.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

# diffusers FlowMatchEulerDiscreteScheduler.__init__ defaults: what diffusers uses for a key the
# JSON lacks (the official GLM-Image config sets all of the relevant ones).
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}

# The official GLM-Image scheduler_config.json (documentation / fallback for callers without a file).
GLM_IMAGE_SCHEDULER_CONFIG = dict(SCHEDULER_DEFAULTS, use_dynamic_shifting=True, time_shift_type="linear",
                                  base_shift=0.25, max_shift=0.75)


def _cfg(scheduler_cfg: Optional[dict]) -> dict:
    out = dict(SCHEDULER_DEFAULTS)
    for k, v in (scheduler_cfg or {}).items():
        if not str(k).startswith("_"):
            out[k] = v
    return out


def image_seq_len(latent_h: int, latent_w: int, patch_size: int = 2) -> int:
    """DiT token count the pipeline uses for mu: ``(H/vae_sf * W/vae_sf) // patch**2``."""
    return (int(latent_h) * int(latent_w)) // (int(patch_size) ** 2)


def calculate_mu(image_seq_len: int, scheduler_cfg: Optional[dict] = None) -> float:
    """``GlmImagePipeline``'s ``calculate_shift``: ``sqrt(seq / base_image_seq_len) * max_shift + base_shift``.

    Like the pipeline, reads ``base_image_seq_len`` / ``base_shift`` / ``max_shift`` from the scheduler
    config (diffusers' scheduler-class defaults fill keys the file lacks).
    """
    c = _cfg(scheduler_cfg)
    m = (image_seq_len / c["base_image_seq_len"]) ** 0.5
    return m * c["max_shift"] + c["base_shift"]


def _timesteps_np(steps: int, c: dict) -> np.ndarray:
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = np.linspace(c["num_train_timesteps"], 1.0, int(steps) + 1)[:-1]
    return ts.astype(np.int64).astype(np.float32)


def glm_timesteps(steps: int, scheduler_cfg: Optional[dict] = None) -> torch.Tensor:
    """The DiT timestep schedule (float32, length ``steps``): ``int(linspace(T, 1, N+1)[:-1])``."""
    return torch.from_numpy(_timesteps_np(steps, _cfg(scheduler_cfg))).to(torch.float32)


def _time_shift(c: dict, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    kind = c.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** sigma)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def glm_sigmas(steps: int, scheduler_cfg: Optional[dict] = None, image_seq_len: Optional[int] = None,
               mu: Optional[float] = None) -> torch.Tensor:
    """Euler sigmas (float32, length ``steps + 1`` with the terminal value appended).

    With ``use_dynamic_shifting`` the time shift of ``time_shift_type`` ("linear":
    ``mu/(mu + 1/s - 1)``, "exponential": ``e^mu/(e^mu + 1/s - 1)``) is applied with ``mu``
    (or ``calculate_mu(image_seq_len)``); otherwise the static ``shift``.
    """
    c = _cfg(scheduler_cfg)
    ts = _timesteps_np(steps, c)
    sigmas = ts / c["num_train_timesteps"]
    sigmas = np.array(sigmas).astype(np.float32)
    if c["use_dynamic_shifting"]:
        if mu is None:
            if image_seq_len is None:
                raise ValueError("use_dynamic_shifting needs mu or image_seq_len")
            mu = calculate_mu(image_seq_len, c)
        sigmas = _time_shift(c, mu, 1.0, sigmas)
    else:
        shift = c["shift"]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if c.get("shift_terminal"):
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - c["shift_terminal"])
        sigmas = 1 - (one_minus_z / scale_factor)
    for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if c.get(k):
            raise NotImplementedError(f"scheduler option {k} is not supported by GLM-Image sampling")
    if c.get("invert_sigmas"):
        raise NotImplementedError("scheduler option invert_sigmas is not supported by GLM-Image sampling")
    sig = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32)
    return torch.cat([sig, torch.zeros(1)])


def mu_for_latent(latent_h: int, latent_w: int, patch_size: int, scheduler_cfg: Optional[dict]) -> float:
    """The time shift for a latent of ``latent_h x latent_w`` cells, with the checkpoint's DiT patch size and
    scheduler config (the one place the sampler, the stock MODEL and GLM-Image Scheduler take it from)."""
    return calculate_mu(image_seq_len(latent_h, latent_w, patch_size), scheduler_cfg)


def glm_schedule(steps: int, scheduler_cfg: Optional[dict], latent_h: int, latent_w: int,
                 patch_size: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(timesteps [N], sigmas [N+1], mu) for a latent of ``latent_h x latent_w``."""
    mu = mu_for_latent(latent_h, latent_w, patch_size, scheduler_cfg)
    return glm_timesteps(steps, scheduler_cfg), glm_sigmas(steps, scheduler_cfg, mu=mu), mu


def unshifted_timestep(sigma: torch.Tensor, scheduler_cfg: Optional[dict], mu: float) -> torch.Tensor:
    """The timestep the official pipeline feeds the DiT (before its ``- 1``) for a shifted sigma:
    the inverse of ``glm_sigmas``' time shift, times ``num_train_timesteps``.

    The pipeline computes integer timesteps first and shifts them into sigmas, so a sampler that
    only knows sigmas (ComfyUI's) needs this inverse. Inverting a float32 sigma loses up to ~2e-4 of
    a timestep; values that land within 2e-3 of an integer (every official schedule's do) snap to it,
    so the stock path feeds the DiT exactly the official timesteps. Other schedules (KSampler's) move
    by at most 2e-3 of 1000 — nothing the DiT can tell apart.
    """
    c = _cfg(scheduler_cfg)
    for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if c.get(k):
            raise NotImplementedError(f"scheduler option {k} is not supported by GLM-Image sampling")
    s = sigma.to(torch.float64)
    if c["use_dynamic_shifting"]:
        kind = c.get("time_shift_type", "exponential")
        if kind not in ("linear", "exponential"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")
        a = mu if kind == "linear" else math.exp(mu)
    else:
        a = float(c["shift"])
    # sigma = a*u / (1 + (a-1)*u)  <=>  u = sigma / (sigma + a*(1 - sigma))   (u: the unshifted fraction)
    u = s / (s + a * (1 - s))
    t = u * float(c["num_train_timesteps"])
    r = torch.round(t)
    t = torch.where((t - r).abs() < 2e-3, r, t)
    return t.to(torch.float32)
