"""Run every lesson in order: ``python -m lessons [--quick] [--device D] [--only 00 03]``.

Each lesson runs as its own process (a failure in one does not stop the others); what it prints
is shown as it comes and kept. At the end the headline numbers that each lesson wrote to
runs/<lesson>/summary.json in *this* run are printed together, failed lessons are listed, and
the exit status is non-zero if any lesson failed. ``--report DIR`` also writes DIR/results.md:
every lesson's printed tables and its plots, with the machine, the torch version and the date.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def lesson_files():
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m lessons",
                                     description="Run all lessons in order.")
    parser.add_argument("--quick", action="store_true", help="smoke-run every lesson")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ...")
    parser.add_argument("--runs", default="runs", help="folder the lessons write to")
    parser.add_argument("--only", nargs="+", metavar="NN", help="lesson numbers, e.g. 00 03")
    parser.add_argument("--report", metavar="DIR",
                        help="write DIR/results.md with every lesson's tables and plots")
    args = parser.parse_args(argv)
    numbers = [p.name[:2] for p in lesson_files()]
    unknown = [n for n in args.only or [] if n not in numbers]
    if unknown:
        parser.error(f"no lesson numbered {', '.join(unknown)}; the lessons are "
                     f"{', '.join(numbers)}")
    if Path(args.runs).exists() and not Path(args.runs).is_dir():
        parser.error(f"--runs {args.runs} is a file; give a folder")
    args.runs = Path(args.runs).resolve()  # the lessons run from the repository root
    return args


def run_lesson(path: Path, args) -> dict:
    """Run one lesson, echoing and keeping its standard output; returns what happened."""
    cmd = [sys.executable, str(path), "--device", args.device, "--runs", str(args.runs)]
    cmd += ["--quick"] if args.quick else []
    print(f"\n{'=' * 78}\n{path.name}\n{'=' * 78}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = proc.wait()
    return {"name": path.name, "code": code, "seconds": time.time() - start,
            "output": "".join(lines), "summary": fresh_summary(args.runs, path, start)}


def fresh_summary(runs: Path, path: Path, since: float):
    """The lesson's summary.json if this run wrote it (an older one says nothing of this run)."""
    for found in sorted(runs.glob(f"{path.stem[:2]}_*/summary.json")):
        if found.stat().st_mtime >= since:
            return {"dir": found.parent, **json.loads(found.read_text())}
    return None


def summary_line(summary) -> str:
    if not summary:
        return ""
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in list(summary["numbers"].items())[:4]]
    return ", ".join(shown)


def print_summary(results) -> None:
    print(f"\n{'=' * 78}\nSummary\n{'=' * 78}")
    for r in results:
        status = "ok" if r["code"] == 0 else f"FAILED ({r['code']})"
        print(f"{r['name']:38s} {status:10s} {r['seconds']:6.1f}s  {summary_line(r['summary'])}")
    failed = [r["name"] for r in results if r["code"] != 0]
    if failed:
        print(f"\n{len(failed)} lesson(s) failed: {', '.join(failed)}")


def write_report(results, args) -> Path:
    """DIR/results.md: machine, date, then per lesson its status, time, output and plots
    (copied next to the page, so that the folder can be committed as it is)."""
    from lessons.common import machine_line  # torch and the packages: only when reporting
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    mode = "--quick (smoke run: numbers meaningless)" if args.quick else "default budgets"
    lines = ["# Results of one run of every lesson", "",
             f"`python -m lessons --report {args.report}`, {mode}, device `{args.device}`,",
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}.", "", f"Machine: {machine_line()}.", "",
             "| lesson | status | time |", "|---|---|---|"]
    lines += [f"| {r['name']} | {'ok' if r['code'] == 0 else 'FAILED'} | {r['seconds']:.0f} s |"
              for r in results]
    for r in results:
        lines += ["", f"## {r['name']}", "", "```text", r["output"].rstrip(), "```"]
        for png in sorted(r["summary"]["dir"].glob("*.png")) if r["summary"] else []:
            target = out / r["summary"]["dir"].name / png.name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(png, target)
            lines += ["", f"![{png.stem}]({target.relative_to(out).as_posix()})"]
    page = out / "results.md"
    page.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwrote {page}")
    return page


def main(argv=None):
    args = parse(argv)
    files = [p for p in lesson_files() if not args.only or p.name[:2] in args.only]
    results = [run_lesson(path, args) for path in files]
    print_summary(results)
    if args.report:
        write_report(results, args)
    return 0 if all(r["code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
