"""Speed, side by side in one run: every speed target of the project, as ratios on this machine.

    python -m lessons.speed            # a few minutes on 2 CPU cores, most of it compiling
    python -m lessons.speed --quick    # tiny sizes and no compiling: the code paths only

Lesson 07 ends with this report. Times of one machine move 2.5x between machines of the same kind
(and from hour to hour on a shared one), so each target is a ratio of two things timed taking
turns in this run (tiny_gpt/util/timing.py), and every table names the CPU it ran on. A target
is read from the ratios of the single rounds, each round timing both sides once: "met" when
the upper quartile of those ratios is within it, "not met" when the lower quartile is above
it, and "cannot tell" when the middle half of the rounds straddles it.
bitsandbytes and PEFT join the tables where they are installed (`pip install bitsandbytes peft`
in another environment); they are never dependencies, and a table says so when one is absent.

1. NF4 (quant/bench.py): quantize and dequantize a 4096 x 4096 weight, ours against
   bitsandbytes' CPU kernels, codes identical; the 4-bit matmul against the fp32 one.
2. One LoRALinear 512 -> 512, r = 8, 8,192 tokens, forward + backward (lora/bench.py), against
   the frozen nn.Linear alone; minLoRA's naive forward, plain autograd and PEFT's layer beside.
3. One training step of the tiny GPT, 32 windows of 128 characters, AdamW: our LoRA against
   PEFT's LoRA on the same model and the same A, B (the same loss, checked); QLoRA against LoRA;
   and the floor, the same step with no adapter work (floor_model): what LoRA adds, and the
   best LoRA / PEFT's step that any LoRA layer could reach here.
4. Tuned against reference: each tuned loop kept beside its reference (quant/tuned.py beside
   quant/blockwise.py) against that reference, on the operation it serves: quantize and
   dequantize a 4096 x 4096 weight, and a QLoRA training step of the tiny GPT. A tuned form stays
   only where it buys at least 10% (ratio <= 0.90).
5. torch.compile (inductor): graph breaks of the LoRA and QLoRA forward (torch._dynamo.explain),
   a full-graph compile of forward and backward, compiled against eager per training step, and
   QLoRA against LoRA with both compiled.
6. A LoRA and a QLoRA training step at SmolLM2-135M's shape (lessons/speed_checkpoint.py): ours
   against transformers + PEFT (+ bitsandbytes' 4-bit), the same weights and A, B, where
   installed.
"""
import copy

import torch

from lessons.speed_checkpoint import TARGET as CHECKPOINT_TARGET, checkpoint_section
from lessons.common import (Checks, get_base_model, lora_copy, machine_line, parse_args,
                            print_table, run_main, text_batch)
from lora.bench import benchmark_lora_linear, copy_factors_to_peft, peft_lora
from quant.bench import against_bitsandbytes, benchmark_nf4, tuned_against_reference, with_kernels
from tiny_gpt.memory.step_time import idle_adamw, step_times, time_step
from tiny_gpt.step import micro_batch_loss
from tiny_gpt.util.timing import RatioSpread, medians, ratio_spread
from tiny_gpt.util.torch_compat import dynamo_traces_function_backward

TARGETS = {  # ratio: at most this
    "dequantize / bitsandbytes": 1.0,
    "quantize / bitsandbytes": 0.5,
    "LoRALinear / frozen nn.Linear": 1.10,
    "LoRA step / PEFT's step": 0.85,
    "QLoRA step / LoRA step": 1.05,
}
TUNED_MUST_BUY = 0.90  # a tuned form stays only where tuned / reference <= this
SAME_LOSS_TOL = 1e-5  # ours vs PEFT's loss, float32, the same weights: summation order only


