"""Lesson 02 -- LoRA on Q and V: teach the pretrained tiny GPT a task, then compare with full
fine-tuning.

Where the adapters go (Hu et al. 2021, Sec. 4.2 and 7.1). In every attention block the query
and value projections get a LoRA update and nothing else changes:

    q = (W_q + (alpha/r) B_q A_q) x        v = (W_v + (alpha/r) B_v A_v) x
    k, o, the MLP, the embeddings and the LayerNorms: frozen, exactly as pretrained

With r = 8 each 128 x 128 projection gets 2 * 8 * 128 = 2,048 trainable numbers; over 4 blocks
and 2 projections that is 16,384 -- under 2% of the model.

The objective does not change (seed, Sec. 5): the same next-token cross-entropy, here taken on
the answer tokens only,  L = - sum_t log p(y_t | y_<t, prompt).  Only the gradient's
destination changes: dL/dW0 is never formed or stored, dL/dA and dL/dB are. AdamW then keeps
two moments per *trainable* number, so the optimizer state shrinks with the trainable count.

The task ("upper"): `upper "cat dog" -> "CAT DOG"`. The base model has seen capitals in its
corpus but was never asked to produce them on cue; it scores near zero. We tune LoRA with the
shared recipe (lessons/common.py: 1,500 AdamW steps of 32 examples, lr 1e-2) and then do full
fine-tuning of a fresh copy of the same base with the same data, steps and schedule (lr 1e-3,
since every weight moves), and put the two side by side.
"""
import copy
import statistics

import torch

from lessons.common import (DEFAULT_TASK, LORA_ALPHA, LORA_R, LORA_TARGETS, Checks, finetune_config,
                            get_base_model, lesson_dir, matplotlib_pyplot, median_step_seconds,
                            moving_average, parse_args, print_table, run_main, save_figure,
                            task_splits, write_summary)
from lora import apply_lora, count_parameters, format_table, parameter_table
from tiny_gpt import exact_match, sample_batch
from tiny_gpt.evaluate import greedy_answers
from tiny_gpt.finetune import finetune
from tiny_gpt.memory.ledger import measure_step
from tiny_gpt.train import make_optimizer

NAME = "02_lora_on_q_and_v"
TARGETS, R, ALPHA = LORA_TARGETS, LORA_R, LORA_ALPHA  # the shared recipe's: Q and V, r = 8
GOALS = {"trainable_fraction": 0.02, "base_acc": 0.10, "lora_acc": 0.90}


def grouped_rows(model):
    """parameter_table with blocks 1.. folded into one row each (they repeat block 0)."""
    rows, folded = [], {}
    for path, trainable, total in parameter_table(model):
        parts = path.split(".")
        if parts[0] == "blocks" and parts[1] != "0":
            key = "blocks.1-N." + ".".join(parts[2:])
            t, n = folded.get(key, (0, 0))
            folded[key] = (t + trainable, n + total)
        else:
            rows.append((path, trainable, total))
    return rows + [(k, t, n) for k, (t, n) in folded.items()]


def show_injection(model):
    """Module tree before / after apply_lora, the parameter table, the freezing check."""
    print("Block 0's attention before apply_lora:\n" + str(model.blocks[0].attn) + "\n")
    apply_lora(model, targets=TARGETS, r=R, alpha=ALPHA)
    print(f"... and after apply_lora(model, targets={TARGETS}, r={R}, alpha={ALPHA}):\n"
          + str(model.blocks[0].attn) + "\n")
    print(f"Parameters per module (blocks 1-{len(model.blocks) - 1} summed; they repeat "
          "block 0):")
    print(format_table(grouped_rows(model)) + "\n")
    names = [(n, p.requires_grad) for n, p in model.named_parameters()]
    trainable = [n for n, g in names if g]
    print_table("requires_grad after apply_lora", ["parameter tensors", "count"],
                [["requires_grad = True", len(trainable)],
                 ["   ... all named *.lora_A / *.lora_B",
                  all(n.endswith(("lora_A", "lora_B")) for n in trainable)],
                 ["requires_grad = False (the base)", len(names) - len(trainable)]])
    return count_parameters(model)


