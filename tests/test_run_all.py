"""python -m lessons: --device checked once before any lesson starts, no abbreviated flags, and
the results page (--report DIR) regenerated whole from the run: per lesson its title, takeaway,
plots, printed tables and time, at a named commit. Fake lessons stand in for the real ones."""
import json
import os
import shutil
import subprocess
import textwrap

import pytest
import torch

import lessons.__main__ as run_all

FAKE_LESSON = '''\
"""{title}

More docstring, not the title."""
import json
import sys
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--runs") + 1]) / "{stem}"
out.mkdir(parents=True, exist_ok=True)
print("Table of {stem}")
print("-----------------")
print("``` a fence inside the output ```")
{takeaway}
(out / "plot.png").write_bytes(b"png of {stem}")
(out / "summary.json").write_text(json.dumps({{"numbers": {{"x": {x}}}}}))
'''


@pytest.fixture
def no_launch(monkeypatch):
    """The process launcher replaced by a recorder: any lesson started is a call in the list."""
    calls = []
    monkeypatch.setattr(run_all.subprocess, "Popen", lambda *a, **k: calls.append(a) or 1 / 0)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_usage_error_before_any_lesson(no_launch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_all.main(["--device", "cuda"])
    assert exit_.value.code == 2 and no_launch == []
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--device" in error and "cuda" in error


@pytest.mark.parametrize("argv", [["--device", "tpu9"], ["--qu"], ["--dev", "cpu"],
                                  ["--only", "77"]])
def test_bad_flags_start_nothing(argv, no_launch):
    """An unknown device; abbreviations of --quick and --device (argparse would take them)."""
    with pytest.raises(SystemExit) as exit_:
        run_all.main(argv)
    assert exit_.value.code == 2 and no_launch == []


@pytest.fixture
def fake_lessons(tmp_path, monkeypatch):
    """Two lessons: 01 prints a takeaway, 02 prints none; both print a table, save a plot and
    write summary.json."""
    folder = tmp_path / "lessons"
    folder.mkdir()
    specs = [("01_first", "Lesson 01 -- the first one.", 'print("Takeaway: first wins by 2x")',
              1.5), ("02_second", "Lesson 02 -- the second one.", "", 2.5)]
    for stem, title, takeaway, x in specs:
        (folder / f"{stem}.py").write_text(FAKE_LESSON.format(title=title, stem=stem,
                                                              takeaway=takeaway, x=x))
    monkeypatch.setattr(run_all, "lesson_files", lambda: sorted(folder.glob("*.py")))
    return tmp_path


def run_with_report(root):
    return run_all.main(["--device", "cpu", "--runs", str(root / "runs"),
                         "--report", str(root / "report")])


def test_the_page_gives_takeaway_then_plot_then_tables_and_names_the_commit(fake_lessons):
    assert run_with_report(fake_lessons) == 0
    page = (fake_lessons / "report" / "results.md").read_text()
    first = page[page.index("## Lesson 01 -- the first one."):page.index("## Lesson 02")]
    order = [first.index(s) for s in ["**Takeaway:** first wins by 2x",
                                      "![plot](01_first/plot.png)", "Table of 01_first"]]
    assert order == sorted(order)
    assert "Time: " in first.split("Table of 01_first")[1]  # after the tables
    second = page[page.index("## Lesson 02"):]
    assert "(no takeaway printed)" in second and "More docstring" not in page
    assert "````text" in page  # a fence longer than the output's own ``` runs
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=run_all.HERE.parent,
                            capture_output=True, text=True).stdout.strip()
    assert f"commit {commit}" in page
    assert f"torch {torch.__version__}" in page
    report = fake_lessons / "report"
    assert (report / "01_first" / "plot.png").read_bytes() == b"png of 01_first"
    headline = json.loads((report / "headline.json").read_text())
    assert headline.pop("all lessons")["minutes"] == 0  # two fake lessons of a second or so
    assert headline == {"01_first": {"x": 1.5}, "02_second": {"x": 2.5}}


def test_the_page_names_the_commit_the_lessons_ran_at_not_one_made_while_they_ran(
        fake_lessons, monkeypatch):
    # a commit made during an hour-long run must not be named as the code the lessons ran
    answers = iter(["abc1234", "def5678 + uncommitted changes"])
    monkeypatch.setattr(run_all, "commit_line", lambda report_dir=None: next(answers))
    assert run_with_report(fake_lessons) == 0
    assert "at commit abc1234," in (fake_lessons / "report" / "results.md").read_text()


def test_the_page_is_regenerated_whole_and_removes_only_its_own_stale_files(fake_lessons):
    report = fake_lessons / "report"
    stale = [report / "09_renamed_lesson" / "old.png", report / "01_first" / "old_plot.png"]
    kept = [report / "notes.md", report / "figures" / "mine.png"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"from before")
    (report / "results.md").write_text("an old page with history\n")
    old_plot = fake_lessons / "runs" / "02_second" / "left_from_an_earlier_run.png"
    old_plot.parent.mkdir(parents=True)
    old_plot.write_bytes(b"old")
    os.utime(old_plot, (1, 1))  # written long before this run started
    assert run_with_report(fake_lessons) == 0
    assert not any(p.exists() for p in stale) and not (report / "09_renamed_lesson").exists()
    assert all(p.read_bytes() == b"from before" for p in kept)
    page = (report / "results.md").read_text()
    assert "an old page" not in page and "left_from_an_earlier_run" not in page
    assert not (report / "02_second" / "left_from_an_earlier_run.png").exists()


def test_a_dirty_tree_is_named_on_the_page_but_not_an_earlier_page(tmp_path, monkeypatch):
    """In a repository of its own: a change to the code is named; a change only inside the
    report's folder (an earlier page, not committed yet) is not; outside git, it says so."""
    def git(*words):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *words],
                       cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "lessons").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "results.md").write_text("old page\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    monkeypatch.setattr(run_all, "HERE", tmp_path / "lessons")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path,
                            capture_output=True, text=True).stdout.strip()
    report = tmp_path / "docs" / "results"
    assert run_all.commit_line(report) == commit
    (report / "results.md").write_text("a newer page\n")
    assert run_all.commit_line(report) == commit
    (tmp_path / "code.py").write_text("x = 2\n")
    assert run_all.commit_line(report) == f"{commit} + uncommitted changes"
    shutil.rmtree(tmp_path / ".git")
    assert run_all.commit_line(report) == "unknown (not a git checkout)"


def test_takeaways_are_the_lines_that_start_with_the_marker():
    output = textwrap.dedent("""\
        Table
        Takeaway: r = 8 is enough here (0.91 vs 0.92)
          Takeaway: indented, so part of a table
        Takeaway: and a second line
    """)
    assert run_all.takeaways(output) == ["r = 8 is enough here (0.91 vs 0.92)",
                                         "and a second line"]
