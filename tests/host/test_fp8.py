"""fp8 weight storage and compute dtypes in the real host (CPU).

fp8 (e4m3fn / e5m2) stores only the Linear weights of the DiT's and AR's repeated blocks; biases,
norms, embeddings, the timestep/condition MLPs and the output heads stay in the compute dtype.
The stored values are exactly ``w.to(fp8)``; the modules keep them in fp8 and ComfyUI's
``comfy.ops`` manual cast runs each layer in the compute dtype (fp32 on a CPU by default, or what
the loader's compute_dtype asks)."""
import importlib
import re

import pytest
import torch

import glmtest_host
from glm_image_core.loading import checkpoint as ckpt

PROMPT = 'a red fox, a sign that says "HI"'
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DIT_BLOCK_LINEAR = re.compile(r"transformer_blocks\.\d+\..+\.weight$")
AR_BLOCK_LINEAR = re.compile(r"model\.(language_model\.layers|visual\.blocks)\.\d+\.(self_attn|mlp|attn)\.\w+\.weight$")


def pack_module(name: str):
    return importlib.import_module(f"{glmtest_host.PACK_DIR.replace('.', '_x_')}.{name}")


@pytest.fixture(autouse=True)
def clean_model_management(host):
    import comfy.model_management as mm
    mm.unload_all_models()
    yield
    mm.unload_all_models()


@pytest.fixture(scope="module")
def reference_weights(tiny_ckpt):
    return {"dit": ckpt.load_component(tiny_ckpt, "transformer")[1],
            "ar": ckpt.load_component(tiny_ckpt, "vision_language_encoder")[1]}


def check_storage(model: torch.nn.Module, reference: dict, fp8: torch.dtype, is_block_linear, compute: torch.dtype):
    """Block Linear weights are exactly the fp32 weights rounded to fp8; everything else is the
    reference value in the compute dtype."""
    n_fp8 = 0
    for k, t in model.state_dict().items():
        ref = reference[k]
        if is_block_linear(k):
            assert t.dtype == fp8, k
            assert torch.equal(t.view(torch.uint8), ref.to(fp8).view(torch.uint8)), f"{k}: not w.to(fp8)"
            n_fp8 += t.numel()
        else:
            assert t.dtype == compute, (k, t.dtype)
            assert torch.equal(t, ref.to(compute)), k
    return n_fp8


@pytest.mark.parametrize("name", list(FP8))
def test_fp8_storage_is_exact_rounding_and_only_block_linears(host, tiny_ckpt, reference_weights, name):
    loader = pack_module("nodes.loader")
    fp8 = FP8[name]
    ar, decoder = loader.load_ar_handle(tiny_ckpt, name), loader.load_decoder_handle(tiny_ckpt, name)
    dit = decoder.dit.network
    assert decoder.dit.compute_dtype == torch.float32             # CPU: ComfyUI picks fp32 compute for fp8
    n = check_storage(dit, reference_weights["dit"], fp8, lambda k: DIT_BLOCK_LINEAR.match(k) is not None, torch.float32)
    assert n == sum(t.numel() for k, t in dit.state_dict().items() if DIT_BLOCK_LINEAR.match(k)) > 0
    # the per-layer cast is ComfyUI's (manual_cast), not a hand-made one
    blk = dit.transformer_blocks[0].attn1.to_q
    assert blk.comfy_cast_weights and blk.weight.dtype == fp8 and blk.bias.dtype == torch.float32
    arm = ar.model.patcher.model
    n = check_storage(arm, reference_weights["ar"], fp8, lambda k: AR_BLOCK_LINEAR.match(k) is not None, torch.float32)
    assert n > 0
    lm = arm.language_model.layers[0]
    assert lm.input_layernorm.weight.dtype == torch.float32 and lm.self_attn.q_proj.weight.dtype == fp8
    assert arm.lm_head.weight.dtype == torch.float32
    # the glyph encoder is never fp8
    assert {p.dtype for p in decoder.glyph_encoder.patcher.model.parameters()} == {torch.float32}


def capture_input_dtypes(module: torch.nn.Module, seen: list):
    return module.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))


