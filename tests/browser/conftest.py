import os

import pytest

import glmtest_host

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "NEWEST_FRONTEND"), encoding="utf-8") as f:
    NEWEST_FRONTEND = f.read().strip()
# The host's own frontend on every host; on ComfyUI 0.33 also the newest frontend on the package index
# (make browser-deps unpacks it into .cache/), served with --front-end-root: what users who update
# their frontend run.
FRONTENDS = ["host"] + (["newest"] if glmtest_host.comfy_version() >= (0, 33) else [])


@pytest.fixture(scope="module", params=FRONTENDS)
def server(request, tmp_path_factory, tiny_ckpt):
    """The real ComfyUI server serving the frontend, with the pack and the tiny checkpoint; latent
    previews on (ComfyUI's default is none), as a user who wants to watch the decoder starts it.
    ``server.frontend``: the frontend version served; ``server.hosts_own``: whether it is the host's."""
    import glmtest_server
    args = ("--preview-method", "auto")
    version = glmtest_host.frontend_version()
    if request.param == "newest":
        root = os.path.join(glmtest_server.ROOT, ".cache", f"frontend-{NEWEST_FRONTEND}", "static")
        assert os.path.isfile(os.path.join(root, "index.html")), f"no frontend {NEWEST_FRONTEND}: make browser-deps"
        args += ("--front-end-root", root)
        version = NEWEST_FRONTEND
    srv = glmtest_server.start(tmp_path_factory.mktemp("browser_server"), tiny_ckpt, f"browser-tier-{request.param}",
                               extra_args=args)
    srv.frontend, srv.hosts_own = version, request.param == "host"
    yield srv
    glmtest_server.stop(srv)
