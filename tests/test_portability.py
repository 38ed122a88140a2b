"""What ships works on another machine: no config or doc names a path of this one, and every import is declared."""
import ast
import json
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path, PureWindowsPath

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("util", "datasets", "base_models", "coders", "train", "serve", "bench")

# A machine's top-level folders, as a doc would spell the start of an absolute path ("/path/to/" is a placeholder).
MACHINE_ROOTS = ("work", "home", "root", "Users", "tmp", "mnt", "data", "opt", "srv", "var", "usr", "scratch",
                 "media", "net", "shared", "Volumes", "private", "lustre", "gpfs", "nfs", "content", "kaggle")
IN_PROSE = re.compile(r"(?<![\w.:/~-])/(?:" + "|".join(MACHINE_ROOTS) + r")/[\w.<>-]+|\b[A-Za-z]:\\\\?[\w.-]+")


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def absolute_paths(path: Path) -> list[str]:
    if path.suffix == ".json":
        return [s for s in strings(json.loads(path.read_text()))
                if s.startswith(("/", "~")) or PureWindowsPath(s).drive]
    return [f"line {i}: {m.group(0)}" for i, line in enumerate(path.read_text().splitlines(), 1)
            for m in IN_PROSE.finditer(line)]


def test_no_shipped_config_or_doc_names_an_absolute_path():
    files = sorted(p for d in ("conf", "docs") for p in (ROOT / d).rglob("*") if p.suffix in (".json", ".md"))
    files += [ROOT / "README.md", ROOT / "mkdocs.yml"]
    assert len(files) > 50
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := absolute_paths(p))}
    assert not found, f"absolute paths (use ../shared/... or a relative path): {found}"


def test_the_check_sees_the_paths_it_is_for(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"base_model_file": "/work/shared/anchor_models/mnist/base-mlp/model.t7",
                                  "data_dir": "../shared/data", "runs": ["C:\\runs\\a"]}))
    assert len(absolute_paths(config)) == 2
    doc = tmp_path / "d.md"
    doc.write_text("F is `/work/shared/anchor_models/mnist/base-mlp/model.t7`; data in /home/me/data.\n"
                   "Not these: `../shared/anchor_models`, export LCC_DATA_DIR=/path/to/data, "
                   "POST /predict/batch, http://localhost:8000/metrics, conf/serve/x.json\n")
    assert [h.split(": ", 1)[1] for h in absolute_paths(doc)] == ["/work/shared", "/home/me"]


def declared() -> set[str]:
    """The distributions setup.py names (install_requires and every extra), lower case, without extras."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[\w,]+\])?\s*(?:[<>=!~;].*)?$", node.value)
            if m:
                names.add(m.group(1).lower().replace("_", "-"))
    return names


def test_every_third_party_import_of_the_shipped_code_is_declared_in_setup_py():
    owners = {k: [d.lower().replace("_", "-") for d in v] for k, v in packages_distributions().items()}
    have = declared()
    missing = {}
    for path in [p for d in PACKAGES for p in (ROOT / d).rglob("*.py")] + [ROOT / "train.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in PACKAGES or top not in owners:
                    continue  # the standard library, lcc's own, or not installed here (an optional import)
                if not set(owners[top]) & have:
                    missing.setdefault(f"{top} ({'/'.join(owners[top])})", str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in setup.py: {missing}"
