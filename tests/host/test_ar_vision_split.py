"""The AR's vision tower + VQ are a separate network: a text-to-image run never builds or loads
them (the AR stage holds only the decoder + lm_head); a Reference Edit builds and loads them."""
import torch

import glmtest_host

# A loader signature no other host test uses, so ComfyUI's cache gives this test a fresh GLM_AR payload.
LOADER = {"class_type": "GLMImageLoader",
          "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "fp32", "compute_dtype": "fp32"}}


def t2i_graph(with_reference: bool) -> dict:
    g = {"1": LOADER,
         "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": "a red apple", "width": 256,
               "height": 256, "seed": 4, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
         "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
               "seed": 4, "steps": 1, "cfg": 1.5}},
         "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
         "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    if with_reference:
        g["6"] = {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1, "color": 0x3366AA}}
        g["7"] = {"class_type": "GLMImageReferenceEdit", "inputs": {"ar": ["1", 0], "decoder": ["1", 1],
                                                                    "vae": ["1", 2], "image": ["6", 0]}}
        g["2"]["inputs"]["reference"] = ["7", 0]
        g["3"]["inputs"]["reference"] = ["7", 0]
    return g


def vision_keys(module) -> list:
    return [k for k in module.state_dict() if k.startswith(("model.visual.", "model.vqmodel."))]


def test_text_to_image_never_builds_the_vision_tower_and_an_edit_does(host):
    import comfy.model_management as mm
    host.run_ok(t2i_graph(with_reference=False))
    ar = glmtest_host.node_output(host, "1", 0)
    text = ar.model._patcher
    assert text is not None, "the text → tokens stage did not build the AR"
    assert not hasattr(text.model.model, "visual") and not hasattr(text.model.model, "vqmodel")
    assert not vision_keys(text.model) and "lm_head.weight" in text.model.state_dict()
    assert ar.vision._patcher is None, "text-to-image built the AR's vision tower"
    assert all(not vision_keys(lm.model.model) for lm in mm.current_loaded_models if lm.model is not None)

    host.run_ok(t2i_graph(with_reference=True))
    assert glmtest_host.node_output(host, "1", 0) is ar              # the same payload (cached loader)
    vision = ar.vision._patcher
    assert vision is not None, "the Reference Edit did not build the vision tower"
    assert set(vision_keys(vision.model)) == set(vision.model.state_dict())       # vision part only
    assert not hasattr(vision.model, "lm_head") and not hasattr(vision.model.model, "language_model")
    ids = glmtest_host.node_output(host, "7").items[0].ar_ids
    assert ids.shape == (2, 3) and ids.dtype == torch.int64
