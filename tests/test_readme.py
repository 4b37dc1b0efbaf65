"""The README says what the code is: every Python snippet in it runs as pasted, and the reading
path it lists names files that exist, with their lengths, within the promised total."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PATH_LIMIT = 1500  # lines, comments and docstrings included: "an afternoon"


def python_snippets():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def reading_path():
    """[(path, lines as the README says)] from the rows of the reading-path table."""
    section = README.split("## The reading path", 1)[1].split("\n## ", 1)[0]
    return [(path, int(lines)) for path, lines in
            re.findall(r"^\| \d+ \| `([^`]+)` \| [^|]+ \| (\d+) \|$", section, flags=re.M)]


def test_the_readme_has_snippets_and_a_reading_path():
    assert len(python_snippets()) >= 2
    assert len(reading_path()) >= 8


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_every_python_snippet_runs_as_pasted(index, tmp_path):
    snippet = python_snippets()[index]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"snippet {index} failed:\n{snippet}\n{run.stderr[-3000:]}"


def test_the_reading_path_lists_real_files_with_their_lengths():
    rows = reading_path()
    for path, lines in rows:
        text = (ROOT / path).read_text(encoding="utf-8")
        assert len(text.splitlines()) == lines, f"{path}: README says {lines} lines"
    total = sum(lines for _, lines in rows)
    assert total <= PATH_LIMIT, f"the reading path is {total} lines, over {PATH_LIMIT}"
    assert f"{total:,}" in README.split("## The reading path", 1)[1].split("\n## ", 1)[0]


def test_the_readme_is_a_front_door_not_a_notebook():
    assert len(README.splitlines()) <= 200
    for stale in ("the seed", "issue ", "2026-"):  # no outside document, issue, or dated record
        assert stale not in README


# --- figures quoted from the results page -----------------------------------------------------
HEADLINE = ROOT / "docs" / "results" / "headline.json"
QUOTE = re.compile(r"<!-- (.+?) -->([^\s<]+)")


def quoted_figures():
    """[(lesson, keys, format spec, figure as printed)] for every figure the README quotes,
    each written as <!-- lesson | key | ... | format -->figure."""
    quotes = []
    for tag, shown in QUOTE.findall(README):
        lesson, *keys, spec = [part.strip() for part in tag.split("|")]
        quotes.append((lesson, keys, spec, shown))
    return quotes


def test_every_figure_the_readme_quotes_is_the_results_page_s():
    """A measured figure in the README names where it comes from on the results page
    (docs/results/headline.json, written by `python -m lessons --report docs/results`) and
    equals it: a page regenerated without the README following, or a figure typed by hand,
    fails here."""
    quotes = quoted_figures()
    assert len(quotes) >= 3, "the README quotes its headline figures from the results page"
    numbers = json.loads(HEADLINE.read_text(encoding="utf-8"))
    for lesson, keys, spec, shown in quotes:
        value = numbers[lesson]
        for key in keys:
            value = value[key]
        assert format(value, spec) == shown, f"{lesson} {keys}: README {shown}, page {value}"
