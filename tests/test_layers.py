"""The house rules of the package's layers (issue 23, item 3), read from the source's import statements.

Every `.py` of askexpert/, strategies/ and datamodules/ is parsed (not imported) and every `import` in it is
counted, at module level and inside functions alike: a function-level import is still an arrow between two
modules, it only runs later. A module is a file; a package's `__init__.py` is a module of its own (named after
the package); `import a.b.c` depends on `a.b.c`, and `from a.b import c` on `a.b.c` when that is a module of
ours, else on `a.b`. Imports by name at run time (`importlib.import_module`) are not arrows here: they are how
the CLI and the checkpoint loader reach commands and classes on purpose.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from conftest import REPO

PACKAGES = ("askexpert", "strategies", "datamodules")

# What may not import a command: every part of askexpert that a command is built from, and the two top-level
# packages of strategies and data.
LIBRARY = (
    *(f"askexpert.{part}" for part in ("ablation", "collab", "deploy", "files", "runs", "models", "modules")),
    *(f"askexpert.{part}" for part in ("callbacks", "export", "pipeline", "parsers", "errors", "loggers", "adapt")),
    "strategies",
    "datamodules",
)
COMMANDS = ("askexpert.commands", "askexpert.cli")
# Routing and the cost model work on tensors; a model's FLOPs come from the registry (askexpert.models).
ROUTING_AND_COSTS = tuple(f"askexpert.collab.{name}" for name in ("routing", "costs", "sweep", "budgets", "system"))
LIGHTNING = ("lightning", "lightning_fabric", "pytorch_lightning")
FILES_MAY_NOT_IMPORT = ("askexpert.modules", "askexpert.commands", "askexpert.pipeline", *LIGHTNING)
# askexpert/files/checkpoint_io.py is Lightning's checkpoint plugin: `AtomicCheckpointIO` subclasses Lightning's
# `TorchCheckpointIO` (that is how the Trainer is told to write and read checkpoints through it), so it is the one
# file of the bottom layer that has to import Lightning.
FILES_LIGHTNING_PLUGIN = "askexpert.files.checkpoint_io"
# Taken by processes that must not pay for torch (a second writer's refusal, the expert server's workers).
STANDARD_LIBRARY_ONLY = ("askexpert.files.atomic", "askexpert.runs.lock")


@dataclass(frozen=True)
class Import:
    target: str  # a module of ours when it resolves to one, else the dotted name as written
    line: int


# -- reading the imports -------------------------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def module_files(root: Path = REPO) -> dict[str, Path]:
    return {module_name(path, root): path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a `from ... import` names, relative imports resolved against the importing module."""
    if not node.level:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports_in(source: str, importer: str, modules, is_package: bool = False) -> list[Import]:
    """Every import in `source` (module level, in functions, in classes), resolved as the module docstring says."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, importer, is_package)
            for alias in node.names:
                member = f"{base}.{alias.name}"
                found.append(Import(member if member in modules else base, node.lineno))
    return found


@cache
def import_table() -> dict[str, list[Import]]:
    """{module: its imports} for every module of the three packages."""
    modules = module_files()
    return {
        name: imports_in(path.read_text(encoding="utf-8"), name, modules, path.name == "__init__.py")
        for name, path in modules.items()
    }


def graph(table: dict[str, list[Import]]) -> dict[str, list[str]]:
    """The arrows between our own modules (sorted, without duplicates)."""
    return {name: sorted({i.target for i in found if i.target in table}) for name, found in table.items()}


def cycles(arrows: dict[str, list[str]]) -> list[list[str]]:
    """A cycle (its first module repeated at the end) for each arrow back onto the path of a depth-first walk:
    at least one through every group of modules that import each other, none when there is no such group."""
    found, state = [], {}  # state: 1 on the current path, 2 finished
    for start in sorted(arrows):
        if start in state:
            continue
        path, todo = [start], [iter(arrows[start])]
        state[start] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(arrows[nxt]))
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether module `name` is one of `prefixes` or inside one (a package)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def line_of(importer: str, target: str) -> str:
    path = module_files()[importer].relative_to(REPO)
    lines = sorted({i.line for i in import_table()[importer] if i.target == target})
    return f"{path}:{','.join(map(str, lines))}"


def violations(importers: tuple[str, ...], forbidden: tuple[str, ...], allowed=lambda importer, target: False):
    """`path:line: importer imports target` for each import of a module in `importers` that reaches `forbidden`."""
    return sorted(
        {
            f"{line_of(name, i.target)}: {name} imports {i.target}"
            for name, found in import_table().items()
            if within(name, importers)
            for i in found
            if within(i.target, forbidden) and not allowed(name, i.target)
        }
    )


def reachable(start: str, arrows: dict[str, list[str]]) -> dict[str, str]:
    """{module: the module that first imported it} for everything `start` loads when it is imported: its imports,
    theirs, and the packages (`__init__.py`) above each, which Python runs first."""
    parents, todo = {start: ""}, [start]
    while todo:
        name = todo.pop()
        above = [".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)]
        for nxt in [*above, *arrows.get(name, ())]:
            if nxt in arrows and nxt not in parents:
                parents[nxt] = name
                todo.append(nxt)
    return parents


def chain(parents: dict[str, str], end: str) -> str:
    names = [end]
    while parents[names[-1]]:
        names.append(parents[names[-1]])
    return " -> ".join(reversed(names))


# -- the reader itself ---------------------------------------------------------------------------------------
def test_the_reader_counts_function_level_and_relative_imports_and_finds_a_cycle() -> None:
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    source = "import os\nfrom pkg import b\n\ndef later():\n    from .sub import c\n    import pkg.sub\n"
    found = imports_in(source, "pkg.a", modules)
    assert [(i.target, i.line) for i in found] == [("os", 1), ("pkg.b", 2), ("pkg.sub.c", 5), ("pkg.sub", 6)]
    assert [i.target for i in imports_in("from . import a\nfrom .a import thing", "pkg", modules, True)] == [
        "pkg.a",
        "pkg.a",
    ]

    arrows = {"pkg": [], "pkg.a": ["pkg.b"], "pkg.b": ["pkg.sub.c"], "pkg.sub": [], "pkg.sub.c": ["pkg.a"]}
    assert cycles(arrows) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert cycles({**arrows, "pkg.sub.c": []}) == []
    assert cycles({"x": ["x"]}) == [["x", "x"]]
    # importing a module runs the packages above it first
    loaded = reachable("pkg.sub.c", {**arrows, "pkg.a": []})
    assert loaded == {"pkg.sub.c": "", "pkg": "pkg.sub.c", "pkg.sub": "pkg.sub.c", "pkg.a": "pkg.sub.c"}


def test_every_module_of_the_three_packages_is_read() -> None:
    table = import_table()
    for package in PACKAGES:
        files = list((REPO / package).rglob("*.py"))
        assert files and sum(within(name, (package,)) for name in table) == len(files)
    # the cost model asks the registry for a network inside a function: that arrow is seen
    assert any(within(i.target, ("askexpert.models",)) for i in table["askexpert.collab.costs"])


# -- the rules -----------------------------------------------------------------------------------------------
def test_no_import_cycle_between_our_modules() -> None:
    found = cycles(graph(import_table()))
    shown = [
        " -> ".join(f"{a} ({line_of(a, b)})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"
        for cycle in found
    ]
    assert not found, "import cycles:\n" + "\n".join(shown)


def room(module: str) -> str:
    """The room of the house a module is in: a sub-package or top-level module of askexpert (askexpert.pipeline,
    askexpert.errors), or strategies / datamodules as a whole."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "askexpert" else parts[0]


