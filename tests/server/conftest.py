import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    """The real ComfyUI server (main.py --cpu on 127.0.0.1, free port) with the pack and the tiny
    checkpoint, once per test module."""
    import glmtest_server
    srv = glmtest_server.start(tmp_path_factory.mktemp("server"), tiny_ckpt, "server-tier")
    yield srv
    glmtest_server.stop(srv)
