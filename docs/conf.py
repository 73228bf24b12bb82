"""Sphinx configuration of delve's documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` from the
repository root (``-W`` turns warnings into errors, as CI does). The build
imports delve from this checkout; the optional integrations (Lightning,
transformers, Keras) are mocked so the build never needs them installed.

The API reference (``api.rst``) is generated here from the modules that exist
under ``delve/``, so a new module is documented without editing the docs.
Objects a package re-exports in its ``__all__`` (``delve.SaturationTracker``,
``delve.writers.CSVWriter``) are documented under the package name, where
users import them, and left out of the module that defines them; autodoc
records the defining module as their canonical name, so references to either
name resolve.
"""
import fnmatch
import importlib
import inspect
import os
import sys
from pathlib import Path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import delve  # noqa: E402  (needs the path above)

project = "delve"
author = "delve developers"
copyright = "2019-2026, delve developers"
release = delve.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# -- autodoc ------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Show the public aliases instead of their expansion in signatures.
autodoc_type_aliases = {
    "SaveTo": "delve.writers.SaveTo",
    "ModuleSpec": "delve.layers.ModuleSpec",
}
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
# Optional extras: imported by delve.integrations.* and delve.kerascallback only.
autodoc_mock_imports = [
    "lightning",
    "pytorch_lightning",
    "transformers",
    "accelerate",
    "keras",
    "tensorflow",
]

# -- napoleon (numpy-style docstrings) -----------------------------------------
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- HTML ---------------------------------------------------------------------
html_theme = "alabaster"
html_theme_options = {
    "description": "Layer saturation of PyTorch models, live during training",
    "fixed_sidebar": True,
}
html_static_path = []


# -- API reference, generated from the modules under delve/ --------------------
#: Sections of the API page: title, then module-name patterns in display order.
API_SECTIONS = [
    ("Tracking", ["delve", "delve.tracker", "delve.hooks", "delve.covariance", "delve.metrics", "delve.adapters",
                  "delve.layers", "delve.distributed"]),
    ("Writers", ["delve.writers", "delve.writers.*"]),
    ("Analysis and tools", ["delve.tools", "delve.analysis", "delve.probes", "delve.report",
                            "delve.receptive_field", "delve.pca_layers"]),
    ("Integrations", ["delve.integrations", "delve.integrations.*", "delve.kerascallback", "delve.keras_layers"]),
    ("Import paths kept from delve 0.1.50", ["delve.torch_utils", "delve.torchcallback"]),
    ("Other modules", ["*"]),
]
API_PLACEHOLDER = ".. delve-api-modules::"


def discover_modules() -> list:
    """Public module names under delve/ (no ``_private`` modules, no ``__main__``)."""
    names = []
    for path in sorted(Path(ROOT, "delve").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return names


def _import_quietly(name: str):
    """The module, imported with the optional extras mocked; None if it fails (autodoc then reports it)."""
    from sphinx.ext.autodoc.mock import mock

    try:
        with mock(autodoc_mock_imports):
            return importlib.import_module(name)
    except Exception:  # reported by autodoc itself, with the traceback, as a build warning
        return None


def _package_exports(module) -> list:
    """Public names of a package's ``__all__`` (documented under the package)."""
    if module is None or not hasattr(module, "__path__"):
        return []
    return [name for name in getattr(module, "__all__", []) if not name.startswith("_")]


def api_rst() -> str:
    """reStructuredText of every section and module of the API reference."""
    modules = discover_modules()
    imported = {name: _import_quietly(name) for name in modules}
    # Classes and functions documented under a package, by id, claimed top-down.
    claimed = {}
    for name in sorted(modules, key=lambda n: n.count(".")):
        module = imported[name]
        for export in _package_exports(module):
            value = getattr(module, export, None)
            if (inspect.isclass(value) or inspect.isfunction(value)) and id(value) not in claimed:
                claimed[id(value)] = name
    placed, lines = set(), []
    for title, patterns in API_SECTIONS:
        section = []
        for pattern in patterns:
            section += [n for n in modules if n not in placed and n not in section and fnmatch.fnmatch(n, pattern)]
        if not section:
            continue
        placed.update(section)
        lines += [title, "-" * len(title), ""]
        for name in section:
            module = imported[name]
            lines += [f"``{name}``", "~" * (len(name) + 4), "", f".. automodule:: {name}"]
            exports = [e for e in _package_exports(module) if claimed.get(id(getattr(module, e, None)), name) == name]
            if exports:
                lines.append(f"   :members: {', '.join(exports)}")
            excluded = sorted(
                member for member, value in (vars(module).items() if module is not None else ())
                if (inspect.isclass(value) or inspect.isfunction(value)) and claimed.get(id(value), name) != name
            )
            if excluded:
                lines.append(f"   :exclude-members: {', '.join(excluded)}")
            lines.append("")
    return "\n".join(lines)


# -- Examples page, generated from the scripts in examples/ ---------------------
#: Examples shown first, in this order; the others follow alphabetically.
EXAMPLES_ORDER = ["quickstart", "regression", "tail_resolution", "lstm", "transformer", "distributed",
                  "custom_writer", "lightning_callback", "huggingface_callback", "keras_saturation"]
EXAMPLES_PLACEHOLDER = ".. delve-examples::"


def examples_rst() -> str:
    """A section per script in examples/: its docstring, how to run it, its code."""
    import ast

    scripts = sorted(Path(ROOT, "examples").glob("*.py"))
    rank = {name: index for index, name in enumerate(EXAMPLES_ORDER)}
    scripts.sort(key=lambda path: (rank.get(path.stem, len(rank)), path.stem))
    lines = []
    for script in scripts:
        if script.stem.startswith("_"):
            continue
        docstring = ast.get_docstring(ast.parse(script.read_text(), filename=str(script))) or ""
        summary, _, body = docstring.partition("\n")
        title = f"{script.name}: {summary.strip().rstrip('.')}" if summary else script.name
        lines += [title, "-" * len(title), "", body.strip(), "",
                  ".. code-block:: bash", "",
                  f"    python examples/{script.name}            # full run",
                  f"    python examples/{script.name} --quick    # a few seconds", "",
                  f".. literalinclude:: ../examples/{script.name}",
                  "   :language: python",
                  "   :linenos:", ""]
    return "\n".join(lines)


def _insert_generated(app, docname, source) -> None:
    if docname == "api" and API_PLACEHOLDER in source[0]:
        source[0] = source[0].replace(API_PLACEHOLDER, api_rst())
    if docname == "examples" and EXAMPLES_PLACEHOLDER in source[0]:
        source[0] = source[0].replace(EXAMPLES_PLACEHOLDER, examples_rst())


def setup(app) -> dict:
    app.connect("source-read", _insert_generated)
    return {"parallel_read_safe": True}
