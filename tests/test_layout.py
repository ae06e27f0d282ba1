"""The package layout the design promises, checked on the source: features -> training -> bundle (the
artifact contract) -> serving, with cli/ above both wings. Every module's imports are read with `ast`,
function-level and `TYPE_CHECKING` imports included, so a lazy `from serving.x import y` inside a
training function counts as much as one at the top of the file."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "training", "bundle", "serving", "cli")
TORCH = ("torch", "torchrec", "fbgemm_gpu", "opacus", "torchmetrics", "tensordict")  # torch or what loads it

# package -> top-level modules it must never import
FORBIDDEN = {
    "features": ("training", "serving", "bundle", "cli", *TORCH),
    "bundle": ("training", "serving", "cli", *TORCH),
    "serving": ("training", "cli", *TORCH),
    "training": ("serving", "cli"),
}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth; relative imports are
    resolved against the file's package; `importlib.import_module("x")` with a literal counts too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
            else:
                names = [node.module]
            found += [(node.lineno, n) for n in names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def modules_of(package: str, root: Path = REPO) -> list[Path]:
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def violations(package: str, root: Path = REPO) -> list[str]:
    banned = FORBIDDEN[package]
    return [
        f"{path.relative_to(root)}:{line} imports {name}"
        for path in modules_of(package, root)
        for line, name in imported_modules(path, root)
        if name.split(".")[0] in banned
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_exists_with_modules(package):
    assert (REPO / package / "__init__.py").is_file(), f"{package}/ is not a package"
    assert len(modules_of(package)) >= 2, package


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_layout_allows(package):
    assert violations(package) == [], f"{package}/ must not import {', '.join(FORBIDDEN[package])}"


def test_the_scanner_sees_function_level_relative_and_dynamic_imports(tmp_path):
    # a module that hides its imports every way the scan claims to catch
    pkg = tmp_path / "serving"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .. import recommender\n")
    (pkg / "sub" / "mod.py").write_text(
        "import json\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from training.model import TwoTower\n"
        "def f():\n"
        "    import torch.nn as nn\n"
        "    from ..app import x\n"
        "    class C:\n"
        "        def g(self):\n"
        "            import importlib\n"
        "            return importlib.import_module('training.pipeline')\n"
    )
    assert imported_modules(pkg / "sub" / "__init__.py", tmp_path) == [(1, "serving.recommender")]
    assert imported_modules(pkg / "sub" / "mod.py", tmp_path) == [
        (1, "json"), (2, "typing"), (4, "training.model"), (6, "torch.nn"), (7, "serving.app"), (10, "importlib"), (11, "training.pipeline"),
    ]  # fmt: skip
    assert violations("serving", tmp_path) == [
        "serving/sub/mod.py:4 imports training.model",
        "serving/sub/mod.py:6 imports torch.nn",
        "serving/sub/mod.py:11 imports training.pipeline",
    ]
