"""The pack loads in the real ComfyUI host and registers the node contract."""
import glmtest_host


def test_every_contract_node_is_registered(host):
    for node_id in glmtest_host.PACK_NODE_IDS:
        assert node_id in host.nodes.NODE_CLASS_MAPPINGS, node_id


def test_contract_inputs_and_types(host):
    info = {n: host.node_class(n).INPUT_TYPES() for n in glmtest_host.PACK_NODE_IDS}
    req = lambda n: info[n]["required"]
    opt = lambda n: info[n].get("optional", {})
    assert set(req("GLMImageLoader")) == {"model", "weight_dtype"}
    assert "GLM-Image-tiny" in req("GLMImageLoader")["model"][1]["options"] or \
        "GLM-Image-tiny" in req("GLMImageLoader")["model"][0]
    assert {"ar", "prompt", "width", "height", "seed", "temperature", "top_p", "top_k", "batch_size"} <= set(req("GLMImageTextToTokens"))
    assert opt("GLMImageTextToTokens")["reference"][0] == "GLM_REFERENCE"
    w = req("GLMImageTextToTokens")["width"][1]
    assert (w["default"], w["min"], w["max"], w["step"]) == (1024, 256, 2048, 32)
    assert req("GLMImageTextToTokens")["temperature"][1]["default"] == 0.9
    assert req("GLMImageTextToTokens")["top_p"][1]["default"] == 0.75
    assert req("GLMImageTextToTokens")["top_k"][1]["default"] == 0
    assert {"decoder", "tokens", "seed", "steps", "cfg"} <= set(req("GLMImageTokensToLatent"))
    assert req("GLMImageTokensToLatent")["steps"][1]["default"] == 30
    assert req("GLMImageTokensToLatent")["cfg"][1]["default"] == 1.5
    assert opt("GLMImageTokensToLatent")["glyph"][0] == "GLM_GLYPH"
    assert opt("GLMImageTokensToLatent")["reference"][0] == "GLM_REFERENCE"
    assert {"ar", "decoder", "vae", "image"} <= set(req("GLMImageReferenceEdit"))
    assert {"decoder", "text"} <= set(req("GLMImageGlyphText"))
    cls = host.node_class
    # the stock MODEL is appended after the original outputs: saved workflows keep their links
    assert list(cls("GLMImageLoader").RETURN_TYPES) == ["GLM_AR", "GLM_DECODER", "VAE", "MODEL"]
    assert list(cls("GLMImageDiTLoader").RETURN_TYPES) == ["GLM_DECODER", "MODEL"]
    assert set(req("GLMImageConditioning")) == {"decoder", "tokens"}
    assert {k: v[0] for k, v in opt("GLMImageConditioning").items()} == {
        "glyph": "GLM_GLYPH", "negative_glyph": "GLM_GLYPH", "reference": "GLM_REFERENCE"}
    assert list(cls("GLMImageConditioning").RETURN_TYPES) == ["CONDITIONING", "CONDITIONING"]
    assert list(cls("GLMImageConditioning").RETURN_NAMES) == ["positive", "negative"]
    assert set(req("GLMImageScheduler")) == {"model", "tokens", "steps"}
    assert list(cls("GLMImageScheduler").RETURN_TYPES) == ["SIGMAS"]
    assert list(cls("GLMImageTextToTokens").RETURN_TYPES) == ["GLM_TOKENS"]
    assert list(cls("GLMImageTokensToLatent").RETURN_TYPES) == ["LATENT"]
    assert list(cls("GLMImageGlyphText").RETURN_TYPES) == ["GLM_GLYPH"]
    assert list(cls("GLMImageReferenceEdit").RETURN_TYPES) == ["GLM_REFERENCE"]
    assert list(cls("GLMImageLoadTokens").RETURN_TYPES) == ["GLM_TOKENS"]


def test_size_validation_message(host):
    prompt = {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
        "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": "a cat", "width": 1000,
              "height": 512, "seed": 0, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
        "3": {"class_type": "GLMImageSaveTokens", "inputs": {"tokens": ["2", 0], "filename_prefix": "t"}},
    }
    ok, res = host.run(prompt)
    assert not ok
    msg = str(res["node_errors"])
    assert "multiple of 32" in msg and "width" in msg
