"""What every lesson shares: its command line, its output folder, the cached base model, tables,
its checks and takeaway, a seeded LoRA copy of the base, and step timing. The fine-tuning
recipe is lessons/recipe.py; plots, lessons/plots.py; seeds, lessons/seeds.py.

A lesson is a script with a ``main(argv=None)``. It prints a table of numbers it measured in the
same run, saves plots under ``runs/<lesson>/``, and writes ``summary.json`` there, which
``python -m lessons`` collects into one table at the end.

Where ``runs/`` is: the repository's own ``runs/`` folder (RUNS, found from this file's place,
not from the current folder, so a lesson started from anywhere finds the cached base model);
``--runs FOLDER`` puts it elsewhere.

A lesson's sizes (steps, examples, repeats) are one frozen dataclass, conventionally
``Budget``, whose defaults are the default run, with a ``QUICK`` instance for ``--quick``;
``parse_args(..., budget=(Budget(), QUICK))`` chooses between them, once, and the lesson reads
``args.budget`` everywhere.
"""
import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lora import apply_lora, prepare_qlora
from tiny_gpt.data import get_batch
from tiny_gpt.memory.step_time import time_step
from tiny_gpt.pretrain import PretrainRecipe, corpus_ids, load_base, pretrain, save_base
from tiny_gpt.train import pick_device
from tiny_gpt.util.safetensors import atomic_write_bytes
from tiny_gpt.util.timing import round_robin_phase_medians

RUNS = Path(__file__).resolve().parent.parent / "runs"  # the repository's runs/
BASE_RECIPE = PretrainRecipe()
# --quick: a smoke-run base of a few seconds; its numbers mean nothing, its code paths are real.
QUICK_RECIPE = replace(BASE_RECIPE, corpus_chars=50_000, steps=10, warmup_steps=2,
                       batch_size=8, seq_len=64, eval_every=5, eval_batches=1)


def parse_args(description: str, argv=None, add_args=None, budget=None) -> argparse.Namespace:
    """--quick, --device, --seed, --runs for every lesson; add_args(parser) adds its own. A bad
    flag is a usage error (exit status 2) before anything runs; flags are never abbreviated
    (``--r 4`` is not ``--runs 4``). budget: (full, quick) -- args.budget is `quick` under
    --quick, else `full`: a dataclass instance, or a function of the parsed args giving one
    (for a budget set by flags, such as --steps)."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds (tiny budgets, numbers meaningless)")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ...")
    parser.add_argument("--seed", type=whole_number(0), default=0,
                        help="seed for everything random")
    parser.add_argument("--runs", default=str(RUNS),
                        help="folder for outputs and the base cache (default: the "
                             "repository's runs/)")
    parser.add_argument("--compile", action="store_true",
                        help="fine-tune through torch.compile (TrainConfig.compile)")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        parser.error(f"--device: {e}")
    if Path(args.runs).exists() and not Path(args.runs).is_dir():
        parser.error(f"--runs {args.runs} is a file; give a folder")
    if budget is not None:
        args.budget = choose_budget(args, *budget)
    torch.manual_seed(args.seed)
    return args


def choose_budget(args, full, quick):
    """The one place --quick picks a lesson's sizes: `quick` under --quick, else `full` (or
    full(args), when the default run's budget is read from flags)."""
    if args.quick:
        return quick
    return full(args) if callable(full) else full


def whole_number(low: int):
    """An argparse type: a whole number >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed, {low}")
        return value
    return parse


def positive_number(text):
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be finite and > 0")
    return value


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def target_list(text):
    """An argparse type: comma-separated projections, 'q,v' or 'q_proj,v_proj' (of PROJECTIONS)
    -> a tuple of full names."""
    names = tuple(t.strip() if t.strip().endswith("_proj") else f"{t.strip()}_proj"
                  for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in PROJECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give projections from {', '.join(PROJECTIONS)} (or q, k, v, o, up, "
            f"down), comma-separated")
    return tuple(dict.fromkeys(names))


def targets_label(targets) -> str:
    """('q_proj', 'v_proj') -> 'Q,V'; the MLP's projections keep their names ('up', 'down')."""
    return ",".join(t.removesuffix("_proj").upper() if len(t) == 6 else t.removesuffix("_proj")
                    for t in targets)


def lesson_dir(args, name: str) -> Path:
    path = Path(args.runs) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_recipe(args) -> PretrainRecipe:
    return choose_budget(args, BASE_RECIPE, QUICK_RECIPE)


def text_batch(args, batch_size: int, block_size: int):
    """(x, y), each (batch_size, block_size), on the CPU: random windows of the base's
    pretraining text, drawn with args.seed -- the batch the memory and speed tables time."""
    gen = torch.Generator().manual_seed(args.seed)
    return get_batch(corpus_ids(base_recipe(args))[0], batch_size, block_size, gen)


def base_path(args) -> Path:
    return Path(args.runs) / "base" / ("base_quick.safetensors" if args.quick else
                                       "base.safetensors")


def get_base_model(args, log_path=None):
    """The pretrained base of lesson 00: loaded from the cache, or trained now and cached.
    Returns (model on args.device, info dict with the recipe and the pretraining result)."""
    recipe = base_recipe(args)
    cached = load_base(base_path(args), recipe, device=args.device)
    if cached is not None:
        return cached
    print(f"no cached base model at {base_path(args)}: pretraining one "
          f"({recipe.steps} steps)...", flush=True)
    model, result = pretrain(recipe, device=args.device, log_path=log_path)
    save_base(base_path(args), model, recipe, result)
    return load_base(base_path(args), recipe, device=args.device)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, {platform.system()}")


