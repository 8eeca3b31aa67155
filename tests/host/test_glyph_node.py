"""GLM-Image Glyph Text Regions in the real ComfyUI host.

- explicit regions (one per line) with the default's spans give the identical latent as no glyph input;
- empty text is the unconditional glyph ([""]), the same as the default negative glyph;
- the node's UI text lists the spans;
- awkward text (unmatched quotes, emoji, 10,000 characters) encodes like the official pipeline
  (`_get_glyph_embeds`, truncated to 2048 ByT5 tokens) without crashing.
"""
import pytest
import torch

import glmtest_host
import glmtest_oracle

PROMPT = 'A poster with the words "GLM" and "Image" on a red wall'
SPANS = ["GLM", "Image"]
REGIONS, QUOTED = "one region per line", "quoted spans of the text"
W, H, SEED, STEPS, CFG = 256, 256, 4, 2, 1.5
LOADER = {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}}


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return glmtest_oracle.load_reference_pipeline(tiny_ckpt)


def glyph_node(text, mode):
    return {"class_type": "GLMImageGlyphText", "inputs": {"decoder": ["1", 1], "text": text, "mode": mode}}


def latent_node(**extra):
    inputs = {"decoder": ["1", 1], "tokens": ["2", 0], "seed": SEED, "steps": STEPS, "cfg": CFG}
    inputs.update({k: [v, 0] for k, v in extra.items()})
    return {"class_type": "GLMImageTokensToLatent", "inputs": inputs}


def test_explicit_regions_give_identical_latent(host):
    g = {
        "1": LOADER,
        "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": PROMPT, "width": W,
              "height": H, "seed": SEED, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
        "10": glyph_node("\n".join(SPANS), REGIONS),
        "11": glyph_node(PROMPT, QUOTED),
        "12": glyph_node("", REGIONS),
        "20": latent_node(),                                  # default: quoted spans of the tokens' prompt
        "21": latent_node(glyph="10"),
        "22": latent_node(glyph="11"),
        "23": latent_node(glyph="10", negative_glyph="12"),   # explicit empty negative = the default
        "24": latent_node(glyph="12"),                        # no glyph text at all
    }
    for n in ("20", "21", "22", "23", "24"):                 # make every latent node an output's ancestor
        g["9" + n] = {"class_type": "VAEDecode", "inputs": {"samples": [n, 0], "vae": ["1", 2]}}
        g["99" + n] = {"class_type": "PreviewImage", "inputs": {"images": ["9" + n, 0]}}
    res = host.run_ok(g)
    lat = {n: glmtest_host.node_output(host, n)["samples"] for n in ("20", "21", "22", "23", "24")}
    assert torch.equal(lat["20"], lat["21"]), "explicit regions differ from the default quoted spans"
    assert torch.equal(lat["20"], lat["22"])
    assert torch.equal(lat["21"], lat["23"]), "explicit empty negative glyph differs from the default"
    assert not torch.equal(lat["20"], lat["24"]), "glyph conditioning has no effect"

    regions, quoted, empty = (glmtest_host.node_output(host, n) for n in ("10", "11", "12"))
    assert regions.spans == quoted.spans == SPANS
    assert torch.equal(regions.embeds, quoted.embeds)
    assert empty.spans == [""]
    ui_text = "\n".join(res["outputs"]["10"]["text"])
    assert all(repr(s) in ui_text for s in SPANS), ui_text
    assert "no glyph" in "\n".join(res["outputs"]["12"]["text"])


AWKWARD = {
    "unmatched_quote": 'a sign that says "OPEN and a "second one" plus "trailing',
    "emoji": 'a neon sign "I ❤️ 🍕 GLM" and “curly” quotes',
    "ten_thousand": '"' + ("GLM-Image renders text. " * 400)[:10000] + '"',
}


@pytest.mark.parametrize("case", list(AWKWARD))
def test_awkward_text_encodes_like_the_pipeline(host, pipe, case):
    prompt = AWKWARD[case]
    g = {"1": LOADER, "10": glyph_node(prompt, QUOTED),
         "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}}}   # an output node, so 10 runs
    host.run_ok(g)
    ours = glmtest_host.node_output(host, "10")
    assert ours.spans == (pipe.get_glyph_texts(prompt)[0] or [""])
    with torch.no_grad():
        ref = pipe._get_glyph_embeds(prompt, device=torch.device("cpu"), dtype=torch.float32)
    assert ours.embeds.shape == ref.shape
    if case == "ten_thousand":
        assert ref.shape[1] == 2048, "the pipeline truncates each glyph text to 2048 ByT5 tokens"
    diff = (ours.embeds.float() - ref.float()).abs().max().item()
    print(f"\n{case}: spans {[s[:20] for s in ours.spans]}, glyph embeds max abs diff vs pipeline = {diff:.3g}")
    assert diff <= 1e-5, f"glyph embeds differ from the pipeline's by {diff}"

    # the same spans given explicitly, one per line, encode identically
    if all(s.strip() and "\n" not in s for s in ours.spans):
        host.run_ok({"1": LOADER, "12": glyph_node("\n".join(ours.spans), REGIONS),
                     "13": {"class_type": "PreviewAny", "inputs": {"source": ["12", 0]}}})
        regions = glmtest_host.node_output(host, "12")
        assert regions.spans == ours.spans and torch.equal(regions.embeds, ours.embeds)
