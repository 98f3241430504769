"""The tree is the architecture: no import circles among the project's modules (imports inside
functions count), a small replica/ top level, a front end that never loads torch, and the deploy
plan's KV sizing held to the engine's."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replica.engine.kv_cache import BLOCK_SIZE, blocks_that_fit, bytes_per_token
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.loading.weights import NameBuilder, build
from replica.model.qwen3 import Qwen3
from replica.ops import select_ops

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "benchmarks", "loadtest", "queueing", "replica", "shortcuts")
FRONT_END = ("server", "api", "queueing", "shortcuts", "replica.wire")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every project module outside tests/."""
    modules = {"server": ROOT / "server.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body (a name imported from a
    package counts as the submodule when there is one)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                found.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_round_a_circle():
    graph = import_graph()
    assert "replica.engine.engine" in graph["replica.startup"]  # the walk sees imports at all
    assert cycles(graph) == []


# Each layer imports only itself and those below it: engine -> model -> ops (attention among
# them) -> kernels, and kernels nothing of the project. The worker (through replica.startup)
# loads the model and hands it to the engine; loading builds models, never engines.
LAYERS: dict[str, tuple[str, ...]] = {
    "replica.kernels": ("replica.kernels",),
    "replica.ops": ("replica.ops", "replica.kernels"),
    "replica.model": ("replica.model", "replica.ops"),
    "replica.loading": (
        "replica.loading",
        "replica.model",
        "replica.ops",
        "replica.tokenization",
        "replica.wire",
    ),
    "replica.engine": ("replica.engine", "replica.model", "replica.ops", "replica.wire"),
    "replica.wire": ("replica.wire",),
    "queueing": ("queueing", "replica.wire", "shortcuts"),
}
NOT_FROM_REPLICA = ("benchmarks", "tests", "loadtest", "api", "queueing", "shortcuts", "server")


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layering_breaches(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) for each import a rule of LAYERS or NOT_FROM_REPLICA forbids."""
    breaches = []
    for module, imported in sorted(graph.items()):
        allowed = next((v for k, v in LAYERS.items() if in_package(module, k)), None)
        for target in sorted(imported):
            if allowed is not None:
                if not any(in_package(target, layer) for layer in allowed):
                    breaches.append((module, target))
            elif in_package(module, "replica") and any(
                in_package(target, top) for top in NOT_FROM_REPLICA
            ):
                breaches.append((module, target))
    return breaches


def test_imports_run_down_the_layers():
    graph = import_graph()
    assert "replica.kernels.moe" in graph  # the walk covers the kernels
    assert layering_breaches(graph) == []


def test_the_layer_rules_catch_an_import_that_climbs():
    graph = {
        "replica.kernels.moe": {"replica.ops.packed"},
        "replica.model.qwen3": {"replica.engine.kv_cache", "replica.ops.attention"},
        "replica.engine.engine": {"replica.loading.model", "replica.model.qwen3"},
        "replica.startup": {"benchmarks.bench"},
        "queueing.service": {"api.params", "queueing.options"},
    }
    assert layering_breaches(graph) == [
        ("queueing.service", "api.params"),
        ("replica.engine.engine", "replica.loading.model"),
        ("replica.kernels.moe", "replica.ops.packed"),
        ("replica.model.qwen3", "replica.engine.kv_cache"),
        ("replica.startup", "benchmarks.bench"),
    ]


def test_the_cycle_finder_sees_a_circle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = "def late():\n    from replica.worker import serve\n"
    path = ROOT / "tests" / "_probe.py"
    path.write_text(source)
    try:
        assert imports_of(path, "probe", project_modules()) == {"replica.worker"}
    finally:
        path.unlink()


def test_replica_keeps_at_most_ten_modules_at_its_top():
    assert len(list((ROOT / "replica").glob("*.py"))) <= 10


def test_the_front_end_imports_no_torch_and_no_engine():
    """Importing every front-end module loads neither torch nor any of replica/ but its wire."""
    names = [
        n for n in project_modules() if any(n == f or n.startswith(f + ".") for f in FRONT_END)
    ]
    assert "queueing.replica_link" in names and "api.responses" in names
    probe = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "engine = [m for m in sys.modules if m.startswith('replica.')"
        " and not m.startswith('replica.wire')]\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)), engine)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[] []"


VENDORED = sorted(path.name for path in VENDORED_CONFIGS.iterdir())


@pytest.mark.parametrize("name", VENDORED)
def test_the_deploy_plan_sizes_kv_as_the_engine_does(name):
    """deploy/systems.py works without torch, so it re-derives the engine's sizing: the bytes a
    token's K/V take, the weights' bytes, the block size, and the blocks a budget holds must be
    the engine's."""
    systems = importlib.import_module("deploy.systems")  # a namespace package: no torch there
    config = resolve(str(VENDORED_CONFIGS / name), random_weights=True).config
    raw = json.loads((VENDORED_CONFIGS / name / "config.json").read_text())
    shape = systems.Shape.from_config(raw)
    assert shape.kv_bytes_per_token == bytes_per_token(config, torch.bfloat16)
    weights = Qwen3(config, build(config, NameBuilder()), select_ops(torch.device("cpu")))
    assert shape.weight_bytes == weights.weight_bytes() // 2
    assert systems.BLOCK_SIZE == BLOCK_SIZE
    block_bytes = BLOCK_SIZE * shape.kv_bytes_per_token
    for budget_gib in (0.001, 12, 19.3, 60):
        budget = int(budget_gib * 2**30)
        engine = blocks_that_fit(budget, block_bytes)
        assert systems.blocks_in(budget, block_bytes) == max(0, engine), budget_gib


