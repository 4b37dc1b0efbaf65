"""Lesson 16 -- a real checkpoint: LoRA and QLoRA at the size they were made for.

Every lesson so far tuned a 0.84M-parameter GPT, where activations dwarf the weights. LoRA and
QLoRA were made for the other end: billions of weights, which full fine-tuning must store with
a gradient and two AdamW moments each (16 bytes a weight in fp32), LoRA only once (4 bytes,
frozen), and QLoRA in about half a byte (NF4 with double-quantized scales). The same four kinds
of bytes as lesson 07 (ZeRO, Rajbhandari et al. 2020, Sec. 3), at Phi weights of which phi are
trained and N tokens a step:

    weights 4 Phi (fp32) | 2 Phi (bf16) | ~0.52 Phi (NF4)     gradients 4 phi
    optimizer 8 phi + 4 per trained tensor                     activations ~ N x layers x block

tiny_gpt/memory/predict.py writes those lines out for a Llama-shaped model, down to what each
operation saves for backward, and this lesson holds the prediction against the ledger's
measurement, one step per recipe, on SmolLM2-135M's shape with random weights (no download:
the shape is a shipped config.json). Then the process's peak resident memory, each in a fresh
interpreter (tiny_gpt/memory/peak_memory.py): loading a checkpoint in float and straight into
4 bits, and one training step at Llama-3.2-1B's shape, where the weights dominate and QLoRA
pays. At 135M with 4 x 128 tokens the picture differs: the log-softmax over a 49k-word
vocabulary and 30 blocks of activations weigh as much as the weights, and what QLoRA saves is a
smaller share; the table says how much, from the measurements. Last, the prediction carried to
published shapes up to 70B, beside the QLoRA paper's own figures (Dettmers et al. 2023).

With ``--model DIR`` (a Hugging Face folder you already have: SmolLM2, Llama 3.2, Qwen2.5,
TinyLlama, GPT-2): load it, answer a few prompts, fine-tune with LoRA or QLoRA for --steps on
the project's tasks written as text (or --data FILE of "prompt<TAB>answer" lines), answer
again, and save the adapter in PEFT's layout.

Run: ``python lessons/16_real_checkpoint.py`` (minutes: the steps at 1B's shape take most of
them), ``--quick`` (a tiny shape, the code paths only), or
``--model DIR [--method qlora] [--steps 40] [--data FILE]``.
"""
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lessons.common import (Checks, lesson_dir, parse_args, positive_number, print_table,
                            run_main, whole_number, write_summary)
from lora import apply_lora, prepare_qlora, save_adapter
from lora.checkpoint_bench import build, random_batch
from quant import load_pretrained_4bit
from tiny_gpt.memory.ledger import MB, measure_step
from tiny_gpt.memory.peak_memory import measure_peak
from tiny_gpt.memory.predict import PAPER_RECIPES, PUBLISHED, RECIPES, Shape, predict
from tiny_gpt.memory.step_time import idle_adamw, step_times, time_step
from tiny_gpt.pretrained import build_model, load_pretrained, save_pretrained, shipped_config
from tiny_gpt.pretrained.tokenizer import load_tokenizer
from tiny_gpt.tasks import get_task
from tiny_gpt.train import TrainConfig, train
from tiny_gpt.util.timing import medians, ratio_spread

NAME = "16_real_checkpoint"
BENCH = "lora.checkpoint_bench"
FIELDS = ("frozen", "trainable", "grads", "optimizer", "activations")
ACTIVATION_TOL = 0.05  # the count of saved tensors against the ledger: layer 0 and the tiny
                       # index tensors aside, it is exact; 5% catches a saved T x T matrix
