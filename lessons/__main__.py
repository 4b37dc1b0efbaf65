"""Run every lesson in order: ``python -m lessons [--quick] [--device D] [--only 00 03]``.

Each lesson runs as its own process (a failure in one does not stop the others); at the end the
headline numbers that each lesson wrote to runs/<lesson>/summary.json are printed together.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def lesson_files():
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))


def summary_line(runs: Path, path: Path) -> str:
    found = sorted(runs.glob(f"{path.stem[:2]}_*/summary.json"))
    if not found:
        return ""
    numbers = json.loads(found[0].read_text())["numbers"]
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in list(numbers.items())[:4]]
    return ", ".join(shown)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run all lessons in order.")
    parser.add_argument("--quick", action="store_true", help="smoke-run every lesson")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--only", nargs="*", help="lesson numbers to run, e.g. 00 03")
    args = parser.parse_args(argv)
    files = [p for p in lesson_files() if not args.only or p.name[:2] in args.only]
    results = []
    for path in files:
        cmd = [sys.executable, str(path), "--device", args.device, "--runs", args.runs]
        cmd += ["--quick"] if args.quick else []
        print(f"\n{'=' * 78}\n{path.name}\n{'=' * 78}", flush=True)
        t0 = time.time()
        code = subprocess.call(cmd, cwd=HERE.parent)
        results.append((path.name, code, time.time() - t0))
    print(f"\n{'=' * 78}\nSummary\n{'=' * 78}")
    for name, code, secs in results:
        status = "ok" if code == 0 else f"FAILED ({code})"
        print(f"{name:38s} {status:10s} {secs:6.1f}s  {summary_line(Path(args.runs), Path(name))}")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
