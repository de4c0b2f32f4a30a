"""Dependencies flow downward: the partitioner knows neither Ray nor ONNX Runtime; the runtime does not know Ray."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "onnxshard"
TOP = {"onnxshard.serve", "onnxshard.data", "onnxshard.cli"}  # the users of the engine: nothing below imports them
BANNED = {
    "partitioner": {"ray", "onnxruntime", "onnxshard.runtime", "onnxshard.workers", "onnxshard.distributed"} | TOP,
    "runtime": {"ray", "onnxshard.workers", "onnxshard.distributed"} | TOP,
    "workers": {"onnxshard.distributed"} | TOP,
    "distributed": TOP,
}
# imported by every layer: must stay free of both
SHARED = ["plans.py", "plan_parts.py", "plan_store.py", "kv_pairs.py", "plan_text.py", "sampling.py", "errors.py",
          "dtypes.py", "models.py", "files.py", "digests.py", "units.py"]


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def _offending(files, banned):
    return [(f.name, m) for f in files for m in _imports(f)
            if any(m == b or m.startswith(b + ".") for b in banned)]


@pytest.mark.parametrize("layer", sorted(BANNED))
def test_layer_does_not_import_upward(layer):
    files = list((PACKAGE / layer).rglob("*.py"))
    assert files
    assert _offending(files, BANNED[layer]) == []


def test_shared_modules_import_neither_ray_nor_onnxruntime():
    assert _offending([PACKAGE / f for f in SHARED], {"ray", "onnxruntime"}) == []


def test_the_protocol_layer_of_serving_needs_neither_ray_nor_a_web_framework():
    files = [PACKAGE / "serve" / f for f in ("kserve.py", "tensors.py", "repository.py")]
    assert _offending(files, {"ray", "fastapi", "starlette", "onnxruntime"}) == []
