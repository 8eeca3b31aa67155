"""Glyph path vs the reference: T5 encoder vs transformers T5EncoderModel, tokenizer ids vs
transformers ByT5Tokenizer, glyph embeddings vs GlmImagePipeline._get_glyph_embeds / encode_prompt."""
import warnings

import pytest
import torch

import glmtest_oracle
from glm_image_core.generation.glyph_text import ByT5Tokenizer, encode_glyph_batch, encode_glyph_texts, extract_glyph_texts, glyph_for_prompt, load_glyph_tokenizer, uncond_glyph
from glm_image_core.loading.registry import NETWORKS

TOL = 1e-5

TEXTS = ["", "hello", "Hi", "a sign 'Hi' and “Yo”", "héllo wörld", "😀🎉", "世界你好", "x </s> y", "<pad>a",
         "a <extra_id_0> b <extra_id_124>", " </s>", "<unk> <unk>", "  spaced  <pad>  ", "tab\tnew\nline",
         "a" * 3000, "ab</s>"]

PROMPTS = {
    0: "a cat on a mat",
    1: 'a sign that says "hello"',
    2: "a sign 'Hi' and “Yo” on a wall",
    3: "「开业大吉」 poster with 'SALE' and \"50% off\"",
}


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return glmtest_oracle.load_reference_pipeline(tiny_ckpt)


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return NETWORKS["glyph_encoder"].load(f"{tiny_ckpt}/text_encoder"), load_glyph_tokenizer(f"{tiny_ckpt}/tokenizer")


def _diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_transformers(pipe, ours, text):
    from transformers import ByT5Tokenizer as HFByT5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_folder = pipe.tokenizer([text], max_length=2048, truncation=True).input_ids[0]
        ref_default = HFByT5()([text], max_length=2048, truncation=True).input_ids[0]
        assert ours[1].encode(text) == ref_folder
        assert ByT5Tokenizer().encode(text) == ref_default


def test_state_dict_keys(pipe, ours):
    ref_keys = set(pipe.text_encoder.state_dict()) - {"encoder.embed_tokens.weight"}
    assert set(ours[0].state_dict()) == ref_keys


@torch.no_grad()
@pytest.mark.parametrize("lengths", [[5], [4, 4], [3, 9, 1], [17, 2], [300, 150]])
def test_t5_encoder_matches_transformers(pipe, ours, lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    n = max(lengths)
    ids = torch.randint(3, 384, (len(lengths), n), generator=g)
    mask = torch.tensor([[1] * k + [0] * (n - k) for k in lengths])
    ids = ids * mask
    a = pipe.text_encoder(ids, attention_mask=mask).last_hidden_state
    b = ours[0](ids, attention_mask=mask)
    assert _diff(a[mask.bool()], b[mask.bool()]) <= TOL
    assert _diff(a, b) <= TOL                             # padded rows too
    a = pipe.text_encoder(ids).last_hidden_state           # no mask at all
    assert _diff(a, ours[0](ids)) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("n_spans", sorted(PROMPTS))
def test_glyph_embeds_match_pipeline(pipe, ours, n_spans):
    prompt = PROMPTS[n_spans]
    spans = extract_glyph_texts(prompt)
    assert len(spans) == max(n_spans, 1)
    ref = pipe._get_glyph_embeds(prompt, 2048, torch.device("cpu"), torch.float32)
    out = glyph_for_prompt(*ours, prompt, "cpu", torch.float32)
    assert out.shape == ref.shape
    assert _diff(ref, out) <= TOL
    # encode_prompt (cond + uncond) as the pipeline calls it
    pe, ne = pipe.encode_prompt(prompt, True, device=torch.device("cpu"), dtype=torch.float32)
    assert _diff(pe, out) <= TOL
    un = uncond_glyph(*ours, "cpu", torch.float32)
    assert un.shape == ne.shape == (1, 1, pipe.text_encoder.config.d_model)
    assert _diff(ne, un) <= TOL


@torch.no_grad()
def test_even_span_prefix_in_pipeline_too(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = pipe.tokenizer(["Hi", "Yo"], max_length=2048, truncation=True).input_ids
    ids = [[pipe.tokenizer.pad_token_id] * ((len(ids) + 1) % 2) + x for x in ids]
    assert ids == [[0, 75, 108, 1], [0, 92, 114, 1]]


@torch.no_grad()
def test_batch_left_padding_matches_pipeline(pipe, ours):
    prompts = [PROMPTS[k] for k in sorted(PROMPTS)]
    ref = pipe._get_glyph_embeds(prompts, 2048, torch.device("cpu"), torch.float32)
    out = encode_glyph_batch(*ours, prompts, "cpu", torch.float32)
    assert out.shape == ref.shape
    assert _diff(ref, out) <= TOL


@torch.no_grad()
def test_texts_api_and_dtype(ours):
    e = encode_glyph_texts(*ours, ["Hi", "Yo"], "cpu", torch.bfloat16)
    assert e.dtype == torch.bfloat16 and e.shape[:2] == (1, 8)


def test_tokenizer_honours_folder_strip_flags(tmp_path, tiny_ckpt):
    """Added-token lstrip/rstrip come from tokenizer_config.json (transformers does the same)."""
    import json
    import shutil
    from transformers import ByT5Tokenizer as HFByT5
    d = tmp_path / "tokenizer"
    shutil.copytree(f"{tiny_ckpt}/tokenizer", d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for k in ("0", "1", "2"):
        cfg["added_tokens_decoder"][k].update(lstrip=False, rstrip=False)
    cfg["added_tokens_decoder"]["259"].update(lstrip=True, rstrip=True)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref, ours = HFByT5.from_pretrained(str(d)), load_glyph_tokenizer(str(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in ["x </s> y", " <pad> a", "a  <extra_id_0>  b", "q <unk>", "<extra_id_0> x"]:
            assert ours.encode(text) == ref([text]).input_ids[0], text