def nf4_section(quick):
    """-> {ratio name: value or RatioSpread}. NF4 throughput, and bitsandbytes' kernels where
    installed."""
    size, repeats = (256, 3) if quick else (4096, 7)
    ours = benchmark_nf4(size, size, tokens=64 if quick else 2048, repeats=repeats)
    print_table(f"1. NF4, W {size} x {size}, blocksize 64, double-quantized ({machine_line()})",
                ["", "value"],
                [["quantize MB/s (fp32 weight read)", f"{ours['quantize_MB_per_s']:.0f}"],
                 ["dequantize MB/s (fp32 weight written)", f"{ours['dequantize_MB_per_s']:.0f}"],
                 [f"4-bit matmul / fp32 matmul, {ours['tokens']} tokens", f"{ours['ratio']:.2f}x"]])
    theirs = against_bitsandbytes(size, size, repeats=repeats)
    if theirs is None:
        print("bitsandbytes is not installed here: its NF4 kernels are not compared\n")
        return {"4-bit matmul / fp32": ours["ratio"]}
    s = theirs["seconds"]
    print_table("   ours next to bitsandbytes' CPU kernels (taking turns)",
                ["operation", "ours ms", "bitsandbytes ms", "ours / theirs"],
                [[op, f"{1e3 * s[op]:.1f}", f"{1e3 * s[op + ' (bitsandbytes)']:.1f}",
                  f"{s[op] / s[op + ' (bitsandbytes)']:.2f}x"] for op in ("quantize", "dequantize")]
                + [["4-bit codes identical", str(theirs["codes_identical"]), "", ""]])
    return {"4-bit matmul / fp32": ours["ratio"], "codes identical": theirs["codes_identical"],
            "quantize / bitsandbytes": theirs["spread"]["quantize"],
            "dequantize / bitsandbytes": theirs["spread"]["dequantize"]}


def lora_layer_section(quick):
    """-> {ratio name: RatioSpread or value}: one LoRALinear against the frozen layer (and
    PEFT's layer)."""
    tokens, repeats = (512, 3) if quick else (8192, 15)
    result = benchmark_lora_linear(tokens=tokens, repeats=repeats)
    seconds, ratio = result["seconds"], result["ratio"]
    print_table(f"2. One layer {result['features']} -> {result['features']}, r = {result['r']}, "
                f"{tokens} tokens, forward + backward, float32 (medians of {repeats}, taking "
                "turns)", ["layer", "ms", "/ frozen"],
                [[name, f"{1e3 * seconds[name]:.2f}", f"{ratio[name]:.3f}x"] for name in seconds])
    if "peft" not in seconds:
        print("peft is not installed here: its LoRA layer is not compared\n")
    found = {"LoRALinear / frozen nn.Linear": result["spread"]["lora"]}
    if "peft" in seconds:
        found["LoRALinear / PEFT's layer"] = seconds["lora"] / seconds["peft"]
    return found


FLOOR = "no adapter (floor)"


def floor_model(base):
    """The step with no adapter work at all: every weight frozen but the position embedding,
    so backward still runs through every layer, as LoRA's must to reach block 0's q_proj, and
    only the adapters' own products are missing (it runs one layer norm's backward more). No
    LoRA layer can make a step cheaper than this one, so floor / PEFT's step is the best
    LoRA / PEFT's step any implementation could read on this model and batch."""
    model = copy.deepcopy(base).requires_grad_(False)
    model.pos_emb.weight.requires_grad_(True)
    return model


def step_models(base):
    """{name: model}: LoRA (ours), QLoRA, the floor, and PEFT's LoRA with our A and B where
    installed."""
    models = {"LoRA": lora_copy(base, 0), "QLoRA": lora_copy(base, 0, quantized=True),
              FLOOR: floor_model(base)}
    theirs = peft_lora(copy.deepcopy(base), ("q_proj", "v_proj"), r=8, alpha=16)
    if theirs is not None:
        with torch.no_grad():  # a trained-looking B, the same in both: neither skips a zero
            for layer in (m for m in models["LoRA"].modules() if hasattr(m, "adapters")):
                layer.lora_B.normal_(0.0, 0.02)
        copy_factors_to_peft(theirs, models["LoRA"])
        models["PEFT's LoRA"] = theirs
    return models


