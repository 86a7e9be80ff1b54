"""The package rules of the code base, checked on the source (AST) and in a live interpreter.

Layers, bottom up: spar_wire; node_firmware_sim, edge_runtime and train on it; export above train;
testbed (brokers, aggregator process, tiny models) on the units; trials (the field-trial product) on
testbed; benchmarks on top. No import circles between our modules, no private name imported from
another module, and no module longer than a reader takes in at once.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"spar_wire", "node_firmware_sim", "train", "export", "edge_runtime", "testbed", "trials", "benchmarks"}
FORBIDDEN = {
    # unit -> top-level modules it must never import
    "spar_wire": OURS - {"spar_wire"} | {"torch", "onnxruntime", "tensorrt"},
    "node_firmware_sim": {"torch", "train", "export", "edge_runtime", "testbed", "trials", "benchmarks", "onnxruntime"},
    "edge_runtime": {"torch", "train", "export", "node_firmware_sim", "testbed", "trials", "benchmarks"},
    # train reads datasets through spar_wire.dataset_format, never through the node exporter
    "train": {"node_firmware_sim", "edge_runtime", "export", "testbed", "trials", "benchmarks", "onnxruntime",
              "paho"},
    "export": {"node_firmware_sim", "edge_runtime", "testbed", "trials", "benchmarks"},
    # the test bed is shared by tests, trials and benchmarks: it may not lean on either of the last two
    "testbed": {"trials", "benchmarks", "torch"},
    # trials are a product of their own; benchmarks build on them, never the other way round
    "trials": {"benchmarks"},
}
MAX_MODULE_LINES = 600
# Physics scenarios are long by nature (one source per file, its constants and their sources).
LONG_MODULES_ALLOWED = ("node_firmware_sim/scenarios/",)


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


def our_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages (tests excluded)."""
    modules = {}
    for unit in sorted(OURS):
        for path in (REPO / unit).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def module_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file: at module level, under TYPE_CHECKING
    and inside functions alike, since a function-local import only hides a circle, it does not break it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_import_circles_between_our_modules():
    modules = our_modules()
    graph = {name: module_imports(name, path, modules) for name, path in modules.items()}
    assert not import_circles(graph), "import circles:\n" + "\n".join(map(" <-> ".join, import_circles(graph)))


def test_the_circle_finder_sees_a_circle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_is_imported_from_another_module():
    """A leading underscore means 'only this module uses it': another module that needs it gets a
    public name with a docstring instead."""
    offenders = []
    for name, path in our_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    offenders.append(f"{name} imports {private} from {node.module}")
    assert not offenders, "\n".join(offenders)


def test_no_module_is_longer_than_a_reader_takes_in():
    long = [f"{path.relative_to(REPO)}: {count} lines" for path in sorted(our_modules().values())
            if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES
            and not str(path.relative_to(REPO)).startswith(LONG_MODULES_ALLOWED)]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them along their seams):\n" + "\n".join(long)


def test_every_name_imported_from_our_modules_exists():
    """A split or move that leaves an import behind (often inside a function, where only the code path
    that runs it would notice) fails here instead of in the field."""
    code = r'''
import ast, importlib, pathlib, sys
ours = sys.argv[1].split(",")
missing = []
for unit in ours:
    for path in sorted(pathlib.Path(unit).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.split(".")[0] in ours):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path}:{node.lineno}: {node.module} has no {alias.name}")
sys.exit("\n".join(missing) or 0)
'''
    result = subprocess.run([sys.executable, "-c", code, ",".join(sorted(OURS))], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
