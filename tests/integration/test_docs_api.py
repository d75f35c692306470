"""The Python examples in the README files and docs/ call the API that exists, with keywords it takes.

Each ```python block is parsed; every call of a name reached from ``tdsteer``, ``tdsteer_hf``,
``tdsteer_timm`` or ``tdsteer_eval`` (``tdsteer.steer(...)``, ``from tdsteer_eval import run_sweep``
then ``run_sweep(...)``) must resolve to an object whose signature binds the call's keywords, and
every name imported from those packages must exist. Renaming a function or a keyword without
updating the docs fails here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tdsteer", "tdsteer_hf", "tdsteer_timm", "tdsteer_eval")
PAGES = sorted(
    [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("packages/*/README.md"), ROOT / "evals" / "README.md"]
)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        if page.is_file():
            for number, match in enumerate(BLOCK.finditer(page.read_text()), 1):
                found.append((f"{page.relative_to(ROOT)}#{number}", match.group(1)))
    return found


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else ``None``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _resolve(path: str) -> Any:
    """The object at ``path`` (``tdsteer_hf.sites``, ``tdsteer.SteeringVector.load``), as attribute
    access reaches it; a submodule is imported only where no attribute has the name."""
    head, *rest = path.split(".")
    obj: Any = importlib.import_module(head)
    for index, attr in enumerate(rest):
        if not hasattr(obj, attr) and inspect.ismodule(obj):
            importlib.import_module(".".join([head, *rest[: index + 1]]))
        obj = getattr(obj, attr)
    return obj


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to the packages' objects by the block's imports."""
    names: dict[str, str] = {package: package for package in PACKAGES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    names[(alias.asname or alias.name).split(".")[0]] = alias.name.split(".")[0]
                    if alias.asname:
                        names[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _problems(code: str) -> list[str]:
    tree = ast.parse(code)
    aliases = _aliases(tree)
    problems = []
    for local, target in aliases.items():
        if local not in PACKAGES:
            try:
                _resolve(target)
            except (ImportError, AttributeError):
                problems.append(f"import of {target}: no such object")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        if dotted is None or dotted.split(".")[0] not in aliases:
            continue
        head, _, rest = dotted.partition(".")
        path = aliases[head] + (f".{rest}" if rest else "")
        try:
            target = _resolve(path)
        except (ImportError, AttributeError):
            problems.append(f"{path}: no such object")
            continue
        if not callable(target):
            problems.append(f"{path}: not callable")
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        keywords = {k.arg: None for k in node.keywords if k.arg is not None}
        unpacked = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        positional = [] if unpacked else [None] * len(node.args)  # with *args or **kw: the keywords only
        try:
            signature.bind_partial(*positional, **keywords)
        except TypeError as error:
            problems.append(f"{path}({len(positional)} positional, {', '.join(keywords) or 'no keywords'}): {error}")
    return problems


BLOCKS = _blocks()


def test_the_pages_have_examples() -> None:
    assert len(BLOCKS) >= 10, [name for name, _ in BLOCKS]


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_example_calls_the_api_that_exists(name: str, code: str) -> None:
    assert _problems(code) == [], name


def test_the_check_catches_a_renamed_keyword_and_function() -> None:
    code = "import tdsteer\nfrom tdsteer_hf import sites\ntdsteer.steer(model, v, scael=2.0)\nsites(model, layer=3)\n"
    code += "tdsteer.stear(model, v)\nfrom tdsteer import nothing_here\n"
    problems = _problems(code)
    assert any("tdsteer.steer" in p and "scael" in p for p in problems), problems
    assert any("tdsteer_hf.sites" in p and "layer" in p for p in problems), problems
    assert any("tdsteer.stear: no such object" in p for p in problems), problems
    assert any("tdsteer.nothing_here" in p for p in problems), problems
