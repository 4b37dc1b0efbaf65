"""Lesson 11 -- many adapters, one base, one batch: training them together and serving them.

LoRA's promise for deployment is one frozen base with a small adapter per task, where full
fine-tuning needs a separate copy of the model per task. A server then gets a batch of
requests that ask for different adapters. Three ways to answer it (lora/serving.py):

    merged       per group of requests for one adapter: W0 <- W0 + sBA, run, W0 <- W0 - sBA
    sub_batches  per group: make its adapter active, run the group on the unmerged model
    mixed        one batch; in every LoRA layer row b gathers its own adapter's factors:

        y_b = W0 x_b + s_j B_j A_j x_b,   j = the adapter of row b

The first two cut the batch into k small batches, one per adapter asked for. The third runs the
base matmul W0 x once for all rows, and the k low-rank terms as two batched matmuls over the
rows (A stacked (k, R, in) and B (k, out, R), ranks padded to the largest R with zeros; see
lora/mixed_function.py for why padding, and for the backward derived by hand). PEFT's mixed
batches (its `adapter_names=`) sit in between: the base once, then a loop over the adapters
inside every layer ("grouped" here); S-LoRA and Punica gather per row, as "mixed" does, with
CUDA kernels. Neither PEFT's mixed batch nor those kernels train; this one has a backward:

(a) One batch trains three adapters at once. Every batch holds rows of three tasks, each row
tagged with its own adapter; a row's loss reaches only its adapter, so after training each
adapter does its task. That its gradients are exactly those of three separate runs is checked.

(b) A library on disk. The adapters (and synthetic ones, with random factors, to have 16) are
saved in the PEFT layout and listed from their configs alone; a server loads one the first time
a request asks for it, and an adapter written for another base is refused before it touches
the model.

(c) The three ways measured: forward passes and greedy generation of batches of task prompts
whose rows ask for k = 1 .. 16 adapters, tokens per second side by side in one run, and each
way's answers compared with the others row by row.
"""
import copy
import random
from dataclasses import dataclass

import torch

from lessons.common import (Checks, get_base_model, lesson_dir, parse_args, print_table, run_main,
                            takeaway, write_summary)
from lessons.plots import saved_figure
from lessons.recipe import finetune_config, task_splits
from lora import (AdapterLibrary, add_adapter, disable_adapters, lora_layers, mixed_adapters,
                  save_adapter, set_active_adapters)
from lora.many.measure import (adapter_bytes, forward_rates, generation_rates,
                               mixed_gradient_gap, mixed_row_gap)
from lora.many.serving import merge_drift
from tiny_gpt import GPT, GPTConfig, exact_match, make_batch
from tiny_gpt.data import encode
from tiny_gpt.train import train

NAME = "11_serving_many_adapters"
TASKS = ("upper", "swap", "reverse")
ROWS_PER_TASK = 16            # rows of each task in every training batch (48 in all)
STEPS = 500
KS = (1, 2, 4, 8, 16)         # adapters the rows of one batch ask for
BATCHES = (64, 128)           # requests per batch
WAYS = ("merged", "sub_batches", "grouped", "mixed")
ROW_TOL = 1e-5                # mixed logits vs each row alone, relative to the largest |logit|
GRAD_TOL = 1e-4               # float32 gradients summed in another order, relative to the largest
K_SHOWN = 8                   # the k of the speed targets
SWAPS = (1, 10, 100, 1000)    # merge + unmerge cycles after which way "merged"'s W0 is compared


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS        # (a): optimizer steps of the three adapters together
    batches: tuple = BATCHES  # (c): requests per forward batch
    repeats: int = 7          # (c): timed forward passes per way, taking turns
    gen_repeats: int = 2      # (c): timed generations per way
    swaps: tuple = SWAPS


QUICK = Budget(steps=6, batches=(8,), repeats=1, gen_repeats=1, swaps=(1, 10, 100))


