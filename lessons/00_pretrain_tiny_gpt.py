"""Lesson 00 -- pretrain the tiny GPT.

Everything later adapts this model, so we build it first: a decoder-only transformer (about
0.84M parameters: 4 blocks, 4 heads, width 128, 256 positions) over a 96-character alphabet,
trained to predict the next character of an English-like corpus that the project generates from
a small grammar (``tiny_gpt/data.py``). The objective is the language-modelling loss

    L = - (1/T) sum_t log p(x_{t+1} | x_{<=t})

More than half of the corpus's sentences repeat earlier words -- verbatim, in capitals, or in the
other order (``Anna reads "red cat" and shouts "RED CAT!"``). That is where the model learns to
copy from its context, and that latent skill is what the fine-tuning tasks (upper-case a word,
swap two words) later redirect with a low-rank update. The lesson measures both: the base copies
words in the corpus's own echo sentences, and scores zero on the tasks' format, which it has
never seen. Copying arrives late and suddenly (the "induction head" jump of Olsson et al. 2022):
a shorter run, or one with fewer echoes, gives a base that cannot copy, and LoRA on top of it
then tops out well below 90% (see tiny_gpt/data.py).

Run it: ``python lessons/00_pretrain_tiny_gpt.py`` (about 4-5 minutes on a 2-core CPU). The
model is cached in ``runs/base/``; later lessons load it from there (and train it if missing).
``--text FILE`` pretrains on your own UTF-8 text instead (saved separately, in runs/00_pretrain/).
"""
import argparse
import json
import random
from dataclasses import dataclass, replace

import torch

from lessons.common import (Checks, base_path, base_recipe, get_base_model, lesson_dir,
                            median_step_seconds, parse_args, print_table, run_main, takeaway,
                            write_summary)
from lessons.plots import matplotlib_pyplot, save_figure
from tiny_gpt import TASKS, decode, encode, exact_match, load_text
from tiny_gpt.data import get_batch
from tiny_gpt.model import GPT
from tiny_gpt.evaluate import greedy_answers, validation_loss
from tiny_gpt.pretrain import corpus_ids, load_base, pretrain, save_base
from tiny_gpt.tasks import corpus_words, lexicon

NAME = "00_pretrain"
BASE_ACC_MAX = 0.10
RELOAD_TOL = 1e-5  # the same float32 forward on the same windows: only the summation order


@dataclass(frozen=True)
class Budget:
    task_prompts: int = None   # test prompts of each task the base is scored on (None: all)
    copy_items: int = 150      # items of the copying table
    step_repeats: int = 5      # timed steps with checkpointing off and on, taking turns
    sample_chars: int = 120    # characters of each sample


QUICK = Budget(task_prompts=20, copy_items=10, step_repeats=1, sample_chars=20)


def add_args(parser):
    parser.add_argument("--retrain", action="store_true", help="ignore the cached base model")
    parser.add_argument("--text", type=text_file,
                        help="pretrain on this UTF-8 text file instead")


def text_file(path):
    """An argparse type: a readable UTF-8 file in the model's alphabet (checked up front)."""
    try:
        load_text(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def obtain_model(args, out):
    """Train (or load the cached) base. Returns (model, recipe, result dict)."""
    recipe = base_recipe(args)
    log_path = out / "train_log.jsonl"
    if args.text:
        recipe = replace(recipe, text_path=args.text)
        model, result = pretrain(recipe, device=args.device, log_path=log_path)
        save_base(out / "custom_base.safetensors", model, recipe, result)
        return model, recipe, load_base(out / "custom_base.safetensors")[1]["result"]
    if args.retrain:
        base_path(args).unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    model, info = get_base_model(args, log_path=log_path)
    return model, recipe, info["result"]


def print_pretraining(args, model, recipe, result, train_ids, val_ids):
    """The run's size, speed and losses; returns the validation loss."""
    n_batches = recipe.eval_batches
    val_loss = validation_loss(model, val_ids, recipe.seq_len, n_batches, recipe.batch_size)
    train_loss = validation_loss(model, train_ids, recipe.seq_len, n_batches, recipe.batch_size)
    rows = [["parameters", f"{model.num_params():,}"],
            ["corpus characters (train/val)", f"{len(train_ids):,} / {len(val_ids):,}"],
            ["optimizer steps", result["steps"]],
            ["tokens seen", f"{result['tokens']:,}"],
            ["wall time (s)", round(result["wall_time"], 1)],
            ["tokens/s", f"{result['tokens'] / result['wall_time']:,.0f}"],
            ["train loss", round(train_loss, 4)],
            ["val loss", round(val_loss, 4)]]
    print_table(f"Pretraining ({args.device})", ["what", "value"], rows)
    return val_loss


def print_base_on_tasks(args, model):
    """Exact match of the base on every task's held-out prompts: {task: accuracy}."""
    tests = {name: task.splits()["test"][:args.budget.task_prompts] for name, task in TASKS.items()}
    base_acc = {name: exact_match(model, tests[name], args.device) for name in TASKS}
    print_table("The base model on the fine-tuning tasks (exact match, held-out prompts)",
                ["task", "what", "example", "test prompts", "base accuracy"],
                [[n, t.describe, "".join(t.splits(n_train=1)["train"][0]).strip(),
                  len(tests[n]), f"{100 * base_acc[n]:.1f}%"] for n, t in TASKS.items()])
    return base_acc


ECHOES = [('Ben says "{w}" and Mia says "', False), ('Anna reads "{w}" and shouts "', True)]


def copying_skill(model, device, words, n_items):
    """Fraction of items (one or two of `words`) that the base repeats exactly, for each echo
    sentence of the corpus: the skill the tasks will redirect."""
    rng = random.Random(0)
    items = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 2))) for _ in range(n_items)]
    acc = {}
    for fmt, upper in ECHOES:
        expected = [(w.upper() + "!" if upper else w) + '"' for w in items]
        got = greedy_answers(model, [fmt.format(w=w) for w in items], 24, device)
        acc[(fmt, upper)] = sum(g.startswith(e) for g, e in zip(got, expected)) / n_items
    return acc


