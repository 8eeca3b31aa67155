"""The pack under each of ComfyUI's device/memory flags: the real server started with --cpu (alone,
with --disable-smart-memory, with --cache-none, with --use-split-cross-attention), --lowvram, --novram or --highvram loads the pack,
registers its nodes and runs the committed text-to-image API workflow, and the saved images are
identical across the flags of one device.

ComfyUI makes --cpu and the vram flags mutually exclusive (argparse), and without --cpu it needs a
CUDA device to start. So on a machine without a GPU only --cpu runs here; the GPU flags are skipped
with that reason (test_comfyui_refuses_vram_flags_with_cpu pins the host behaviour the skip rests
on). Partial (lowvram) loading itself is covered in-process on the CPU by tests/host/test_lowvram.py."""
import os

import numpy as np
import pytest
import torch

import glmtest_server as gs
from glmtest_server import PACK_NODES, ComfyServer, ServerError

FLAGS = {"cpu": ("--cpu",),
         # model-management flags that combine with --cpu: unload after every use / no output cache
         "cpu-disable-smart-memory": ("--cpu", "--disable-smart-memory"),
         "cpu-cache-none": ("--cpu", "--cache-none"),
         # an attention flag: ComfyUI's split attention, which the pack routes GLM's attention through
         "cpu-split-attention": ("--cpu", "--use-split-cross-attention"),
         "lowvram": ("--lowvram",), "novram": ("--novram",), "highvram": ("--highvram",)}
# flags that change the arithmetic (another attention): their images are checked, not compared bit for bit
ATTENTION_FLAGS = {"cpu-split-attention": "GLM-Image: attention through ComfyUI's attention_split"}
NEEDS_GPU = "ComfyUI allows --lowvram/--novram/--highvram only without --cpu, which needs a CUDA device"


@pytest.fixture(scope="module")
def t2i_prompt():
    return gs.load_json(os.path.join(gs.WORKFLOWS, "api", "glm_image_t2i_api.json"))


@pytest.fixture(scope="module")
def results():
    """flag name -> saved image pixels of that flag's run."""
    return {}


def run_with_flags(tmp_path_factory, tiny_ckpt, name, prompt):
    from PIL import Image
    base = tmp_path_factory.mktemp(f"server-{name}")
    server = gs.start(base, tiny_ckpt, f"vram-{name}", device_args=FLAGS[name])
    try:
        argv = server.get_json("/system_stats")["system"]["argv"]
        info = server.object_info()
        problems = server.pack_problems()
        entry = gs.run_prompt(server, prompt, timeout=600)
        save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
        paths = server.download_images(entry, str(base / "downloaded"), save_id)
        pixels = [np.asarray(Image.open(p)) for p in paths]
        return entry, argv, server.log_text(), set(info), problems, pixels
    finally:
        gs.stop(server)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(FLAGS))
def test_pack_loads_and_runs_t2i_under_flag(name, tmp_path_factory, tiny_ckpt, t2i_prompt, results):
    if "--cpu" not in FLAGS[name] and not torch.cuda.is_available():
        pytest.skip(NEEDS_GPU)
    entry, argv, log, node_ids, problems, pixels = run_with_flags(tmp_path_factory, tiny_ckpt, name, t2i_prompt)
    for flag in FLAGS[name]:
        assert flag in argv, f"the running server did not get {flag}: {argv}"
    assert "Set vram state to:" in log
    if name in ATTENTION_FLAGS:
        assert ATTENTION_FLAGS[name] in log, log[-3000:]
    else:
        assert "GLM-Image: attention through" not in log
    assert set(PACK_NODES) <= node_ids
    assert problems == []
    assert entry["status"]["status_str"] == "success"
    w, h = t2i_prompt["2"]["inputs"]["width"], t2i_prompt["2"]["inputs"]["height"]
    assert len(pixels) == t2i_prompt["2"]["inputs"]["batch_size"]
    assert pixels[0].shape[:2] == (h, w) and pixels[0].std() > 0
    results[name] = pixels


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_images_are_identical_across_flags(device, results):
    """Same device, different memory management: the same pixels."""
    runs = {n: px for n, px in results.items()
            if ("--cpu" in FLAGS[n]) == (device == "cpu") and n not in ATTENTION_FLAGS}
    if device == "gpu" and not torch.cuda.is_available():
        pytest.skip(NEEDS_GPU)
    assert len(runs) >= 2, f"fewer than two {device} runs finished: {sorted(runs)}"
    first_name, first = next(iter(runs.items()))
    for name, pixels in runs.items():
        assert len(pixels) == len(first)
        for a, b in zip(first, pixels):
            assert np.array_equal(a, b), f"{FLAGS[name]} image differs from {FLAGS[first_name]}"


@pytest.mark.timeout(120)
def test_comfyui_refuses_vram_flags_with_cpu(tmp_path, tiny_ckpt):
    """Why the GPU flags cannot run on a CPU-only machine: the host rejects the combination."""
    server = ComfyServer(str(tmp_path), diffusers={gs.TINY_NAME: tiny_ckpt}, device_args=("--cpu", "--lowvram"))
    with pytest.raises(ServerError):
        server.start(timeout=60)
    server.stop()
    assert "--lowvram: not allowed with argument --cpu" in server.log_text()
