"""The house rules of the code layout, checked on the source: no import cycle among the project's modules
(function-local imports included), and project modules imported at module level only (a function-local
import of our own code hides a cycle or a slow import; optional third-party packages may be lazy), and no public
function of the pipeline with more than 8 parameters (thresholds and limits travel as one ``PredictOptions``)."""
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


MAX_PARAMS = 8  # issue 30: thresholds and limits travel as one options object, not as a row of keywords
PIPELINE = ("utils",)
PIPELINE_SCRIPTS = ("train.py", "test.py", "detect.py", "export.py")


def _public_functions(path: Path):
    """(qualified name, line, parameter count without self/cls) of every public function and method of
    ``path``: module-level functions and methods of module-level classes whose names do not start with ``_``
    (``__init__`` and ``__call__`` count as public); nested functions are private by construction."""
    tree = ast.parse(path.read_text())
    funcs = [(None, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")):
        funcs += [(cls, n) for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for cls, fn in funcs:
        if fn.name.startswith("_") and fn.name not in ("__init__", "__call__"):
            continue
        a = fn.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [p for p in (a.vararg, a.kwarg) if p is not None]
        static = any(ast.unparse(d) == "staticmethod" for d in fn.decorator_list)
        if cls is not None and not static and params and params[0].arg in ("self", "cls"):
            params = params[1:]
        yield (f"{cls.name}.{fn.name}" if cls else fn.name), fn.lineno, len(params)


def test_public_functions_take_at_most_8_parameters():
    files = [p for pkg in PIPELINE for p in sorted((ROOT / pkg).rglob("*.py"))] + [ROOT / s for s in PIPELINE_SCRIPTS]
    seen, wide = 0, []
    for path in files:
        for name, line, n in _public_functions(path):
            seen += 1
            if n > MAX_PARAMS:
                wide.append(f"{path.relative_to(ROOT)}:{line} {name} takes {n} parameters")
    assert seen > 200  # the walk saw the pipeline
    assert not wide, f"more than {MAX_PARAMS} parameters (group them in an options object):\n" + "\n".join(wide)
