"""The floors of bigssl (docs/architecture.md), read from the source: no import circle, config.py
at the bottom, nothing importing the command line.

What counts as an import here: every `import` and `from … import` statement anywhere in a
module: at its top, inside a function or method, under `if TYPE_CHECKING:`, inside `try:`. A
lazy import postpones a dependency to run time; it does not remove it (the two modules still
cannot be understood, tested or changed apart), so a circle closed by one is still a circle.
An edge goes to the module named: `from a.b import c` is an edge to a.b.c when that is a module,
else to a.b. Not counted: the package `__init__` Python runs before any of its submodules (every
submodule would otherwise import its own package), and imports by a computed name
(`importlib.import_module(f"bigssl.methods.{name}")`: the plug-in loader), which name no module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bigssl"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under `package`."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_modules(source: str, module: str, is_package: bool, known: set[str] | dict[str, Path]) -> set[str]:
    """The modules of `known` that the statements of `source` (module `module`) import, relative
    imports resolved: `from a import b` is a.b when that is a module, else a."""
    found: set[str] = set()
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                         for alias in node.names)
    return {name for name in found if name in known} - {module}


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module → the bigssl modules it imports (see the module docstring for what counts)."""
    files = files if files is not None else module_files()
    return {name: imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", files)
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles (a → … → a) a depth-first walk closes, less any whose modules all lie on one
    already named: at least one through every group of modules that reach each other; [] when
    there is none."""
    found, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack = [(start, iter(sorted(graph[start])))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(path.pop())
                done.add(node)
            elif child in on_path:
                circle = path[path.index(child):] + [child]
                if not any(set(circle) <= set(known) for known in found):
                    found.append(circle)
            elif child not in done and child in graph:
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
                on_path.add(child)
    return found


def bigssl_imports(module: str) -> set[str]:
    return import_graph()[module]


# ------------------------------------------------------------------------- the walk itself
def test_lazy_and_type_checking_imports_count_and_relative_ones_resolve():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bigssl.c import C\n"
              "def f():\n    from bigssl import b\n    from .d import x\n")
    known = {"bigssl", "bigssl.a", "bigssl.b", "bigssl.c", "bigssl.d"}
    assert imported_modules(source, "bigssl.a", False, known) == {"bigssl.b", "bigssl.c", "bigssl.d"}


def test_the_cycle_finder_names_each_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_has_an_edge_per_imported_module(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name, text in {"__init__.py": "", "a.py": "from pkg import sub\nfrom pkg.b import thing\n",
                       "b.py": "def g():\n    import pkg.a\n", "sub/__init__.py": "from pkg.sub import c\n",
                       "sub/c.py": ""}.items():
        (package / name).write_text(text)
    graph = import_graph(module_files(package))
    assert graph["pkg.a"] == {"pkg.sub", "pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


# ------------------------------------------------------------------------------ the floors
def test_no_import_circle_in_bigssl():
    graph = import_graph()
    assert len(graph) > 80 and "bigssl.methods.base" in graph["bigssl.methods.simclr"]
    found = cycles(graph)
    assert not found, "import circles in bigssl/:\n" + "\n".join(" → ".join(circle) for circle in found)


def test_config_is_the_ground_floor():
    """config.py imports nothing of bigssl above it: what it needs to know of methods and view
    policies it is told (config.Registry, filled by bigssl.recipes)."""
    assert bigssl_imports("bigssl.config") <= {"bigssl.errors", "bigssl.config_ranges"}
    assert bigssl_imports("bigssl.config_ranges") <= {"bigssl.errors"}
    assert bigssl_imports("bigssl.errors") == set()


def test_no_module_imports_the_command_line():
    graph = import_graph()
    importers = sorted(name for name, edges in graph.items() if "bigssl.cli" in edges)
    assert importers == ["bigssl.__main__"]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions."""
    kinds = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    owners = [tree, *(node for node in ast.walk(tree) if isinstance(node, kinds))]
    return {id(owner.body[0].value) for owner in owners if owner.body and isinstance(owner.body[0], ast.Expr)
            and isinstance(owner.body[0].value, ast.Constant) and isinstance(owner.body[0].value.value, str)}


def method_names_in_code(path: Path, names: set[str]) -> list[str]:
    """`file:line: 'name'` for every string in the code of `path` (not its docstrings or comments,
    which may say whose setting a piece of code reproduces) that is a method or policy name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{shown}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and node.value.strip().lower() in names]


def test_the_data_pipeline_names_no_method():
    """Data code reads what a view policy declares (data.views.crop, color_space, channel_split,
    text), never which method's policy runs: a new method or policy changes nothing in bigssl/data/."""
    from bigssl.methods.policies import POLICIES
    from bigssl.methods.schemas import builtin_names

    names = set(builtin_names()) | set(POLICIES)
    assert {"cpc", "clip", "cmc", "mocov2", "vicreg"} <= names
    found = [hit for path in sorted((PACKAGE / "data").rglob("*.py")) for hit in method_names_in_code(path, names)]
    assert not found, "method names in bigssl/data/:\n" + "\n".join(found)


def test_a_method_name_in_data_code_would_be_found(tmp_path: Path):
    source = tmp_path / "views.py"
    source.write_text('"""For CPC: "cpc" in a docstring is fine."""\nif policy == "cpc":\n    pass\n')
    assert [hit.split(": ", 1)[1] for hit in method_names_in_code(source, {"cpc"})] == ["'cpc'"]


def test_methods_do_not_import_the_data_pipeline():
    """A method receives its views in the layout bigssl/methods/base.py documents (`Batch`)."""
    graph = import_graph()
    found = sorted(f"{name} → {target}" for name, edges in graph.items() if name.startswith("bigssl.methods")
                   for target in edges if target == "bigssl.data" or target.startswith("bigssl.data."))
    assert not found, "methods that import bigssl.data:\n" + "\n".join(found)


# --------------------------------------------------------------------- small, plugged-in parts
MAX_FUNCTION_LINES = 50
MAX_TRAINER_LINES = 250


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line: name (N lines)` for every function or method of `path` longer than `limit`
    lines, from its `def` to its last line (decorators not counted, its docstring counted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{shown}:{node.lineno}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > limit]


def class_lines(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    (node,) = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == name]
    return node.end_lineno - node.lineno + 1


def asked_not_declared(path: Path) -> list[str]:
    """`file:line: what` for every comparison with a `.kind` (an engine asked which it is) and
    every `hasattr(...)` (a method sniffed for what it can do) in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

    def asks_kind(node: ast.AST) -> bool:
        return isinstance(node, ast.Compare) and any(isinstance(side, ast.Attribute) and side.attr == "kind"
                                                     for side in [node.left, *node.comparators])

    def sniffs(node: ast.AST) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"

    return [f"{shown}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree) if asks_kind(node) or sniffs(node)]


def test_no_function_in_bigssl_is_over_50_lines():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in long_functions(path)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


def test_a_long_function_would_be_found(tmp_path: Path):
    source = tmp_path / "long.py"
    body = "".join(f"        x{i} = {i}\n" for i in range(50))
    source.write_text(f"def short():\n    pass\n\nclass A:\n    @staticmethod\n    def long():\n{body}")
    assert [hit.split(": ", 1)[1] for hit in long_functions(source)] == ["long (51 lines)"]
    assert long_functions(source, limit=51) == []


def test_the_trainer_is_the_loop():
    """Trainer steps, logs, checkpoints and handles signals; evaluation, the data position and
    the log window live in their own components (bigssl/eval/during_training.py, data/epoch.py,
    step_log.py)."""
    lines = class_lines(PACKAGE / "train.py", "Trainer")
    assert 100 < lines < MAX_TRAINER_LINES, f"Trainer is {lines} lines"


def test_the_trainer_asks_no_engine_its_kind_and_sniffs_no_method():
    """Engines declare capabilities (`Engine.capabilities`), methods their needs (`Method.encodes_text`)."""
    paths = [PACKAGE / "train.py", PACKAGE / "eval" / "during_training.py", PACKAGE / "checkpoint.py",
             *sorted((PACKAGE / "distributed" / "engines").glob("*.py"))]
    found = [hit for path in paths for hit in asked_not_declared(path)
             # The engines' own duck typing of torch and DeepSpeed objects is not about a method.
             if "engines" not in path.parts or ".kind" in hit]
    assert not found, "asked instead of declared:\n" + "\n".join(found)


def test_asking_an_engine_its_kind_or_sniffing_a_method_would_be_found(tmp_path: Path):
    source = tmp_path / "trainer.py"
    source.write_text('if self.config.engine.kind == "ddp":\n    pass\nif "ddp" != engine.kind:\n    pass\n'
                      'ok = hasattr(self.method, "encode_text")\nkind = "ddp"\nname = engine.kind\n')
    assert [hit.split(": ", 1)[1] for hit in asked_not_declared(source)] == [
        "self.config.engine.kind == 'ddp'", "'ddp' != engine.kind", "hasattr(self.method, 'encode_text')"]


def test_every_engine_is_registered_once_under_the_kind_a_recipe_names():
    """An engine is its module plus its entry in `ENGINES`; `engine.kind`'s choices in config.py
    (the ground floor, which imports no engine) must name exactly the registered ones."""
    from bigssl.config import CHOICES
    from bigssl.distributed.engines import ENGINES

    assert tuple(ENGINES) == CHOICES["engine.kind"]
    for kind, engine in ENGINES.items():
        assert engine.kind == kind and engine.checkpoint_marker
        assert not getattr(engine, "__abstractmethods__", None), f"{kind}: {sorted(engine.__abstractmethods__)}"
