"""AR prompt layout, grid sizes, MRoPE positions, processor config and reference fitting (plain PyTorch)."""
import json
import os

import pytest
import torch

from glm_image_core.generation import ar_prompt, image_proc

# (height, width) -> (AR grid, preview grid, max_new_tokens): architecture doc §4.9 (+ 768x1344)
TABLE = {
    (512, 512): ((16, 16), (16, 16), 513),
    (1024, 1024): ((32, 32), (16, 16), 1281),
    (1152, 768): ((36, 24), (19, 13), 1112),
    (768, 1344): ((24, 42), (12, 21), 1261),
    (2048, 2048): ((64, 64), (16, 16), 4353),
}


@pytest.mark.parametrize("hw", sorted(TABLE))
def test_ar_grid_table(hw):
    h, w = hw
    grid, prev, n = TABLE[hw]
    assert ar_prompt.target_grid(w, h) == grid
    assert ar_prompt.preview_grid(*grid) == prev
    assert ar_prompt.max_new_tokens(w, h) == n
    assert ar_prompt.max_new_tokens(w, h, edit=True) == grid[0] * grid[1] + 1


def test_ar_target_grid_floors_and_rejects_tiny():
    assert ar_prompt.target_grid(100, 70) == (2, 3)
    with pytest.raises(ValueError):
        ar_prompt.target_grid(16, 64)


def test_ar_prompt_layout_t2i(tok):
    lay = ar_prompt.build_prompt(tok, "a cat", 768, 1152)
    assert lay.grids == [(36, 24), (19, 13)]
    assert lay.decode_grids == [(19, 13), (36, 24)]          # preview first
    assert lay.num_generate == 19 * 13 + 36 * 24
    assert lay.text == "a cat<sop>36 24<eop><sop>19 13<eop><|dit_token_16384|>"
    ids = lay.input_ids
    assert ids[-1] == 16384
    sop, eop = tok.token_to_id("<sop>"), tok.token_to_id("<eop>")
    assert ids.count(sop) == 2 and ids.count(eop) == 2
    assert ids[:len(tok.encode("a cat"))] == tok.encode("a cat")
    assert not lay.is_edit and torch.equal(lay.filled_ids(), torch.tensor(ids))


def test_ar_prompt_layout_edit(tok):
    r1 = torch.arange(6).view(2, 3)
    r2 = torch.arange(100, 104).view(2, 2)
    lay = ar_prompt.build_prompt(tok, "make it red", 96, 64, references=[r1, r2])
    img = tok.image_token_id
    assert lay.grids == [(2, 3), (2, 2), (2, 3)] and lay.decode_grids == [(2, 3)]
    assert lay.text.startswith("<|dit_token_16384|>" + "<|image|>" * 6 + "<|dit_token_16385|><|dit_token_16384|>")
    assert lay.text.endswith("make it red<sop>2 3<eop><|dit_token_16384|>")
    ids = lay.input_ids
    assert ids[0] == 16384 and ids[7] == 16385 and ids[8] == 16384 and ids[13] == 16385
    assert ids.count(img) == 10
    filled = lay.filled_ids()
    assert filled[1:7].tolist() == list(range(6)) and filled[9:13].tolist() == [100, 101, 102, 103]
    assert (filled != img).all()
    # grid sizes alone give the same ids (placeholders unfilled)
    lay2 = ar_prompt.build_prompt(tok, "make it red", 96, 64, references=[(2, 3), (1, 2, 2)])
    assert lay2.input_ids == ids
    with pytest.raises(ValueError):
        lay2.filled_ids()


def test_ar_prefill_positions_t2i_are_sequential():
    pos, nxt = ar_prompt.prefill_positions([20000, 20001, 16384], [(2, 2), (1, 1)])
    assert pos.tolist() == [[0, 1, 2]] * 3 and nxt == 3


def test_ar_positions_edit_by_hand():
    # text(2) [start] img 2x3 [end] text(1) [start]
    ids = [20000, 20001, 16384] + [7] * 6 + [16385, 20002, 16384]
    pos, nxt = ar_prompt.prefill_positions(ids, [(2, 3), (4, 5)])
    t, h, w = pos.tolist()
    # text + start marker: 0..2; image at p=3: t=3, h=3+row, w=3+col; then p = 3 + max(2,3) = 6
    assert t == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    assert h == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    assert w == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert nxt == 9
    dec = ar_prompt.decode_positions(nxt, [(4, 5)])
    assert dec.shape == (3, 21)
    assert dec[0].tolist() == [9] * 20 + [14]
    assert dec[1, :6].tolist() == [9, 9, 9, 9, 9, 10] and dec[2, :6].tolist() == [9, 10, 11, 12, 13, 9]


def test_ar_decode_positions_t2i_two_grids():
    dec = ar_prompt.decode_positions(10, [(2, 2), (3, 4)])
    assert dec[0].tolist() == [10] * 4 + [12] * 12 + [16]
    assert dec[1].tolist() == [10, 10, 11, 11] + [12] * 4 + [13] * 4 + [14] * 4 + [16]
    assert dec[2].tolist() == [10, 11, 10, 11] + [12, 13, 14, 15] * 3 + [16]


