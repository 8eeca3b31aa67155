"""GLM-Image Image → Semantic Tokens (issue 25, item 1) against the official tokenisation of the same image:
transformers' GlmImageProcessor + ``get_image_features`` + ``get_image_tokens``, as the pipeline tokenises a
condition image, bit for bit on the CPU. The node runs in the real host on PNGs read by the stock dataset
loader; the oracle reads the same PNG files with PIL. Square, non-square and off-grid (cropped) sizes."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import glmtest_oracle
import glmtest_train

pytestmark = pytest.mark.parity

# (width, height) of the dataset images; 100x70 is off the 32-px grid: the node centre-crops it to 96x64
SIZES = [(64, 64), (96, 64), (64, 128), (100, 70)]


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    from transformers import GlmImageForConditionalGeneration, GlmImageProcessor
    processor = GlmImageProcessor.from_pretrained(os.path.join(tiny_ckpt, "processor"))
    model = GlmImageForConditionalGeneration.from_pretrained(os.path.join(tiny_ckpt, "vision_language_encoder"),
                                                             torch_dtype=torch.float32)
    return processor, glmtest_oracle.realign(model).train(False)


def official_tokens(hf, image: Image.Image) -> torch.Tensor:
    """The pipeline's condition-image tokenisation: processor -> features -> VQ ids, as a [h, w] grid."""
    processor, model = hf
    content = [{"type": "image", "image": image}, {"type": "text", "text": "x"}]
    inputs = processor.apply_chat_template([[{"role": "user", "content": content}]], tokenize=True,
                                           target_h=image.height, target_w=image.width, return_dict=True,
                                           return_tensors="pt")
    grids = inputs["image_grid_thw"][:-1]
    with torch.no_grad():
        feats = model.get_image_features(inputs["pixel_values"], grids).pooler_output
        ids = model.get_image_tokens(torch.cat(feats, dim=0), grids)
    return ids.reshape(int(grids[0, 1]), int(grids[0, 2]))


def test_image_to_tokens_equals_the_official_tokenisation(host, hf):
    folder = "image_tokens_parity"
    path = glmtest_train.write_dataset(host.folder_paths.get_input_directory(), SIZES, folder=folder)
    host.run_ok(glmtest_train.dataset_graph(folder=folder))
    tokens = glmtest_train.raw_output(host, "3", 0)
    images = glmtest_train.raw_output(host, "3", 1)
    # the stock loader's order is the folder listing's: find each image's file by its (unique) caption
    by_caption = {open(os.path.join(path, f), encoding="utf-8").read(): f[:-4] + ".png"
                  for f in os.listdir(path) if f.endswith(".txt")}
    assert len(tokens) == len(images) == len(SIZES) == len(by_caption)
    for tok, img in zip(tokens, images):
        name = by_caption[tok.prompt]
        pil = Image.open(os.path.join(path, name)).convert("RGB")
        w, h = pil.size
        cw, ch = w // 32 * 32, h // 32 * 32
        top, left = (h - ch) // 2, (w - cw) // 2
        pil = pil.crop((left, top, left + cw, top + ch))
        ref = official_tokens(hf, pil)
        assert (tok.width, tok.height) == (cw, ch)
        assert tuple(tok.grid.shape) == (1, ch // 32, cw // 32) == (1, *ref.shape)
        assert torch.equal(tok.grid[0], ref), f"{name}: ids differ from the official tokenisation"
        # the fitted image is exactly the cropped pixels (no resampling)
        assert torch.equal((img[0] * 255).round().to(torch.uint8), torch.from_numpy(np.asarray(pil)))
