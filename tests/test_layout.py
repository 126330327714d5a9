"""The module layout: no import cycles, and the optimizer side without the capture machinery.

The graph is read from the source (``ast``: module-level and function-level imports of
``ekfac_optax`` modules), so that it shows what a reader follows, not what ``import`` happens to
have loaded. Data flow: capture (``_capture`` for linen, ``_nnx``, the shared ``_probes``,
``_stats``) → kinds (``_kinds``, ``_patches``) → factors → eigenbasis → scalings → stages → step
→ transform → aliases; the optimizer's modules (``_transform`` and everything it imports) never
import the capture's (``_capture``, ``_probes``, ``_nnx``): they read ``LayerStats`` from
``_stats``.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ekfac_optax"
CAPTURE = {"_capture", "_probes", "_nnx", "_loss_check"}


def graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports (``from ekfac_optax import _x`` or
    ``from ekfac_optax._x import ...``), anywhere in its source."""
    edges = {}
    for path in ROOT.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "ekfac_optax":
                    deps |= {alias.name for alias in node.names}
                elif node.module.startswith("ekfac_optax."):
                    deps.add(node.module.split(".")[1])
        edges[path.stem] = deps - {path.stem}
    return edges


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
