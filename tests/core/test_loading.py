"""glm_image_core.loading.build: one build-and-load routine for every network, independent of how the
``operations`` namespace allocates layers (ComfyUI's dynamic-VRAM layers are built without weights)."""
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from glm_image_core.loading import checkpoint as ckpt
from glm_image_core.loading.build import build_loaded, declared_shapes


class LazyLinear(nn.Linear):
    """A Linear built without weights that gets them only through load_state_dict (what comfy.ops
    Linear does under dynamic VRAM), written here in plain PyTorch."""

    def __init__(self, din, dout, bias=True, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = din, dout
        self.weight = self.bias = None

    def _load_from_state_dict(self, sd, prefix, meta, strict, missing, unexpected, errors):
        for name in ("weight", "bias"):
            if prefix + name in sd:
                setattr(self, name, nn.Parameter(sd[prefix + name], requires_grad=False))


class lazy_ops:
    Linear = LazyLinear


class Net(nn.Module):
    def __init__(self, operations=nn, device=None, dtype=None):
        super().__init__()
        self.a = operations.Linear(3, 4, device=device, dtype=dtype)
        self.b = operations.Linear(4, 2, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.b(self.a(x))


def weights(tmp_path, **override):
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
          "b.weight": torch.randn(2, 4, generator=g)}
    sd.update(override)
    sd = {k: v for k, v in sd.items() if v is not None}
    p = str(tmp_path / "w.safetensors")
    save_file(sd, p)
    return p, sd


def make(ops):
    return Net(ops, device="meta")


def test_declared_shapes_come_from_the_network_not_the_instance():
    assert declared_shapes(make) == {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4)}
    assert Net(lazy_ops).state_dict() == {}          # what an instance-based check would compare against


@pytest.mark.parametrize("ops", [nn, lazy_ops], ids=["torch.nn", "lazy layers"])
def test_loads_the_same_network_whatever_the_layers(tmp_path, ops):
    path, sd = weights(tmp_path)
    m = build_loaded(make, ops, [path], "test net")
    x = torch.randn(5, 3)
    want = (x @ sd["a.weight"].T + sd["a.bias"]) @ sd["b.weight"].T
    assert torch.equal(m(x), want)
    assert not any(p.is_meta for p in m.parameters())


@pytest.mark.parametrize("ops", [nn, lazy_ops], ids=["torch.nn", "lazy layers"])
def test_wrong_files_are_named(tmp_path, ops):
    path, _ = weights(tmp_path, **{"a.bias": None, "c.weight": torch.zeros(1), "b.weight": torch.zeros(3, 4)})
    with pytest.raises(ckpt.CheckpointError, match=r"missing key.*a\.bias.*unexpected key.*c\.weight.*shape mismatch.*b\.weight"):
        build_loaded(make, ops, [path], "test net")


def test_storage_dtype_is_applied(tmp_path):
    path, _ = weights(tmp_path)
    m = build_loaded(make, lazy_ops, [path], "test net", storage=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_a_layer_that_drops_its_weight_is_caught(tmp_path):
    class Forgetful(LazyLinear):
        def _load_from_state_dict(self, *args):
            return None

    class forgetful_ops:
        Linear = Forgetful
    path, _ = weights(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="left 3 weight"):
        build_loaded(make, forgetful_ops, [path], "test net")
