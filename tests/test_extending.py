"""docs/extending.md runs: every example on the page is written out and run, so the page fails here when
the code it shows goes stale.

A fenced block under ``<!-- file: NAME -->`` is written to a scratch folder as NAME; a block under
``<!-- run -->`` is then run there (the folder current and first on sys.path, as beside a config), in page
order, each in a namespace of its own.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCK = re.compile(r"<!-- (file: (?P<name>[\w.]+)|run) -->\n```\w*\n(?P<code>.*?)```", re.S)
SECTIONS = ("A coder", "An N-worker code", "A code form", "A base model", "A serving policy", "A strategy")


def examples(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{section title: [(file name or "run", code), ...]}`` in page order."""
    found: dict[str, list[tuple[str, str]]] = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.+)$", text, re.M)]
    for m in BLOCK.finditer(text):
        section = [title for at, title in starts if at < m.start()][-1]
        found.setdefault(section, []).append((m.group("name") or "run", m.group("code")))
    return found


def test_the_page_marks_an_example_of_every_kind():
    found = examples(PAGE.read_text())
    for section in SECTIONS:
        assert any(name == "run" for name, _ in found.get(section, [])), f"'{section}' has no run block"
    stale = [word for word in ("train.code",) if word in PAGE.read_text()]
    assert not stale, f"docs/extending.md names old module paths: {stale}"


def test_a_block_the_page_does_not_mark_is_not_run():
    """The extractor takes only marked blocks: an unmarked one is prose."""
    text = "## A\n```python\nraise SystemExit\n```\n<!-- run -->\n```python\nx = 1\n```\n"
    assert examples(text) == {"A": [("run", "x = 1\n")]}


def forget_page_modules() -> None:
    """Drop every ``my_*`` module, so the page's files are imported from this test's scratch folder even when
    another test (tests/test_classpath.py's user modules, say) imported a module of the same name first."""
    for mod in [m for m in sys.modules if m.startswith("my_")]:
        del sys.modules[mod]
    importlib.invalidate_caches()


@pytest.mark.parametrize("section", SECTIONS)
def test_each_example_on_the_page_runs(section, tmp_path, monkeypatch):
    import torch

    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from serve.core.strategies import REGISTRY

    registered = dict(REGISTRY)
    forget_page_modules()
    try:
        for name, code in examples(PAGE.read_text())[section]:
            if name != "run":
                (tmp_path / name).write_text(code)
            else:
                exec(compile(code, f"{PAGE.name} ({section})", "exec"), {"__name__": "__example__"})
    finally:  # the page's own modules are imported from this scratch folder only, its strategies live here only
        forget_page_modules()
        REGISTRY.clear()
        REGISTRY.update(registered)


def test_the_config_lines_on_the_page_name_classes_its_files_define(tmp_path, monkeypatch):
    """Each inline config fragment (`"key": [...]`) is JSON, and every class path in it builds as the key's
    config would: the coders with (k, r, in_dim) or (K, N, in_dim), the models as F."""
    from base_models import MODEL_ALIASES
    from base_models.functions import construct
    from util.classpath import build

    text = PAGE.read_text()
    for name, code in (item for items in examples(text).values() for item in items):
        if name != "run":
            (tmp_path / name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    fragments = [json.loads("{" + m + "}") for m in re.findall(r'`("(?:enc_dec_types|models)": \[.*?\])`', text)]
    built = []
    forget_page_modules()
    try:
        for fragment in fragments:
            for pair in fragment.get("enc_dec_types", []):
                nworker = "nworker" in json.dumps(pair)
                sizes = (3, 5) if nworker else (2, 1)
                built += [build(pair[0], "enc_dec_types", *sizes, [-1, 1, 4, 4]),
                          build(pair[1], "enc_dec_types", *sizes, [-1, 10])]
            built += [construct(spec, "models", MODEL_ALIASES, (1, 4, 4), 10) for spec in fragment.get("models", [])]
    finally:
        forget_page_modules()
    assert {type(m).__name__ for m in built} == {"MixEncoder", "FlatDecoder", "LinearEncoder", "MaskedDecoder",
                                                 "TinyMLP"}
    assert built[1].net[1].out_features == 128  # the fragment's args reach the constructor
