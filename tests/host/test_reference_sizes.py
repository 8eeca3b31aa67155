"""Reference images of awkward sizes are fitted to the 32-pixel grid (with a note), never crash;
impossible ones get a clear error naming the problem."""
import pytest
import torch

import glmtest_host


def edit_graph(w, h, batch=1):
    return {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": w, "height": h, "batch_size": batch, "color": 0x336699}},
        "3": {"class_type": "GLMImageReferenceEdit", "inputs": {"ar": ["1", 0], "decoder": ["1", 1], "vae": ["1", 2],
              "image": ["2", 0]}},
        "4": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": "make it red", "width": 256,
              "height": 256, "seed": 1, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1,
              "reference": ["3", 0]}},
        "5": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["4", 0], "seed": 1,
              "steps": 1, "cfg": 1.5, "reference": ["3", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


@pytest.mark.parametrize("w,h", [(250, 130), (8, 8), (1000, 320), (96, 64)])
def test_awkward_reference_sizes_are_fitted(host, w, h):
    host.run_ok(edit_graph(w, h, batch=2))
    ref = glmtest_host.node_output(host, "3")
    assert len(ref) == 2
    for r in ref.items:
        assert r.height % 32 == 0 and r.width % 32 == 0
        assert tuple(r.ar_ids.shape) == (r.height // 32, r.width // 32)
        assert tuple(r.latent.shape[-2:]) == (r.height // 8, r.width // 8)
        assert (r.note != "") == ((h, w) != (r.height, r.width))
    img = glmtest_host.node_output(host, "6")
    assert img.shape == (1, 256, 256, 3) and torch.isfinite(img).all()


def test_extreme_aspect_ratio_is_a_clear_error(host):
    ok, _ = host.run(edit_graph(1024, 128))
    assert not ok
    err = host.execution_error()
    assert err["node_type"] == "GLMImageReferenceEdit"
    assert "aspect ratio above 4:1" in err["exception_message"]