@pytest.mark.parametrize("compute_name,compute", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_fp8_dit_runs_in_the_compute_dtype_close_to_fp32(host, tiny_ckpt, compute_name, compute):
    """fp8 storage + compute dtype through the real denoiser: the block Linears see activations in
    the compute dtype, the result stays close to the fp32 network's.

    Tolerance, from the measurement: 0.65% (fp32 compute) and 0.83% (bf16 compute) relative error of
    the latent (deterministic on the CPU: fixed random weights, fixed noise), bounded at 2× that. The
    analytic ceiling (e4m3's 3 mantissa bits move each weight matrix by ≈ 2.7%, 2 blocks of 6
    matrices) would allow ≈ 19% of the velocity: far looser than what this path does."""
    from glm_image_core.generation import denoise as dn
    from glm_image_core.generation.tokens import upsample_grid
    loader = pack_module("nodes.loader")
    glyph = pack_module("nodes.glyph")
    ref_dec = loader.load_decoder_handle(tiny_ckpt, "fp32")
    dec = loader.load_decoder_handle(tiny_ckpt, "fp8_e4m3fn", compute_name)
    g = torch.Generator().manual_seed(3)
    H = W = 128
    noise = torch.randn(1, dec.latent_channels, H // 8, W // 8, generator=g)
    grid = torch.randint(0, dec.codebook_size, (1, H // 32, W // 32), generator=g)

    def run(d):
        dtype = d.dit.compute_dtype
        cond = glyph.encode_glyph(d, PROMPT, mode="prompt").embeds
        uncond = glyph.encode_glyph(d, "", mode="regions").embeds
        model = d.dit.load()
        return dn.denoise(model, noise, upsample_grid(grid), cond.to(dtype), uncond.to(dtype), (H, W), 2, 1.5,
                          d.scheduler_config, compute_dtype=dtype)

    ref = run(ref_dec)
    assert dec.dit.compute_dtype == compute
    seen = []
    hook = capture_input_dtypes(dec.dit.network.transformer_blocks[0].ff.net[2], seen)
    try:
        out = run(dec)
    finally:
        hook.remove()
    assert seen and all(i == compute and o == compute for i, o in seen), seen[:3]
    assert dec.dit.network.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert torch.isfinite(out).all()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    bound = 2 * (0.0065 if compute == torch.float32 else 0.0083)     # 2× the measured error
    print(f"fp8 DiT latent relative error ({compute_name} compute): {rel:.4f}")
    assert 0 < rel < bound, rel


def test_fp8_ar_logits_close_to_fp32(host, tiny_ckpt, reference_weights):
    """The AR with fp8 block weights (fp32 compute on CPU): the prefill logits stay close to the
    fp32 model's, and further from them than with bf16 storage (so the check sees the rounding).

    Tolerance, from the measurement: 8.3% relative error of the prefill logits (deterministic on the
    CPU), bounded at 1.5× that, 12.5%. For scale: the fp8 rounding moves each block weight matrix by
    eps ≈ 2.6% (relative norm, computed below) and the text path multiplies through 12 of them, whose
    errors add about in quadrature: sqrt(12)·eps ≈ 9%."""
    from glm_image_core.generation import ar_generate
    loader = pack_module("nodes.loader")

    def prefill_logits(handle):
        model = handle.model.load()
        res = ar_generate.generate_tokens(model, handle.tokenizer, PROMPT, width=256, height=256, seed=7,
                                          device=handle.model.load_device, dtype=handle.model.compute_dtype,
                                          return_logits=True)
        return res.logits[:, 0], res.grid

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    ref, _ = prefill_logits(loader.load_ar_handle(tiny_ckpt, "fp32"))
    bf16, _ = prefill_logits(loader.load_ar_handle(tiny_ckpt, "bf16"))
    fp8_handle = loader.load_ar_handle(tiny_ckpt, "fp8_e4m3fn")
    assert fp8_handle.model.compute_dtype == torch.float32
    logits, grid = prefill_logits(fp8_handle)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    w = [t for k, t in reference_weights["ar"].items() if AR_BLOCK_LINEAR.match(k) and "language_model" in k]
    eps = (sum((t.to(torch.float8_e4m3fn).float() - t).norm() ** 2 for t in w) / sum(t.norm() ** 2 for t in w)) ** 0.5
    err, err_bf16 = rel(logits, ref), rel(bf16, ref)
    print(f"fp8 AR prefill logits relative error: {err:.4f} (bf16 storage: {err_bf16:.5f}; weight eps {eps:.4f})")
    assert err_bf16 < err < 1.5 * 0.083, (err, err_bf16, eps)
    assert int(grid.max()) < fp8_handle.codebook_size


def test_compute_dtype_input_is_validated_and_passed(host):
    prompt = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "fp8_e5m2",
                                                              "compute_dtype": "fp64"}},
              "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": "a cat", "width": 256,
                    "height": 256, "seed": 0, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
              "3": {"class_type": "GLMImageSaveTokens", "inputs": {"tokens": ["2", 0], "filename_prefix": "t"}}}
    ok, res = host.run(prompt)
    assert not ok
    assert "compute_dtype must be one of auto, bf16, fp16, fp32" in str(res["node_errors"])
    prompt["1"]["inputs"]["compute_dtype"] = "bf16"
    host.run_ok(prompt)
    ar = glmtest_host.node_output(host, "1", 0)
    assert ar.model.compute_dtype == torch.bfloat16
    assert ar.model.patcher.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e5m2
    assert ar.model.patcher.model.language_model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
