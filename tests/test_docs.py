"""The Sphinx documentation builds with warnings as errors and covers the whole public surface.

The build runs once per session (``sphinx -W``, into a temporary folder) in a
subprocess. The checks then look at the built pages: every public module under
``delve/`` has its API section, every example its page section, and the user
guide names every option of ``SaturationTracker`` and every writer key.
"""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="building the docs needs sphinx (pip install sphinx)")

from delve import SaturationTracker  # noqa: E402
from delve.writers import STATMAP, WRITERS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BUILD_TIMEOUT_S = 300


def _public_modules() -> list:
    """Module names of every public .py file under delve/ (no _private parts, no __main__)."""
    names = []
    for path in sorted((REPO / "delve").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return names


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    completed = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert completed.returncode == 0, (
        f"sphinx -W failed ({completed.returncode}):\n{completed.stderr[-6000:]}\n{completed.stdout[-2000:]}"
    )
    return out / "html"


def test_every_page_is_built(html: Path) -> None:
    for page in ("index", "installation", "saturation", "user_guide", "transformers", "integrations", "writers",
                 "statistics", "output_formats", "migration", "examples", "api", "history"):
        assert (html / f"{page}.html").is_file(), page


def test_index_includes_the_readme(html: Path) -> None:
    readme_title = (REPO / "README.rst").read_text().splitlines()[0].strip()
    page = (html / "index.html").read_text()
    assert readme_title.split(":")[0] in page
    assert "add_saturations" in page


def test_every_public_module_is_documented(html: Path) -> None:
    page = (html / "api.html").read_text()
    documented = set(re.findall(r'id="module-([\w.]+)"', page))
    missing = [name for name in _public_modules() if name not in documented]
    assert not missing, f"modules without an API section: {missing}"


def test_top_level_api_has_its_docstrings(html: Path) -> None:
    page = (html / "api.html").read_text()
    for name in ("delve.SaturationTracker", "delve.TorchCovarianceMatrix", "delve.register_adapter",
                 "delve.metrics.compute_saturation", "delve.metrics.compute_intrinsic_dimensionality"):
        assert f'id="{name}"' in page, name
    # numpy-style sections are rendered by napoleon, not shown as raw underlined text
    raw_sections = re.findall(r"(?:Parameters|Returns|Raises|Examples)\s*\n\s*-{4,}", page)
    assert not raw_sections, raw_sections[:3]
    assert '<dt class="field-odd">Parameters' in page


def test_every_example_has_a_section(html: Path) -> None:
    page = (html / "examples.html").read_text()
    for script in sorted((REPO / "examples").glob("*.py")):
        if not script.stem.startswith("_"):
            assert f"examples/{script.name}" in page, script.name


def test_user_guide_names_every_tracker_option_and_writer_key() -> None:
    guide = (DOCS / "user_guide.rst").read_text()
    parameters = [name for name in inspect.signature(SaturationTracker.__init__).parameters if name != "self"]
    assert len(parameters) == 28
    missing = [name for name in parameters if f"``{name}``" not in guide]
    assert not missing, f"options missing from the user guide: {missing}"
    missing_keys = [key for key in WRITERS if f"``{key}``" not in guide]
    assert not missing_keys, f"writer keys missing from the user guide: {missing_keys}"
    missing_stats = [key for key in STATMAP if f"``{key}``" not in guide]
    assert not missing_stats, f"statistics missing from the user guide: {missing_stats}"


def test_output_formats_name_every_statistic() -> None:
    formats = (DOCS / "output_formats.rst").read_text()
    for key, name in STATMAP.items():
        assert f"``{key}``" in formats and f"``{name}``" in formats, key
    assert "<savefile>/<name>/<name>_epoch<k>.npy" in formats


def test_concept_page_has_the_covariance_formula(html: Path) -> None:
    page = (html / "saturation.html").read_text()
    assert r"\frac{1}{n} \sum_{i=1}^{n} (a_i - \mu)(a_i - \mu)^T" in page
    assert "Chan" in page