def method_configs(args):
    """The shared recipe for each: LoRA's lr 1e-2, full fine-tuning's 1e-3, the same steps."""
    steps = finetune_config(args).max_steps
    quick = {"eval_every": steps} if args.quick else {}  # --quick: one validation, not five
    return {k: finetune_config(args, m, **quick) for k, m in (("LoRA", "lora"),
                                                               ("full FT", "full"))}


def train_each(models, splits, cfgs, device):
    results = {}
    for name, model in models.items():
        print(f"fine-tuning: {name}, {cfgs[name].max_steps} steps, lr {cfgs[name].lr}")
        results[name] = finetune(model, splits, cfgs[name], batch_size=32, device=device,
                                 with_accuracy=True)
    return results


def step_costs(models, cfgs, batch, device, repeats):
    """AdamW's state bytes after one real step (moments + step counters, read off the tensors
    by tiny_gpt/memory/ledger.py) and the median seconds of one training step (the models
    taking turns on `batch`), on throwaway copies whose optimizers are made the way
    tiny_gpt.train makes them: over trainable parameters only."""
    runs = {}
    for name, model in models.items():
        model = copy.deepcopy(model).to(device).train()
        runs[name] = (model, make_optimizer(model, cfgs[name]))
    state_bytes = {name: measure_step(model, [batch], opt).optimizer
                   for name, (model, opt) in runs.items()}
    return state_bytes, median_step_seconds(runs, [batch], repeats)


def print_comparison(args, cfgs, counts, acc, base_acc, state_bytes, step_s, results):
    names = list(cfgs)
    n_evals = len(results["LoRA"].evals)
    def row(label, fmt):
        return [label] + [fmt(k) for k in names]
    rows = [row(f"test exact match (base: {base_acc:.1%})", lambda k: f"{acc[k]:.1%}"),
            row("trainable parameters", lambda k: f"{counts[k][0]:,}"),
            row("  share of the model", lambda k: f"{counts[k][0] / counts[k][1]:.2%}"),
            row("gradient bytes (fp32)", lambda k: f"{4 * counts[k][0]:,}"),
            row("AdamW state bytes (measured)", lambda k: f"{state_bytes[k]:,}"),
            row("median step time (ms, side by side)", lambda k: f"{1e3 * step_s[k]:.1f}"),
            row(f"wall time of the run (s, incl. {n_evals} validations)",
                lambda k: f"{results[k].wall_time:.1f}"),
            row("final train loss (mean of last 50 steps)",
                lambda k: f"{statistics.fmean(results[k].losses[-50:]):.4f}")]
    print_table(f"LoRA (Q, V, r = {R}) vs full fine-tuning on '{DEFAULT_TASK}', "
                f"{cfgs['LoRA'].max_steps} steps each, batch 32, {args.device}", ["", *names],
                rows)


def frozen_change(lora_model, reference):
    """Largest |change| of any frozen weight: a wrapped layer's W0 sits at <path>.base.*"""
    before = dict(reference.named_parameters())
    return max((p - before[n.replace(".base.", ".")]).abs().max().item()
               for n, p in lora_model.named_parameters() if not p.requires_grad)


def print_frozen_check(lora_model, reference, trainable):
    """The base did not move; what AdamW's state should be. Returns the largest change."""
    base_drift = frozen_change(lora_model, reference)
    print(f"largest change of any frozen base weight during LoRA training: {base_drift}")
    print(f"AdamW keeps 2 moments per trainable number: 2 x 4 x {trainable:,} = "
          f"{8 * trainable:,} bytes, plus a 4-byte step counter per tensor\n")
    return base_drift


def show_samples(models, examples, device):
    prompts = [p for p, _ in examples]
    answers = {name: greedy_answers(m.eval(), prompts, 24, device) for name, m in models.items()}
    unquote = lambda s: s.removesuffix('"')  # noqa: E731  (answers end with a closing quote)
    rows = [[p.split('"')[1], unquote(a.rstrip("\n"))] + [unquote(answers[n][i]) for n in models]
            for i, (p, a) in enumerate(examples)]
    print_table("Greedy completions of held-out prompts", ["input", "expected", *models], rows)


