"""Peak resident memory of one function call, measured in a fresh Python process.

The ledger (ledger.py) counts the bytes of tensors; what the operating system must actually
give a process is more: allocator slack, a tensor freed a moment too late, two copies alive at
once while a file is read. The number that decides whether a run fits is the process's *peak
resident set size*, the most physical memory it ever held. Linux keeps it as VmHWM ("high water
mark") in /proc/self/status, and lets a process reset it by writing "5" to
/proc/self/clear_refs.

One process is one measurement: memory that Python or the allocator once took is seldom given
back, so a second measurement in the same process would start above the first one's floor.
So `measure_peak("package.module:function", **kwargs)` starts a new interpreter, imports the
module (torch and the rest: the *baseline*), resets the high water mark, calls the function,
and reports

    peak     the high water mark after the call (bytes)
    baseline the resident memory just before the call (bytes)
    added    peak - baseline: what the call itself needed at its worst moment
    result   the function's return value (anything json can write)

Where /proc is missing (macOS), ``resource.getrusage`` gives the peak since the process began
(its import peak included, so `added` can only read high) and the baseline is then that peak
before the call.
"""
import importlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

MARK = "PEAK_MEMORY_RESULT "  # the line of the child's stdout that carries its report
ROOT = Path(__file__).resolve().parents[2]  # the project root: the child imports from it


def status_bytes(field: str):
    """A 'VmRSS:  1234 kB' line of /proc/self/status, in bytes (None without /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    raise ValueError(f"/proc/self/status has no field {field!r}")


def rusage_peak_bytes() -> int:
    """The process's peak RSS from getrusage: kilobytes on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak() -> bool:
    """Start the high water mark again from the current RSS (Linux >= 4.0). -> done or not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_and_peak():
    """(resident bytes now, peak resident bytes), from /proc where it exists."""
    now = status_bytes("VmRSS")
    if now is None:
        peak = rusage_peak_bytes()
        return peak, peak
    return now, status_bytes("VmHWM")


def run_target(target: str, kwargs: dict) -> dict:
    """In the child: import, reset the high water mark, call, read it."""
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    reset = reset_peak()
    baseline, _ = current_and_peak()
    result = function(**kwargs)
    _, peak = current_and_peak()
    return {"peak": peak, "baseline": baseline, "added": peak - baseline, "reset": reset,
            "result": result}


def touch_bytes(n: int) -> int:
    """Allocate n bytes and write one byte in every 4 KiB page, so that all of them become
    resident (a fresh allocation is mapped lazily, page by page, when first written): the
    meter's calibration, which should read `added` close to n. -> n"""
    buffer = bytearray(n)
    buffer[::4096] = b"\x01" * len(range(0, n, 4096))
    return n


def check_target(target: str) -> None:
    module_name, colon, function_name = target.partition(":")
    if not (colon and module_name and function_name.isidentifier()):
        raise ValueError(f"measure_peak: target must read 'package.module:function', "
                         f"got {target!r}")


def measure_peak(target: str, timeout: float = 600, threads: int = None, **kwargs) -> dict:
    """Call `target` ('package.module:function') with kwargs (json-serializable) in a fresh
    interpreter; -> {"peak", "baseline", "added", "reset", "result"} (bytes; see the module
    docstring). threads: torch's intra-op threads in the child (default: torch's own). A
    failing call raises RuntimeError with the child's last lines of output."""
    check_target(target)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "tiny_gpt.memory.peak_memory", target, json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    lines = [l for l in done.stdout.splitlines() if l.startswith(MARK)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"measure_peak({target}) failed (exit status {done.returncode}):\n"
                           f"{tail}")
    return json.loads(lines[-1][len(MARK):])


if __name__ == "__main__":
    report = run_target(sys.argv[1], json.loads(sys.argv[2]))
    print(MARK + json.dumps(report), flush=True)
