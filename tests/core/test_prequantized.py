"""Pre-quantized community releases are refused by name, before any weight is read: an SDNQ folder as
the sdnq package writes it (Disty0/GLM-Image-SDNQ-4bit-dynamic's format), and an AutoRound AR whose
config carries transformers' AutoRoundConfig (Intel/GLM-Image-int4-AutoRound's format). The message
names the method and its settings and points to the supported low-memory route (GGUF conversion)."""
import json
import os
import shutil

import pytest
import torch

from glm_image_core.loading import checkpoint as ckpt
from glm_image_core.loading import single_file as sf
from glm_image_core.loading import sources


@pytest.fixture(scope="module")
def sdnq_folder(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with its DiT quantized and saved by the sdnq package (uint4, static)."""
    from diffusers import GlmImageTransformer2DModel
    from sdnq import SDNQConfig
    from sdnq.loader import save_sdnq_model
    out = str(tmp_path_factory.mktemp("sdnq") / "GLM-Image-SDNQ")
    shutil.copytree(tiny_ckpt, out)
    shutil.rmtree(os.path.join(out, "transformer"))
    dit = GlmImageTransformer2DModel.from_pretrained(os.path.join(tiny_ckpt, "transformer"), torch_dtype=torch.bfloat16,
                                                     quantization_config=SDNQConfig(weights_dtype="uint4"))
    save_sdnq_model(dit, os.path.join(out, "transformer"))
    return out


@pytest.fixture(scope="module")
def autoround_folder(tiny_ckpt, tmp_path_factory):
    from transformers import AutoRoundConfig
    out = str(tmp_path_factory.mktemp("autoround") / "GLM-Image-int4-AutoRound")
    shutil.copytree(tiny_ckpt, out)
    path = os.path.join(out, "vision_language_encoder", "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"] = json.loads(AutoRoundConfig(bits=4, group_size=128, sym=True).to_json_string())
    json.dump(cfg, open(path, "w"))
    return out


def test_the_sdnq_package_writes_what_the_check_reads(sdnq_folder):
    cfg = json.load(open(os.path.join(sdnq_folder, "transformer", "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "sdnq"
    assert os.path.isfile(os.path.join(sdnq_folder, "transformer", "quantization_config.json"))


def test_an_sdnq_dit_is_refused_by_name(sdnq_folder):
    with pytest.raises(ckpt.CheckpointError) as e:
        sources.decoder_assets(sources.FolderSource(sdnq_folder))
    msg = str(e.value)
    assert "transformer/" in msg and "SDNQ" in msg and "weights_dtype uint4" in msg
    assert "--dtype gguf_q4_k" in msg and "fp8_e4m3fn" in msg
    # the converter reads the same configs: it refuses as clearly
    with pytest.raises(ckpt.CheckpointError, match="SDNQ"):
        sf.convert_component(sdnq_folder, "dit", os.path.join(sdnq_folder, "x.safetensors"))


def test_sdnqs_separate_quantization_config_alone_is_enough(sdnq_folder, tmp_path):
    """sdnq also writes quantization_config.json beside config.json: a config.json without the entry
    (edited, or from an older sdnq) is still refused."""
    out = str(tmp_path / "f")
    shutil.copytree(sdnq_folder, out)
    path = os.path.join(out, "transformer", "config.json")
    cfg = json.load(open(path))
    cfg.pop("quantization_config")
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ckpt.CheckpointError, match="pre-quantized release \\(SDNQ: weights_dtype uint4"):
        sources.decoder_assets(sources.FolderSource(out))


def test_an_autoround_ar_is_refused_by_name(autoround_folder):
    with pytest.raises(ckpt.CheckpointError) as e:
        sources.ar_assets(sources.FolderSource(autoround_folder))
    msg = str(e.value)
    assert "vision_language_encoder/" in msg and "AutoRound" in msg and "bits 4, group_size 128" in msg
    assert "--dtype gguf_q4_k" in msg
    # the DiT of the same folder is untouched by the check
    assert sources.decoder_assets(sources.FolderSource(autoround_folder)).dit_config["in_channels"] == 16
