"""Smoke runs: every lesson's main() with --quick, in one shared temporary runs folder (so the
quick base model of lesson 00 is trained once and reused, as in a real run)."""
import importlib.util
import json
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
def test_lesson_quick_run(path, runs_dir):
    lesson = load_lesson(path)
    assert lesson.main(["--quick", "--device", "cpu", "--runs", str(runs_dir)]) == 0
    summaries = list(runs_dir.glob(f"{path.stem[:2]}_*/summary.json"))
    assert summaries, "a lesson writes its headline numbers to runs/<lesson>/summary.json"
    assert json.loads(summaries[0].read_text())["numbers"]


def test_lessons_are_numbered_00_to_09_without_gaps():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers == list(range(len(numbers)))
