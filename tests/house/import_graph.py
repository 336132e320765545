"""The arrows between gatemix's folders, read from the source (``python tests/house/import_graph.py``).

Every ``import gatemix.X`` and ``from gatemix.X import ...`` in a product module,
at any depth (a deferred import is an arrow too), becomes an edge from the
importing module's room to the imported module's room. A room is a top-level
folder, except that the serve-time gate (``gate/``) and the offline fit
(``gate/fit/``) are two rooms.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Folder on disk -> import prefix (pyproject's package-dir).
PACKAGE_DIRS = {
    "gatemix": "gatemix",
    "gate": "gatemix.gate",
    "engine": "gatemix.engine",
    "server": "gatemix.server",
    "distill": "gatemix.distill",
    "demo": "gatemix.demo",
    "bench": "gatemix.bench",
}

# Rooms, lowest first: a room may import its own and those below it, never one above.
# The order is the pipeline's (build-demo -> fit-gate -> pack -> serve -> distill),
# with the shared core below everything and the demo and the benchmarks, which
# drive the whole pipeline, on top.
ROOMS = (
    "core",        # gatemix/: errors, project file, data readers, config flags, atomic writes
    "gate",        # gate/: the serve-time gate (mixing, router, posterior, artifact, registry)
    "gate.fit",    # gate/fit/: the offline robust fit, its features, game, selection and report
    "engine",      # engine/: the vLLM composite, its folder format, packing
    "server",      # server/: the OpenAI-compatible API
    "distill",     # distill/: the student
    "demo",        # demo/: the embedded example project, built end to end
    "bench",       # bench/: benchmarks over every system
)

# Modules that dispatch to every room by name (``importlib``) and so sit above them all.
DISPATCHERS = {"gatemix.cli"}


def product_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every product module."""
    modules = {}
    for folder, prefix in PACKAGE_DIRS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def room_of(module: str) -> str:
    """The room a dotted ``gatemix.*`` module belongs to."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in {"gate", "engine", "server", "distill", "demo", "bench"}:
        return "core"
    if parts[1] == "gate" and len(parts) > 2 and parts[2] == "fit":
        return "gate.fit"
    return parts[1]


def imported_modules(path: Path, module: str) -> set[str]:
    """Every ``gatemix`` module named by an import anywhere in the file."""
    names = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return {name for name in names if name == "gatemix" or name.startswith("gatemix.")}


def module_edges() -> dict[str, set[str]]:
    """Module -> the gatemix modules it imports."""
    return {module: imported_modules(path, module) for module, path in product_modules().items()}


def room_edges(edges: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """(from room, to room) -> the module-level imports that make the arrow."""
    arrows = defaultdict(list)
    for module, targets in edges.items():
        if module in DISPATCHERS:
            continue
        for target in sorted(targets):
            source_room, target_room = room_of(module), room_of(target)
            if source_room != target_room:
                arrows[(source_room, target_room)].append(f"{module} -> {target}")
    return dict(arrows)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a room above the importer's own, as ``module -> target (room < room)``."""
    rank = {room: index for index, room in enumerate(ROOMS)}
    return [
        f"{line} ({source} imports {target}, above it)"
        for (source, target), lines in sorted(room_edges(edges).items())
        if rank[target] > rank[source]
        for line in lines
    ]


def main() -> int:
    for (source, target), lines in sorted(room_edges(module_edges()).items()):
        print(f"{source:9s} -> {target:9s} {len(lines):3d} imports")
    problems = upward_imports(module_edges())
    for line in problems:
        print("UPWARD:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