def sequence_writes(path: Path) -> set[str]:
    """The Sequence state a module writes: `kv.<field>` assigned (a sequence's placement),
    `limit` or `reported` assigned, `output` appended to."""
    written = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            appends = node.func.attr == "append" and isinstance(owner, ast.Attribute)
            if appends and owner.attr == "output":
                written.add("output")
        for target in targets:
            for part in ast.walk(target):
                if not isinstance(part, ast.Attribute):
                    continue
                if isinstance(part.value, ast.Attribute) and part.value.attr == "kv":
                    written.add("kv")
                elif part.attr in ("limit", "reported", "thought"):
                    written.add(part.attr)
    return written


def test_each_piece_of_a_sequence_has_one_writer():
    """The scheduler places sequences (their `kv`); the engine writes what they generated."""
    writers: dict[str, set[str]] = {}
    for name, path in project_modules().items():
        for piece in sequence_writes(path):
            writers.setdefault(piece, set()).add(name)
    assert writers == {
        "kv": {"replica.engine.scheduler"},
        "limit": {"replica.engine.engine"},
        "output": {"replica.engine.engine"},
        "reported": {"replica.engine.engine"},
        "thought": {"replica.engine.engine"},
    }


def test_the_front_end_offers_the_attention_backends_the_ops_layer_has():
    from replica.ops import ATTENTION_BACKENDS
    from replica.wire.spec import ATTENTION_CHOICES

    assert ATTENTION_CHOICES == ATTENTION_BACKENDS


def test_modules_and_functions_stay_small():
    """No module over 400 lines; no function over 60 outside replica/kernels/ (Triton kernels
    read best whole) and the argparse builders."""
    long = []
    deploy = {f"deploy.{path.stem}": path for path in (ROOT / "deploy").glob("*.py")}
    for name, path in {**project_modules(), **deploy}.items():
        source = path.read_text()
        if source.count("\n") > 400:
            long.append((name, source.count("\n")))
        if name.startswith("replica.kernels"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > 60 and "parse_args" not in node.name:
                    long.append((f"{name}.{node.name}", size))
    assert long == []
