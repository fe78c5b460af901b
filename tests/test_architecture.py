"""The package's shape stays what docs/architecture.md draws.

Every import of the package's own modules (at the top of a file or inside a function)
is read with ``ast``: imports go down the layers only, no module imports another
module's private (``_``) name, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llama2_mlx"

# Bottom to top. A module may import from its own subpackage and from lower layers;
# subpackages on the same layer do not import each other.
LAYERS = [
    {"errors", "blas"},
    {"io"},
    {"chat"},
    {"formats"},
    {"models"},
    {"checkpoints"},
    {"generation", "training"},
    {"rlhf", "eval", "demo"},
    {"serve"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """The layer unit of a module: its subpackage (``llama2_mlx.models.cache`` -> models)."""
    parts = module.split(".")
    if parts[0] == "cli":
        return "cli"
    if parts[0] != "llama2_mlx" or len(parts) < 2:
        return None  # the package's facade (__init__) may import anything
    return parts[1]


def _sources(root: Path = ROOT):
    files = sorted((root / "llama2_mlx").rglob("*.py")) + sorted((root / "cli").rglob("*.py"))
    return {_module_name(f, root): f for f in files}


def _imports(module: str, path: Path):
    """``(imported module, [names], line)`` for each import of the project's own code."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("llama2_mlx", "cli"):
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] in ("llama2_mlx", "cli"):
                yield target, [a.name for a in node.names], node.lineno


def _graph(root: Path = ROOT):
    sources = _sources(root)
    edges: dict[str, set[str]] = {m: set() for m in sources}
    found = []
    for module, path in sources.items():
        for target, names, line in _imports(module, path):
            # "from pkg import mod" imports the module pkg.mod
            targets = [f"{target}.{n}" if f"{target}.{n}" in sources else target for n in names] \
                or [target]
            for t in targets:
                if t in sources and t != module:
                    edges[module].add(t)
            found.append((module, path, target, names, line))
    return sources, edges, found


def upward_imports(root: Path = ROOT) -> list[str]:
    _, _, found = _graph(root)
    bad = []
    for module, path, target, _, line in found:
        a, b = _unit(module), _unit(target)
        if a is None or b is None or a == b:
            continue
        assert a in RANK and b in RANK, f"{module} or {target}: add its subpackage to LAYERS"
        if RANK[b] >= RANK[a]:
            bad.append(f"{path.relative_to(root)}:{line}: {a} imports {target} ({b})")
    return bad


def find_cycle(root: Path = ROOT) -> list[str]:
    _, edges, _ = _graph(root)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_imports_go_down_the_layers_only():
    bad = upward_imports()
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    _, _, found = _graph()
    bad = [f"{path.relative_to(ROOT)}:{line}: {n} from {target}"
           for module, path, target, names, line in found
           for n in names if n.startswith("_") and target != module]
    assert not bad, "\n".join(bad)


def test_no_private_attribute_of_another_module_is_used():
    sources = _sources()
    bad = []
    for module, path in sources.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(("llama2_mlx.", "cli.")) and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama2_mlx"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in sources:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_module_graph_has_no_cycle():
    cycle = find_cycle()
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_module_grows_past_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources().values()
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"


def test_the_checker_sees_a_planted_violation(tmp_path):
    # An upward import from the bottom layer is both a layer violation and a cycle.
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "llama2_mlx")
    shutil.copytree(ROOT / "cli", tmp_path / "cli")
    errors = tmp_path / "llama2_mlx" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom llama2_mlx.io.hub import resolve\n")
    assert any("errors imports llama2_mlx.io.hub" in b for b in upward_imports(tmp_path))
    assert "llama2_mlx.errors" in find_cycle(tmp_path)
