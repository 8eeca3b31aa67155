"""glm_image_core.loading.adapters: which layer a LoRA key names, and the alpha that makes ComfyUI's
scale (alpha / rank) PEFT's (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA)."""
import json
import math

import pytest

from glm_image_core.errors import CheckpointError
from glm_image_core.loading import adapters

Q = "model.language_model.layers.0.self_attn.q_proj"
KMAP = adapters.key_map([Q, "lm_head"], ("vision_language_encoder",))


@pytest.mark.parametrize("key", [
    f"{Q}.lora_up.weight", f"base_model.model.{Q}.lora_A.weight", f"vision_language_encoder.{Q}.lora_B.weight",
    "lora_te_model_language_model_layers_0_self_attn_q_proj.lora_down.weight", f"{Q}.alpha",
])
def test_every_name_form_reaches_the_layer(key):
    m = adapters.match([key], KMAP)
    assert m.modules == {f"{Q}.weight": adapters.split_key(key)[0]} and m.unmatched == []


def test_keys_of_no_layer_or_no_lora_form_are_unmatched():
    m = adapters.match(["transformer_blocks.0.attn1.to_q.lora_A.weight", f"{Q}.weight", "lm_head.lora_B.weight"], KMAP)
    assert m.unmatched == [f"{Q}.weight", "transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert m.modules == {"lm_head.weight": "lm_head"}


def config(**kw):
    return adapters.read_peft_config(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **kw}), "cfg")


def test_alpha_gives_peft_scale_for_plain_rslora_and_patterns():
    assert config().alpha_for(Q, 8) / 8 == 16 / 8
    assert math.isclose(config(use_rslora=True).alpha_for(Q, 8) / 8, 16 / math.sqrt(8))
    cfg = config(alpha_pattern={"q_proj": 4}, rank_pattern={"q_proj": 2})
    assert cfg.alpha_for(Q, 2) == 4 and cfg.alpha_for("lm_head", 8) == 16
    assert config(alpha_pattern={"layers.0.self_attn.q_proj": 2}).alpha_for(Q, 8) == 2
    assert config(alpha_pattern={"k_proj": 2}).alpha_for(Q, 8) == 16


@pytest.mark.parametrize("text,words", [
    ("not json", "not valid JSON"), ("[1]", "JSON object"), ('{"peft_type": "IA3"}', "not a LoRA"),
    ('{"r": "x", "lora_alpha": 1}', "integer 'r'"), ('{"r": 0, "lora_alpha": 1}', "positive"),
])
def test_bad_configs_are_refused_with_what_is_wrong(text, words):
    with pytest.raises(CheckpointError, match=words):
        adapters.read_peft_config(text, "cfg")


def test_dora_is_named_as_not_applied():
    assert "DoRA" in adapters.adapter_warnings(config(use_dora=True))[0]
    assert adapters.adapter_warnings(config()) == []


def test_shapes_of_another_model_are_refused_naming_both():
    shapes = {f"{Q}.weight": (32, 32)}
    m = adapters.match([f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"], KMAP)
    assert adapters.check_shapes({f"{Q}.lora_A.weight": (4, 32), f"{Q}.lora_B.weight": (32, 4)}, m, shapes, "x") == {Q: 4}
    with pytest.raises(CheckpointError, match=r"\(4, 4096\).*32 × 32.*another model"):
        adapters.check_shapes({f"{Q}.lora_A.weight": (4, 4096), f"{Q}.lora_B.weight": (32, 4)}, m, shapes, "x")
    with pytest.raises(CheckpointError, match="no up"):
        adapters.check_shapes({f"{Q}.lora_A.weight": (4, 32)}, m, shapes, "x")
