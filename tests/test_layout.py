"""The project's module names: none hides a package when its folder's files run as scripts,
and every module path users have seen still imports."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")


def test_the_project_has_its_packages():
    assert {"coders", "base_models", "datasets", "train", "util", "serve", "bench"} <= set(PACKAGES)


# util/util.py keeps the original write-ups' `from util.util import get_flattened_dim`; it stands in
# for its package when a script inside util/ makes `import util` find it (see its docstring).
STANDS_IN = {"util/util.py"}


def test_no_module_is_named_like_a_package_of_the_project():
    # Running a file as a script puts its folder first on sys.path, so a module there named
    # like a package (bench/base_models.py, serve/util.py) is what `import base_models` finds.
    clashes = [f"{pkg}/{py.name}" for pkg in PACKAGES for py in (ROOT / pkg).glob("*.py")
               if py.stem in PACKAGES and f"{pkg}/{py.name}" not in STANDS_IN]
    assert not clashes, clashes


def test_a_script_inside_util_still_finds_the_util_package():
    # `python util/checkpoint.py` puts util/ first on sys.path: `import util` finds util/util.py, which must
    # then act as the package (util.classpath, util.files, ...), and `util.util` must still import.
    script = ("import util.files, util.shapes\n"
              "from util.util import get_flattened_dim\n"
              "print(get_flattened_dim([-1, 1, 8, 8]), util.files.TMP_SUFFIX)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT / "util", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["64", ".tmp"]
    proc = subprocess.run([sys.executable, "util/checkpoint.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # it imports util.errors and util.files through the stand-in


OLD_NAMES = [  # (old module path, name, new module path): each old one is kept for users' scripts
    ("train.code", "load_code", "coders.code"), ("train.code", "Code", "coders.code"),
    ("train.config", "load_config", "coders.config"), ("train.config", "Config", "coders.config"),
    ("train.scenarios", "enumerate_scenarios", "coders.scenarios"),
    ("train.checkpoint", "load_checkpoint", "util.checkpoint"), ("train.lock", "FolderLock", "util.lock"),
    ("train.preflight", "check_device", "util.checks"), ("train.preflight", "probe_coders", "coders.build"),
    ("train.engine", "build_coders", "coders.build"), ("train.engine", "build_parity_models", "coders.build"),
    ("train.cli", "parse_overrides", "util.schema"), ("coders.config", "parse_overrides", "util.schema"),
    ("coders.config", "validate_schema", "util.schema"), ("coders.config", "read_json_config", "util.schema"),
    ("coders.config", "Config", "train.config"), ("coders.config", "validate_dict", "train.config"),
    ("coders.config", "load_config", "train.config"), ("coders.config", "load_run_folder", "train.config"),
    ("coders.config", "DEFAULT_OPTIMIZER", "train.config"), ("train.config", "expand_runs", "coders.config"),
    ("train.config", "RunSpec", "coders.config"), ("train.config", "CODE_DIRS", "util.classpath"),
    ("serve.runtime", "Pool", "serve.pool"), ("serve.runtime", "Instance", "serve.pool"),
    ("serve.plan", "read_latency_file", "serve.config"), ("util.util", "get_flattened_dim", "util.shapes"),
    ("util.util", "flush_denormals", "util.hardware"), ("util.util", "atomic_write_text", "util.files"),
    ("util.report", "main", "train.report"), ("util.report", "markdown_table", "train.report"),
    ("coders.code", "Code", "coders.systematic"), ("coders.code", "freeze", "coders.systematic"),
    ("coders.config", "RunSpec", "coders.form"), ("coders.config", "expand_runs", "coders.form"),
    ("train.nworker", "NWorkerSpec", "coders.form"), ("train.engine", "build_coders", "coders.build"),
]


@pytest.mark.parametrize("old, name, new", OLD_NAMES, ids=[f"{o}.{n}" for o, n, _ in OLD_NAMES])
def test_an_old_import_path_still_gives_the_same_object(old, name, new):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_the_policies_frontend_keeps_its_old_name():
    # one Ray frontend now drives fixed strategies and policies alike; scripts written for the policies still run
    from serve.runtime import Frontend, PolicyFrontend
    assert PolicyFrontend is Frontend


def test_a_moved_module_is_one_module_under_both_names():
    import train.code

    from train import code
    assert train.code is code is importlib.import_module("coders.code")


def test_the_training_names_of_coders_config_are_served_only_when_asked_for():
    # coders.config keeps Config, load_config, ... for users' scripts without importing train (the layers):
    # the name is looked up in train.config when first asked for, and an unknown name is still an AttributeError
    script = ("import sys, coders.config as c\n"
              "print('train.config' in sys.modules)\n"
              "from coders.config import Config, load_config\n"
              "import train.config as t\n"
              "print(Config is t.Config and load_config is t.load_config and issubclass(Config, c.CodeConfig))\n"
              "print(hasattr(c, 'no_such_name'))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "False"]


def test_no_bench_script_is_named_like_a_module_it_may_import():
    # bench/ files are also run as scripts: the standard library and the installed packages are off limits too.
    taken = set(sys.stdlib_module_names) | {"torch", "torchvision", "numpy", "ray", "matplotlib", "pytest"}
    clashes = [py.name for py in (ROOT / "bench").glob("*.py") if py.stem in taken]
    assert not clashes, clashes


def layout_map(text: str) -> dict[str, list[str]]:
    """The modules docs/layout.md's map names, by package: the code block whose lines are ``pkg/  what``
    headers followed by ``  a.py [b.py ...]  what`` lines (the leading ``.py`` words of each); a
    sub-package is a ``  sub/  what`` line, its modules the lines indented deeper below it."""
    block = text.split("```\nutil/", 1)[1].split("```", 1)[0]
    listed: dict[str, list[str]] = {}
    package, sub = "util", None
    for line in ("util/" + block).splitlines():
        words = line.split()
        indent = len(line) - len(line.lstrip())
        if line and not indent:
            package, sub = line.split("/", 1)[0], None
        elif words and words[0].endswith("/"):
            sub = f"{package}/{words[0].rstrip('/')}"
        else:
            owner = sub if sub and indent > 2 else package
            if indent <= 2:
                sub = None
            listed.setdefault(owner, []).extend(w for w in words[:next(
                (i for i, w in enumerate(words) if not w.endswith(".py")), len(words))])
    return listed


def module_folders() -> list[str]:
    """Every package of the project and every sub-package inside one, as ``pkg`` or ``pkg/sub``."""
    return PACKAGES + sorted(f"{pkg}/{d.name}" for pkg in PACKAGES for d in (ROOT / pkg).iterdir()
                             if (d / "__init__.py").is_file())


def test_the_layout_map_names_every_module_of_the_tree():
    listed = layout_map((ROOT / "docs" / "layout.md").read_text())
    fixes = []
    for pkg in module_folders():
        tree = sorted(py.name for py in (ROOT / pkg).glob("*.py") if py.name != "__init__.py")
        named = listed.get(pkg, [])
        fixes += [f"add under '{pkg}/' the line '  {name:<14} <what it holds, in a few words>'"
                  for name in tree if name not in named]
        fixes += [f"remove '{name}' from the '{pkg}/' lines: there is no {pkg}/{name}"
                  for name in named if name not in tree]
    fixes += [f"remove the '{pkg}/' lines: there is no package {pkg}" for pkg in listed if pkg not in module_folders()]
    assert not fixes, "docs/layout.md's map is behind the tree:\n" + "\n".join(fixes)


def test_the_layout_map_check_sees_a_missing_and_a_stale_module():
    # the reader above must see the modules of a line, and only those, so the check can fail
    text = "```\nutil/   x\n  a.py b.py   two things, c.py in words\ncoders/   y\n  d.py   one\n```\n"
    assert layout_map(text) == {"util": ["a.py", "b.py"], "coders": ["d.py"]}
    rooms = "```\nutil/   x\n  a.py   one\n  sub/   a room\n    b.py   in it\n  c.py   back out\ncoders/  y\n```\n"
    assert layout_map(rooms) == {"util": ["a.py", "c.py"], "util/sub": ["b.py"]}


SERVE_ROOMS = [  # (the flat name users' scripts import, the module in its room)
    ("serve.config", "serve.core.config"), ("serve.plan", "serve.core.plan"), ("serve.policy", "serve.core.policy"),
    ("serve.results", "serve.core.results"), ("serve.limits", "serve.core.limits"),
    ("serve.batching", "serve.core.batching"), ("serve.runtime", "serve.cluster.runtime"),
    ("serve.dispatch", "serve.cluster.dispatch"), ("serve.pool", "serve.cluster.pool"),
    ("serve.sim", "serve.simulator.simulate"), ("serve.sim_events", "serve.simulator.events"),
    ("serve.sim_profile", "serve.simulator.profiles"), ("serve.sim_predict", "serve.simulator.predictions"),
    ("serve.map", "serve.simulator.map"), ("serve.app", "serve.web.app"), ("serve.edge", "serve.web.edge"),
    ("serve.bodies", "serve.web.bodies"), ("serve.exposition", "serve.web.exposition"),
    ("serve.online", "serve.web.online"), ("serve.loadgen", "serve.web.loadgen"),
]


@pytest.mark.parametrize("old, new", SERVE_ROOMS, ids=[o for o, _ in SERVE_ROOMS])
def test_a_flat_serve_module_is_its_rooms_module(old, new):
    # one module object under both names: `from serve.policy import X` and patching either name act on one module
    assert importlib.import_module(old) is importlib.import_module(new)
    assert not (ROOT / (old.replace(".", "/") + ".py")).exists()  # no file copy to keep in step
