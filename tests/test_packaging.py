"""Packaging: what is required is exactly what the library imports at runtime.

- ``[project] dependencies`` are the distributions of the third-party modules that
  ``ekfac_optax/*.py`` import at module level or inside functions (read from the source with
  ``ast``), except orbax-checkpoint: imported only inside ``_checkpoint``'s functions, and the
  optional extra ``checkpoint``;
- without orbax, ``ek.save_state``/``ek.restore_state`` raise an ImportError naming the extra,
  and ``import ekfac_optax`` works.
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import ekfac_optax as ek

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {"orbax": "orbax-checkpoint"}  # module -> distribution where they differ


def imported_modules() -> dict[str, set[str]]:
    """Per third-party top-level module imported by the library, the files importing it."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "ekfac_optax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "ekfac_optax":
                    found.setdefault(top, set()).add(path.name)
    return found


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def distribution(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;@]", requirement, maxsplit=1)[0].strip().lower()


def test_required_is_what_is_imported():
    modules = imported_modules()
    required = {distribution(r) for r in project()["dependencies"]}
    imported = {DISTRIBUTIONS.get(m, m) for m in modules}
    assert required == imported - {"orbax-checkpoint"}, (required, imported)
    assert modules["orbax"] == {"_checkpoint.py"}
    assert {distribution(r) for r in project()["optional-dependencies"]["checkpoint"]} == {
        "orbax-checkpoint"
    }


def test_orbax_imported_lazily():
    """orbax is imported inside functions only: the module-level imports of the library do
    not include it."""
    source = (ROOT / "ekfac_optax" / "_checkpoint.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not any(n.startswith("orbax") for n in names)


def test_missing_orbax_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'ekfac_optax\[checkpoint\]'"):
        ek.save_state(tmp_path / "ckpt", {"a": 1})
    with pytest.raises(ImportError, match=r"ekfac_optax\[checkpoint\]"):
        ek.restore_state(tmp_path / "ckpt", {"a": 1})


def test_import_without_orbax():
    """``import ekfac_optax`` in a fresh interpreter where orbax cannot be imported."""
    code = (
        "import sys; sys.modules['orbax'] = None; sys.modules['orbax.checkpoint'] = None\n"
        "import ekfac_optax\nassert 'orbax' not in [m for m in sys.modules if sys.modules[m]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