def print_copying_skill(args, model):
    """Copying corpus words and the tasks' pseudo-words (tiny_gpt/tasks.py), which the base
    never saw: {kind: {echo: accuracy}}."""
    n_items = args.budget.copy_items
    kinds = {"corpus words": corpus_words(), "pseudo-words": lexicon()[len(corpus_words()):]}
    copy_acc = {kind: copying_skill(model, args.device, words, n_items)
                for kind, words in kinds.items()}
    rows = [[f"{fmt.format(w='red cat')}{'RED CAT!' if up else 'red cat'}\""]
            + [f"{100 * copy_acc[kind][(fmt, up)]:.1f}%" for kind in kinds]
            for fmt, up in ECHOES]
    print_table(f"The latent skill: copying in the corpus's own echo sentences (greedy, "
                f"n={n_items} items of one or two words)",
                ["sentence the base completes", *(f"{k} copied right" for k in kinds)], rows)
    return copy_acc["corpus words"]


def print_checkpointing_cost(args, model_cfg, train_ids, recipe):
    """Median seconds of one forward+backward+AdamW step of a fresh model with gradient
    checkpointing off and on, the two taking turns on one pretraining batch."""
    gen = torch.Generator().manual_seed(0)
    x, y = get_batch(train_ids, recipe.batch_size, recipe.seq_len, gen)
    runs = {}
    for name, checkpointing in (("off", False), ("on", True)):
        model = GPT(replace(model_cfg, gradient_checkpointing=checkpointing)).to(args.device)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    t = median_step_seconds(runs, [(x, y, None)], repeats=args.budget.step_repeats)
    print_table("Gradient checkpointing (one training step)", ["", "ms/step", "ratio"],
                [["off", round(1e3 * t["off"], 1), 1.0],
                 ["on", round(1e3 * t["on"], 1), round(t["on"] / t["off"], 3)]])


def print_samples(args, model):
    print("Samples (temperature 0.8, top-k 10):")
    gen = torch.Generator().manual_seed(args.seed)
    for prompt in ["The ", "Anna says \"", "Who "]:
        idx = torch.tensor([encode(prompt)], device=args.device)
        text = decode(model.generate(idx, args.budget.sample_chars, temperature=0.8, top_k=10,
                                     generator=gen)[0])
        print(f"  {text.splitlines()[0]!r}")


def plot_curve(out):
    log = out / "train_log.jsonl"
    records = [json.loads(line) for line in open(log)] if log.exists() else []
    if not records:
        return
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label="train")
    ax.set(xlabel="step", ylabel="loss (nats/char)", title="Pretraining the tiny GPT")
    ax.legend()
    save_figure(fig, out / "loss_curve.png")


def summary(model, result, val_loss, base_acc, copy_acc):
    return {"parameters": model.num_params(), "val_loss": val_loss,
            "wall_time_s": result["wall_time"],
            "tokens_per_s": result["tokens"] / result["wall_time"],
            **{f"base_acc_{k}": v for k, v in base_acc.items()},
            "copy_acc_says": copy_acc[ECHOES[0]], "copy_acc_shouts": copy_acc[ECHOES[1]]}


def conclude(val_loss, base_acc, copy_acc):
    says, shouts = copy_acc[ECHOES[0]], copy_acc[ECHOES[1]]
    takeaway(f"the base reaches a validation loss of {val_loss:.3f} nats per character; it "
             f"copies {100 * says:.0f}% of corpus words in the corpus's echo sentences "
             f"({100 * shouts:.0f}% in capitals); in the tasks' format, which it never saw, "
             f"its best exact match over the {len(base_acc)} tasks is "
             f"{100 * max(base_acc.values()):.0f}%")


def judge(args, base_acc, val_loss, result):
    """The saved base reloads as it was saved; the lessons teach the contrast: the base must
    not already do the tasks."""
    checks = Checks(args)
    step, metrics = result["evals"][-1]  # the last validation, [step, {"val_loss": ...}]
    if step == result["steps"]:  # of the weights that were saved
        gap = abs(val_loss - metrics["val_loss"])
        checks.must("the saved base reloads to the validation loss it was saved with",
                    gap <= RELOAD_TOL * max(1.0, val_loss), f"|diff| {gap:.1e}")
    for task, acc in base_acc.items():
        checks.target(f"the base scores <= {BASE_ACC_MAX:.0%} on '{task}'", acc <= BASE_ACC_MAX,
                      f"{acc:.1%}")
    return checks.report()


def main(argv=None):
    args = parse_args(__doc__, argv, add_args, budget=(Budget(), QUICK))
    out = lesson_dir(args, NAME)
    model, recipe, result = obtain_model(args, out)
    train_ids, val_ids = corpus_ids(recipe)
    model.eval()
    val_loss = print_pretraining(args, model, recipe, result, train_ids, val_ids)
    base_acc = print_base_on_tasks(args, model)
    copy_acc = print_copying_skill(args, model)
    print_checkpointing_cost(args, model.config, train_ids, recipe)
    print_samples(args, model)
    plot_curve(out)
    write_summary(args, NAME, summary(model, result, val_loss, base_acc, copy_acc))
    conclude(val_loss, base_acc, copy_acc)
    return judge(args, base_acc, val_loss, result)


if __name__ == "__main__":
    run_main(main)
