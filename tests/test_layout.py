"""The module layout: no import cycles, and the optimizer side without the capture machinery.

The graph is read from the source (``ast``: module-level and function-level imports of
``ekfac_optax`` modules), so that it shows what a reader follows, not what ``import`` happens to
have loaded. Data flow, one folder per stage: ``capture/`` (``_capture`` for linen, ``_nnx``,
the shared ``_probes``, ``_stats``) → ``kinds/`` (``_kinds``, ``_patches``, ``_blocks``) →
``curvature/`` (factors, eigenbasis, scalings) → ``update/`` (stages, step, transform) → the
aliases at the top; the optimizer's modules (``_transform`` and everything it imports) never
import the capture's (``_capture``, ``_probes``, ``_nnx``): they read ``LayerStats`` from
``_stats``.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ekfac_optax"
CAPTURE = {"_capture", "_probes", "_nnx", "_loss_check"}


def graph() -> dict[str, set[str]]:
    """Module (file stem, unique in the package) -> the library modules it imports (``from
    ekfac_optax.<folder> import _x``, ``from ekfac_optax.<folder>._x import ...``), anywhere in
    its source."""
    edges = {}
    for path in ROOT.rglob("*.py"):
        if path.name == "__init__.py" and path.parent != ROOT:
            continue  # a folder's docstring
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] != "ekfac_optax":
                    continue
                if parts[-1].startswith("_"):
                    deps.add(parts[-1])
                else:
                    deps |= {alias.name for alias in node.names if alias.name.startswith("_")}
        edges[path.stem] = deps - {path.stem}
    return edges


def folder(module: str) -> str:
    """The folder of a module: ``capture``, ``kinds``, ``curvature``, ``update`` or the top."""
    (path,) = [p for p in ROOT.rglob(f"{module}.py")]
    return path.parent.name if path.parent != ROOT else "top"


# A folder imports only from folders of a lower rank (or itself): the picture's rooms stand above
# what they use, so that the data flow reads top-down with no arrow running back up.
RANK = {"kinds": 0, "capture": 1, "curvature": 1, "update": 2, "top": 3}


def test_folders_follow_the_data_flow():
    edges = graph()
    back = sorted(
        (module, dep)
        for module, deps in edges.items()
        if module != "__init__"
        for dep in deps
        if folder(dep) != folder(module) and RANK[folder(dep)] >= RANK[folder(module)]
    )
    assert not back, back
    assert {folder(m) for m in ("_stats", "_probes", "_capture", "_nnx")} == {"capture"}
    assert {folder(m) for m in ("_factors", "_eigenbasis", "_scalings")} == {"curvature"}


def closure(edges, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in edges[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles():
    edges = graph()
    cycles = sorted(m for m in edges if m != "__init__" and m in closure(edges, m))
    assert not cycles, {m: sorted(edges[m]) for m in cycles}


def test_optimizer_side_without_capture():
    edges = graph()
    for module in ("_transform", "_alias", "_accumulate", "_graft", "_summary", "_validation"):
        assert not closure(edges, module) & CAPTURE, (module, closure(edges, module) & CAPTURE)
    assert "_stats" in closure(edges, "_validation")


def test_capture_does_not_import_the_optimizer():
    edges = graph()
    optimizer = {"_transform", "_step", "_stages", "_scalings", "_eigenbasis", "_accumulate"}
    for module in ("_capture", "_probes", "_nnx"):
        assert not closure(edges, module) & optimizer, module
