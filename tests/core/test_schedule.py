"""GLM-Image schedule: mu, unshifted timesteps, shifted sigmas (values from the spec, §4.6 / oracle §3.8)."""
import math

import pytest
import torch

from glm_image_core.generation.schedule import (GLM_IMAGE_SCHEDULER_CONFIG, calculate_mu, glm_schedule, glm_sigmas,
                                     glm_timesteps, image_seq_len, unshifted_timestep)

CFG = {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "time_shift_type": "linear",
       "base_shift": 0.25, "max_shift": 0.75, "base_image_seq_len": 256, "shift": 1.0}


@pytest.mark.parametrize("hw,mu", [((512, 512), 1.75), ((1024, 1024), 3.25), ((2048, 2048), 6.25),
                                   ((64, 64), 0.4375), ((256, 256), 1.0)])
def test_mu_examples(hw, mu):
    seq = image_seq_len(hw[0] // 8, hw[1] // 8, 2)
    assert calculate_mu(seq, CFG) == pytest.approx(mu, abs=1e-12)


def test_mu_1152x768():
    assert calculate_mu(image_seq_len(1152 // 8, 768 // 8), CFG) == pytest.approx(3.0057, abs=1e-4)


def test_mu_reads_config_keys():
    cfg = dict(CFG, base_shift=0.5, max_shift=1.0, base_image_seq_len=1024)
    assert calculate_mu(4096, cfg) == pytest.approx(math.sqrt(4) * 1.0 + 0.5)


def test_timesteps_are_unshifted_integers():
    t50 = glm_timesteps(50, CFG)
    assert t50.dtype == torch.float32 and len(t50) == 50
    assert t50[:3].tolist() == [1000.0, 980.0, 960.0] and t50[-1].item() == 20.0
    t30 = glm_timesteps(30, CFG).tolist()
    assert t30[:3] == [1000.0, 966.0, 933.0] and t30[-1] == 34.0
    assert glm_timesteps(2, CFG).tolist() == [1000.0, 500.0]
    assert glm_timesteps(8, CFG).tolist() == [1000.0 - 125 * i for i in range(8)]
    assert glm_timesteps(3, dict(CFG, num_train_timesteps=500)).tolist() == [500.0, 333.0, 167.0]


def test_sigmas_worked_values():
    s = glm_sigmas(2, CFG, image_seq_len=image_seq_len(8, 8))        # 64x64, mu 0.4375
    assert s.dtype == torch.float32 and len(s) == 3
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert s[1].item() == pytest.approx(0.30435, abs=1e-5)
    s = glm_sigmas(2, CFG, image_seq_len=image_seq_len(8, 12))       # 64x96
    assert s[1].item() == pytest.approx(0.3242, abs=1e-4)


def test_sigmas_linear_shift_formula_and_identity_at_mu_1():
    ts = glm_timesteps(8, CFG).double() / 1000
    for mu in (0.7, 1.75, 3.25):
        s = glm_sigmas(8, CFG, mu=mu).double()[:-1]
        assert torch.allclose(s, mu / (mu + 1 / ts - 1), atol=1e-6)
        assert torch.allclose(s, mu * ts / (1 + (mu - 1) * ts), atol=1e-6)
    assert torch.allclose(glm_sigmas(8, CFG, mu=1.0)[:-1].double(), ts, atol=1e-7)


def test_sigmas_exponential_shift():
    cfg = dict(CFG, time_shift_type="exponential")
    ts = glm_timesteps(5, cfg).double() / 1000
    mu = 1.2
    s = glm_sigmas(5, cfg, mu=mu).double()[:-1]
    assert torch.allclose(s, math.exp(mu) / (math.exp(mu) + 1 / ts - 1), atol=1e-6)


def test_sigmas_static_shift_without_dynamic_shifting():
    cfg = dict(CFG, use_dynamic_shifting=False, shift=3.0)
    ts = glm_timesteps(6, cfg).double() / 1000
    s = glm_sigmas(6, cfg).double()[:-1]               # no mu needed
    assert torch.allclose(s, 3 * ts / (1 + 2 * ts), atol=1e-6)


def test_dynamic_shifting_needs_mu_or_seq():
    with pytest.raises(ValueError):
        glm_sigmas(4, CFG)
    with pytest.raises(ValueError):
        glm_sigmas(0, CFG, mu=1.0)


def test_schedule_helper_and_official_defaults():
    ts, sig, mu = glm_schedule(4, GLM_IMAGE_SCHEDULER_CONFIG, 128, 128, 2)
    assert mu == pytest.approx(3.25)
    assert ts.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert len(sig) == 5 and sig[-1] == 0 and bool((sig[:-1] > sig[1:]).all())
    # the shift pushes sigmas up for large images
    assert bool((sig[1:-1] > ts[1:] / 1000).all())


@pytest.mark.parametrize("steps", [1, 2, 7, 30, 50])
@pytest.mark.parametrize("hw", [(32, 32), (64, 48), (128, 128), (256, 256)])
def test_unshifted_timestep_inverts_the_official_sigmas_exactly(steps, hw):
    """The stock sampler path only knows sigmas: from them it gets back exactly the integer timesteps
    the pipeline feeds the DiT (float32 sigmas, snapped to the integer they round to)."""
    ts, sig, mu = glm_schedule(steps, GLM_IMAGE_SCHEDULER_CONFIG, *hw, 2)
    assert torch.equal(unshifted_timestep(sig[:-1], GLM_IMAGE_SCHEDULER_CONFIG, mu), ts)


@pytest.mark.parametrize("cfg,mu", [(dict(CFG, time_shift_type="exponential"), 0.8),
                                    (dict(CFG, use_dynamic_shifting=False, shift=3.0), None)])
def test_unshifted_timestep_inverts_the_other_shifts(cfg, mu):
    ts = glm_timesteps(20, cfg)
    sig = glm_sigmas(20, cfg, mu=mu)[:-1]
    assert torch.equal(unshifted_timestep(sig, cfg, mu), ts)


def test_unshifted_timestep_keeps_sigmas_off_the_official_grid():
    """A KSampler schedule's sigma between two official ones maps to a fractional timestep (not snapped)."""
    mu = 3.25
    u = torch.tensor([0.5005, 0.1234567])
    sig = (mu * u / (1 + (mu - 1) * u)).float()
    t = unshifted_timestep(sig, GLM_IMAGE_SCHEDULER_CONFIG, mu)
    assert torch.allclose(t, u * 1000, atol=1e-3) and t[0] != torch.round(t[0])
