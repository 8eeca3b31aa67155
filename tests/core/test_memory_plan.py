"""glm_image_core.loading.memory_plan: the parameter counts equal the real networks', the fp8 bytes follow
the loaders' fp8 rule, the activation estimates grow with what they model, and a run's peak is
the largest stage. bench/memory.py's plan runs end to end on a small config."""
import json
import os
import subprocess
import sys

import pytest
import torch

from glm_image_core.loading import memory_plan as mp
from glm_image_core.loading.registry import NETWORKS
from glm_image_core.testing.tiny_checkpoint import configs_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def configs():
    files = configs_for("tiny")
    return {c: files[NETWORKS[c].config_file] for c in mp.NETWORK_IDS}


@pytest.fixture(scope="module")
def stats(configs):
    return mp.component_stats(configs)


@pytest.fixture(scope="module")
def real_models(configs):
    """The networks with real (CPU) parameters, built the default way."""
    return {c: NETWORKS[c].skeleton(configs[c], device="cpu") for c in mp.NETWORK_IDS}


def test_parameter_counts_equal_the_real_networks(stats, real_models):
    for c, m in real_models.items():
        n_state = sum(t.numel() for t in m.state_dict().values())
        assert stats[c].total == n_state == sum(p.numel() for p in m.parameters()), c
        assert stats[c].bytes("fp32") == sum(t.numel() * t.element_size() for t in m.state_dict().values()), c
        assert stats[c].bytes("bf16") * 2 == stats[c].bytes("fp32"), c


def test_fp8_bytes_follow_the_loader_rule(stats, real_models):
    """fp8: one byte per weight matched by the registry entry's fp8_keys (2-D Linear weights of the
    repeated blocks), the compute dtype for everything else; glyph encoder and VAE have none."""
    from glm_image_core.loading import checkpoint as ckpt
    for c, m in real_models.items():
        keys = NETWORKS[c].fp8_keys
        rule = ckpt.storage_dtypes(torch.float8_e4m3fn, keys, torch.bfloat16) if keys is not None else None
        fp8 = other = 0
        for k, t in m.state_dict().items():
            dt = rule(k, t) if rule is not None else None
            if dt == torch.float8_e4m3fn:
                fp8 += t.numel()
                assert isinstance(m.get_submodule(k.rsplit(".", 1)[0]), torch.nn.Linear), k
            else:
                other += t.numel()
        assert (stats[c].fp8able, stats[c].other) == (fp8, other), c
        assert stats[c].bytes("fp8") == fp8 * 1 + other * 2, c
    assert stats["ar"].fp8able > 0 and stats["dit"].fp8able > 0
    assert stats["glyph_encoder"].fp8able == stats["vae"].fp8able == 0


def test_full_size_counts_match_the_published_sizes():
    st = mp.component_stats(mp.full_size_configs())      # meta device: no memory
    # architecture spec §2: AR 10.114B (incl. post_quant_conv, not built: 2048*1536+1536),
    # DiT 6.927B, ByT5 encoder ~218M, VAE 406M
    assert abs(st["ar"].total + 2048 * 1536 + 1536 - 10.114e9) < 0.001e9
    assert abs(st["dit"].total - 6.927e9) < 0.001e9
    assert abs(st["glyph_encoder"].total - 0.218e9) < 0.001e9
    assert abs(st["vae"].total - 0.406e9) < 0.001e9
    assert st["ar"].largest_layer_name.endswith("mlp.gate_up_proj")   # not the embedding
    assert st["ar"].unused_in_t2i > 1e9                               # vision tower + VQ


def test_activation_estimates_grow_with_what_they_model(configs):
    t = configs["ar"]["text_config"]
    assert mp.ar_activation_bytes(t, 100, 512, 512) < mp.ar_activation_bytes(t, 100, 1024, 1024)
    assert mp.ar_activation_bytes(t, 100, 512, 512) < mp.ar_activation_bytes(t, 1000, 512, 512)
    assert mp.ar_activation_bytes(t, 100, 512, 512, batch=1) < mp.ar_activation_bytes(t, 100, 512, 512, batch=2)
    d = configs["dit"]
    one = mp.dit_activation_bytes(d, 512, 512, 16, passes=1)
    assert one < mp.dit_activation_bytes(d, 512, 512, 16, passes=2) < mp.dit_activation_bytes(d, 1024, 1024, 16)
    assert one < mp.dit_activation_bytes(d, 512, 512, 16, passes=1, reference_tokens=1024)
    assert mp.dit_activation_bytes(d, 512, 512, 16, dtype_bytes=4) > mp.dit_activation_bytes(d, 512, 512, 16)
    v = configs["vae"]
    assert mp.vae_decode_activation_bytes(v, 512, 512) * 3 < mp.vae_decode_activation_bytes(v, 1024, 1024)
    ar = configs["ar"]
    assert 0 < mp.vision_activation_bytes(ar, 64) < mp.vision_activation_bytes(ar, 1024)
    # the VQ step holds [patches, codebook] distances: at least that many bytes
    assert mp.vision_activation_bytes(ar, 1024) >= 1024 * ar["vq_config"]["num_embeddings"] * 2


