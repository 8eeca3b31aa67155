import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    """The real ComfyUI server serving the frontend, with the pack and the tiny checkpoint."""
    import glmtest_server
    srv = glmtest_server.start(tmp_path_factory.mktemp("browser_server"), tiny_ckpt, "browser-tier")
    yield srv
    glmtest_server.stop(srv)
