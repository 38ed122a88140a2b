"""The project's module names: none hides a package when its folder's files run as scripts."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")


def test_the_project_has_its_packages():
    assert {"coders", "base_models", "datasets", "train", "util", "serve", "bench"} <= set(PACKAGES)


def test_no_module_is_named_like_a_package_of_the_project():
    # Running a file as a script puts its folder first on sys.path, so a module there named
    # like a package (bench/base_models.py, util/util.py) is what `import base_models` finds.
    clashes = [f"{pkg}/{py.name}" for pkg in PACKAGES for py in (ROOT / pkg).glob("*.py")
               if py.stem in PACKAGES]
    assert not clashes, clashes


def test_no_bench_script_is_named_like_a_module_it_may_import():
    # bench/ files are also run as scripts: the standard library and the installed packages are off limits too.
    taken = set(sys.stdlib_module_names) | {"torch", "torchvision", "numpy", "ray", "matplotlib", "pytest"}
    clashes = [py.name for py in (ROOT / "bench").glob("*.py") if py.stem in taken]
    assert not clashes, clashes