LOAD_LIMIT, QLORA_LIMIT = 1.3, 0.4  # peak / (what must be held); QLoRA / LoRA step at 1B
GB = 1e9  # the QLoRA paper's figures are in decimal units
PAPER = {  # (shape, recipe, published bytes, the paper's claim: "about" (within PAPER_TOL),
    # "under" or "over" that figure, and how the paper says it)
    "4-bit LLaMA-7B base": ("Llama-2-7B", "QLoRA, all linear r=64", 5048e6, "about",
                            "takes 5,048 MB (Fig. 6)"),
    "QLoRA, 65B": ("LLaMA-65B", "QLoRA, all linear r=64", 48e9, "under",
                   "fits a 48 GB GPU (Abstract)"),
    "full 16-bit FT, 65B": ("LLaMA-65B", "full FT 16-bit", 780e9, "over",
                            "needs more than 780 GB (Sec. 1)"),
}
PAPER_TOL, PAPER_TOKENS = 0.10, 512  # batch 1 x 512 tokens, as the paper's Fig. 6
SLOW = "LoRA + bf16 weights"  # a CPU without bfloat16 matmul units: timed once, not every round


@dataclass(frozen=True)
class Budget:
    config: str = "smollm2-135m"      # the shape of the ledger and timing sections
    batch: int = 4
    seq_len: int = 128
    repeats: int = 3                  # rounds of step timing, recipes taking turns
    peaks: tuple = (("llama-3.2-1b", 1, 256, ("LoRA + ckpt", "QLoRA + ckpt")),
                    ("smollm2-135m", 4, 128, ("LoRA", "QLoRA")))  # (shape, B, T, recipes)


# --quick: the tiny shape (the fresh-process peaks are skipped; tests run them on it)
QUICK = Budget("tiny", 2, 32, 2, (("tiny", 1, 64, ("LoRA + ckpt", "QLoRA + ckpt")),
                                  ("tiny", 2, 32, ("LoRA", "QLoRA"))))


def add_args(parser):
    parser.add_argument("--model", help="a Hugging Face folder to load (nothing is downloaded)")
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--steps", type=whole_number(1), default=40)
    parser.add_argument("--lr", type=positive_number, default=1e-3)
    parser.add_argument("--data", help='a file of "prompt<TAB>answer" lines (default: the '
                                       "upper task written as text)")
    parser.add_argument("--prompt", default="The capital of France is")


# --- without --model: the measurements ---------------------------------------------------

def ledger_section(cfg, B, T, checks):
    """One measured step per recipe beside predict.py's numbers. -> {recipe: model}."""
    models, rows, batch = {}, [], random_batch(cfg, B, T)
    for name, recipe in RECIPES.items():
        models[name] = build(cfg, recipe)
        start = time.perf_counter()
        measured = measure_step(models[name], batch, idle_adamw(models[name]))
        if name == SLOW:  # its one timed step (time_section)
            models[name].step_seconds = time.perf_counter() - start
        predicted = predict(cfg, recipe, B, T)
        exact = all(getattr(measured, f) == getattr(predicted, f) for f in FIELDS[:4])
        ratio = measured.activations / predicted.activations
        checks.must(f"{name}: weights, grads, optimizer = prediction (bytes)", exact)
        checks.target(f"{name}: activations within {ACTIVATION_TOL:.0%} of prediction",
                      abs(ratio - 1) <= ACTIVATION_TOL, f"{ratio:.3f}x")
        rows.append([name] + [f"{getattr(measured, f) / MB:.1f}" for f in FIELDS]
                    + [f"{measured.total / MB:.0f}", f"{predicted.total / MB:.0f}",
                       f"{ratio:.3f}"])
    params = sum(Shape.of(cfg).parameter_counts().values())
    print_table(f"One AdamW step, batch {B} x {T}, {params / 1e6:.1f}M parameters: measured MiB "
                "(ledger.py) and predicted (predict.py)",
                ["recipe", *FIELDS, "total", "predicted", "activ meas/pred"], rows)
    return models


def time_section(models, B, T, cfg, repeats):
    """Step time per recipe, taking turns (tiny_gpt/util/timing.py); the slow bf16 recipe
    by its one step in ledger_section (minutes on a CPU without bfloat16 units)."""
    batch = random_batch(cfg, B, T)
    steps = {n: (lambda m=m, o=idle_adamw(m): time_step(m, batch, o))
             for n, m in models.items() if n != SLOW}
    times = step_times(steps, repeats, warmup=0)
    seconds = medians(times)
    rows = [[n, f"{s:.2f}", str(ratio_spread(times, n, "LoRA"))] for n, s in seconds.items()]
    if SLOW in models:
        seconds[SLOW] = models[SLOW].step_seconds
        rows.append([SLOW, f"{seconds[SLOW]:.2f}", f"{seconds[SLOW] / seconds['LoRA']:.2f} "
                     "(its ledger step / LoRA's median)"])
    print_table(f"Step time, batch {B} x {T} (median of {repeats} rounds, taking turns)",
                ["recipe", "s", "/ LoRA, median [quartiles] of the rounds"], rows)
    qlora, full = (ratio_spread(times, n, "LoRA") for n in ("QLoRA", "full FT fp32"))
    print(f"Takeaway: a QLoRA step takes {qlora.median:.2f}x LoRA's time and a full fine-tuning "
          f"step {full.median:.2f}x (medians of {repeats} rounds; quartiles in the table).\n")
    return seconds


