"""The pack in a long-running real ComfyUI server (main.py --cpu on loopback, tiny checkpoint):

- a failing prompt (rejected by validation, or raising while it runs) never stops the server: the
  next valid prompt runs;
- soak: 50 queued prompts with varying prompts, seeds and sizes all succeed, repeated inputs give
  byte-identical PNGs, the server's RSS does not grow beyond a fixed bound after warm-up (no leak),
  and every network is loaded once;
- determinism across process restarts: a second, fresh server gives byte-identical PNGs.
"""
import re

import pytest

import glmtest_server as gs
from glmtest_server import ExecutionFailed, PromptRejected

# Soak configurations: (prompt, seed, width, height, steps). Consecutive prompts always differ in
# the AR inputs, so ComfyUI's cache (which keeps the last prompt's results) never serves a repeat:
# each repeat is recomputed and must give the same bytes.
CONFIGS = [
    ("a red fox in the snow", 1, 256, 256, 2),
    ('a shop sign that says "OPEN"', 2, 256, 320, 1),
    ("一只戴帽子的猫", 3, 320, 256, 2),
    ("", 4, 256, 256, 1),
    ("a lighthouse at dusk, oil painting", 5, 288, 256, 2),
    ("a red fox in the snow", 6, 256, 256, 2),           # same prompt, other seed
    ("a red fox in the snow", 1, 320, 320, 1),           # same prompt and seed, other size
    ("macro photo of a dew drop", 7, 256, 288, 2),
    ('poster "GLM" "Image"', 8, 256, 256, 1),
    ("   ", 9, 256, 256, 1),
]
N_PROMPTS = 50
WARMUP = len(CONFIGS)        # every configuration has run once: models loaded, every size allocated
# RSS bound after warm-up. The server's RSS is ~1 GB of libraries; what a prompt allocates at these
# sizes is freed or reused by the allocator once every size has been seen. A leak of one decoded
# image per prompt (256x256x3 float32 = 0.75 MB) plus its latent and tokens would add ~40 MB over
# the 40 post-warm-up prompts; a leaked AR KV cache or model copy far more. 32 MB leaves room for
# allocator and Python-object noise (measured growth: a few MB) and still catches such leaks.
RSS_BOUND_KB = 32 * 1024


def t2i(prompt, seed, w, h, steps, prefix):
    return {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": gs.TINY_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": prompt, "width": w,
              "height": h, "seed": seed, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
        "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
              "seed": seed, "steps": steps, "cfg": 1.5}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


def config_prompt(i: int) -> dict:
    return t2i(*CONFIGS[i], prefix=f"soak/config{i:02d}")


def png_bytes(server, entry) -> bytes:
    imgs = server.images(entry, "5")
    assert len(imgs) == 1, imgs
    return server.view(imgs[0])


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_server_keeps_serving_after_failing_prompts(server):
    with pytest.raises(PromptRejected) as rejected:            # validation: bad size
        server.queue(t2i("a cat", 0, 250, 256, 1, "fail/size"))
    assert "multiple of 32" in str(rejected.value)
    with pytest.raises(ExecutionFailed) as failed:             # execution: beyond the AR's context
        server.run(t2i("a cat " * 5000, 0, 256, 256, 1, "fail/long"), timeout=300)
    assert failed.value.node_type == "GLMImageTextToTokens" and "prompt too long" in failed.value.exception_message
    with pytest.raises(PromptRejected) as rejected:            # validation: path outside input/
        server.queue({"1": {"class_type": "GLMImageLoadTokens",
                            "inputs": {"token_file": "../../etc/x.glmtokens.safetensors"}},
                      "2": {"class_type": "GLMImageSaveTokens", "inputs": {"tokens": ["1", 0], "filename_prefix": "t"}}})
    assert "outside ComfyUI's input folder" in str(rejected.value)
    entry = server.run(t2i("a cat", 0, 256, 256, 1, "fail/after"), timeout=300)
    assert entry["status"]["status_str"] == "success" and png_bytes(server, entry)


@pytest.mark.timeout(900)
def test_soak_fifty_prompts(server):
    pid = server.proc.pid
    order = [i % len(CONFIGS) for i in range(N_PROMPTS)]
    outputs: dict[int, bytes] = {}
    rss = []
    # queue everything at once, as a user filling the queue does; ComfyUI runs them in order
    ids = [server.queue(config_prompt(i)) for i in order]
    for n, (i, pid_) in enumerate(zip(order, ids)):
        entry = server.wait(pid_, timeout=300)
        assert entry["status"]["status_str"] == "success", (n, entry["status"])
        data = png_bytes(server, entry)
        if i in outputs:
            assert data == outputs[i], f"prompt {n} (config {i}) differs from its first run"
        else:
            outputs[i] = data
        rss.append(rss_kb(pid))
    assert len(outputs) == len(CONFIGS)
    assert len(set(outputs.values())) == len(CONFIGS), "different configurations gave identical images"

    warm, end = rss[WARMUP - 1], rss[-1]
    growth = end - warm
    print(f"\nsoak: {N_PROMPTS} prompts, RSS after warm-up ({WARMUP} prompts) {warm / 1024:.1f} MB, "
          f"after all {end / 1024:.1f} MB, growth {growth / 1024:+.1f} MB (bound {RSS_BOUND_KB / 1024:.0f} MB), "
          f"max {max(rss) / 1024:.1f} MB")
    assert growth <= RSS_BOUND_KB, f"RSS grew by {growth} kB after warm-up: {rss}"

    # each network is built once for the whole run (the loader output stays cached)
    loads = re.findall(r"GLM-Image: loading (.+?) \(", server.log_text())
    assert loads, "no model loading lines in the server log"
    print(f"soak: networks loaded: {loads}")
    assert len(loads) == len(set(loads)), f"a network was loaded more than once: {loads}"
    assert server.log_text().count("GLM-Image VAE load device") == 1



@pytest.mark.timeout(900)
def test_same_bytes_after_a_server_restart(server, tmp_path_factory):
    """Same inputs, same PNG bytes from a second, freshly started server process."""
    first = {i: png_bytes(server, server.run(config_prompt(i), timeout=300)) for i in (0, 2, 6)}
    second = gs.start(tmp_path_factory.mktemp("server-restart"), server.diffusers[gs.TINY_NAME], "reliability-restart")
    try:
        for i, data in first.items():
            assert png_bytes(second, second.run(config_prompt(i), timeout=300)) == data, \
                f"config {i} differs after a server restart"
    finally:
        gs.stop(second)
