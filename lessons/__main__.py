"""Run every lesson in order: ``python -m lessons [--quick] [--device D] [--only 00 03]``.

The device is checked once, before any lesson starts, and every lesson gets the one it names.
Each lesson runs as its own process (a failure in one does not stop the others); what it prints
is shown as it comes and kept. At the end the headline numbers that each lesson wrote to
runs/<lesson>/summary.json in *this* run are printed together, failed lessons are listed, and
the exit status is non-zero if any lesson failed.

``--report DIR`` also writes the results page, regenerated whole at one commit: DIR/results.md
names the commit (as the run started), the machine and the torch version, then gives each
lesson its title, its takeaway (the lines it printed starting with "Takeaway: ", computed from
its own measurements), its plots (copied to DIR/<lesson>/), its printed tables and its time;
and DIR/headline.json holds every lesson's summary numbers, {lesson: {key: value}}, and under
"all lessons" the run's minutes and machine, for the README to quote. Files of an earlier page
that this run did not write (results.md, headline.json and the DIR/NN_*/ folders: the files the
page owns) are removed; nothing else in DIR is touched.
"""
import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAKEAWAY = "Takeaway: "
OWNED_FOLDERS = "[0-9][0-9]_*"  # DIR/<lesson>/: one per lesson, written by the report only


def lesson_files():
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))


def parse(argv):
    from lessons.common import RUNS  # where runs/ is: decided there, once
    from tiny_gpt.train import pick_device
    parser = argparse.ArgumentParser(prog="python -m lessons", allow_abbrev=False,
                                     description="Run all lessons in order.")
    parser.add_argument("--quick", action="store_true", help="smoke-run every lesson")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ...")
    parser.add_argument("--runs", default=str(RUNS), help="folder the lessons write to")
    parser.add_argument("--only", nargs="+", metavar="NN", help="lesson numbers, e.g. 00 03")
    parser.add_argument("--report", metavar="DIR",
                        help="write the results page DIR/results.md (regenerated whole)")
    args = parser.parse_args(argv)
    numbers = [p.name[:2] for p in lesson_files()]
    unknown = [n for n in args.only or [] if n not in numbers]
    if unknown:
        parser.error(f"no lesson numbered {', '.join(unknown)}; the lessons are "
                     f"{', '.join(numbers)}")
    try:  # once here, not once per lesson
        args.device = str(pick_device(args.device))
    except ValueError as error:
        parser.error(f"--device: {error}")
    for flag, folder in (("--runs", args.runs), ("--report", args.report)):
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            parser.error(f"{flag} {folder} is a file; give a folder")
    args.runs = Path(args.runs).resolve()  # the lessons run from the repository root
    return args


def run_lesson(path: Path, args) -> dict:
    """Run one lesson, echoing and keeping its standard output; returns what happened."""
    cmd = [sys.executable, str(path), "--device", args.device, "--runs", str(args.runs)]
    cmd += ["--quick"] if args.quick else []
    print(f"\n{'=' * 78}\n{path.name}\n{'=' * 78}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, text=True,
                            env=with_packages_importable(os.environ))
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = proc.wait()
    return {"name": path.name, "path": path, "code": code, "seconds": time.time() - start,
            "output": "".join(lines), "start": start,
            "summary": fresh_summary(args.runs, path, start)}


