"""The docs site builds without a warning (``mkdocs build --strict``: a broken link or anchor,
a docstring griffe cannot parse, a public name missing from its API page fail it), and every
public name has an API entry; the aliases document each of their own arguments."""

import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

import ekfac_optax as ek

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "inherited arguments" not in api
    for name in ("factor_update_every", "max_factor_dim", "weight_decay"):
        assert name in api


def test_every_public_name_has_an_api_entry():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: ekfac_optax\.(\w+)$", api, re.M))
    assert documented == set(ek.__all__), set(ek.__all__) ^ documented


@pytest.mark.parametrize(
    "alias", [ek.ekfac, ek.kfac, ek.kfe_adam, ek.kfe_adamw, ek.grafted_ekfac, ek.summarize]
)
def test_aliases_document_each_argument(alias):
    """Every argument of an alias has its own ``name:`` entry in its docstring's Args."""
    doc = inspect.getdoc(alias)
    args = doc[doc.index("Args:") : doc.index("Returns:")]
    entries = set(re.findall(r"^  (\w+): ", args, re.M))
    assert entries == set(inspect.signature(alias).parameters), alias.__name__