# --- (a) three adapters trained in one batch -----------------------------------------------
def mixed_batches(splits, rows):
    """get_batch for tiny_gpt.train: ROWS_PER_TASK examples of each task, in the order of
    `rows` (each row's adapter is its task's name)."""
    def get_batch(gen):
        picks = [splits[t]["train"][int(torch.randint(len(splits[t]["train"]), (1,),
                                                      generator=gen))] for t in rows]
        return make_batch(picks)
    return get_batch


def train_together(model, splits, args):
    rows = [t for t in TASKS for _ in range(ROWS_PER_TASK)]
    for task in TASKS:
        add_adapter(model, task, r=8, alpha=16)
    for name, p in model.named_parameters():
        p.requires_grad_(".adapters." in name)
    cfg = finetune_config(args, "lora", restore_best=False, eval_every=0,
                          max_steps=args.budget.steps)
    with mixed_adapters(model, rows):
        result = train(model, mixed_batches(splits, rows), cfg, device=args.device)
    print(f"trained {len(TASKS)} adapters in one batch of {len(rows)} rows: {result.steps} steps,"
          f" {result.wall_time:.1f} s\n")
    return rows


def gradient_gap(model, splits):
    """Gradients of one mixed batch against each task's rows run alone with its adapter
    active (lora/many/measure.py), on 4 training examples of each task."""
    examples = [splits[t]["train"][i] for t in TASKS for i in range(4)]
    return mixed_gradient_gap(model, *make_batch(examples), [t for t in TASKS for _ in range(4)])


def accuracy_table(model, splits, args):
    rows, accuracy = [], {}
    for task in TASKS:
        test = splits[task]["test"]
        set_active_adapters(model, task)
        accuracy[task] = exact_match(model, test, args.device)
        with disable_adapters(model):
            base = exact_match(model, test, args.device)
        rows.append([task, len(test), f"{100 * base:.1f}%", f"{100 * accuracy[task]:.1f}%"])
    print_table("(a) Test exact match of each adapter on its own task, after training all three "
                "in one batch", ["task", "test prompts", "base", "its adapter"], rows)
    return accuracy


# --- (b) the library ---------------------------------------------------------------------
def build_library(model, base, out, n_synthetic):
    """Save the trained adapters and n_synthetic random ones (r = 8, B ~ N(0, 0.02^2) so that
    they change the output) under out/library; one more written for a 2-layer GPT."""
    root = out / "library"
    for task in TASKS:
        save_adapter(model, root / task, task)
    scratch = copy.deepcopy(base)
    torch.manual_seed(1)
    for j in range(n_synthetic):
        add_adapter(scratch, f"synthetic{j:02d}", r=8, alpha=16)
        with torch.no_grad():
            for _, layer in lora_layers(scratch):
                layer.adapters[f"synthetic{j:02d}"].lora_B.normal_(0, 0.02)
        save_adapter(scratch, root / f"synthetic{j:02d}", f"synthetic{j:02d}")
    other = add_adapter(GPT(GPTConfig(n_layer=2)), "other_base", r=8, alpha=16)
    save_adapter(other, root / "other_base", "other_base")
    return root


def library_section(base, root):
    server = copy.deepcopy(base)
    library = AdapterLibrary(server, root)
    print_table(f"(b) Adapter library {root} (listed from the configs; nothing loaded yet)",
                AdapterLibrary.HEADERS, [e.row() for e in library.entries()])
    before = {k: v.clone() for k, v in server.state_dict().items()}
    try:
        library.load("other_base")
        refused = "accepted (unexpected)"
    except ValueError as e:
        refused = f"refused: {e}"
    unchanged = (server.state_dict().keys() == before.keys()
                 and all(torch.equal(v, before[k]) for k, v in server.state_dict().items()))
    print(f"loading 'other_base' onto our GPT: {refused}\nthe model unchanged: {unchanged}\n")
    names = [n for n in library.names() if n != "other_base"]
    return server, library, names, unchanged


