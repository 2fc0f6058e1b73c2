"""The house rules of the code layout, checked on the source: no import cycle among the project's modules
(function-local imports included), and project modules imported at module level only (a function-local
import of our own code hides a cycle or a slow import; optional third-party packages may be lazy)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "utils")
SCRIPTS = ("train.py", "test.py", "detect.py", "export.py", "hubconf.py")


def _modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + [ROOT / s for s in SCRIPTS]
    out = {}
    for p in files:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported project module, at module level?, line) for every import of ``path``, TYPE_CHECKING blocks
    left out (annotations only, never executed)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in modules:
                found.append((name, id(node) in top, node.lineno))
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {name for name, _, _ in _imports(p, modules) if name != m} for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert len(graph) > 50  # the walk saw the project
    assert not cycles, f"import cycles: {cycles}"


def test_project_modules_are_imported_at_module_level():
    modules = _modules()
    local = [f"{p.relative_to(ROOT)}:{line} imports {name}" for m, p in modules.items()
             for name, at_top, line in _imports(p, modules) if not at_top]
    assert not local, "function-local imports of project modules:\n" + "\n".join(local)


def _imports_under(room: str) -> list[tuple[str, str]]:
    """(module of ``room``, project module it imports) for every module under the dotted ``room``."""
    modules = _modules()
    return [(m, name) for m, p in modules.items() if m == room or m.startswith(room + ".")
            for name, _, _ in _imports(p, modules)]


def _climbs(room: str, above: tuple[str, ...]) -> list[str]:
    return [f"{m} imports {name}" for m, name in _imports_under(room) if name.startswith(above)]


def test_runtime_room_is_below_loss_and_engine():
    """The runtime room (distributed, device, checkpoints, run folders) knows nothing of training or tasks, and
    the losses never climb into the trainer's room for it."""
    assert _imports_under("utils.runtime")  # the walk saw the room
    assert not _climbs("utils.runtime", ("utils.engine", "utils.loss", "utils.eval", "utils.data", "utils.deploy",
                                         "utils.viz", "utils.tasks"))
    assert not _climbs("utils.loss", ("utils.engine",))
    assert any(name.startswith("utils.runtime") for _, name in _imports_under("utils.loss"))


def test_deploy_letterboxes_through_ops_not_the_training_augment():
    """Inference makes its input with the letterbox of ``utils/ops`` (the module holding its inverse too), never
    through the training augmentation."""
    assert _imports_under("utils.deploy")
    assert not _climbs("utils.deploy", ("utils.data.augment",))
