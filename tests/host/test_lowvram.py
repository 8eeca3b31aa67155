"""ComfyUI model management of the pack's networks in the real host (CPU): every network sits in a
ModelPatcher whose size is its parameter bytes, and a partial (lowvram) load through ComfyUI's own
mechanism, with most layers streamed per call by comfy.ops, gives bit-identical AR tokens/logits
and DiT latents to the fully loaded networks.

On a CPU the load and offload devices are the same, so ComfyUI's load_models_gpu always loads
whole; the partial load is driven with the call load_models_gpu makes once it has chosen a budget
(`LoadedModel.model_load(lowvram_model_memory)`), with a budget far below the model size."""
import importlib

import pytest
import torch

import glmtest_host
from glm_image_core.loading import memory_plan

PROMPT = 'a red fox, a sign that says "HI"'


def pack_module(name: str):
    """A submodule of the pack, as ComfyUI's custom-node loader imported it."""
    return importlib.import_module(f"{glmtest_host.PACK_DIR.replace('.', '_x_')}.{name}")


@pytest.fixture(scope="module")
def handles(host, tiny_ckpt):
    loader = pack_module("nodes.loader")
    return loader.load_ar_handle(tiny_ckpt, "default"), loader.load_decoder_handle(tiny_ckpt, "default")


@pytest.fixture(autouse=True)
def clean_model_management(host):
    import comfy.model_management as mm
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what a checkpoint of the network holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def cast_flags(model: torch.nn.Module) -> list:
    return [m.comfy_cast_weights for m in model.modules() if hasattr(m, "comfy_cast_weights")]


def partial_load(patcher, keep: float = 0.5) -> int:
    """Load `patcher` the way load_models_gpu does under --lowvram once it has picked a budget;
    registered with ComfyUI so unload_all_models() undoes it. ComfyUI keeps room for one streamed
    layer (the largest) out of the budget, so the budget is that plus `keep` of the rest."""
    import comfy.model_management as mm
    largest = max(mm.module_size(m) for m in patcher.model.modules() if hasattr(m, "comfy_cast_weights"))
    budget = int(largest + keep * (patcher.model_size() - largest))
    loaded = mm.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=budget)
    mm.current_loaded_models.insert(0, loaded)
    return budget


def test_every_network_is_in_a_model_patcher_sized_by_its_weights(host, handles, tiny_ckpt):
    import comfy.model_patcher
    ar, decoder = handles
    vae = pack_module("nodes.vae_adapter").load_glm_vae(pack_module("glm_image_core.loading.sources").FolderSource(tiny_ckpt))
    patchers = {"AR": ar.model.patcher, "AR vision": ar.vision.patcher, "DiT": decoder.dit.patcher, "glyph encoder": decoder.glyph_encoder.patcher,
                "VAE": vae.patcher}
    for name, p in patchers.items():
        assert isinstance(p, comfy.model_patcher.ModelPatcher), name
        params = sum(t.numel() * t.element_size() for t in p.model.parameters())
        assert p.model_size() == state_bytes(p.model) > 0, name
        # buffers are not weights the plan misses: nothing beyond the parameters but, for the DiT's
        # stock MODEL, ComfyUI's own sigma table (model_sampling.sigmas, 1000 floats)
        tables = sum(t.numel() * t.element_size() for k, t in p.model.state_dict().items() if k.startswith("model_sampling."))
        assert tables == (4000 if name == "DiT" else 0), (name, tables)
        assert p.model_size() == params + tables, (name, p.model_size(), params)
        # the memory plan counts the same elements as the real network
        net = getattr(p, "glm_network", p.model)        # the core network (the DiT's is inside its MODEL)
        assert memory_plan.weight_stats(net).total * next(net.parameters()).element_size() == params, name


