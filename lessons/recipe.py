"""The fine-tuning recipe every lesson shares, so that their numbers can be compared: the task,
the steps and learning rates, its splits, its TrainConfig (whole or cut short), fine-tuning one
seed's recipe and scoring it, short LoRA runs varied one knob at a time over the seeds, and the
learning-rate probe."""
from dataclasses import dataclass, replace

from lessons.common import LORA_ALPHA, choose_budget, lora_copy
from lessons.seeds import Trials, seeds_of
from tiny_gpt.evaluate import exact_match, task_loss
from tiny_gpt.finetune import finetune
from tiny_gpt.tasks import get_task
from tiny_gpt.train import TrainConfig

DEFAULT_TASK = "upper"   # the task the lessons tune on; "swap" is the second, for lesson 03
FINETUNE_STEPS = 500     # optimizer steps of a default fine-tuning run (--seeds of them)
QUICK_STEPS, QUICK_EXAMPLES = 6, 16  # --quick: steps of a run, and examples kept per split
FINETUNE_LR = {"lora": 1e-2, "full": 1e-3}  # peak learning rates (tiny models take large ones)


def finetune_config(args, method: str = "lora", **overrides):
    """The shared TrainConfig for fine-tuning; --quick cuts it to a few steps."""
    steps = choose_budget(args, FINETUNE_STEPS, QUICK_STEPS)
    cfg = dict(max_steps=steps, lr=FINETUNE_LR[method], warmup_steps=min(50, steps // 3),
               eval_every=max(1, steps // 5), seed=args.seed, progress=not args.quick,
               compile=args.compile)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def task_splits(args, task_name: str = DEFAULT_TASK, seed=None):
    """train / val / test examples drawn with `seed` (default --seed); --quick keeps 16 of
    each so evaluation is instant."""
    splits = get_task(task_name).splits(seed=args.seed if seed is None else seed)
    keep = choose_budget(args, None, QUICK_EXAMPLES)
    if keep:
        splits = {k: v[:keep] for k, v in splits.items()}
    return splits


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


@dataclass(frozen=True)
class ShortRun:
    """A short LoRA run (lessons.common.lora_copy: r=8 on Q and V) with one knob changed: the
    peak lr, a constant lr without warmup (else warmup + cosine), alpha, LoRA dropout, the task.
    Equal recipes are equal keys, so Trials trains each once per seed."""
    lr: float
    constant: bool = False
    alpha: float = LORA_ALPHA
    dropout: float = 0.0
    task: str = DEFAULT_TASK


def short_runs(args, base, steps: int) -> Trials:
    """Trials of ShortRuns of `steps` steps on copies of `base`. A row holds the model (in eval
    mode), the seed's splits, the training losses, "val_loss" (task_loss on the seed's
    validation examples) and "last_loss" (tail_mean of the losses); test accuracy is decoded
    only where a table shows it (scored_runs)."""
    def train(recipe, seed):
        splits = task_splits(args, recipe.task, seed)
        model = lora_copy(base, seed, alpha=recipe.alpha, dropout=recipe.dropout)
        schedule = dict(warmup_steps=0, schedule="constant") if recipe.constant else {}
        cfg = short_config(args, steps, 0, lr=recipe.lr, seed=seed, **schedule)
        losses = fit(model, splits["train"], cfg, args).losses
        return dict(model=model.eval(), splits=splits, losses=losses,
                    val_loss=task_loss(model, splits["val"]), last_loss=tail_mean(losses))
    return Trials(seeds_of(args), train)


def scored_runs(args, runs: Trials, recipe, n_test: int) -> dict:
    """{"val_loss", "last_loss", "acc": Spread} of a recipe of short_runs, "acc" being the exact
    match on the first n_test test prompts of each seed (decoded once per run, then kept)."""
    for seed in runs.seeds:
        row = runs.one(recipe, seed)
        if "acc" not in row:
            row["acc"] = exact_match(row["model"], row["splits"]["test"][:n_test], args.device)
    return runs.spreads(recipe, ("val_loss", "last_loss", "acc"))


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
