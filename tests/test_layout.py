"""The package's architecture, read from its source: imports run one way down the floors below, no module imports
one on a higher floor, and the modules' import graph has no circle (lazy imports inside functions count; imports
under `if TYPE_CHECKING:` do not, they never run)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmmlab"
# Floors, bottom first: a module may import from its own floor (no circle) or below.
FLOORS = ("files", "progress", "kv", "plan", "tasks", "models", "prune", "search", "lab", "cli", "__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    unit = module.split(".")[1] if module.count(".") else "files"  # lmmlab/__init__.py sits with the bottom floor
    return FLOORS.index(unit)


def type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports(path: Path, modules: set[str]) -> set[str]:
    """The lmmlab modules `path` imports (a `from lmmlab.pkg import name` of a submodule counts as that module)."""
    tree = ast.parse(path.read_text())
    skip = type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmmlab":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lmmlab")
    return found - {module_name(path)}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_every_module_sits_on_a_known_floor(graph):
    for module in graph:
        assert module == "lmmlab" or module.split(".")[1] in FLOORS, f"{module}: add its package to FLOORS"


def test_no_import_climbs_the_floors(graph):
    climbs = [f"{m} (floor {FLOORS[floor(m)]}) imports {d} (floor {FLOORS[floor(d)]})"
              for m, deps in graph.items() for d in deps if floor(d) > floor(m)]
    assert not climbs, "\n".join(climbs)


def test_the_import_graph_has_no_circle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (circle := visit(d)):
                return circle
        stack.pop()
        state[m] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module)
            assert circle is None, " -> ".join(circle)


def test_the_checks_see_a_climb_and_a_circle():
    """The checks themselves can fail: a made-up graph with an upward import and a circle."""
    fake = {"lmmlab.kv.cache": {"lmmlab.prune.scores"}, "lmmlab.prune.scores": {"lmmlab.prune.pruner"},
            "lmmlab.prune.pruner": {"lmmlab.prune.scores"}}
    assert floor("lmmlab.prune.scores") > floor("lmmlab.kv.cache")
    with pytest.raises(AssertionError, match="prune.pruner -> lmmlab.prune.scores|prune.scores -> lmmlab.prune.pruner"):
        test_the_import_graph_has_no_circle(fake)
    with pytest.raises(AssertionError, match="imports lmmlab.prune.scores"):
        test_no_import_climbs_the_floors(fake)


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "\n".join(long)