def test_ar_partial_load_streams_weights_and_gives_identical_tokens(host, handles):
    from glm_image_core.generation import ar_generate
    ar, _ = handles
    patcher = ar.model.patcher

    def run():
        return ar_generate.generate_tokens(patcher.model, ar.tokenizer, PROMPT, width=256, height=256, seed=7,
                                           device=ar.model.load_device, dtype=ar.model.compute_dtype,
                                           return_logits=True)

    model = ar.model.load()                                      # whole: load_models_gpu
    assert model is patcher.model and patcher.loaded_size() == patcher.model_size()
    assert not any(cast_flags(model))
    full = run()

    import comfy.model_management as mm
    mm.unload_all_models()
    partial_load(patcher, 0.5)
    assert 0 < patcher.loaded_size() < patcher.model_size()
    assert patcher.model.model_lowvram
    flags = cast_flags(patcher.model)
    assert any(flags) and not all(flags), "expected some layers streamed (comfy_cast_weights) and some resident"
    low = run()

    assert torch.equal(full.grid, low.grid)
    assert torch.equal(full.logits, low.logits)

    mm.unload_all_models()                                       # ComfyUI undoes the partial load
    assert not any(cast_flags(patcher.model))


def test_dit_partial_load_streams_weights_and_gives_identical_latents(host, handles):
    from glm_image_core.generation import denoise as dn
    from glm_image_core.generation.tokens import upsample_grid
    _, decoder = handles
    glyph = pack_module("nodes.glyph")
    cond = glyph.encode_glyph(decoder, PROMPT, mode="prompt").embeds
    uncond = glyph.encode_glyph(decoder, "", mode="regions").embeds
    patcher = decoder.dit.patcher
    g = torch.Generator().manual_seed(3)
    H = W = 128
    noise = torch.randn(1, decoder.latent_channels, H // 8, W // 8, generator=g)
    grid = torch.randint(0, decoder.codebook_size, (1, H // 32, W // 32), generator=g)

    def run():
        dtype = decoder.dit.compute_dtype
        return dn.denoise(decoder.dit.network, noise, upsample_grid(grid), cond.to(dtype), uncond.to(dtype), (H, W),
                          3, 1.5, decoder.scheduler_config, compute_dtype=dtype)

    decoder.dit.load()
    assert patcher.loaded_size() == patcher.model_size()
    full = run()

    import comfy.model_management as mm
    mm.unload_all_models()
    partial_load(patcher, 0.3)
    assert 0 < patcher.loaded_size() < patcher.model_size()
    flags = cast_flags(patcher.model)
    assert any(flags) and not all(flags)
    low = run()
    assert torch.equal(full, low)


def test_nothing_streamed_when_the_budget_covers_the_model(host, handles):
    """The control case: a budget above the model size loads it whole (so the partial tests above
    really depend on the budget)."""
    _, decoder = handles
    patcher = decoder.glyph_encoder.patcher
    partial_load(patcher, 10.0)
    assert patcher.loaded_size() == patcher.model_size()
    assert not any(cast_flags(patcher.model))


def test_pack_holds_no_models_in_module_globals(host, handles):
    """Models live only in the handles the loader node returns (ComfyUI's cache owns them)."""
    import sys
    prefix = glmtest_host.PACK_DIR.replace(".", "_x_")
    for name, mod in list(sys.modules.items()):
        if not name.startswith(prefix):
            continue
        for attr, val in vars(mod).items():
            assert not isinstance(val, torch.nn.Module), f"{name}.{attr} holds a network"
            assert type(val).__name__ not in ("ModelPatcher", "LazyComponent", "GLMARModel", "GLMDecoderModel"), \
                f"{name}.{attr} holds a model"


def test_every_network_loads_on_the_main_device_in_every_vram_mode(host, tiny_ckpt):
    """The device policy, for each VRAM state ComfyUI has (set as its main.py sets it from the flags):
    the AR text part, its vision tower, the glyph encoder and the DiT load on ComfyUI's main torch
    device and offload where diffusion models do — never the text-encoder policy, which is the CPU
    under --lowvram/--novram (ComfyUI 0.3.75) and would run a 10B AR there in fp32."""
    import comfy.model_management as mm
    loader = pack_module("nodes.loader")
    old = mm.vram_state
    try:
        for state in mm.VRAMState:
            mm.vram_state = state
            ar, dec = loader.load_ar_handle(tiny_ckpt, "default"), loader.load_decoder_handle(tiny_ckpt, "default")
            for name, comp in (("AR text", ar.model), ("AR vision", ar.vision), ("glyph encoder", dec.glyph_encoder),
                               ("DiT", dec.dit)):
                want = (mm.get_torch_device(), mm.unet_offload_device())
                assert (comp.load_device, comp.offload_device) == want, (state, name)
                assert comp.patcher.load_device == want[0] and comp.patcher.offload_device == want[1], (state, name)
    finally:
        mm.vram_state = old
