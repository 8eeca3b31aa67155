"""Shared fixtures for every test tier.

Tiers (pytest markers, all run by `make test`): core (plain PyTorch), parity (vs the
diffusers/transformers oracle), host (real ComfyUI in-process), server (real ComfyUI over
HTTP on loopback), browser (real ComfyUI frontend in headless Chromium).
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)           # `import glm_image_core` as a plain package
SUPPORT = os.path.join(ROOT, "tests", "_support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)        # test helper modules (glmtest_*.py)

# Deterministic CPU numerics for parity: fixed thread count (see reference-oracle.md §8).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The full-size tier (tests/fullsize: 20 min to 2.5 h of CPU, 35 GB of weights) is collected only when
# asked for (GLM_FULLSIZE=1, which `make fullsize` sets), never by `make test`.
collect_ignore = [] if os.environ.get("GLM_FULLSIZE") == "1" else ["fullsize"]


def _tier(path: str) -> str | None:
    for t in ("core", "parity", "host", "server", "browser", "fullsize"):
        if f"{os.sep}tests{os.sep}{t}{os.sep}" in path:
            return t
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        t = _tier(str(item.fspath))
        if t:
            item.add_marker(getattr(pytest.mark, t))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A complete random-weight GLM-Image folder in the official layout (tiny size)."""
    from glm_image_core.testing.tiny_checkpoint import write_checkpoint
    return write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "GLM-Image-tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tok(tiny_ckpt):
    """The tiny checkpoint's AR tokenizer (processor/ files; read-only)."""
    from glm_image_core.generation import ar_prompt
    return ar_prompt.GlmTokenizer.from_folder(os.path.join(tiny_ckpt, "processor"))


@pytest.fixture(scope="session")
def proc_cfg(tiny_ckpt):
    """The tiny checkpoint's image-processor settings (processor/processor_config.json)."""
    from glm_image_core.generation import ar_prompt
    return ar_prompt.read_processor_config(os.path.join(tiny_ckpt, "processor"))


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tmp_path_factory) -> str:
    """Same weights as tiny_ckpt, with AR and DiT split into shards + index json (official layout)."""
    from glm_image_core.testing.tiny_checkpoint import write_checkpoint
    return write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "GLM-Image-tiny-sharded"), "tiny", seed=0,
                            max_shard_bytes=4 * 1024 * 1024)
