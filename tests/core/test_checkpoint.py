"""Model-folder reading: official layout, sharded weights, refusal of pickle and truncated files."""
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from glm_image_core.loading import checkpoint as ckpt
from glm_image_core.testing.tiny_checkpoint import ar_shapes, configs_for


def test_tiny_folder_is_recognised(tiny_ckpt):
    assert ckpt.is_glm_image_folder(tiny_ckpt)
    idx = ckpt.check_glm_image_folder(tiny_ckpt)
    assert idx["_class_name"] == "GlmImagePipeline"


def test_sharded_equals_single(tiny_ckpt, tiny_ckpt_sharded):
    files = ckpt.weight_files(os.path.join(tiny_ckpt_sharded, "vision_language_encoder"))
    assert len(files) > 1 and all("-of-" in f for f in files)
    _, a = ckpt.load_component(tiny_ckpt, "vision_language_encoder")
    _, b = ckpt.load_component(tiny_ckpt_sharded, "vision_language_encoder")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_ar_tensor_names_follow_config(tiny_ckpt):
    _, sd = ckpt.load_component(tiny_ckpt, "vision_language_encoder")
    cfg = configs_for("tiny")["vision_language_encoder/config.json"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(ar_shapes(cfg))


def test_missing_component_is_named(tiny_ckpt, tmp_path):
    d = str(tmp_path / "broken")
    shutil.copytree(tiny_ckpt, d)
    shutil.rmtree(os.path.join(d, "transformer"))
    with pytest.raises(ckpt.CheckpointError, match="missing component folder.*transformer"):
        ckpt.check_glm_image_folder(d)


def test_pickle_weights_are_refused_never_loaded(tmp_path):
    d = tmp_path / "vae"
    d.mkdir()
    (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ckpt.CheckpointError, match="never unpickles"):
        ckpt.weight_files(str(d))


def test_truncated_safetensors_is_named(tmp_path):
    p = str(tmp_path / "model.safetensors")
    save_file({"a": torch.zeros(1000)}, p)
    open(p, "r+b").truncate(200)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_safetensors([p])


def test_strict_load_names_bad_keys():
    m = torch.nn.Linear(2, 3)
    with pytest.raises(ckpt.CheckpointError, match=r"missing key.*bias.*unexpected key.*extra.*shape mismatch.*weight"):
        ckpt.check_state_dict_keys(m.state_dict(), {"weight": torch.zeros(3, 3), "extra": torch.zeros(1)}, "test layer")