def load_section(cfg, checks):
    """Peak resident memory of loading a random bf16 checkpoint, float and 4-bit."""
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(build_model(cfg, torch.bfloat16), folder)
        file_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
        flt = measure_peak(f"{BENCH}:load_float", folder=folder)
        four = measure_peak(f"{BENCH}:load_4bit", folder=folder)
    held = {"float": flt["result"]["model_bytes"],
            "4-bit": four["result"]["model_bytes"] + four["result"]["largest_linear_bytes"]}
    rows = []
    for name, run in (("float", flt), ("4-bit", four)):
        ratio = run["added"] / held[name]
        checks.target(f"load {name}: peak - baseline <= {LOAD_LIMIT} x what it must hold",
                      ratio <= LOAD_LIMIT, f"{ratio:.2f}x")
        rows.append([name, f"{file_bytes / MB:.0f}", f"{run['result']['model_bytes'] / MB:.0f}",
                     f"{held[name] / MB:.0f}", f"{run['added'] / MB:.0f}", f"{ratio:.2f}"])
    print_table(f"Loading a random bf16 checkpoint (fresh process each; baseline "
                f"{flt['baseline'] / MB:.0f} MiB)", ["load", "file MiB", "model MiB",
                "must hold MiB", "peak - baseline", "ratio"], rows)
    print("'must hold': the model; for 4-bit, plus the largest linear weight in float32 (the "
          "one the loader quantizes at a time).\n")
    return {n: r["added"] / held[n] for n, r in (("float", flt), ("4-bit", four))}


def peak_steps(config, recipes, B, T):
    """{recipe: measure_peak of one step in a fresh process}."""
    return {r: measure_peak(f"{BENCH}:train_step", model_config=config, recipe=r, batch=B,
                            seq_len=T, timeout=3600) for r in recipes}


def rss_section(budget, checks):
    """Peak resident memory of one training step per recipe, at two shapes."""
    runs = {(config, B, T): recipes for config, B, T, recipes in budget.peaks}
    big = budget.peaks[0][0]
    rows, found = [], {}
    for (config, B, T), recipes in runs.items():
        peaks = peak_steps(config, recipes, B, T)
        for r in recipes:
            led = peaks[r]["result"]["ledger"]
            rows.append([f"{config}, {B} x {T}", r, f"{peaks[r]['added'] / MB:.0f}",
                         *[f"{led[f] / MB:.0f}" for f in ("frozen", "activations")],
                         f"{peaks[r]['result']['step_s']:.1f}"])
        found[config, B, T] = peaks[recipes[1]]["added"] / peaks[recipes[0]]["added"], peaks
    print_table("One training step in a fresh process: peak resident memory above the "
                "interpreter's (MiB), and the ledger's split", ["shape, batch", "recipe",
                "peak - baseline", "weights (frozen)", "activations", "step s"], rows)
    (ratio_big, big_peaks), (ratio_small, small_peaks) = found.values()
    checks.target(f"{big}: QLoRA step peak <= {QLORA_LIMIT} x LoRA (fp32), checkpointed",
                  ratio_big <= QLORA_LIMIT, f"{ratio_big:.2f}x")
    frozen = big_peaks["QLoRA + ckpt"]["result"]["ledger"]["frozen"]
    embedding = RECIPES["QLoRA + ckpt"].embedding_bytes * Shape.of(
        shipped_config(big)).parameter_counts()["embedding"]
    print(f"Why: at {big} QLoRA's weights are {frozen / MB:.0f} MiB, of which the bfloat16 "
          f"embedding (the head too, tied) is {embedding / MB:.0f} MiB ({embedding / frozen:.0%})"
          f"; the 4-bit projections are the rest.")
    config, B, T = list(runs)[1]
    why_small(small_peaks, ratio_small, shipped_config(config).vocab_size * B * T)
    costs = {f"{c}, {b} x {t}, {r}": {"peak MiB": round(p[r]["added"] / MB),
                                      "step s": round(p[r]["result"]["step_s"], 1)}
             for (c, b, t), (_, p) in found.items() for r in runs[c, b, t]}
    return ratio_big, ratio_small, costs