def print_table(title: str, headers, rows) -> str:
    """Print rows as an aligned text table (and return it). Floats get 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    cells = [[fmt(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title, "-" * len(title)]
    for k, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if k else c.ljust(w) for c, w in zip(row, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def takeaway(*sentences) -> None:
    """Print a lesson's conclusion, one line each starting with 'Takeaway: ' (the results page
    collects them). Each sentence must be computed from the run's measurements."""
    for sentence in sentences:
        print(f"Takeaway: {sentence}", flush=True)
    print()


def write_summary(args, name: str, numbers: dict) -> None:
    """runs/<lesson>/summary.json: the lesson's headline numbers, for `python -m lessons`."""
    record = {"lesson": name, "quick": args.quick, "device": str(args.device),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "numbers": numbers}
    atomic_write_bytes(lesson_dir(args, name) / "summary.json",
                       json.dumps(record, indent=1).encode())


def run_main(main):
    """Entry point used at the bottom of every lesson file: main()'s return is the exit status
    (non-zero when one of the lesson's own checks failed)."""
    sys.exit(main())


class Checks:
    """A lesson's own verdicts, printed as one table, and its exit status.

    must(what, ok, measured)         a property of the code that holds in every run, --quick
                                     too (a gradient against autograd, a table against the
                                     published one, a frozen weight unchanged): judged always
    target(what, ok, measured)       a quality target of a default run (an accuracy, a share
                                     of memory); --quick's tiny budgets make such numbers
                                     meaningless, so there it is shown but not judged
    shown(what, ok, measured, why)   shown with its verdict, never judged, for the reason
                                     given: a timing (timings move 2.5x between machines of one
                                     kind, and a busy machine says nothing about the code)
    verdict(what, verdict)           a target read from seeds (lessons/seeds.py): judged as a
                                     target where its interval decides, else 'cannot tell'
    main() ends with ``return checks.report()``: 1 if anything judged failed, else 0."""

    def __init__(self, args):
        self.quick, self.rows = args.quick, []

    def must(self, what, ok, measured=""):
        return self._add(what, ok, measured, None)

    def target(self, what, ok, measured=""):
        return self._add(what, ok, measured, "--quick" if self.quick else None)

    def shown(self, what, ok, measured="", why="timing"):
        return self._add(what, ok, measured, why)

    def verdict(self, what, verdict):
        """A target read from seeds (lessons/seeds.py): judged where the interval decides,
        shown as 'cannot tell' where it does not."""
        if verdict.holds is None:
            return self._add(what, None, verdict.text, "the interval cannot tell")
        return self.target(what, verdict.holds, verdict.text)

    def _add(self, what, ok, measured, not_judged_because):
        self.rows.append((what, str(measured), ok if ok is None else bool(ok),
                          not_judged_because))
        return bool(ok)

    def failed(self):
        return [what for what, _, ok, why in self.rows if why is None and not ok]

    def report(self, title="Checks") -> int:
        """Print the table; return the exit status (1 if a judged check failed)."""
        def verdict(ok, why):
            if ok is None:
                return f"cannot tell (not judged: {why})"
            if why is None:
                return "PASS" if ok else "FAIL"
            return f"{'met' if ok else 'not met'} (not judged: {why})"
        print_table(title, ["check", "measured", "verdict"],
                    [[what, measured, verdict(ok, why)] for what, measured, ok, why in self.rows])
        if self.failed():
            print(f"FAILED: {'; '.join(self.failed())}", flush=True)
        return 1 if self.failed() else 0


# ---------------------------------------------------------------------------------------------
# A seeded LoRA copy of the base, and step timing (the fine-tuning recipe: lessons/recipe.py).


LORA_TARGETS, LORA_R, LORA_ALPHA = ("q_proj", "v_proj"), 8, 16  # the LoRA paper's Q,V at r = 8


def lora_copy(base, seed: int = 0, targets=LORA_TARGETS, r: int = LORA_R, alpha=LORA_ALPHA,
              dropout: float = 0.0, use_rslora: bool = False, quantized: bool = False,
              **options):
    """A fresh copy of `base` with LoRA on `targets` -- QLoRA when `quantized`: every linear
    layer in NF4 first. lora_A's Kaiming init draws from torch's global generator, seeded here,
    so copies made with one seed start identical (LoRA and QLoRA alike). options go to
    apply_lora (use_dora, init_lora_weights) or prepare_qlora (bits, init_lora_weights)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    prepare = prepare_qlora if quantized else apply_lora
    return prepare(model, targets=targets, r=r, alpha=alpha, dropout=dropout,
                   use_rslora=use_rslora, **options)


def median_step_seconds(runs: dict, micro_batches, repeats: int) -> dict:
    """{name: (model, optimizer)} -> {name: median seconds of one training step (forward,
    backward, optimizer step; synchronized on CUDA)}, the models taking turns so that a busy
    machine slows them alike (tiny_gpt/util/timing.py)."""
    steps = {name: (lambda m=model, o=opt: time_step(m, micro_batches, o))
             for name, (model, opt) in runs.items()}
    medians = round_robin_phase_medians(steps, repeats)
    return {name: phases["total"] for name, phases in medians.items()}
