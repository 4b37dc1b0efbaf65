"""What every lesson shares: its command line, its output folder, the cached base model, tables,
the fine-tuning recipe, a seeded LoRA copy of the base, step timing and moving averages.

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
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from lora import apply_lora, prepare_qlora
from tiny_gpt.data import get_batch
from tiny_gpt.evaluate import exact_match, task_loss
from tiny_gpt.finetune import finetune
from tiny_gpt.memory.step_time import time_step
from tiny_gpt.pretrain import PretrainRecipe, corpus_ids, load_base, pretrain, save_base
from tiny_gpt.tasks import get_task
from tiny_gpt.train import TrainConfig, pick_device
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
    return QUICK_RECIPE if args.quick else BASE_RECIPE


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


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def matplotlib_pyplot():
    """pyplot with a non-interactive backend (lessons only ever save figures)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
# The fine-tuning recipe every lesson shares, so that their numbers can be compared.

DEFAULT_TASK = "upper"   # the task the lessons tune on; "swap" is the second, for lesson 03
FINETUNE_STEPS = 500     # optimizer steps of a default fine-tuning run (--seeds of them)
FINETUNE_LR = {"lora": 1e-2, "full": 1e-3}  # peak learning rates (tiny models take large ones)


def finetune_config(args, method: str = "lora", **overrides):
    """The shared TrainConfig for fine-tuning; --quick cuts it to a few steps."""
    steps = 6 if args.quick else FINETUNE_STEPS
    cfg = dict(max_steps=steps, lr=FINETUNE_LR[method], warmup_steps=min(50, steps // 3),
               eval_every=max(1, steps // 5), seed=args.seed, progress=not args.quick,
               compile=args.compile)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def task_splits(args, task_name: str = DEFAULT_TASK, seed=None):
    """train / val / test examples drawn with `seed` (default --seed); --quick keeps 16 of
    each so evaluation is instant."""
    splits = get_task(task_name).splits(seed=args.seed if seed is None else seed)
    if args.quick:
        splits = {k: v[:16] for k, v in splits.items()}
    return splits


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


def moving_average(values, k: int) -> list:
    """Means of every k consecutive values: entry j is mean(values[j : j + k]), so there are
    len(values) - k + 1 of them (plot them at steps k .. len(values)). k is cut to the length."""
    t = torch.as_tensor(values, dtype=torch.float64)
    k = max(1, min(k, len(t)))
    return t.unfold(0, k, 1).mean(1).tolist()


# ---------------------------------------------------------------------------------------------
# Short runs of the shared recipe, for the lessons that measure one change at a time (08, 09).

TASK_BATCH = 32  # task examples per optimizer step, as in every lesson


def short_config(args, steps: int, eval_every: int, method: str = "lora", **overrides):
    """The shared recipe cut to `steps` steps (warmup min(50, steps // 3)), validating every
    `eval_every` steps (0: never), keeping the last weights, no progress line; overrides win."""
    cfg = dict(max_steps=steps, warmup_steps=min(50, steps // 3), restore_best=False,
               eval_every=eval_every, progress=False)
    return finetune_config(args, method, **{**cfg, **overrides})


def fit(model, examples, cfg, args, evaluate=None):
    """tiny_gpt.finetune on batches of TASK_BATCH examples drawn from `examples`."""
    return finetune(model, {"train": examples}, cfg, TASK_BATCH, args.device, evaluate=evaluate)


def tuned_accuracy(args, model, cfg, seed: int, task_name: str = DEFAULT_TASK,
                   evaluate=None):
    """Train `model` with `cfg` on the task's examples drawn with `seed` (the config's seed is
    set to it, so the batch order follows too), then score it on that seed's test prompts.
    Returns (test exact match, TrainResult): one seed's measurement of one recipe."""
    splits = task_splits(args, task_name, seed)
    result = finetune(model, splits, replace(cfg, seed=seed), TASK_BATCH, args.device,
                      evaluate=evaluate)
    return exact_match(model, splits["test"], args.device), result


def probe_lr(args, build, candidates, splits, steps: int, method: str = "lora"):
    """The learning-rate probe: a short run of a fresh build() at each candidate peak lr on
    splits['train'] (--seed's batch order), scored by the answer loss on splits['val'] -- an
    lr is chosen on validation data, never on the test set. Returns (the lr of the lowest
    loss, {lr: validation loss})."""
    losses = {}
    for lr in candidates:
        model = build()
        fit(model, splits["train"], short_config(args, steps, 0, method, lr=lr), args)
        losses[lr] = task_loss(model, splits["val"])
    return min(losses, key=losses.get), losses


def tail_mean(values, frac: float = 0.1) -> float:
    """Mean of the last `frac` of the values (at least one): a run's end, with its noise."""
    tail = values[-max(1, int(len(values) * frac)):]
    return sum(tail) / len(tail)


def plot_loss_curves(ax, curves: dict, k: int = 10) -> None:
    """{label: training loss per step} -> their k-step moving averages on `ax` (log scale),
    each mean drawn at the last step it covers, so the curves start at step k. k is cut to the
    shortest curve; the curves take the colors C0, C1, ... in order."""
    k = max(1, min([k] + [len(v) for v in curves.values()]))
    for label, losses in curves.items():
        avg = moving_average(losses, k)
        ax.plot(range(len(losses) - len(avg) + 1, len(losses) + 1), avg, lw=1, label=str(label))
    ax.set(xlabel="step", ylabel=f"training loss ({k}-step mean)", yscale="log")
    ax.legend(fontsize=7)


@contextmanager
def saved_figure(path: Path, ncols: int = 1, figsize=(6.5, 3.8)):
    """``with saved_figure(path, ncols) as axes:`` draw on a row of ncols axes (one axis when
    ncols is 1); on leaving the block the figure is saved to `path` and closed."""
    plt = matplotlib_pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        save_figure(fig, path)
    finally:
        plt.close(fig)


def saved_heatmaps(path: Path, rows, title: str, label: str, width_ratios=None):
    """rows: [[(matrix (i, j), panel title), ...], ...] -> one heatmap per matrix, values 0..1,
    indexed from 1 as i (down) and j (across); one colorbar, saved to `path`."""
    plt = matplotlib_pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(15, 2.75 * len(rows)),
                             layout="constrained", squeeze=False,
                             gridspec_kw={"width_ratios": width_ratios})
    for ax_row, panels in zip(axes, rows):
        for ax, (m, panel_title) in zip(ax_row, panels):
            im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                           extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
            ax.set(title=panel_title, xlabel="j", ylabel="i")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes.ravel().tolist(), label=label)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