def judge(checks, trainable, total, base_acc, lora_acc, base_drift):
    share = trainable / total
    checks.must(f"trainable share <= {GOALS['trainable_fraction']:.0%}",
                share <= GOALS["trainable_fraction"], f"{share:.2%}")
    checks.must("every frozen base weight unchanged by training", base_drift == 0,
                f"max change {base_drift:g}")
    checks.target(f"base accuracy <= {GOALS['base_acc']:.0%}", base_acc <= GOALS["base_acc"],
                  f"{base_acc:.1%}")
    checks.target(f"LoRA accuracy >= {GOALS['lora_acc']:.0%}", lora_acc >= GOALS["lora_acc"],
                  f"{lora_acc:.1%}")
    return checks.report("Targets")


def plot_curves(results, path):
    plt = matplotlib_pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, res in results.items():
        k = max(1, len(res.losses) // 60)  # moving average over ~1/60 of the run
        ax1.plot(range(k, len(res.losses) + 1), moving_average(res.losses, k), label=name)
        ax2.plot([s for s, _ in res.evals], [m["val_acc"] for _, m in res.evals], "o-",
                 label=name)
    ax1.set(xlabel="step", ylabel="train loss (answer tokens)", yscale="log",
            title="Fine-tuning loss")
    ax2.set(xlabel="step", ylabel="validation exact match", ylim=(-0.02, 1.02),
            title="Validation accuracy")
    ax1.legend()
    ax2.legend()
    save_figure(fig, path)


def summary(acc, base_acc, counts, state_bytes, step_s, results, base_drift):
    trainable, total = counts["LoRA"]
    return {"lora_test_acc": acc["LoRA"], "full_test_acc": acc["full FT"],
            "base_test_acc": base_acc, "trainable_fraction": trainable / total,
            "lora_trainable": trainable, "full_trainable": counts["full FT"][0],
            "lora_adam_state_bytes": state_bytes["LoRA"],
            "full_adam_state_bytes": state_bytes["full FT"],
            "lora_step_ms": 1e3 * step_s["LoRA"], "full_step_ms": 1e3 * step_s["full FT"],
            "lora_wall_s": results["LoRA"].wall_time, "full_wall_s": results["full FT"].wall_time,
            "frozen_base_max_change": base_drift}


def main(argv=None):
    args = parse_args(__doc__, argv)
    device = args.device
    splits = task_splits(args, DEFAULT_TASK)
    base, _ = get_base_model(args)
    base_acc = exact_match(base, splits["test"], device)
    full = copy.deepcopy(base)        # full fine-tuning starts from the same base
    reference = copy.deepcopy(base)   # untouched: for the frozen-weights check and samples
    trainable, total = show_injection(base)
    models = {"LoRA": base, "full FT": full}
    counts = {"LoRA": (trainable, total), "full FT": count_parameters(full)}
    cfgs = method_configs(args)
    results = train_each(models, splits, cfgs, device)
    acc = {k: exact_match(m, splits["test"], device) for k, m in models.items()}
    first_batch = sample_batch(splits["train"], 32, torch.Generator().manual_seed(0))
    state_bytes, step_s = step_costs(models, cfgs, first_batch, device, 3 if args.quick else 30)
    print_comparison(args, cfgs, counts, acc, base_acc, state_bytes, step_s, results)
    base_drift = print_frozen_check(base, reference, trainable)
    show_samples({"base": reference, **models}, splits["test"][:6], device)
    plot_curves(results, lesson_dir(args, NAME) / "loss_curves.png")
    write_summary(args, NAME, summary(acc, base_acc, counts, state_bytes, step_s, results,
                                      base_drift))
    return judge(Checks(args), trainable, total, base_acc, acc["LoRA"], base_drift)


if __name__ == "__main__":
    run_main(main)
