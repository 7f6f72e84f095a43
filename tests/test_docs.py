"""Every docstring example runs (doctest), every Python block of the README and the user guide
runs, and the demo command runs."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import deepeq
from deepeq.__main__ import main

MODULES = [
    m.name for m in pkgutil.walk_packages(deepeq.__path__, "deepeq.") if m.name != "deepeq.__main__"
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_doctests_exist():
    total = sum(
        doctest.testmod(importlib.import_module(n), report=False).attempted for n in MODULES
    )
    assert total >= 10


def test_demo_smoke(capsys):
    assert main(["demo", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("| attention |") == 3 and out.count("| conv |") == 3
    assert "CONVERGED" in out


def test_version_command(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == deepeq.__version__


ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))
PAGES = ["README.md", "CONTRIBUTING.md", *DOCS]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
GUIDES = [p for p in PAGES if BLOCK.search((ROOT / p).read_text())]
TRAINING_EXAMPLE = {"README.md", "docs/guide/gradients.md"}  # first block trains a DEQ layer


def test_the_guides_have_code():
    assert set(GUIDES) >= TRAINING_EXAMPLE | {
        "docs/guide/solving.md",
        "docs/guide/stabilisation.md",
    }


@pytest.mark.parametrize("page", GUIDES)
def test_python_blocks_of_the_guides_run(page, capsys):
    for block in BLOCK.findall((ROOT / page).read_text()):
        exec(compile(block, page, "exec"), {})
    if page not in TRAINING_EXAMPLE:
        return
    # the first block trains a DEQ layer for 10 steps, printing step, loss, forward status and
    # NFE, backward status, NFE and fallbacks: the loss must fall, the solves must have run and
    # (at these settings) converged, forward and backward
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    rows = [ln for ln in lines if len(ln) == 7 and ln[0].isdigit()][:10]
    assert [int(r[0]) for r in rows] == list(range(10))
    assert float(rows[-1][1]) < float(rows[0][1])
    assert all(int(r[3]) >= 2 and int(r[5]) >= 1 for r in rows)
    assert all(r[2] == r[4] == "CONVERGED" and r[6] == "0" for r in rows)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    # mkdocs build --strict checks the site's pages; this also covers README and CONTRIBUTING
    text = (ROOT / page).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert ((ROOT / page).parent / target).exists(), f"{page}: broken link {target!r}"


def test_no_document_speaks_of_work_periods():
    # results are organised by topic; history lives in git and CHANGELOG.md
    pattern = re.compile(r"\b[Ss]ession\b|\bsessions\b")
    files = [
        *PAGES,
        "CHANGELOG.md",
        *(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.toml")),
    ]
    hits = [f for f in files if pattern.search((ROOT / f).read_text())]
    assert hits == []