def training_step_section(base, args):
    """-> {ratio name: RatioSpread}, and the loss gap between our LoRA and PEFT's (or None)."""
    B, T, repeats = (4, 32, 3) if args.quick else (32, 128, 15)
    x, y = (t.to(args.device) for t in text_batch(args, B, T))
    batch = [(x, y, None)]
    runs = {}
    for name, model in step_models(base).items():
        runs[name] = (model.to(args.device).train(), idle_adamw(model))
    loss_gap = None
    if "PEFT's LoRA" in runs:
        losses = [micro_batch_loss(runs[n][0], *batch[0], B * T).item()
                  for n in ("LoRA", "PEFT's LoRA")]
        loss_gap = abs(losses[0] - losses[1])
    steps = {n: (lambda m=m, o=o: time_step(m, batch, o)) for n, (m, o) in runs.items()}
    times = step_times(steps, repeats)
    seconds = medians(times)
    print_table(f"3. One training step of the tiny GPT, batch {B} x {T}, AdamW, {args.device} "
                f"(medians of {repeats}, taking turns)", ["model", "ms", "/ LoRA"],
                [[n, f"{1e3 * s:.1f}", f"{s / seconds['LoRA']:.3f}x"] for n, s in seconds.items()])
    found = {"QLoRA step / LoRA step": ratio_spread(times, "QLoRA", "LoRA"),
             "LoRA step / floor": ratio_spread(times, "LoRA", FLOOR)}
    print(f"   per round, median [quartiles]: LoRA / floor {found['LoRA step / floor']}")
    if "PEFT's LoRA" in seconds:
        found["LoRA step / PEFT's step"] = ratio_spread(times, "LoRA", "PEFT's LoRA")
        best = found["floor / PEFT's step"] = ratio_spread(times, FLOOR, "PEFT's LoRA")
        print(f"   floor / PEFT's step {best}: the least LoRA / PEFT's step that any LoRA layer "
              "could read here")
        print(f"   our LoRA and PEFT's compute the same loss: they differ by {loss_gap:.1e}\n")
    else:
        print("peft is not installed here: its LoRA step is not compared\n")
    return found, loss_gap


def tuned_section(base, args):
    """-> {"<op> tuned / reference": RatioSpread}: each tuned quant loop against its reference,
    on the kernel itself and on the QLoRA training step it serves (same batch, taking turns)."""
    size, repeats = (256, 3) if args.quick else (4096, 7)
    kernel = tuned_against_reference(size, size, repeats=repeats)
    B, T = (4, 32) if args.quick else (32, 128)
    x, y = (t.to(args.device) for t in text_batch(args, B, T))
    model = lora_copy(base, 0, quantized=True).to(args.device).train()
    opt = idle_adamw(model)
    steps = {label: with_kernels(tuned, lambda: time_step(model, [(x, y, None)], opt))
             for label, tuned in (("tuned", True), ("reference", False))}
    times = step_times(steps, repeats)
    found = {f"{op} {size}^2, tuned / reference": spread
             for op, spread in kernel["spread"].items()}
    found[f"QLoRA step {B} x {T}, tuned / reference"] = ratio_spread(times, "tuned", "reference")
    print_table(f"4. Tuned quant loops against the reference, taking turns ({machine_line()})",
                ["operation", "tuned / reference, median [quartiles]"],
                [[name, str(spread)] for name, spread in found.items()]
                + [["codes and values identical", str(kernel["identical"])]])
    return found, kernel["identical"]


