"""Packaging: every package folder is installed under the m1jax namespace, and the design card's folders are
imported as m1jax.convert / m1jax.train / m1jax.pallas_kernels (no top-level names a user's file could shadow)."""

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FOLDERS = {"m1jax": "m1jax", "convert": "m1jax.convert", "train": "m1jax.train",
           "pallas_kernels": "m1jax.pallas_kernels"}
TOP_LEVEL = ("convert", "train", "pallas_kernels")


def test_every_package_folder_is_listed_under_m1jax():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {"m1jax._presets"}
    for folder, name in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    assert listed == found, f"pyproject packages differ from the folders: missing {found - listed}, " \
                            f"extra {listed - found}"
    dirs = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for folder, name in FOLDERS.items():
        if folder != "m1jax":
            assert dirs[name] == folder


def test_subpackages_import_under_m1jax():
    import m1jax.convert
    import m1jax.pallas_kernels.lightning
    import m1jax.train

    import m1jax

    assert Path(m1jax.convert.__file__).parent == REPO / "convert"
    assert Path(m1jax.train.__file__).parent == REPO / "train"
    assert Path(m1jax.pallas_kernels.lightning.__file__).parent == REPO / "pallas_kernels" / "lightning"
    assert m1jax.__version__


def test_no_code_imports_the_old_top_level_names():
    offenders = []
    for folder in ("m1jax", "convert", "train", "pallas_kernels", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in TOP_LEVEL]
    assert not offenders, offenders
