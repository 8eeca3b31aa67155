"""The token file format: round trip, validation, refusal of malformed files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from glm_image_core.generation.tokens import (FORMAT_VERSION, METADATA_KEY, GLMTokens, TokenFileError, load_tokens,
                                   save_tokens, upsample_grid)


def make_tokens(b=2, w=96, h=64):
    g = torch.Generator().manual_seed(0)
    return GLMTokens(grid=torch.randint(0, 16384, (b, h // 32, w // 32), generator=g), width=w, height=h,
                     prompt='a sign "Hi" 🙂', seed=7, sampling={"temperature": 0.9, "top_p": 0.75, "top_k": 0},
                     preview=torch.randint(0, 16384, (b, 13, 19), generator=g), source="GLM-Image-tiny")


def test_round_trip(tmp_path):
    t = make_tokens()
    p = save_tokens(t, str(tmp_path / "x.glmtokens.safetensors"))
    u = load_tokens(p)
    assert torch.equal(u.grid, t.grid) and torch.equal(u.preview, t.preview)
    assert (u.width, u.height, u.prompt, u.seed, u.sampling, u.source) == \
        (t.width, t.height, t.prompt, t.seed, t.sampling, t.source)


def test_truncated_file_is_refused(tmp_path):
    p = save_tokens(make_tokens(), str(tmp_path / "x.glmtokens.safetensors"))
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(TokenFileError, match="cannot read token file"):
        load_tokens(p)


def test_wrong_version_is_refused(tmp_path):
    t = make_tokens()
    meta = t.metadata() | {"format_version": FORMAT_VERSION + 1}
    p = str(tmp_path / "v.glmtokens.safetensors")
    save_file({"grid": t.grid}, p, metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(TokenFileError, match="format_version"):
        load_tokens(p)


def test_foreign_safetensors_is_refused(tmp_path):
    p = str(tmp_path / "f.safetensors")
    save_file({"weight": torch.zeros(2)}, p)
    with pytest.raises(TokenFileError, match="not a GLM-Image token file"):
        load_tokens(p)


@pytest.mark.parametrize("mutate, match", [
    (lambda m, g: (m | {"width": 100}, g), "multiple of 32"),
    (lambda m, g: (m | {"width": 128}, g), "does not match"),
    (lambda m, g: (m, g.clone().fill_(16384)), "outside the codebook"),
    (lambda m, g: (m, g.clone().fill_(-1)), "outside the codebook"),
    (lambda m, g: (m, g.to(torch.int32)), "int64"),
])
def test_inconsistent_content_is_refused(tmp_path, mutate, match):
    t = make_tokens()
    meta, grid = mutate(t.metadata(), t.grid)
    p = str(tmp_path / "b.glmtokens.safetensors")
    save_file({"grid": grid.contiguous()}, p, metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(TokenFileError, match=match):
        load_tokens(p)


def test_upsample_grid_matches_pipeline_rule():
    g = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    up = upsample_grid(g)
    assert up.shape == (1, 4 * 6)
    assert up.view(4, 6).tolist() == [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3],
                                      [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6]]
    # the reference: F.interpolate(float, scale_factor=2, mode="nearest") then flatten
    ref = torch.nn.functional.interpolate(g[:, None].float(), scale_factor=2, mode="nearest").long().view(1, -1)
    assert torch.equal(up, ref)
