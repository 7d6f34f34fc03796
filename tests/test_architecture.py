"""The package's shape, checked: one-way imports, no private names across modules, small functions and
classes, and a CLI that starts without torch. These are the rules issue #11 set; a change that breaks
one fails here with the place named, rather than in a reviewer's head."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gnsurgeon"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
LAZY_ALLOWED = {"cli.py", "__init__.py"}  # the CLI and the package root load stages on demand
MAX_FUNCTION_LINES = 80
MAX_INSTANCE_ATTRIBUTES = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` node names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


_TREES: dict[Path, ast.Module] = {}


def parsed(path: Path) -> ast.Module:
    """One parse per file, so node identities agree between calls."""
    if path not in _TREES:
        _TREES[path] = ast.parse(path.read_text())
    return _TREES[path]


def intra_imports(path: Path, top_level_only: bool):
    tree = parsed(path)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = resolve(path, node)
            if target == "gnsurgeon" or target.startswith("gnsurgeon."):
                yield node, target


def test_no_private_name_crosses_a_module_boundary():
    found = []
    for path in MODULES:
        for node, target in intra_imports(path, top_level_only=False):
            for alias in node.names:
                if alias.name.startswith("_") and alias.name != "__version__":
                    found.append(f"{path.name}:{node.lineno} imports {alias.name} from {target}")
    assert not found, found


def type_checking_imports(path: Path) -> set[int]:
    """Imports under a module-level ``if TYPE_CHECKING:``: names for annotations, never executed."""
    return {
        id(sub)
        for node in parsed(path).body
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for sub in ast.walk(node)
    }


def test_intra_package_imports_are_at_the_top_of_the_file():
    found = []
    for path in MODULES:
        if path.name in LAZY_ALLOWED and path.parent == PACKAGE:
            continue
        top = {id(n) for n, _ in intra_imports(path, top_level_only=True)} | type_checking_imports(path)
        for node, target in intra_imports(path, top_level_only=False):
            if id(node) not in top:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {target} inside a function")
    assert not found, found


def test_the_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        name = module_name(path)
        deps = graph.setdefault(name, set())
        for node, target in intra_imports(path, top_level_only=True):
            deps.add(target)
            for alias in node.names:  # `from . import x` where x is a module
                if f"{target}.{alias.name}" in {module_name(p) for p in MODULES}:
                    deps.add(f"{target}.{alias.name}")
    graph = {k: {d for d in v if d in graph and d != k and not k.startswith(d + ".")} for k, v in graph.items()}
    graph.pop("gnsurgeon", None)
    graph = {k: v - {"gnsurgeon"} for k, v in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def body_lines(node: ast.AST) -> int:
    """Lines of a function's body, its docstring excluded."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_is_over_80_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({body_lines(node)} lines)")
    assert not long, long


def test_no_class_has_more_than_12_instance_attributes():
    big = []
    for path in MODULES:
        for node in ast.walk(parsed(path)):
            if not isinstance(node, ast.ClassDef):
                continue
            names = {
                t.attr
                for sub in ast.walk(node)
                for t in (sub.targets if isinstance(sub, ast.Assign) else [getattr(sub, "target", None)])
                if isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                and isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            }
            fields = {
                s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
            is_dataclass = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            count = len(names | (fields if is_dataclass else set()))
            if not is_dataclass and count > MAX_INSTANCE_ATTRIBUTES:
                big.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({count} attributes)")
    assert not big, big


def test_importing_the_package_and_the_cli_loads_no_torch():
    code = (
        "import sys, gnsurgeon, gnsurgeon.cli\n"
        "heavy = [m for m in ('torch', 'torchvision', 'timm', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at startup: {out.stdout.strip()}"