def with_packages_importable(env):
    """The environment with the repository root first on PYTHONPATH: a lesson run as a script
    imports the packages beside it, installed or not."""
    paths = [str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


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


# --- the results page ------------------------------------------------------------------------

def commit_line(report_dir=None) -> str:
    """The commit the page was made at, and whether the tree held changes beyond it; the
    page's own folder aside (an earlier page not committed yet changes no code)."""
    root = HERE.parent

    def git(*words):
        done = subprocess.run(["git", *words], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    commit, paths = git("rev-parse", "--short", "HEAD"), ["."]
    if report_dir is not None and root in Path(report_dir).resolve().parents:
        paths.append(f":(exclude){Path(report_dir).resolve().relative_to(root).as_posix()}")
    changes = git("status", "--porcelain", "--", *paths)
    if commit is None or changes is None:
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if changes else "")


def title(path: Path) -> str:
    """The first line of the lesson's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or path.stem
    return doc.strip().splitlines()[0]


def takeaways(output: str) -> list:
    return [line[len(TAKEAWAY):].strip() for line in output.splitlines()
            if line.startswith(TAKEAWAY)]


def fenced(text: str) -> list:
    """Markdown lines of `text` in a code fence longer than any run of backticks inside it."""
    longest = max([len(run) for run in re.findall("`+", text)] + [2])
    return ["`" * (longest + 1) + "text", text.rstrip(), "`" * (longest + 1)]


def fresh_plots(runs: Path, r) -> list:
    """The .png files the lesson wrote in this run (a plot left by an earlier run is not one)."""
    return [png for png in sorted(runs.glob(f"{r['path'].stem[:2]}_*/*.png"))
            if png.stat().st_mtime >= r["start"]]


def lesson_section(r, runs: Path, files: dict) -> list:
    """A lesson's lines on the page: title, takeaway, plots, printed tables, time. The plots'
    bytes go into `files` ({path relative to DIR: bytes})."""
    status = "ok" if r["code"] == 0 else f"FAILED (exit status {r['code']})"
    lines = ["", f"## {title(r['path'])}", "", f"`lessons/{r['path'].name}`", ""]
    lines += [f"**Takeaway:** {t}" for t in takeaways(r["output"])] or ["(no takeaway printed)"]
    for png in fresh_plots(runs, r):
        name = f"{r['path'].stem}/{png.name}"
        files[name] = png.read_bytes()
        lines += ["", f"![{png.stem}]({name})"]
    lines += ["", *fenced(r["output"]), "", f"Time: {r['seconds']:.0f} s ({status})."]
    return lines


def report_files(results, args) -> dict:
    """{path relative to DIR: bytes}: results.md, headline.json and the plots."""
    from lessons.common import machine_line  # torch and the packages: only when reporting
    mode = "--quick (a smoke run: its numbers mean nothing)" if args.quick else "default budgets"
    files = {}
    lines = ["# Results: one run of every lesson", "",
             f"Made by `python -m lessons --report {args.report}` ({mode}, device "
             f"`{args.device}`) at commit {args.commit}, "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}.",
             "", f"Machine: {machine_line()}.", "",
             "| lesson | status | time |", "|---|---|---|"]
    lines += [f"| {r['name']} | {'ok' if r['code'] == 0 else 'FAILED'} | "
              f"{r['seconds']:.0f} s |" for r in results]
    for r in results:
        lines += lesson_section(r, args.runs, files)
    files["results.md"] = ("\n".join(lines) + "\n").encode("utf-8")
    headline = {r["path"].stem: r["summary"]["numbers"] for r in results if r["summary"]}
    headline["all lessons"] = {"minutes": round(sum(r["seconds"] for r in results) / 60),
                               "machine": machine_line()}
    files["headline.json"] = (json.dumps(headline, indent=1) + "\n").encode("utf-8")
    return files


def stale_files(out: Path, written) -> list:
    """Files the page owns (results.md, headline.json, DIR/NN_*/...) that this run did not write."""
    owned = [out / "results.md", out / "headline.json"]
    owned += [f for folder in out.glob(OWNED_FOLDERS) if folder.is_dir()
              for f in folder.rglob("*") if f.is_file()]
    return [f for f in owned if f.exists() and f.resolve() not in written]


def write_report(results, args) -> Path:
    """Every file of the page written at once (each to a temporary name, then renamed), then
    the owned files of an earlier page that this one does not have removed."""
    from tiny_gpt.util.safetensors import atomic_write_files
    out = Path(args.report)
    files = {out / name: data for name, data in report_files(results, args).items()}
    atomic_write_files(files)
    for stale in stale_files(out, {path.resolve() for path in files}):
        stale.unlink()
    for folder in out.glob(OWNED_FOLDERS):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    print(f"\nwrote {out / 'results.md'}")
    return out / "results.md"


def main(argv=None):
    args = parse(argv)
    files = [p for p in lesson_files() if not args.only or p.name[:2] in args.only]
    args.commit = commit_line(args.report)  # the code the lessons run: named before they start
    results = [run_lesson(path, args) for path in files]
    print_summary(results)
    if args.report:
        write_report(results, args)
    return 0 if all(r["code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
