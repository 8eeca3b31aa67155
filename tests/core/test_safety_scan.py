"""Static safety scan of the pack's own code (glm_image_core/, nodes/, scripts/, __init__.py; not
.venv/.host/tests): no eval/exec, no torch.load, no unpickling of any kind.

`eval(` / `exec(` / `torch.load` are forbidden as text anywhere in a file (the project writes
`module.train(False)`, never `.eval()`, so the scan has no false hits). "pickle" is forbidden as code:
no import of pickle-family modules and no identifier containing it (e.g. numpy's `allow_pickle`); it
may appear in strings and comments, where the refusal messages explain that pickle files are refused.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNED = ("glm_image_core", "nodes", "scripts", "__init__.py")
FORBIDDEN_TEXT = re.compile(r"\beval\(|\bexec\(|torch\.load\b|torch\.jit\.load\b")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def python_files():
    for entry in SCANNED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
            continue
        for d, dirs, files in os.walk(path):
            dirs[:] = [x for x in dirs if x not in ("__pycache__", "node_modules")]
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)


def problems(source: str, name: str = "<source>") -> list[str]:
    found = [f"{name}:{source.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for m in FORBIDDEN_TEXT.finditer(source)]
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            found.append(f"{where}: {node.func.id}(...)")
        elif isinstance(node, ast.Name) and "pickle" in node.id.lower():
            found.append(f"{where}: name {node.id}")
        elif isinstance(node, ast.Attribute) and "pickle" in node.attr.lower():
            found.append(f"{where}: attribute .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg and "pickle" in node.arg.lower():
            found.append(f"{where}: keyword {node.arg}=")
    return found


def test_scan_covers_the_pack():
    files = list(python_files())
    rel = {os.path.relpath(f, ROOT).split(os.sep)[0] for f in files}
    assert {"glm_image_core", "nodes", "scripts", "__init__.py"} <= rel, rel
    assert len(files) > 20


def test_pack_code_has_no_eval_exec_or_unpickling():
    bad = []
    for path in python_files():
        with open(path, encoding="utf-8") as f:
            bad += problems(f.read(), os.path.relpath(path, ROOT))
    assert not bad, "forbidden constructs:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", [
    "import pickle\n", "from pickle import loads\n", "import dill as d\n", "x = eval('1')\n",
    "exec('x = 1')\n", "import torch\nsd = torch.load(p)\n", "import numpy as np\nnp.load(p, allow_pickle=True)\n",
    "m = __import__('os')\n", "model.eval()\n",
])
def test_scan_catches_each_forbidden_construct(source):
    assert problems(source), source


def test_scan_allows_explanations_in_strings():
    assert problems('raise ValueError("pickle-based weights are refused; never unpickled")\n') == []
    assert problems("model.train(False)\n# refuses pickle files\n") == []
