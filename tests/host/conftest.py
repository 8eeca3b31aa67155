import os

import pytest


@pytest.fixture(scope="session")
def host(tmp_path_factory, tiny_ckpt):
    """The real ComfyUI host in-process, with the pack loaded and the tiny checkpoint installed
    as models/diffusers/GLM-Image-tiny."""
    import glmtest_host
    base = str(tmp_path_factory.mktemp("comfy_base"))
    os.makedirs(os.path.join(base, "models", "diffusers"), exist_ok=True)
    os.symlink(tiny_ckpt, os.path.join(base, "models", "diffusers", "GLM-Image-tiny"))
    return glmtest_host.Host(base)
