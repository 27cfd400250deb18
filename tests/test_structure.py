"""The package's structure: no import cycle (imports inside functions counted), the adapters a
leaf, and every map by model type covering exactly the registered families."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pio_fvlm
import tiny_checkpoints
import tiny_models
from pio_fvlm import bench_models, viz
from pio_fvlm.encoder import ENCODER_MODES, NO_ENCODER_MODE
from pio_fvlm.models import REGISTRY

PACKAGE = Path(pio_fvlm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its code."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {f for f in found if f in files and f != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in order:
            visit(node)
    return found


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_adapters_import_nothing_of_the_library_but_compat():
    graph = import_graph()
    for name in (n for n in graph if n.startswith("pio_fvlm.models")):
        assert {m for m in graph[name] if not m.startswith("pio_fvlm.models")} <= {"pio_fvlm.compat"}, name


FAMILY_MAPS = {
    "picture layouts (pio_fvlm.viz.LAYOUTS)": set(viz.LAYOUTS),
    "encoder modes or the reason for none (pio_fvlm.encoder)": set(ENCODER_MODES) | set(NO_ENCODER_MODE),
    "benchmark shapes (pio_fvlm.bench_models.SHAPE_OF_MODEL_TYPE)": set(bench_models.SHAPE_OF_MODEL_TYPE),
    "tiny checkpoints' tokens (tests/tiny_checkpoints.py CHECKPOINT_SPECIAL_TOKENS)": set(
        tiny_checkpoints.CHECKPOINT_SPECIAL_TOKENS),
}


@pytest.mark.parametrize("what", FAMILY_MAPS)
def test_every_map_by_model_type_covers_exactly_the_registered_families(what):
    assert FAMILY_MAPS[what] == set(REGISTRY), f"{what}: add or remove {FAMILY_MAPS[what] ^ set(REGISTRY)}"


def test_a_family_has_an_encoder_mode_or_a_reason_not_both():
    assert not set(ENCODER_MODES) & set(NO_ENCODER_MODE)


def test_the_test_families_are_the_registry():
    assert tiny_models.FAMILIES == tuple(REGISTRY)
    assert set(tiny_models.VIDEO_FAMILIES) == {t for t, layout in viz.LAYOUTS.items() if layout.videos is not None}


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_every_family_has_a_tiny_model_of_its_own_type(family):
    assert tiny_models.tiny_vlm(family, num_layers=2).config.model_type == family


# What users run: the package's import, the command line and the lmms-eval plugin (pyproject.toml),
# the model class the plugin names by its path, and the client docs/serving.md imports.
ENTRY_MODULES = ("pio_fvlm", "pio_fvlm.cli", "pio_fvlm.integrations.lmms_eval_manifest",
                 "pio_fvlm.integrations.lmms_eval", "pio_fvlm.serving.client")


def reachable(graph: dict[str, set[str]], roots: tuple[str, ...]) -> set[str]:
    """The modules that importing ``roots`` can load (a module's parent packages included)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in graph:
            continue
        seen.add(name)
        parents = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
        todo += [*graph[name], *parents]
    return seen


def test_every_module_of_the_package_serves_what_users_run():
    # scaffolding only the tests call lives in tests/ (tiny_models.py, tiny_checkpoints.py, reference.py)
    graph = import_graph()
    assert set(graph) - reachable(graph, ENTRY_MODULES) == set()


def test_the_reachability_check_finds_an_orphan():
    graph = {"pkg": {"pkg.a"}, "pkg.a": set(), "pkg.orphan": set(), "pkg.sub": set(), "pkg.sub.b": set()}
    assert set(graph) - reachable(graph, ("pkg", "pkg.sub.b")) == {"pkg.orphan"}
