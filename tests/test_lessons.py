"""Smoke runs: every lesson's main() with --quick, in one shared temporary runs folder (so the
quick base model of lesson 00 is trained once and reused, as in a real run); and
``python -m lessons``: failures listed and non-zero, stale summaries ignored, bad flags refused."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

LESSONS = sorted((Path(__file__).resolve().parent.parent / "lessons").glob("[0-9][0-9]_*.py"))


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def load_lesson(path: Path):
    spec = importlib.util.spec_from_file_location(f"lesson_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_quick_run(path, runs_dir, capfd):
    lesson = load_lesson(path)
    assert lesson.main(["--quick", "--device", "cpu", "--runs", str(runs_dir)]) == 0
    summaries = list(runs_dir.glob(f"{path.stem[:2]}_*/summary.json"))
    assert summaries, "a lesson writes its headline numbers to runs/<lesson>/summary.json"
    assert json.loads(summaries[0].read_text())["numbers"]
    out = capfd.readouterr().out  # capfd: lesson 13's output comes from its two processes
    last_takeaway = out.rfind("\nTakeaway: ")
    checks_table = max(out.rfind("\nChecks\n------"), out.rfind("\nTargets\n-------"))
    assert last_takeaway >= 0, "a lesson prints its computed takeaway (the results page)"
    assert checks_table > last_takeaway, "a lesson ends with its checks table"


def test_a_lesson_whose_own_check_fails_exits_non_zero(runs_dir, monkeypatch, capsys):
    """Lesson 01's gradient check, given a tolerance nothing can meet, must fail the lesson --
    in main()'s return and so in the process's exit status (run_main)."""
    lesson = load_lesson(next(p for p in LESSONS if p.name.startswith("01_")))
    monkeypatch.setattr(lesson, "AUTOGRAD_TOL", -1.0)
    assert lesson.main(["--quick", "--device", "cpu", "--runs", str(runs_dir)]) == 1
    assert "FAILED: hand-derived backward" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        lesson.run_main(lambda: lesson.main(["--quick", "--device", "cpu", "--runs",
                                             str(runs_dir)]))
    assert stop.value.code == 1


def test_lessons_are_numbered_from_00_without_gaps():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers == list(range(len(numbers)))


def fake_lesson(folder: Path, name: str, code: int, summary=True) -> Path:
    """A stand-in lesson script: writes a summary (or not) under --runs and exits with code."""
    path = folder / name
    path.write_text(
        "import json, sys, pathlib\n"
        "runs = pathlib.Path(sys.argv[sys.argv.index('--runs') + 1])\n"
        f"out = runs / '{name[:-3]}'\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        f"if {summary}:\n"
        "    (out / 'summary.json').write_text(json.dumps({'numbers': {'x': 1.5}}))\n"
        f"print('table of {name}')\n"
        f"sys.exit({code})\n")
    return path


def test_run_all_lists_failed_lessons_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    import lessons.__main__ as run_all
    scripts = [fake_lesson(tmp_path, "00_fine.py", 0), fake_lesson(tmp_path, "01_broken.py", 3)]
    monkeypatch.setattr(run_all, "lesson_files", lambda: scripts)
    runs = tmp_path / "runs"
    assert run_all.main(["--runs", str(runs), "--report", str(tmp_path / "report")]) == 1
    out = capsys.readouterr().out
    assert "1 lesson(s) failed: 01_broken.py" in out and "x=1.5" in out
    page = (tmp_path / "report" / "results.md").read_text()
    assert "| 01_broken.py | FAILED |" in page and "table of 00_fine.py" in page
    assert "Machine:" in page and "torch" in page


def test_run_all_ignores_a_stale_summary_of_an_earlier_run(tmp_path, monkeypatch, capsys):
    import lessons.__main__ as run_all
    runs = tmp_path / "runs"
    (runs / "00_fine").mkdir(parents=True)
    (runs / "00_fine" / "summary.json").write_text(json.dumps({"numbers": {"stale": 9}}))
    time.sleep(0.05)
    script = fake_lesson(tmp_path, "00_fine.py", 4, summary=False)
    monkeypatch.setattr(run_all, "lesson_files", lambda: [script])
    assert run_all.main(["--runs", str(runs)]) == 1
    assert "stale" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, phrase", [(["--only", "99"], "no lesson numbered 99"),
                                          (["--bogus"], "unrecognized arguments")])
def test_run_all_refuses_bad_flags_with_a_usage_error(argv, phrase, capsys):
    import lessons.__main__ as run_all
    with pytest.raises(SystemExit) as stop:
        run_all.main(argv)
    assert stop.value.code == 2 and phrase in capsys.readouterr().err


def test_run_all_refuses_a_runs_path_that_is_a_file(tmp_path, capsys):
    import lessons.__main__ as run_all
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        run_all.main(["--runs", str(tmp_path / "f")])
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, phrase", [
    (["--device", "nonsense"], "unknown device"), (["--seed", "-1"], "below the smallest"),
    (["--text", "/no/such/file.txt"], "no such text file"), (["--bogus"], "unrecognized")])
def test_a_lesson_given_a_bad_flag_prints_a_usage_error_and_exits_2(argv, phrase, capsys):
    lesson = load_lesson(LESSONS[0])  # lesson 00 has the most flags
    with pytest.raises(SystemExit) as stop:
        lesson.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and phrase in err and "Traceback" not in err


def test_a_lesson_refuses_a_runs_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as stop:
        load_lesson(LESSONS[0]).main(["--runs", str(tmp_path / "f")])
    assert stop.value.code == 2 and "is a file" in capsys.readouterr().err
