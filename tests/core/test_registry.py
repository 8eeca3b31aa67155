"""The network registry (glm_image_core/loading/registry.py) is the one place for each network's facts:
its signature recognises its own files and no other, it refuses the dtypes it does not take with the
reason, the memory plan and the converter speak its ids, and the network modules are pure architecture."""
import ast
import os

import pytest
import torch

from glm_image_core.loading import checkpoint as ckpt
from glm_image_core.loading import memory_plan as mp
from glm_image_core.loading import sources
from glm_image_core.loading.registry import NETWORKS, STORAGE_DTYPES, identify

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_each_signature_recognises_its_own_networks_files_and_no_other(tiny_ckpt):
    for net in NETWORKS.values():
        tensors = {}
        for f in ckpt.weight_files(os.path.join(tiny_ckpt, net.folder)):
            tensors.update(ckpt.weights_header(f)[1])
        matches = [n.id for n in NETWORKS.values() if n.signature(tensors) is not None]
        assert matches == [net.id], (net.id, matches)
        assert identify(tensors)[0] == net.id


@pytest.mark.parametrize("network,dtype,reason", [
    ("vae", "fp16", "overflows in fp16"),
    ("vae", "fp8_e4m3fn", "no fp8"),
    ("glyph_encoder", "fp8_e4m3fn", "numerically sensitive"),
])
def test_build_refuses_a_storage_dtype_the_network_does_not_take_with_the_reason(tiny_ckpt, network, dtype, reason):
    with pytest.raises(ValueError) as e:
        sources.build_network(sources.FolderSource(tiny_ckpt), network, STORAGE_DTYPES[dtype], "cpu", torch.nn)
    msg = str(e.value)
    assert dtype in msg and reason in msg and ", ".join(NETWORKS[network].storage) in msg


def test_build_refuses_a_compute_dtype_the_network_does_not_run_in(tiny_ckpt):
    with pytest.raises(ValueError, match="cannot compute in fp16"):
        sources.build_network(sources.FolderSource(tiny_ckpt), "vae", torch.float32, "cpu", torch.nn, torch.float16)


def test_every_dtype_a_network_takes_builds(tiny_ckpt):
    src = sources.FolderSource(tiny_ckpt)
    for net in NETWORKS.values():
        for name in net.storage:
            kw = {"parts": ("text",)} if net.id == "ar" else {}
            m = sources.build_network(src, net.id, STORAGE_DTYPES[name], "cpu", torch.nn, net.compute[-1], **kw)
            stored = {p.dtype for p in m.parameters()}
            assert STORAGE_DTYPES[name] in stored, (net.id, name, stored)


def test_a_pipeline_wide_weight_dtype_reaches_each_network_as_its_entry_says():
    assert NETWORKS["dit"].storage_for("fp8_e4m3fn") == NETWORKS["ar"].storage_for("fp8_e4m3fn") == "fp8_e4m3fn"
    assert NETWORKS["glyph_encoder"].storage_for("fp8_e4m3fn") == "default"     # never fp8
    assert NETWORKS["glyph_encoder"].storage_for("bf16") == "default"           # kept as stored
    assert NETWORKS["glyph_encoder"].storage_for("fp32") == "fp32"
    for net in NETWORKS.values():
        assert set(net.follows) <= set(net.storage), net.id


def test_the_memory_plan_speaks_the_registrys_ids():
    assert set(mp.NETWORK_IDS) == set(NETWORKS)
    assert set(mp.full_size_configs()) == set(NETWORKS)
    stats = mp.component_stats(mp.full_size_configs())
    assert set(stats) == set(NETWORKS) | {mp.AR_TEXT, mp.AR_VISION}
    for n in NETWORKS.values():
        assert mp.COMPONENT_NAMES[n.id] == n.short


def test_network_modules_are_pure_architecture():
    """networks/ reads no files and knows nothing of loading: no os/json/safetensors, no loading package."""
    folder = os.path.join(ROOT, "glm_image_core", "networks")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add("." * node.level + (node.module or ""))
        bad = {m for m in imported if m.split(".")[0] in ("os", "json", "safetensors", "glob")
               or m.startswith("..loading") or m.startswith("glm_image_core.loading")}
        assert not bad, (name, bad)
        opens = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "open"]
        assert not opens, name