def test_ar_kv_cache_term_is_exact():
    """The KV-cache part of the AR estimate is the cache generate_tokens allocates (the static
    decode's bucketed capacity, the larger of its two modes)."""
    from glm_image_core.generation.ar_generate import cache_capacity
    from glm_image_core.networks.ar_model import KVCache, TextConfig
    t = mp.full_size_configs()["ar"]["text_config"]
    c = TextConfig.from_dict(t)
    L, n_gen = mp.ar_sequence(100, 1024, 1024)
    assert n_gen == 32 * 32 + 16 * 16
    meta = KVCache(c.num_layers, 1, c.num_kv_heads, cache_capacity(L + n_gen), c.head_dim, torch.bfloat16, "meta")
    kv_bytes = sum(t.numel() for t in meta.k + meta.v) * 2
    base = mp.ar_activation_bytes(t, 100, 1024, 1024)
    assert base > kv_bytes
    assert mp.ar_activation_bytes(t, 100, 1024, 1024, batch=2) - base >= kv_bytes


def test_run_peak_is_the_largest_stage(configs, stats):
    for wd in ("bf16", "fp8", "fp32"):
        plan = mp.plan_run(configs, stats, wd, 512, 512)
        assert [s.component for s in plan.stages] == ["ar", "glyph_encoder", "dit", "vae"]
        assert plan.peak_full == max(s.weights + s.activations + s.cast_buffer for s in plan.stages)
        assert plan.peak_lowvram() == max(s.lowvram() for s in plan.stages)
        assert plan.card_full == max(s.card_full() for s in plan.stages)
        for s in plan.stages:
            assert s.lowvram() <= s.full, (wd, s.name)
        d = plan.to_dict()
        assert d["peak_full"] == plan.peak_full and len(d["stages"]) == 4
    bf16, fp8 = (mp.plan_run(configs, stats, wd, 512, 512) for wd in ("bf16", "fp8"))
    # fp8 stores the fp8-able weights in 1 byte and casts one layer at a time to bf16
    for a, b in zip(bf16.stages, fp8.stages):
        st = stats[a.network or a.component]
        assert a.weights - b.weights == st.fp8able, a.name
        assert b.cast_buffer == st.largest_fp8_layer * 2
    assert fp8.stages[1].weight_dtype == fp8.stages[3].weight_dtype == "bf16"   # glyph encoder, VAE


def test_ar_stage_counts_only_the_text_part_and_an_edit_adds_the_vision_part(configs, stats):
    text, vision, full = stats[mp.AR_TEXT], stats[mp.AR_VISION], stats["ar"]
    assert text.total + vision.total == full.total and text.fp8able + vision.fp8able == full.fp8able
    assert vision.total == full.unused_in_t2i > 0 and text.unused_in_t2i == 0
    for wd in ("bf16", "fp8"):
        t2i = mp.plan_run(configs, stats, wd, 512, 512)
        assert t2i.stages[0].network == mp.AR_TEXT and t2i.stages[0].weights == text.bytes(wd)
        edit = mp.plan_run(configs, stats, wd, 512, 512, reference=(256, 192))
        v = edit.stages[0]
        assert (v.component, v.network, v.weights) == ("ar", mp.AR_VISION, vision.bytes(wd))
        # a 256×192 reference is 8×6 AR tokens; bf16 activations for both weight dtypes
        assert v.activations == mp.vision_activation_bytes(configs["ar"], 8 * 6, 2)
        assert [s.name for s in edit.stages[1:]] == [s.name for s in t2i.stages]


def test_settings_table_prefers_the_lightest_setting_that_fits():
    cf = mp.full_size_configs()
    st = mp.component_stats(cf)
    plans = {wd: mp.plan_run(cf, st, wd) for wd in ("bf16", "fp8")}
    assert plans["bf16"].peak_full > plans["fp8"].peak_full > plans["fp8"].peak_lowvram()
    assert mp.settings_for_card(plans, 80).startswith("bf16")
    assert mp.settings_for_card(plans, plans["bf16"].card_full / mp.GIB - 0.1).startswith("fp8_e4m3fn weights, all")
    assert "partial" in mp.settings_for_card(plans, plans["fp8"].card_full / mp.GIB - 0.1)
    assert mp.settings_for_card(plans, 1).startswith("not enough")


def test_bench_memory_plan_runs_and_writes_json(tmp_path):
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "memory.py"), "--size", "tiny", "--plan-only",
                        "--json", str(out), "--markdown", str(tmp_path / "memory.md")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "GPU memory" in r.stdout and "| AR model |" in r.stdout
    data = json.loads(out.read_text())
    assert set(data["plans"]) == {"bf16", "fp8"}
    assert data["plans"]["bf16"]["peak_full"] == max(s["full"] for s in data["plans"]["bf16"]["stages"])
    assert data["parameters"]["dit"]["total"] > 0
