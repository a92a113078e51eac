"""The house rules that the folder layout promises, checked on the source itself.

- ``kernels/`` and ``bindings/`` never import the engine (``clipengine`` outside those two packages).
- The engine's stage packages import each other in one direction: encode → annotate → slices →
  report, and the run job sequences them all; no stage imports a later one, and there is no import cycle.
- Run-directory file names are spelled in one module (``engine/artifacts.py``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what a stage may import, by the order of the way an item goes through the house
STAGE_ORDER = ["encode", "annotate", "slices", "coverage", "compare", "report", "run"]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def _module_of(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    folder, *rest = relative.parts
    package = {"engine": "clipengine", "kernels": "clipengine.kernels", "bindings": "clipengine.bindings",
               "bench": "clipengine.bench"}[folder]
    parts = [p for p in rest if p != "__init__"]
    return ".".join([package, *parts])


def test_kernels_and_bindings_never_import_the_engine():
    offenders = []
    for folder in ("kernels", "bindings"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                if name.startswith("clipengine") and not name.startswith(("clipengine.kernels", "clipengine.bindings")):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_stages_import_only_earlier_stages():
    offenders = []
    for stage in STAGE_ORDER:
        folder = ROOT / "engine" / stage
        if not folder.is_dir():
            continue
        later = STAGE_ORDER[STAGE_ORDER.index(stage) + 1:]
        for path in folder.rglob("*.py"):
            for name in _imports(path):
                for other in later:
                    if name == f"clipengine.{other}" or name.startswith(f"clipengine.{other}."):
                        offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_no_import_cycle_in_the_engine():
    modules = {_module_of(p): p for p in (ROOT / "engine").rglob("*.py")}
    graph = {name: {imported for imported in _imports(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert not cycle, " → ".join(cycle)


def test_run_directory_file_names_are_spelled_in_one_module():
    names = re.compile(r"""["'](?:items|metadata|metadata_naive|errors|skipped|slices|compare_items)\.parquet["']|"""
                       r"""["'](?:embeddings|item_stats)\.npy["']|["'](?:model|slices|manifest|compare)\.json["']|"""
                       r"""["'](?:summary\.md|report\.html|label_quality\.(?:csv|md))["']|"""
                       r"""["'](?:labels\.(?:csv|html)|sample\.json|label_studio_(?:tasks\.json|config\.xml))["']""")
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        # dataset adapters read the user's input files, one of which is named like an artifact
        # (a folder dataset's errors.parquet), and they write none
        if path.name == "artifacts.py" or "datasets" in path.parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if names.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
