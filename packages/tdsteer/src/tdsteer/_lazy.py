"""Package roots whose public names are imported on first use (PEP 562), so that importing the package
(or one of its light submodules, such as the ``tdsteer`` command's program) does not import torch.

The names are those the package's ``__init__.py`` imports under ``if TYPE_CHECKING:``: one list that
mypy, IDEs, the API reference and the run-time lookup all read.

Examples:
    A package's ``__init__.py``::

        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from tdsteer.vector import SteeringVector
        else:
            from tdsteer._lazy import lazy_exports

            __getattr__, __dir__ = lazy_exports(__name__, __file__)
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def type_checking_imports(package: str, source: str) -> dict[str, tuple[str, str | None]]:
    """The names a package's ``if TYPE_CHECKING:`` block imports, and where each comes from.

    Args:
        package: The package's ``__name__``.
        source: Its ``__init__.py``.

    Returns:
        Name -> ``(module, attribute)``; the attribute is ``None`` for a submodule of the package
        (``from tdsteer import distributed``).

    Examples:
        >>> import tdsteer
        >>> type_checking_imports("tdsteer", tdsteer.__file__)["steer"]
        ('tdsteer.handle', 'steer')
        >>> type_checking_imports("tdsteer", tdsteer.__file__)["distributed"]
        ('tdsteer.distributed', None)
    """
    found: dict[str, tuple[str, str | None]] = {}
    for node in ast.parse(Path(source).read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            continue
        for statement in node.body:
            if isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
                for alias in statement.names:
                    own = statement.module == package
                    where = (f"{package}.{alias.name}", None) if own else (statement.module, alias.name)
                    found[alias.asname or alias.name] = where
    return found


def lazy_exports(package: str, source: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package whose names are imported on first use.

    Args:
        package: The package's ``__name__``.
        source: Its ``__init__.py`` (``__file__``), whose ``if TYPE_CHECKING:`` imports name the
            public names (:func:`type_checking_imports`).

    Returns:
        ``(__getattr__, __dir__)``. ``__getattr__`` imports the module that holds the name and keeps
        the value in the package (later lookups are plain attribute reads); any other submodule is
        imported by its name too, as an eager package root made it an attribute; anything else
        raises :class:`AttributeError`.

    Examples:
        >>> import tdsteer
        >>> getattr_, dir_ = lazy_exports("tdsteer", tdsteer.__file__)
        >>> getattr_("parse_indices")("1,2")
        [1, 2]
        >>> "SteeringVector" in dir_()
        True
    """
    where = type_checking_imports(package, source)

    def __getattr__(name: str) -> Any:
        module, attribute = where.get(name, (f"{package}.{name}", None))
        if name not in where and (name.startswith("__") or importlib.util.find_spec(module) is None):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(module)
        value = loaded if attribute is None else getattr(loaded, attribute)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__
