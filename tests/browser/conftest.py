import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    """The real ComfyUI server serving the frontend, with the pack and the tiny checkpoint; latent
    previews on (ComfyUI's default is none), as a user who wants to watch the decoder starts it."""
    import glmtest_server
    srv = glmtest_server.start(tmp_path_factory.mktemp("browser_server"), tiny_ckpt, "browser-tier",
                               extra_args=("--preview-method", "auto"))
    yield srv
    glmtest_server.stop(srv)
