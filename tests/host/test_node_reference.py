"""docs/nodes.md (the node reference the README links to) is what scripts/node_reference.py makes of
the nodes' current V3 schemas: a changed input, default or tooltip without regenerating it fails here."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import node_reference  # noqa: E402


def test_node_reference_is_up_to_date():
    want = node_reference.render(node_reference.pack_node_classes())
    with open(node_reference.OUT, encoding="utf-8") as f:
        got = f.read()
    assert got == want, "docs/nodes.md is stale: run .venv/bin/python scripts/node_reference.py"


def test_node_reference_covers_every_node_input_and_output():
    classes = node_reference.pack_node_classes()
    text = node_reference.render(classes)
    assert {c.define_schema().node_id for c in classes} >= {
        "GLMImageLoader", "GLMImageTextToTokens", "GLMImageGlyphText", "GLMImageReferenceEdit",
        "GLMImageTokensToLatent", "GLMImageSaveTokens", "GLMImageLoadTokens"}
    for cls in classes:
        s = cls.define_schema()
        section = text.split(f"(`{s.node_id}`)", 1)[1].split("\n## ", 1)[0]
        for inp in s.inputs:
            assert f"| `{inp.id}`" in section, (s.node_id, inp.id)
            if inp.tooltip:
                assert node_reference._cell(inp.tooltip) in section, (s.node_id, inp.id)
        for out in s.outputs or []:
            assert f"| `{out.display_name or out.id}` |" in section, (s.node_id, out.id)
