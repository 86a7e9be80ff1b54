"""The dependency rules of DESIGN.md, checked on the source (AST) and in a live interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"spar_wire", "node_firmware_sim", "train", "export", "edge_runtime", "benchmarks"}
FORBIDDEN = {
    # unit -> top-level modules it must never import
    "spar_wire": OURS - {"spar_wire"} | {"torch", "onnxruntime", "tensorrt"},
    "node_firmware_sim": {"torch", "train", "export", "edge_runtime", "benchmarks", "onnxruntime"},
    "edge_runtime": {"torch", "train", "export", "node_firmware_sim", "benchmarks"},
    # train reads datasets through spar_wire.dataset_format, never through the node exporter
    "train": {"node_firmware_sim", "edge_runtime", "export", "benchmarks", "onnxruntime", "paho"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value).split(".")[0])
    return found


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_units_respect_the_dependency_rules(unit):
    files = sorted((REPO / unit).rglob("*.py"))
    assert files, f"{unit} has no Python files"
    violations = [f"{f.relative_to(REPO)} imports {sorted(imported_modules(f) & FORBIDDEN[unit])}"
                  for f in files if imported_modules(f) & FORBIDDEN[unit]]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_forbidden_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom torch import nn\nimport train.models as m\n__import__('export')\n")
    assert imported_modules(sample) >= {"torch", "train", "export"}


@pytest.mark.parametrize("module", ["spar_wire", "node_firmware_sim.skeleton_node",
                                    "edge_runtime.skeleton_ingest"])
def test_runtime_units_load_without_torch(module):
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in ('torch', 'train', 'export') if m in sys.modules); "
            "sys.exit(f'loaded {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr + result.stdout


def test_spar_wire_imports_paho_only_inside_functions():
    """The shared MQTT client factory may use paho, but ``import spar_wire`` must not need it."""
    for path in (REPO / "spar_wire").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "paho" for n in names), f"{path}: module-level paho import"


def test_spar_wire_import_does_not_pull_paho():
    code = "import sys, spar_wire; sys.exit('paho loaded' if 'paho' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr + result.stdout