def room_arrows() -> dict[str, list[str]]:
    arrows: dict[str, set[str]] = {}
    for importer, targets in graph(import_table()).items():
        arrows.setdefault(room(importer), set())
        arrows[room(importer)].update(room(t) for t in targets if room(t) != room(importer))
    return {name: sorted(found) for name, found in arrows.items()}


def test_the_rooms_point_one_way() -> None:
    """Between rooms as between modules: no two rooms reach each other, so each can be read knowing only those
    below it (docs/architecture.md draws the order)."""
    found = cycles(room_arrows())
    assert not found, "rooms that import each other:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_library_parts_never_import_a_command() -> None:
    found = violations(LIBRARY, COMMANDS)
    assert not found, "library code imports a command (commands are built from the library, never the other way):\n" + (
        "\n".join(found)
    )


def test_routing_and_costs_never_load_a_lightning_module() -> None:
    """Directly or through what they import: FLOPs come from askexpert.models, never a LightningModule."""
    arrows = graph(import_table())
    found = []
    for name in ROUTING_AND_COSTS:
        assert name in arrows, f"{name} is gone: update ROUTING_AND_COSTS"
        parents = reachable(name, arrows)
        found += [chain(parents, hit) for hit in sorted(parents) if within(hit, ("askexpert.modules",))]
    assert not found, "routing and costs load askexpert.modules:\n" + "\n".join(found)


