"""The manual (docs/, mkdocs.yml): `make docs`'s strict build passes with no warning, every page is in it."""

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def nav_pages(items) -> list[str]:
    pages = []
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_manual_builds_strictly_without_a_warning(tmp_path):
    """mkdocs build --strict (what `make docs` runs): a broken link, a missing anchor, a page left out of the nav
    or a docstring mkdocstrings cannot read fails the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("GaussianDiffusion") > 3  # docstrings rendered
    listed = set(nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}


def test_make_docs_builds_the_site(tmp_path):
    done = subprocess.run(["make", "-C", str(ROOT), "-o", ".venv/.installed-stamp", "-n", "docs"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "mkdocs build --strict" in done.stdout
