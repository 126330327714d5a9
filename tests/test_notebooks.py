"""The notebooks in ``notebooks/``: their shared structure, and a clean run of each, top to bottom,
in its small configuration.

The structure tests read the ``.ipynb`` JSON directly. The run tests execute every notebook with
nbclient in a fresh ``python3`` kernel (the ipykernel of this interpreter), in a temporary
directory, with ``EKFAC_NOTEBOOK_SIZE=small`` and this checkout first on ``PYTHONPATH``; a cell
that raises fails the test. Without nbclient they are skipped locally, but fail when ``CI`` is
set, so that CI never passes without running them.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # executes every notebook (1.5 min)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = (
    "01_quickstart",
    "02_inside_ekfac",
    "03_convnets",
    "04_paper_autoencoder",
    "05_nnx_and_transformers",
    "06_influence",
)
REPOSITORY = "ekfac-optax/ekfac_optax"  # the placeholder owner/name, see notebooks/README.md
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# What a notebook may import: it must run alone in Colab, without benchmarks/ or tests/.
ALLOWED_IMPORTS = set(
    "ekfac_optax flax importlib jax matplotlib numpy optax os pathlib sklearn time".split()
)
CELL_TIMEOUT_S = 600

try:
    import ipykernel  # noqa: F401  (the kernel the notebooks run in)
    import nbclient
    import nbformat

    MISSING = None
except ImportError as error:  # pragma: no cover - depends on the environment
    MISSING = error


def load(name: str) -> dict:
    return json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    text = cell["source"]
    return "".join(text) if isinstance(text, list) else text


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


INSTALL_CELL = source(code_cells(load("01_quickstart"))[0])


def run_install_cell(directory: Path, monkeypatch, importable: bool) -> list[tuple[str, str]]:
    """Runs the install cell in ``directory`` with a stand-in IPython; its ``%pip`` calls."""
    calls = []

    class IPython:
        def run_line_magic(self, magic, line):
            calls.append((magic, line))

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: find_spec(name, *a) if importable or name != "ekfac_optax" else None,
    )
    monkeypatch.chdir(directory)
    exec(INSTALL_CELL, {"get_ipython": IPython})
    return calls


def test_install_cell_logic(tmp_path, monkeypatch):
    """Nothing where ekfac_optax imports; otherwise a pip install of the newest uploaded wheel,
    else of the clone around the notebook, else of the repository (no network: the calls are
    recorded, not run)."""
    here = tmp_path / "clone" / "notebooks"
    here.mkdir(parents=True)
    assert run_install_cell(here, monkeypatch, importable=True) == []
    url = f"ekfac_optax[examples] @ git+https://github.com/{REPOSITORY}"
    assert run_install_cell(here, monkeypatch, False) == [("pip", f'install -q "{url}"')]
    (tmp_path / "clone" / "pyproject.toml").write_text("")
    assert run_install_cell(here, monkeypatch, False) == [("pip", 'install -q "..[examples]"')]
    for version in ("0.1.0", "0.2.0"):
        (here / f"ekfac_optax-{version}-py3-none-any.whl").write_text("")
    wheel = "ekfac_optax-0.2.0-py3-none-any.whl[examples]"
    assert run_install_cell(here, monkeypatch, False) == [("pip", f'install -q "{wheel}"')]


@pytest.mark.slow
def test_install_cell_requirements_resolve(tmp_path):
    """The requirements the cell gives pip resolve: the clone (``..[examples]`` from
    ``notebooks/``) and a wheel built from it (``pip install --dry-run --no-deps``; building
    needs setuptools from the package index that ``make`` installs from, nothing else)."""
    pip = [sys.executable, "-m", "pip"]
    quiet = dict(check=True, capture_output=True, text=True)
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(tmp_path), "."],
        cwd=ROOT,
        **quiet,
    )
    (wheel,) = tmp_path.glob("ekfac_optax-*.whl")
    for requirement, cwd in ((f"{wheel.name}[examples]", tmp_path), ("..[examples]", NOTEBOOK_DIR)):
        run = subprocess.run(
            [*pip, "install", "--dry-run", "--no-deps", requirement],
            cwd=cwd,
            **quiet,
        )
        assert (
            "Would install ekfac_optax" in run.stdout or "Would install ekfac-optax" in run.stdout
        )


def test_the_notebooks_are_the_numbered_six():
    assert sorted(path.stem for path in NOTEBOOK_DIR.glob("*.ipynb")) == list(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_structure(name):
    notebook = load(name)
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"

    # First cell: the "Open in Colab" badge, pointing at this very notebook.
    first = notebook["cells"][0]
    assert first["cell_type"] == "markdown"
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{name}.ipynb"
    assert f"[![Open In Colab]({BADGE_IMAGE})]({url})" in source(first)

    cells = code_cells(notebook)
    # The install cell: a no-op where the package imports, a pip install from the repository
    # otherwise (Colab).
    install = source(cells[0])
    assert install == INSTALL_CELL, f"{name}: the install cell differs from 01's"
    assert f'REPOSITORY = "git+https://github.com/{REPOSITORY}"' in install
    # The size knob, overridable from the environment.
    knob = source(cells[1])
    assert re.search(r'^SIZE = "small"  # ', knob, re.M), knob
    assert 'os.environ.get("EKFAC_NOTEBOOK_SIZE", SIZE)' in knob

    # Committed with outputs cleared.
    for cell in cells:
        assert cell["outputs"] == [], f"cell {cell.get('id')} has outputs"
        assert cell["execution_count"] is None, f"cell {cell.get('id')} has an execution count"

    # Self-contained: nothing from benchmarks/, tests/ or other local modules.
    for cell in cells:
        for line in source(cell).splitlines():
            match = re.match(r"\s*(?:import|from)\s+([A-Za-z_]\w*)", line)
            if match:
                assert match.group(1) in ALLOWED_IMPORTS, f"{name}: {line.strip()}"

    # Ends with plots.
    assert "plt.show()" in source(cells[-1])


def kernel_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["EKFAC_NOTEBOOK_SIZE"] = "small"
    # Headless, but keeping the figures as outputs: Agg would drop them from the notebook.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # The eigendecompositions go through OpenBLAS's LAPACK, whose threads thrash on a CPU shared
    # with other jobs (measured on a loaded 2-core machine: eigh of a 257x257 float32 matrix in
    # 0.87 s instead of 0.01 s); one thread keeps the run time predictable.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # conftest.py asks XLA for 8 CPU devices (for test_distributed.py); a notebook runs as a
    # user's would.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    if MISSING is not None:
        message = f"running the notebooks needs nbclient, nbformat and ipykernel: {MISSING}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_environment())  # raises CellExecutionError if a cell fails

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no figure"