def test_ar_prefill_positions_mismatch_raises():
    with pytest.raises(ValueError):
        ar_prompt.prefill_positions([16384, 7, 7, 16385, 16384], [(2, 2), (1, 1)])


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_ar_read_processor_config_variants(tiny_ckpt, tmp_path):
    cfg = ar_prompt.read_processor_config(os.path.join(tiny_ckpt, "processor"))
    assert cfg["patch_size"] == 16 and cfg["min_pixels"] == 32 * 32 and cfg["max_pixels"] == 2048 * 2048
    assert cfg["resample"] == 3 and len(cfg["image_mean"]) == 3
    # older layout: preprocessor_config.json with min_pixels / max_pixels
    _write(str(tmp_path / "old" / "preprocessor_config.json"),
           {"patch_size": 16, "merge_size": 1, "temporal_patch_size": 1, "min_pixels": 4096, "max_pixels": 65536,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    old = ar_prompt.read_processor_config(str(tmp_path / "old"))
    assert (old["min_pixels"], old["max_pixels"], old["image_mean"]) == (4096, 65536, [0.5, 0.5, 0.5])
    _write(str(tmp_path / "bad" / "preprocessor_config.json"), {"patch_size": 14, "merge_size": 2, "size": {
        "shortest_edge": 1, "longest_edge": 2}})
    with pytest.raises(Exception, match="merge_size"):
        ar_prompt.read_processor_config(str(tmp_path / "bad"))


CFG = {"patch_size": 16, "merge_size": 1, "min_pixels": 32 * 32, "max_pixels": 2048 * 2048}


@pytest.mark.parametrize("h,w", [(64, 64), (1024, 768), (512, 2048), (100, 70), (1000, 1500), (4000, 3000),
                                 (33, 33), (3000, 800)])
def test_ar_fit_reference_size(h, w):
    th, tw, note = image_proc.fit_reference_size(h, w, CFG)
    assert th % 32 == 0 and tw % 32 == 0 and 32 <= min(th, tw) and max(th, tw) <= 2048
    # the processor then sees exactly half: AR grid (th/32, tw/32), i.e. 2x grid == VAE grid th/16
    assert image_proc.smart_resize(th, tw, 16, CFG["min_pixels"], CFG["max_pixels"]) == (th // 2, tw // 2)
    assert (note == "") == ((th, tw) == (h, w))
    assert abs((th / tw) / (h / w) - 1) < 0.35


def test_ar_fit_reference_size_max_pixels_and_ratio():
    th, tw, _ = image_proc.fit_reference_size(2048, 2048, CFG, max_pixels=1024 * 1024)
    assert th * tw <= 1024 * 1024 and th == tw
    with pytest.raises(ValueError, match="aspect"):
        image_proc.fit_reference_size(100, 500, CFG)


def test_ar_float_to_uint8_and_resize():
    x = torch.randint(0, 256, (1, 40, 50, 3), dtype=torch.uint8)
    f = x.float() / 255
    assert torch.equal(image_proc.to_uint8_chw(f), x[0].permute(2, 0, 1))
    assert torch.equal(image_proc.to_uint8_chw(x[0]), x[0].permute(2, 0, 1))
    r = image_proc.resize_image(f, 64, 96)
    assert r.shape == (1, 64, 96, 3) and float(r.min()) >= 0 and float(r.max()) <= 1
    assert image_proc.resize_image(f, 40, 50) is f


# --- the chat template is checked against the pack's prompt layout ------------------------------

GLM4V_STYLE = ("{% for m in messages %}{{ '<|user|>\\n' }}{% for item in m.content %}{% if item.type == 'text' %}"
               "{{ item.text }}{% endif %}{% endfor %}{% endfor %}")


def _processor_copy(tiny_ckpt, tmp_path):
    import shutil
    d = tmp_path / "processor"
    shutil.copytree(os.path.join(tiny_ckpt, "processor"), d)
    return d


def test_chat_template_of_the_checkpoint_matches_the_layout(tiny_ckpt):
    from glm_image_core.generation.ar_prompt import GlmTokenizer, find_chat_template
    text, where = find_chat_template(os.path.join(tiny_ckpt, "processor"))
    assert where.endswith("chat_template.jinja") and "dit_token_16384" in text
    GlmTokenizer.from_folder(os.path.join(tiny_ckpt, "processor"))          # checked on load: no error


@pytest.mark.parametrize("place", ["chat_template.jinja", "tokenizer_config.json", "chat_template.json"])
def test_chat_template_that_renders_otherwise_is_refused(tiny_ckpt, tmp_path, place):
    import json
    from glm_image_core.generation.ar_prompt import GlmTokenizer
    from glm_image_core.loading.checkpoint import CheckpointError
    d = _processor_copy(tiny_ckpt, tmp_path)
    if place != "chat_template.jinja":
        os.remove(d / "chat_template.jinja")
        path = d / place
        cfg = json.loads(path.read_text()) if path.exists() else {}
        cfg["chat_template"] = GLM4V_STYLE
        path.write_text(json.dumps(cfg))
    else:
        (d / place).write_text(GLM4V_STYLE)
    with pytest.raises(CheckpointError, match=r"renders a text-only prompt as '<\|user\|>\\na probe prompt'.*"
                                              r"prompt layout.*is 'a probe prompt'"):
        GlmTokenizer.from_folder(str(d))


def test_chat_template_missing_or_unrenderable(tiny_ckpt, tmp_path):
    from glm_image_core.generation.ar_prompt import GlmTokenizer
    from glm_image_core.loading.checkpoint import CheckpointError
    d = _processor_copy(tiny_ckpt, tmp_path)
    os.remove(d / "chat_template.jinja")
    GlmTokenizer.from_folder(str(d))                                   # no template: nothing to check
    (d / "chat_template.jinja").write_text("{{ raise_exception('no GLM here') }}")
    with pytest.raises(CheckpointError, match="cannot render the chat template.*no GLM here"):
        GlmTokenizer.from_folder(str(d))
