"""The size policy of Image → Semantic Tokens (image_proc.fit_token_grid): which sizes are kept, how
others are cropped or resized, and which are refused, for the official processor range (32..2048 px)."""
import pytest
import torch

from glm_image_core.generation import image_proc

CFG = {"min_pixels": 32 * 32, "max_pixels": 2048 * 2048}


@pytest.mark.parametrize("h,w", [(64, 64), (64, 96), (1024, 1024), (2048, 512), (32, 128)])
def test_on_grid_sizes_are_kept(h, w):
    for fit in image_proc.FIT_MODES:
        crop, size, note = image_proc.fit_token_grid(h, w, CFG, fit)
        assert crop == (0, 0, h, w) and size == (h, w) and note == ""


def test_crop_is_centred_and_keeps_pixels():
    crop, size, note = image_proc.fit_token_grid(70, 100, CFG, "crop")
    assert crop == (3, 2, 64, 96) and size == (64, 96) and "centre-cropped 100x70 -> 96x64" in note
    img = torch.rand(1, 70, 100, 3)
    assert torch.equal(image_proc.fit_image(img, crop, size), img[:, 3:67, 2:98])


def test_resize_keeps_aspect_and_area():
    crop, (th, tw), note = image_proc.fit_token_grid(700, 1000, CFG, "resize")
    assert crop == (0, 0, 700, 1000) and th % 32 == 0 and tw % 32 == 0
    assert abs(tw / th - 1000 / 700) < 0.05 and abs(th * tw / 700_000 - 1) < 0.1 and "resized" in note
    assert image_proc.fit_image(torch.rand(1, 700, 1000, 3), crop, (th, tw)).shape == (1, th, tw, 3)


@pytest.mark.parametrize("h,w,what", [(20, 64, "sides 32..2048"), (64, 4200, "sides 32..2048"),
                                      (32, 160, "aspect ratio of at most 4")])
def test_crop_refuses_sizes_outside_the_processor_range(h, w, what):
    with pytest.raises(ValueError, match=what) as e:
        image_proc.fit_token_grid(h, w, CFG, "crop")
    assert "resize" in str(e.value)


def test_unknown_fit_mode_and_empty_image():
    with pytest.raises(ValueError, match="fit must be one of"):
        image_proc.fit_token_grid(64, 64, CFG, "pad")
    with pytest.raises(ValueError, match="empty size"):
        image_proc.fit_token_grid(0, 64, CFG, "crop")
