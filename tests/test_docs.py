"""The manual cannot drift from the code: its links resolve, and every config key has its reference row.

No MkDocs needed. Links and pictures of README.md and docs/*.md must point at
files that exist (and at headings that exist, for ``page.md#anchor``); every
key of the training config (train/config.py ``Config``, with the computation's keys of coders/config.py), the serving config
(serve/core/config.py ``ServeConfig``) and the map (serve/simulator/map.py ``MAP_KEYS``) needs
a row ``| `key` | default | meaning |`` in its reference page, with the
default the code declares.
"""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
ROW = re.compile(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|\s*([^|\n]*?)\s*\|", re.M)


def prose(text: str) -> str:
    """The page without its code blocks and inline code, where link-like text is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def broken_links(page: Path) -> list[str]:
    """``"page: target (why)"`` for each relative link or picture of ``page`` that does not resolve."""
    bad = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = page.relative_to(ROOT)
        if not dest.exists():
            bad.append(f"{where}: '{target}' (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where}: '{target}' (no heading of {dest.name} has the anchor '#{anchor}')")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_and_picture_resolves(page):
    bad = broken_links(page)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_pictures_are_small_pngs():
    pictures = sorted((DOCS / "img").glob("*"))
    assert pictures, "docs/img/ holds the manual's pictures"
    for pic in pictures:
        assert pic.suffix == ".png" and pic.stat().st_size < 150_000, f"{pic.name}: {pic.stat().st_size} bytes"


def reference_rows(page: Path) -> dict[str, str]:
    """``key -> default cell`` (backticks removed) of every ``| `key` | default |`` row of ``page``."""
    return {key: cell.strip().strip("`") for key, cell in ROW.findall(page.read_text())}


def schema_defaults(schema) -> dict[str, str]:
    """``key -> default`` as the reference writes it: JSON, or ``required``."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = json.dumps(f.default_factory())
        else:
            out[f.name] = "required"
    return out


def coverage_problems(defaults: dict[str, str], page: Path, declared_in: str) -> list[str]:
    """One sentence per key of ``defaults`` without a row in ``page``, or whose row gives another default."""
    rows = reference_rows(page)
    where = page.relative_to(ROOT)
    problems = []
    for key, default in defaults.items():
        shown = default if default == "required" else f"`{default}`"
        if key not in rows:
            problems.append(f"config key '{key}' ({declared_in}) has no row in {where}. Fix: add to its reference "
                            f"table the row\n    | `{key}` | {shown} | <what it does> |")
        elif rows[key] != default:
            problems.append(f"config key '{key}' ({declared_in}) is listed in {where} with the default "
                            f"'{rows[key]}', but the code declares {shown}. Fix: correct that row's default.")
    return problems


def schemas():
    from train.config import Config
    from serve.config import ServeConfig
    from serve.map import MAP_KEYS

    return [
        (schema_defaults(Config), DOCS / "training.md", "train/config.py, class Config"),
        (schema_defaults(ServeConfig), DOCS / "serving.md", "serve/core/config.py, class ServeConfig"),
        ({key: json.dumps(default) for key, (default, _) in MAP_KEYS.items()}, DOCS / "simulator.md",
         "serve/simulator/map.py, MAP_KEYS"),
    ]


def test_every_config_key_has_a_reference_row_with_its_default():
    problems = [p for defaults, page, declared in schemas() for p in coverage_problems(defaults, page, declared)]
    assert not problems, "\n".join(problems)


def test_a_key_added_to_a_schema_without_a_row_is_named_with_its_fix():
    from train.config import Config

    grown = dataclasses.make_dataclass("Grown", [("brand_new_key", int, dataclasses.field(default=3))], bases=(Config,))
    (problem,) = coverage_problems(schema_defaults(grown), DOCS / "training.md", "train/config.py, class Config")
    assert "'brand_new_key'" in problem and "docs/training.md" in problem and "| `brand_new_key` | `3` |" in problem


def test_readme_is_a_front_page_with_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    blocks = [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)]
    assert any(b.endswith("python -m pytest tests") for b in blocks), "CI runs the README's test command"
    assert any('pip install -e ".[test,plot,serve]"' in b for b in blocks)


def test_every_page_of_the_manual_is_in_the_site_navigation():
    nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    missing = [p.name for p in DOCS.glob("*.md") if p.name not in nav]
    assert not missing, (f"pages missing from mkdocs.yml's nav: {missing}. Fix: add a line such as "
                         f"'      - Title: {missing[0]}' under the fitting section of nav in mkdocs.yml.")
