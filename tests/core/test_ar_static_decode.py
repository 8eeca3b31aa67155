"""The static decode step built for GPUs (``ar_generate.StaticDecode``), checked on the CPU by
construction: same tokens as the exact step, fixed shapes per cache bucket, no host sync, an op budget,
one graph and no recompile under ``torch.compile(fullgraph=True)`` across whole generations."""
import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glm_image_core.generation import ar_generate
from glm_image_core.networks import ar_model
from glm_image_core.loading.registry import NETWORKS

PROMPT = "A photo of a cat"
# Host reads: each is a device → host sync on a GPU.
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def _static(model, first_row=7, n=40):
    cache = model.new_cache(1, ar_generate.cache_capacity(first_row + n), dtype=torch.float32, device="cpu")
    cols = torch.arange(n).expand(3, 1, n)
    return ar_generate.StaticDecode(model, cache, cols, first_row, torch.float32)


@pytest.mark.parametrize("kw", [dict(width=256, height=256, seed=0), dict(width=320, height=192, seed=3),
                                dict(width=256, height=256, seed=1, batch_size=2),
                                dict(width=256, height=256, seed=2, top_k=50, temperature=1.0, top_p=1.0)])
def test_static_decode_gives_the_exact_tokens(model, tok, kw):
    a = ar_generate.generate_tokens(model, tok, PROMPT, decode="exact", return_logits=True, **kw)
    b = ar_generate.generate_tokens(model, tok, PROMPT, decode="static", return_logits=True, **kw)
    assert torch.equal(a.grid, b.grid) and torch.equal(a.preview, b.preview)
    # attention over the masked cache sums more (zero-weighted) terms: float-rounding-level logits
    # (measured: max |diff| ≈ 1e-5 on logits of magnitude ≈ 10); a real error would be O(1)
    scale = a.logits.abs().max()
    assert (a.logits - b.logits).abs().max() <= 1e-5 * scale, (a.logits - b.logits).abs().max()


def test_static_decode_edit_and_graph_fallback_on_cpu(model, tok):
    ref = [torch.randint(0, model.codebook_size, (8, 8), generator=torch.Generator().manual_seed(5))]
    a = ar_generate.generate_tokens(model, tok, PROMPT, 256, 256, 4, reference_grids=ref, decode="exact")
    b = ar_generate.generate_tokens(model, tok, PROMPT, 256, 256, 4, reference_grids=ref, decode="graphs")
    assert torch.equal(a.grid, b.grid)          # "graphs" on a CPU: the static step, eagerly


def test_cache_capacity_buckets():
    assert [ar_generate.cache_capacity(n) for n in (1, 512, 513, 4400)] == [512, 512, 1024, 4608]


def test_static_decode_step_has_no_host_sync_and_fixed_shapes(model):
    st = _static(model)
    sampler = ar_generate.CodebookSampler(0.9, 0.75, 0, model.text_config.vision_vocab_size, model.codebook_size,
                                          torch.Generator().manual_seed(0), sync_free=True)
    tok = torch.zeros(1, 1, dtype=torch.long)
    shapes = set()
    with torch.no_grad(), OpCounter() as c:
        for _ in range(5):
            logits = st(tok)
            tok = sampler(logits[:, -1])[0][:, None]
            shapes.add(tuple(logits.shape))
    assert not SYNC_OPS & set(c.ops), {k: c.ops[k] for k in SYNC_OPS & set(c.ops)}
    assert shapes == {(1, 1, model.text_config.vision_vocab_size)}
    assert int(st.args["row"]) == 7 + 5 and int(st.args["col"]) == 5   # advanced on the device


# Aten ops (dispatcher calls, views included) of one eager static decode step, per decoder layer and
# outside the layers, as measured (tiny 2-layer model: 185; the 40-layer "deep" one: 3149; the exact
# step: 178 / 3218). The budget is the measurement: an op added to every layer fails here, since 40
# layers turn it into 40 more launches per token.
OPS_PER_LAYER, OPS_OUTSIDE = 78, 29


def test_static_decode_op_budget(model):
    st = _static(model)
    tok = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        st(tok)
        with OpCounter() as c:
            st(tok)
    n = sum(c.ops.values())
    layers = model.text_config.num_layers
    print(f"aten ops in one decode step: {n} ({layers} layers)")
    assert n <= OPS_PER_LAYER * layers + OPS_OUTSIDE, (n, c.ops.most_common(12))


def test_static_decode_compiles_to_one_graph_without_recompiles(model, tok):
    """torch.compile(fullgraph=True) of the step (eager backend: the graph capture is the subject,
    not the code generation): one graph, no break, for a whole 1024² generation and then for an
    image size not seen before that falls in the same cache bucket."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    ar_generate._COMPILED_STEP.clear()
    counters.clear()
    a = ar_generate.generate_tokens(model, tok, PROMPT, 1024, 1024, 0, decode="static", compile="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        b = ar_generate.generate_tokens(model, tok, PROMPT, 1024, 992, 1, decode="static", compile="eager")
    assert ar_generate.cache_capacity(a.num_prompt_tokens + a.num_generated) == \
        ar_generate.cache_capacity(b.num_prompt_tokens + b.num_generated)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    exact = ar_generate.generate_tokens(model, tok, PROMPT, 1024, 992, 1, decode="exact")
    assert torch.equal(b.grid, exact.grid)


def test_one_row_attention_equals_sdpa():
    """The compiler-fusable form of the cache attention (GQA, additive mask, batch 2) against SDPA."""
    from glm_image_core.networks import attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
    mask = torch.zeros(64).masked_fill(torch.arange(64) > 40, float("-inf")).view(1, 1, 1, -1)
    ref = attention.sdpa(q, k, v, mask, 0.3)
    out = attention.one_row_attention(q, k, v, mask, 0.3)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=0, atol=1e-6), (out - ref).abs().max()
    assert torch.equal(attention.cache_attention(q, k, v, mask, 0.3), ref)    # eager: the installed SDPA


def test_compiled_step_fuses_the_attention_and_keeps_the_tokens(model, tok):
    """Traced by torch.compile, the step's attention is products and sums (no SDPA node, which
    inductor could not fuse); inductor's code of that graph gives the exact step's tokens."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ar_generate._COMPILED_STEP.clear()
    exact = ar_generate.generate_tokens(model, tok, PROMPT, 128, 96, 2, decode="exact")
    a = ar_generate.generate_tokens(model, tok, PROMPT, 128, 96, 2, decode="static", compile=record)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "scaled_dot_product" in t], targets
    assert torch.equal(a.grid, exact.grid) and torch.equal(a.preview, exact.preview)
    b = ar_generate.generate_tokens(model, tok, PROMPT, 128, 96, 2, decode="static", compile=True)
    assert torch.equal(b.grid, exact.grid) and torch.equal(b.preview, exact.preview)
    ar_generate._COMPILED_STEP.clear()


def test_key_columns_cache_has_the_same_shape_and_rows_contiguous(model):
    a = model.new_cache(2, 512, dtype=torch.float32, device="cpu")
    b = model.new_cache(2, 512, dtype=torch.float32, device="cpu", key_columns=True)
    assert a.k[0].shape == b.k[0].shape and a.v[0].shape == b.v[0].shape
    assert b.k[0].stride(-2) == 1 and a.k[0].stride(-1) == 1 and b.v[0].stride(-1) == 1
    row = torch.randn(2, a.k[0].shape[1], a.k[0].shape[3])
    a.k[0][:, :, 5] = row
    b.k[0][:, :, 5] = row
    assert torch.equal(a.k[0], b.k[0])
