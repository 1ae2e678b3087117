"""The folder layout is a dependency rule, checked here rather than trusted to reviewers.

Each package may import only packages in lower layers (or its own); the pure packages
(`projections/`, `weft/core/`) import nothing that does I/O, reads the clock or draws randomness,
so a replay computes the same state and the same decisions every time. Imports inside functions
count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A module may import its own layer's packages and any lower one, never a higher one.
LAYERS: list[tuple[str, ...]] = [
    ("projections",),
    ("weft.core",),
    ("weft.stamps", "weft.aio", "weft.logs", "weft.settings", "weft.metrics", "weft.tracing", "weft.watched_file",
     "weft.token_file"),
    ("weft.store",),
    ("weft.spinup",),
    ("weft.commands",),
    ("weft.runtime",),
    ("weft.api",),
    ("weft.service",),
    ("weft.cli",),
]
# The reference agent runs beside the coordinator, not inside it: it speaks the protocol (core),
# connects to NATS (store.connection) and nothing of the server's machinery.
AGENT_MAY_IMPORT = ("projections", "weft.core", "weft.stamps", "weft.aio", "weft.logs", "weft.store.connection",
                    "weft.agent")
PURE = ("projections", "weft.core")
IMPURE_MODULES = {"asyncio", "time", "os", "random", "secrets", "socket", "subprocess", "threading", "nats",
                  "aiohttp", "weft.stamps"}
CLOCK_OR_RANDOM_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "uuid1", "uuid4",
                         "urandom"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, ast.Module]:
    files = [*ROOT.joinpath("projections").rglob("*.py"), *ROOT.joinpath("weft").rglob("*.py")]
    return {_module_name(f): ast.parse(f.read_text(), str(f)) for f in files}


SOURCES = _sources()


def _imports(tree: ast.Module, module: str) -> set[str]:
    package = module if module in {"projections", "weft"} or _is_package(module) else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from weft.store import connection` depends on the module weft.store.connection
            modules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in SOURCES}
            out.update(modules)
            if len(modules) < len(node.names):
                out.add(target)
    return out


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(_within(name, p) for p in layer):
            return i
    return None


def test_every_module_is_in_a_layer() -> None:
    orphans = [m for m in SOURCES if _layer(m) is None and not _within(m, "weft.agent") and m != "weft"]
    assert orphans == [], f"modules outside every layer (add them to LAYERS): {orphans}"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _layer(m) is not None))
def test_no_module_imports_a_higher_layer(module: str) -> None:
    own = _layer(module)
    assert own is not None
    upward = sorted(
        name for name in _imports(SOURCES[module], module)
        if (layer := _layer(name)) is not None and layer > own
    )
    if not _within(module, "weft.cli"):  # only the CLI starts the reference agent
        upward += sorted(n for n in _imports(SOURCES[module], module) if _within(n, "weft.agent"))
    assert upward == [], f"{module} (layer {LAYERS[own]}) imports upward: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _within(m, "weft.agent")))
def test_the_reference_agent_uses_only_the_protocol_and_a_connection(module: str) -> None:
    ours = {n for n in _imports(SOURCES[module], module) if _within(n, "weft") or _within(n, "projections")}
    bad = sorted(n for n in ours if not any(_within(n, p) for p in AGENT_MAY_IMPORT) and n != "weft")
    assert bad == [], f"{module} reaches into the coordinator: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if any(_within(m, p) for p in PURE)))
def test_pure_modules_do_no_io_and_read_no_clock(module: str) -> None:
    tree = SOURCES[module]
    imported = _imports(tree, module)
    bad = sorted(n for n in imported if any(_within(n, p) for p in IMPURE_MODULES))
    calls = sorted(
        {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in CLOCK_OR_RANDOM_CALLS
        }
    )
    assert (bad, calls) == ([], []), f"{module} is in a pure package but imports {bad} / calls {calls}"


def test_the_package_graph_has_no_cycle() -> None:
    def package(name: str) -> str | None:
        for layer in LAYERS:
            for p in layer:
                if _within(name, p):
                    return p
        return "weft.agent" if _within(name, "weft.agent") else None

    edges: dict[str, set[str]] = {}
    for module, tree in SOURCES.items():
        src = package(module)
        if src is None:
            continue
        for name in _imports(tree, module):
            dst = package(name)
            if dst is not None and dst != src:
                edges.setdefault(src, set()).add(dst)

    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if seen.get(nxt) == 1:
                raise AssertionError(f"package cycle: {' -> '.join([*path, node, nxt])}")
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for start in sorted(edges):
        if start not in seen:
            visit(start, [])