def why_small(peaks, ratio, logits):
    """The small shape's ratio, explained from its two ledgers."""
    lora, qlora = (peaks[r]["result"]["ledger"] for r in ("LoRA", "QLoRA"))
    saved = lora["frozen"] - qlora["frozen"]
    share = lora["activations"] / (lora["frozen"] + lora["activations"])
    print(f"Why: at the small shape QLoRA's peak is {ratio:.2f}x LoRA's: NF4 saves "
          f"{saved / MB:.0f} MiB of weights, but activations are {share:.0%} of LoRA's ledger "
          f"({lora['activations'] / MB:.0f} MiB, of which the float32 log-softmax over the "
          f"vocabulary is {4 * logits / lora['activations']:.0%}), and QLoRA keeps them all.\n")


def paper_section(checks):
    """predict.py carried to published shapes, beside the QLoRA paper's figures."""
    rows = []
    for name, (shape, recipe, published, claim, says) in PAPER.items():
        ledger = predict(PUBLISHED[shape], PAPER_RECIPES[recipe], 1, PAPER_TOKENS)
        ours = ledger.frozen if "base" in name else ledger.total
        diff = ours / published - 1
        agrees = {"about": abs(diff) <= PAPER_TOL, "under": diff < 0, "over": diff > 0}[claim]
        rows.append([name, says, f"{ours / GB:.2f} GB", f"{diff:+.0%}"])
        checks.shown(f"{name}: prediction {claim} the published figure"
                     + (f" (within {PAPER_TOL:.0%})" if claim == "about" else ""), agrees,
                     f"{ours / GB:.2f} vs {published / GB:.3g} GB ({diff:+.0%})",
                     why="a published figure, measured elsewhere")
    for shape in ("Llama-3.2-1B", "Llama-2-7B", "Llama-2-70B"):
        for recipe in ("full FT fp32", "LoRA + ckpt", "QLoRA + ckpt"):
            total = predict(PUBLISHED[shape], RECIPES[recipe], 1, 512).total
            rows.append([shape, recipe + ", 1 x 512", f"{total / GB:.1f} GB", ""])
    print_table("predict.py at published shapes (decimal GB; QLoRA as the paper runs it: r = 64 "
                "on every linear layer, bf16 adapters, batch 1 x 512, checkpointing)",
                ["model", "recipe / published", "predicted", "vs published"], rows)
    print("The 4-bit base is counted as NF4 projections with double-quantized scales plus a "
          "bf16 embedding and head; whatever else the published 5,048 MB holds, the ledger "
          "does not count.\n")


def process_sections(args, cfg, checks):
    """Loading and the step peaks, each a fresh interpreter: skipped under --quick (seconds
    apiece; tests/test_lesson16.py runs them on the tiny shape). -> numbers or {}."""
    if args.quick:
        print("Loading and training-step peaks: skipped under --quick (each measurement "
              "starts a fresh interpreter)\n")
        return {}
    loads = load_section(cfg, checks)
    ratio_big, ratio_small, costs = rss_section(args.budget, checks)
    print(f"Takeaway: at Llama-3.2-1B's shape a checkpointed QLoRA step peaks at "
          f"{ratio_big:.2f}x the memory of LoRA on fp32 weights.\n")
    return {"load peak / must hold": loads, "QLoRA / LoRA peak, 1B": ratio_big,
            "QLoRA / LoRA peak, 135M": ratio_small, "one step in a fresh process": costs}


# --- with --model: a real checkpoint -----------------------------------------------------

