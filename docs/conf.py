"""Sphinx configuration for the tdsteer documentation (build with `nox -s docs`)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import astroid
from autoapi import _astroid_utils
from autoapi._parser import Parser as _AutoapiParser
from sphinx.util import logging as sphinx_logging

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "packages" / "tdsteer" / "src",
    ROOT / "packages" / "tdsteer-hf" / "src",
    ROOT / "packages" / "tdsteer-timm" / "src",
    ROOT / "evals" / "src",
]

_version_file = (ROOT / "packages" / "tdsteer" / "src" / "tdsteer" / "_version.py").read_text()
release = re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", _version_file).group(1)  # type: ignore[union-attr]
version = release

project = "tdsteer"
author = "the tdsteer developers"
copyright = "2026, the tdsteer developers"

extensions = [
    "myst_parser",
    "sphinx.ext.napoleon",
    "autoapi.extension",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# -- MyST -------------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- Docstrings (Google style) ----------------------------------------------------------------------
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields, so dataclass fields are not described twice

# -- API reference: sphinx-autoapi reads the sources, it never imports them -------------------------
autoapi_type = "python"
autoapi_dirs = [str(path) for path in SOURCES]
autoapi_root = "api"
autoapi_keep_files = False
autoapi_add_toctree_entry = True  # adds "API Reference" (api/index) to the root toctree
autoapi_member_order = "groupwise"
autoapi_python_class_content = "class"
autoapi_options = [
    "members",
    "undoc-members",
    "show-inheritance",
    "show-module-summary",
    "imported-members",
]
autoapi_ignore = ["*.egg-info/*"]
PACKAGES = ("tdsteer", "tdsteer_hf", "tdsteer_timm", "tdsteer_eval")


class _ThirdPartyModules(set):  # type: ignore[type-arg]
    """astroid's module deny list, as a predicate: every module but ours and the standard library.

    Without it, astroid's inference follows imports into torch, transformers and timm and parses
    thousands of their modules (minutes); the API reference only needs our own sources.
    """

    def __contains__(self, name: object) -> bool:
        top = str(name).split(".")[0]
        return top not in PACKAGES and top not in sys.stdlib_module_names and top != "builtins"


astroid.MANAGER.brain["module_denylist"] = astroid.MANAGER.module_denylist = _ThirdPartyModules()


def _parse_if(self, node):  # type: ignore[no-untyped-def]
    """A package root's ``if TYPE_CHECKING:`` imports are its public names, imported on first use at
    run time (PEP 562, ``tdsteer`` and ``tdsteer.cli``): document them as the top-level imports they
    stand for. Any other ``if`` is read as autoapi reads it."""
    if node.root().package and "TYPE_CHECKING" in node.test.as_string():
        top_name = node.root().name.split(".", 1)[0]
        local = [child for child in node.body if _astroid_utils.is_local_import_from(child, top_name)]
        return [data for child in local for data in self._parse_local_import_from(child)]
    for child in node.get_children():
        data = self.parse(child)
        if data:
            return data
    return []


_AutoapiParser.parse_if = _parse_if

# Re-exported names (tdsteer.Site and tdsteer.sites.Site) make short annotations such as ``Layout``
# ambiguous between packages; the reference links to one of them, which is fine.
suppress_warnings = ["ref.python"]

# -- HTML -------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"tdsteer {release}"
html_static_path: list[str] = []


# -- Docstring problems in the generated API pages ------------------------------------------------
# -W makes every warning fatal. Two kinds that come from the package sources rather than from these
# pages are reported but not fatal, and only for the generated API pages (docs/api/):
#   * reStructuredText errors inside docstrings (fix them in the docstring);
#   * "duplicate object description" for a package that re-exports a function under the name of
#     one of its submodules (``tdsteer_hf.sites`` the function and ``tdsteer_hf.sites`` the module).
API_DIR = Path(__file__).resolve().parent / autoapi_root


class _DocstringProblems:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def filter(self, record) -> bool:  # type: ignore[no-untyped-def]
        location = getattr(record, "location", None)
        if isinstance(location, tuple):
            location = location[0]
        elif location is not None and not isinstance(location, str):
            location = sphinx_logging.get_node_location(location)
        text = str(location or "")
        in_api = str(API_DIR) in text or text.startswith(f"{autoapi_root}/")
        message = record.getMessage()
        kind = getattr(record, "type", None)
        if in_api and (kind == "docutils" or message.startswith("duplicate object description")):
            line = f"{text}: docstring problem (not fatal): {message}"
            self.seen.append(line)
            print(line, file=sys.stderr)
            return False
        return True


def setup(app):  # type: ignore[no-untyped-def]
    docstring_problems = _DocstringProblems()
    for handler in logging.getLogger(sphinx_logging.NAMESPACE).handlers:
        if isinstance(handler, sphinx_logging.WarningStreamHandler):
            handler.filters.insert(0, docstring_problems)

    def report(app, exception):  # type: ignore[no-untyped-def]
        if docstring_problems.seen:
            print(
                f"{len(docstring_problems.seen)} docstring problem(s) in the API pages, listed above", file=sys.stderr
            )

    app.connect("build-finished", report)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