def graph_breaks(model, idx):
    """(graphs, breaks, reasons) of torch._dynamo.explain on model(idx)'s logits."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda i: model(i)[0])(idx)
    return (explained.graph_count, explained.graph_break_count,
            [str(r.reason) for r in explained.break_reasons])


def compile_section(base, args):
    """-> ({name: graph breaks}, {name: compiled / eager step time}, QLoRA / LoRA step time
    with both compiled; the ratios as RatioSpread), or None under --quick (compiling takes
    about half a minute a model on a 2-core CPU)."""
    if args.quick:
        print("5. torch.compile: skipped under --quick (compiling takes ~30 s a model here)\n")
        return None
    if not dynamo_traces_function_backward():
        print(f"5. torch.compile: skipped: torch {torch.__version__} breaks the graph at every "
              "custom autograd.Function, and cannot compile a 4-bit model (torch >= 2.4 can)\n")
        return None
    B, T, repeats = 16, 256, 7
    x, y = (t.to(args.device) for t in text_batch(args, B, T))
    batch = [(x, y, None)]
    breaks, steps = {}, {}
    for name, options in (("LoRA", {}), ("QLoRA", {"quantized": True})):
        model = lora_copy(base, 0, **options).to(args.device).train()
        graphs, count, reasons = graph_breaks(model, x[:2])
        breaks[name] = count
        for reason in reasons[:3]:
            print(f"   {name} graph break: {reason}")
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)  # a graph break here raises
        opt = idle_adamw(model)
        for _ in range(2):  # the first call compiles the forward and the backward graphs
            time_step(compiled, batch, opt)
        steps[name] = lambda m=model, o=opt: time_step(m, batch, o)
        steps[name + ", compiled"] = lambda m=compiled, o=opt: time_step(m, batch, o)
    times = step_times(steps, repeats)
    seconds = medians(times)
    ratios = {n: ratio_spread(times, n + ", compiled", n) for n in breaks}
    print_table(f"5. torch.compile (inductor, fullgraph=True), one training step, batch {B} x {T} "
                f"(medians of {repeats}, taking turns)",
                ["model", "graph breaks (forward)", "eager ms", "compiled ms", "compiled / eager"],
                [[n, breaks[n], f"{1e3 * seconds[n]:.1f}", f"{1e3 * seconds[n + ', compiled']:.1f}",
                  f"{ratios[n].median:.2f}x"] for n in breaks])
    # Compiled, the decoding's small ops are fused into the kernels around them, so this ratio
    # shows what the 4-bit base costs once the per-op overhead of eager mode is gone.
    qlora_over_lora = {mode: ratio_spread(times, "QLoRA" + mode, "LoRA" + mode)
                       for mode in ("", ", compiled")}
    print(f"   QLoRA step / LoRA step at {B} x {T} (median [quartiles] of the rounds): eager "
          f"{qlora_over_lora['']}, compiled {qlora_over_lora[', compiled']}\n")
    return breaks, ratios, qlora_over_lora[", compiled"]


def report(base, args, checks):
    """Every section above; the targets go into `checks` (timings shown, never judged; the
    graph breaks and PEFT's loss are properties of the code, judged). A timing target reads
    "met" only when the upper quartile of its per-round ratios is within it, "not met" when even
    the lower quartile is above it, and "cannot tell" between. -> numbers for a summary."""
    found = {**nf4_section(args.quick), **lora_layer_section(args.quick)}
    steps, loss_gap = training_step_section(base, args)
    found.update(steps)
    for name, limit in TARGETS.items():
        if name in found:
            show_ratio(checks, f"{name} <= {limit}", found[name], limit)
        else:
            checks.shown(f"{name} <= {limit}", None, "not measured", why="package not installed")
    if "floor / PEFT's step" in found:  # could any LoRA layer meet that target on this model?
        limit = TARGETS["LoRA step / PEFT's step"]
        show_ratio(checks, f"floor / PEFT's step <= {limit} (reachable at all)",
                   found["floor / PEFT's step"], limit)
    if "codes identical" in found:
        checks.must("our NF4 codes = bitsandbytes' codes", found["codes identical"])
    if loss_gap is not None:
        checks.must(f"our LoRA's loss = PEFT's, same weights (float32, {SAME_LOSS_TOL:g})",
                    loss_gap <= SAME_LOSS_TOL, f"{loss_gap:.1e}")
    tuned, identical = tuned_section(base, args)
    checks.must("tuned quant loops give the reference's codes and values", identical)
    for name, spread in tuned.items():
        show_ratio(checks, f"{name} <= {TUNED_MUST_BUY}", spread, TUNED_MUST_BUY)
    found.update(tuned)
    compiled = compile_section(base, args)
    if compiled is not None:
        breaks, ratios, qlora_over_lora = compiled
        for name in breaks:
            checks.must(f"{name} forward compiles without a graph break", breaks[name] == 0,
                        breaks[name])
            show_ratio(checks, f"{name} step compiled / eager <= 1", ratios[name], 1.0)
            found[f"{name} compiled / eager"] = ratios[name]
        show_ratio(checks, f"QLoRA step / LoRA step <= {TARGETS['QLoRA step / LoRA step']}, "
                   "both compiled", qlora_over_lora, TARGETS["QLoRA step / LoRA step"])
        found["QLoRA / LoRA, compiled"] = qlora_over_lora
    for name, value in checkpoint_section(args.quick).items():  # the real-checkpoint shape
        if isinstance(value, RatioSpread):
            show_ratio(checks, f"{name} <= {CHECKPOINT_TARGET}", value, CHECKPOINT_TARGET)
        found[name] = value
    return summary_numbers(found)


def show_ratio(checks, what, spread, limit):
    """A timing ratio and its verdict against `limit`, shown but never judged."""
    checks.shown(what, spread.at_most(limit), f"{spread} (quartiles)")


def summary_numbers(found):
    """Plain numbers for the lesson's summary file: a RatioSpread becomes its median and a
    "(quartiles)" entry beside it."""
    numbers = {}
    for name, value in found.items():
        if isinstance(value, RatioSpread):
            numbers[name] = value.median
            numbers[f"{name} (quartiles)"] = [value.low, value.high]
        else:
            numbers[name] = value
    return numbers


def main(argv=None):
    args = parse_args(__doc__, argv)
    base, _ = get_base_model(args)
    checks = Checks(args)
    report(base, args, checks)
    return checks.report("Speed targets")


if __name__ == "__main__":
    run_main(main)