def test_files_is_the_bottom_layer() -> None:
    def plugin_needs_lightning(importer: str, target: str) -> bool:
        return importer == FILES_LIGHTNING_PLUGIN and within(target, LIGHTNING)

    found = violations(("askexpert.files",), FILES_MAY_NOT_IMPORT, plugin_needs_lightning)
    assert not found, "askexpert/files/ reaches up a layer:\n" + "\n".join(found)


def test_the_plugin_is_why_files_may_import_lightning() -> None:
    """The exception above holds only while checkpoint_io.py subclasses Lightning's TorchCheckpointIO."""
    tree = ast.parse(module_files()[FILES_LIGHTNING_PLUGIN].read_text(encoding="utf-8"))
    bases = [ast.unparse(base) for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for base in node.bases]
    assert "TorchCheckpointIO" in bases


def outside_the_standard_library(name: str) -> list[str]:
    """What importing `name` loads besides the standard library and askexpert (its imports, those of the askexpert
    modules it imports, and of the packages above each), each with the chain of imports that leads to it."""
    table = import_table()
    arrows = graph(table)
    parents = reachable(name, arrows)
    return [
        f"{chain(parents, module)} imports {target} ({line_of(module, target)})"
        for module in sorted(parents)
        for target in sorted({i.target for i in table[module] if i.target not in table})
        if target.split(".")[0] not in sys.stdlib_module_names
    ]


def test_atomic_writes_and_the_run_lock_need_the_standard_library_only() -> None:
    found = [line for name in STANDARD_LIBRARY_ONLY for line in outside_the_standard_library(name)]
    assert not found, "not the standard library:\n" + "\n".join(found)
    # the check sees what a module pulls in through askexpert: checkpoints need torch
    assert any(
        line.endswith(f"imports torch ({line_of('askexpert.files.checkpoints', 'torch')})")
        for line in outside_the_standard_library("askexpert.files.checkpoints")
    )


def test_a_lock_is_taken_without_loading_anything_but_the_standard_library(tmp_path) -> None:
    """The same rule, at run time: nothing outside the standard library and askexpert is in sys.modules."""
    script = (
        "import sys\n"
        "from askexpert.files.atomic import write_json\n"
        "from askexpert.runs.lock import locked\n"
        "with locked(sys.argv[1]):\n"
        "    write_json(sys.argv[1] + '/x.json', {'a': 1})\n"
        "top = {name.split('.')[0] for name in sys.modules}\n"
        "print(' '.join(sorted(top - set(sys.stdlib_module_names) - {'askexpert', '__main__'})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "", f"taking a lock loaded {done.stdout.strip()}"
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'
