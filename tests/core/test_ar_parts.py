"""The AR built in parts (text: decoder + lm_head; vision: ViT + VQ) equals the full model."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_image_core.generation import ar_generate, ar_prompt
from glm_image_core.networks import ar_model
from glm_image_core.loading.checkpoint import CheckpointError, read_json
from glm_image_core.loading.registry import NETWORKS


@pytest.fixture(scope="module")
def vle(tiny_ckpt):
    return os.path.join(tiny_ckpt, "vision_language_encoder")


@pytest.fixture(scope="module")
def models(vle):
    return (NETWORKS["ar"].load(vle), NETWORKS["ar"].load(vle, parts=("text",)), NETWORKS["ar"].load(vle, parts=("vision",)))


def test_parts_load_exactly_the_full_key_set(models):
    full, text, vision = models
    t, v = set(text.state_dict()), set(vision.state_dict())
    assert t and v and not (t & v)
    assert t | v == set(full.state_dict())
    assert all(k.startswith(("model.language_model.", "lm_head.")) for k in t)
    assert all(k.startswith(("model.visual.", "model.vqmodel.")) for k in v)
    assert not hasattr(text.model, "visual") and not hasattr(text.model, "vqmodel")
    assert not hasattr(vision, "lm_head") and not hasattr(vision.model, "language_model")
    sd = full.state_dict()
    for part in (text, vision):
        for k, p in part.state_dict().items():
            assert torch.equal(p, sd[k]), k


def test_parts_give_the_same_logits_and_reference_tokens(models, tiny_ckpt):
    full, text, vision = models
    proc_cfg = ar_prompt.read_processor_config(os.path.join(tiny_ckpt, "processor"))
    img = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(3))
    ref_full = ar_generate.tokenize_reference(full, img, proc_cfg)
    ref_part = ar_generate.tokenize_reference(vision, img, proc_cfg)
    assert torch.equal(ref_full, ref_part)
    tok = ar_prompt.GlmTokenizer.from_folder(os.path.join(tiny_ckpt, "processor"))
    ids = torch.tensor([tok.encode("a cat on a mat")])
    pos = torch.arange(ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        assert torch.equal(full(ids, pos), text(ids, pos))
    a = ar_generate.generate_tokens(full, tok, "make it blue", 64, 64, 0, reference_grids=[ref_full])
    b = ar_generate.generate_tokens(text, tok, "make it blue", 64, 64, 0, reference_grids=[ref_part])
    assert torch.equal(a.grid, b.grid)


def test_missing_part_gives_a_clear_error(models):
    _, text, vision = models
    with pytest.raises(RuntimeError, match="needs the 'vision' part"):
        text.image_features(torch.zeros(1, 3 * 16 * 16), [(1, 1)])
    with pytest.raises(RuntimeError, match="needs the 'text' part"):
        vision(torch.zeros(1, 1, dtype=torch.long), torch.zeros(3, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty subset"):
        ar_model.GlmImageAR(text.config, device="meta", parts=("audio",))
    with pytest.raises(ValueError, match="non-empty subset"):
        ar_model.GlmImageAR(text.config, device="meta", parts=())


def test_part_load_is_strict_within_its_part_and_skips_the_other(vle, tmp_path):
    cfg = read_json(os.path.join(vle, "config.json"))
    sd = load_file(os.path.join(vle, "model.safetensors"))
    # a file with only the text part's keys loads as the text part, not as the vision part
    only_text = {k: v for k, v in sd.items() if ar_model.part_of_key(k) == "text"}
    save_file(only_text, str(tmp_path / "text.safetensors"))
    m = NETWORKS["ar"].build(cfg, [str(tmp_path / "text.safetensors")], parts=("text",))
    assert set(m.state_dict()) == set(only_text)
    with pytest.raises(CheckpointError, match=r"vision part.*missing key"):
        NETWORKS["ar"].build(cfg, [str(tmp_path / "text.safetensors")], parts=("vision",))
    # a missing key of the part asked for, and a key of no part, still fail
    broken = dict(sd)
    broken.pop("lm_head.weight")
    broken["model.extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): lm_head.weight.*unexpected key\(s\): model.extra"):
        NETWORKS["ar"].build(cfg, [str(tmp_path / "broken.safetensors")], parts=("text",))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): model.extra"):
        NETWORKS["ar"].build(cfg, [str(tmp_path / "broken.safetensors")], parts=("vision",))