# --- (c) serving ---------------------------------------------------------------------------
def request_batch(splits, n, seed):
    """n task prompts (drawn from the three tasks' test prompts) and their tokens, right-padded
    (n, T)."""
    pool = [p for t in TASKS for p, _ in splits[t]["test"]]
    prompts = random.Random(seed).choices(pool, k=n)
    T = max(len(p) for p in prompts)
    idx = torch.zeros((n, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(encode(p))
    return prompts, idx


def assigned(names, k, n):
    """Row b asks for adapter b mod k among the first k."""
    return [names[b % k] for b in range(n)]


def rate_table(title, rates):
    """Tokens / s per way and k; with the base model's rate when it was timed too."""
    with_base = (KS[0], "base") in rates
    rows = [[k, *(f"{rates[(k, w)]:,.0f}" for w in WAYS),
             f"{rates[(k, 'mixed')] / rates[(k, 'sub_batches')]:.2f}x",
             *([f"{rates[(k, 'base')]:,.0f}", f"{rates[(k, 'base')] / rates[(k, 'mixed')]:.2f}x"]
               if with_base else [])] for k in KS]
    print_table(title, ["k", *WAYS, "mixed / sub_batches",
                        *(["base alone", "mixed time / base"] if with_base else [])], rows)


def memory_table(library, names, n, layer):
    per_adapter = adapter_bytes(library.model, names[0])
    R = max(a.r for a in layer.adapters.values())  # the padded rank of the stacks
    gathered = n * R * (layer.in_features + layer.out_features) * 4  # A and B rows, float32
    print_table("Memory", ["what", "bytes"], [
        ["one adapter (r=8 on Q, V of 4 blocks), float32", f"{per_adapter:,}"],
        [f"all {len(names)} adapters", f"{per_adapter * len(names):,}"],
        ["the base model, float32", f"{adapter_bytes(library.model, None):,}"],
        [f"mixed: one layer's gathered factors for {n} rows (freed after the layer)",
         f"{gathered:,}"]])


def plot(rates, gen_rates, path):
    """Tokens / s against k: one panel per forward batch size, one for generation."""
    panels = [(f"forward, batch {n}", r) for n, r in rates.items()]
    panels.append((f"greedy generation, batch {next(iter(rates))}", gen_rates))
    with saved_figure(path, ncols=len(panels), figsize=(5 * len(panels), 4)) as axes:
        for ax, (title, r) in zip(axes, panels):
            for way in WAYS + (("base",) if (KS[0], "base") in r else ()):
                ax.plot(KS, [r[(k, way)] for k in KS], marker="o", label=way,
                        **({"color": "0.5", "ls": "--"} if way == "base" else {}))
            ax.set(xscale="log", xticks=KS, xticklabels=[str(k) for k in KS], title=title,
                   xlabel="adapters in the batch (k)", ylabel="tokens / s")
            ax.legend(fontsize=7)


def together_section(base, splits, args, checks):
    """(a): train three adapters in one batch; their gradients against separate runs."""
    model = copy.deepcopy(base)
    train_together(model, splits, args)
    model.eval()
    gap = gradient_gap(model, splits)
    checks.must(f"one mixed batch's gradients = separate runs' (relative {GRAD_TOL:g})",
                gap <= GRAD_TOL, f"{gap:.1e}")
    return model, accuracy_table(model, splits, args), gap


def forward_section(server, library, names, splits, args):
    """(c): {batch size: {(k, way): tokens / s}} of one forward pass, a table per size."""
    rates, repeats = {}, args.budget.repeats
    for n in args.budget.batches:
        _, idx = request_batch(splits, n, args.seed)
        rows_by_k = {k: assigned(names, k, n) for k in KS}
        library.ensure(rows_by_k[max(KS)])  # loaded when a request first asks for an adapter
        rates[n] = forward_rates(server, idx.to(args.device), rows_by_k, WAYS, repeats)
        rate_table(f"(c) Forward pass, {n} requests of {idx.shape[1]} tokens: tokens / s "
                   f"(median of {repeats}, the ways taking turns)", rates[n])
    return rates


def generation_section(server, names, splits, args, checks):
    """(c): each row alone against the mixed batch, then greedy generation by every way."""
    n0 = args.budget.batches[0]
    prompts, idx = request_batch(splits, n0, args.seed)
    row_rel = mixed_row_gap(server, idx.to(args.device),
                            assigned(names + [None], len(names) + 1, n0))
    checks.must(f"mixed batch = each row alone, {len(names)} adapters + base rows (relative "
                f"{ROW_TOL:g})", row_rel <= ROW_TOL, f"{row_rel:.1e}")
    max_new = max(len(a) for t in TASKS for _, a in splits[t]["test"])
    gen_rates, agree = generation_rates(server, prompts, {k: assigned(names, k, n0) for k in KS},
                                        WAYS, max_new, args.budget.gen_repeats, args.device)
    rate_table(f"(c) Greedy generation of {max_new} tokens for {n0} requests: generated "
               "tokens / s", gen_rates)
    checks.must("every way gives the same greedy answers, for every k", agree)
    return gen_rates, row_rel


def swap_drift_section(server, name, swaps):
    """Way 'merged' rewrites W0 twice per group: W0's drift after each number of cycles, and
    whether it grows with them (each count measured from the same start)."""
    drift = {n: merge_drift(server, name, swaps=n) for n in swaps}
    print_table("Way 'merged': largest |W0 - W0 at the start| after n merge + unmerge cycles",
                ["cycles", "drift"], [[n, f"{d:.2g}"] for n, d in drift.items()])
    print(drift_sentence(drift))
    return drift


def drift_sentence(drift: dict) -> str:
    """{cycles: drift} -> whether the rounding grows with the cycles: it does where every
    count drifts at least as far as the one before and the last further than the first."""
    (n0, d0), (n1, d1) = next(iter(drift.items())), list(drift.items())[-1]
    values = list(drift.values())
    grows = all(b >= a for a, b in zip(values, values[1:])) and d1 > d0
    said = "grows" if grows else "does not grow steadily"
    return f"float32 rounding {said} with the cycles: {d0:.2g} after {n0}, {d1:.2g} after {n1}\n"


def speed_checks(rates, args, checks):
    n0 = args.budget.batches[0]
    speedup = rates[n0][(K_SHOWN, "mixed")] / rates[n0][(K_SHOWN, "sub_batches")]
    over_base = rates[n0][(K_SHOWN, "base")] / rates[n0][(K_SHOWN, "mixed")]
    checks.shown(f"mixed >= 1.5x sub_batches' tokens/s at k = {K_SHOWN}, batch {n0}",
                 speedup >= 1.5, f"{speedup:.2f}x")
    checks.shown(f"mixed <= 1.3x the base model's time at k = {K_SHOWN}, batch {n0}",
                 over_base <= 1.3, f"{over_base:.2f}x")
    takeaway(f"one mixed batch of {n0} requests for {K_SHOWN} adapters served {speedup:.2f}x "
             f"the tokens/s of one sub-batch per adapter, at {over_base:.2f}x the base model's "
             "time")
    return speedup, over_base


def main(argv=None):
    args = parse_args(__doc__, argv, budget=(Budget(), QUICK))
    out = lesson_dir(args, NAME)
    splits = {t: task_splits(args, t) for t in TASKS}
    base = get_base_model(args)[0].eval()
    checks = Checks(args)

    model, accuracy, gap = together_section(base, splits, args, checks)
    root = build_library(model, base, out, n_synthetic=max(KS) - len(TASKS))
    server, library, names, unchanged = library_section(base, root)
    checks.must("an adapter for another base is refused, the model unchanged", unchanged)
    rates = forward_section(server, library, names, splits, args)
    gen_rates, row_rel = generation_section(server, names, splits, args, checks)
    memory_table(library, names, args.budget.batches[0], lora_layers(server)[0][1])
    drift = swap_drift_section(server, names[0], args.budget.swaps)
    plot(rates, gen_rates, out / "tokens_per_second.png")
    speedup, over_base = speed_checks(rates, args, checks)
    write_summary(args, NAME, {**{f"acc_{t}": a for t, a in accuracy.items()},
                               "mixed_over_sub_batches_k8": speedup,
                               "mixed_time_over_base_k8": over_base, "row_gap": row_rel,
                               "gradient_gap": gap, **{f"merge_drift_{n}": d for n, d in
                                                       drift.items()}})
    return checks.report()


if __name__ == "__main__":
    run_main(main)
