"""The package's shape, checked from its source: imports point down the stages and never loop, no private
name crosses a module, serve/ stands on core/ and data/ only, and no function outgrows a screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top: a module may import from its own layer or any layer below it.
LAYERS = ["orchestrator.core", "orchestrator.data", "orchestrator.reports", "serve", "orchestrator.training",
          "orchestrator.tuning", "orchestrator.artifacts", "orchestrator.deployment", "orchestrator"]
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted([*ROOT.glob("orchestrator/**/*.py"), *ROOT.glob("serve/**/*.py")]):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def layer(module: str) -> int:
    """The index in LAYERS of the longest prefix naming ``module``'s package."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS.index(max(matches, key=len))


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str, int]]:
    """(importer, imported module, imported name or "", line) for every project import, function-level too."""
    out = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out += [(name, a.name, "", node.lineno) for a in node.names if a.name in mods]
            elif isinstance(node, ast.ImportFrom) and node.module in mods:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.append((name, sub, "", node.lineno) if sub in mods else (name, node.module, a.name, node.lineno))
    return out


def test_imports_point_down_the_stages():
    mods = modules()
    upward = [f"{a} -> {b} (line {line})" for a, b, _, line in imports(mods) if layer(b) > layer(a)]
    assert not upward, upward


def test_no_import_circles():
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _, _ in imports(mods):
        if a != b:
            graph[a].add(b)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_private_name_crosses_a_module():
    crossing = [f"{a} imports {b}.{name} (line {line})" for a, b, name, line in imports(modules())
                if name.startswith("_") and a != b]
    assert not crossing, crossing


def test_serve_stands_on_core_and_data_only():
    mods = modules()
    wrong = [f"{a} -> {b}" for a, b, _, _ in imports(mods)
             if a.startswith("serve") and b.startswith("orchestrator")
             and not b.startswith(("orchestrator.core", "orchestrator.data"))]
    assert not wrong, wrong


def test_functions_fit_a_screen_and_packages_stay_small():
    long = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        long += [f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                 and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
        if path.name == "__init__.py":
            assert len(path.read_text().splitlines()) <= 12, f"{path}: a package's __init__ stays small"
        assert ast.get_docstring(tree), f"{path}: every module says what it holds"
    assert not long, long


def test_the_checks_see_a_planted_violation(tmp_path):
    """The import walk finds function-level imports and maps them to layers (guards the checks above)."""
    mods = modules()
    found = {(a, b) for a, b, _, _ in imports(mods)}
    assert ("orchestrator.cli", "orchestrator.training.train") in found  # a lazy import inside a verb
    assert layer("orchestrator.training.loop") > layer("orchestrator.data.pipelines")
    assert layer("orchestrator.cli") == len(LAYERS) - 1