def read_pairs(args):
    """(train, test) prompt -> answer pairs: --data's lines, or the upper task as text."""
    if not args.data:
        splits = get_task("upper").splits(seed=args.seed)
        return splits["train"][:200], splits["test"][:4]
    pairs = []
    for number, line in enumerate(Path(args.data).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            if line.count("\t") != 1:
                raise SystemExit(f"--data {args.data}, line {number}: expected one tab between "
                                 "prompt and answer")
            prompt, answer = line.split("\t")
            pairs.append((prompt, answer + "\n"))
    if len(pairs) < 2:
        raise SystemExit(f"--data {args.data}: needs at least 2 prompt<TAB>answer lines")
    return pairs[:-2] or pairs, pairs[-2:]


def token_batch(tok, pairs):
    """(x, y, mask) right-padded, the mask on the answer's tokens only."""
    lines = [(tok.encode(p), tok.encode(a, add_bos=False)) for p, a in pairs]
    T = max(len(p) + len(a) for p, a in lines) - 1
    x, y, mask = (torch.zeros(len(lines), T, dtype=torch.long) for _ in range(3))
    for row, (p, a) in enumerate(lines):
        ids = torch.tensor(p + a)
        x[row, :len(ids) - 1], y[row, :len(ids) - 1] = ids[:-1], ids[1:]
        mask[row, len(p) - 1:len(ids) - 1] = 1
    return x, y, mask


def answers(model, tok, prompts, n=24):
    out = []
    for prompt in prompts:
        idx = torch.tensor([tok.encode(prompt)])
        ids = model.generate(idx, n, eos_id=list(tok.eos_ids) or None)[0, idx.shape[1]:]
        out.append(tok.decode(ids.tolist(), skip_special_tokens=True).split("\n")[0])
    return out


def tune_checkpoint(args, checks):
    train_pairs, test_pairs = read_pairs(args)  # a bad --data stops before anything loads
    tok = load_tokenizer(args.model)
    model = (load_pretrained_4bit(args.model, embedding_dtype=torch.bfloat16)
             if args.method == "qlora" else load_pretrained(args.model))
    print(f"{args.prompt!r} -> {answers(model, tok, [args.prompt])[0]!r}\n")
    (prepare_qlora if args.method == "qlora" else apply_lora)(model, r=8, alpha=16)
    held = token_batch(tok, test_pairs)
    loss_of = lambda: float(torch.no_grad()(model)(held[0], held[1], held[2])[1])
    before, said = loss_of(), answers(model, tok, [p for p, _ in test_pairs])
    gen = lambda g: token_batch(tok, [train_pairs[i] for i in torch.randint(
        len(train_pairs), (8,), generator=g).tolist()])
    train(model, gen, TrainConfig(max_steps=args.steps, lr=args.lr, warmup_steps=args.steps // 5,
                                  eval_every=0, seed=args.seed, restore_best=False), device="cpu")
    after, now = loss_of(), answers(model, tok, [p for p, _ in test_pairs])
    print_table(f"{args.method} on {args.model}, {args.steps} steps", ["prompt", "expected",
                "before", "after"], [[p, a.strip(), b, c] for (p, a), b, c in
                                     zip(test_pairs, said, now)])
    print(f"Takeaway: held-out answer loss {before:.3f} -> {after:.3f} after {args.steps} steps.")
    folder = save_adapter(model, lesson_dir(args, NAME) / f"adapter_{args.method}")
    checks.target("held-out answer loss went down", after < before, f"{before:.3f} -> {after:.3f}")
    return {"loss before": before, "loss after": after, "adapter": str(folder)}


def main(argv=None):
    args = parse_args(__doc__, argv, add_args, budget=(Budget(), QUICK))
    checks = Checks(args)
    if args.model:
        numbers = tune_checkpoint(args, checks)
    else:
        b = args.budget
        cfg, B, T = shipped_config(b.config), b.batch, b.seq_len
        models = ledger_section(cfg, B, T, checks)
        seconds = time_section(models, B, T, cfg, b.repeats)
        del models
        numbers = {"step seconds": seconds, **process_sections(args, cfg, checks)}
        paper_section(checks)
    write_summary(args, NAME, numbers)
    return checks.report()


if __name__ == "__main__":
    run_main(main)
