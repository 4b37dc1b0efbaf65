"""Lesson 08 -- stability and evaluation: what goes wrong when fine-tuning, and how to see it.

Every part is a short LoRA run (r=8 on Q and V, the default task) with one thing changed, so the
effect is measured rather than asserted. Sweeps use fewer steps than the 1500 of a full run; every
table title says how many.

(a) Divergence. AdamW moves every parameter by about lr per step whatever the gradient's size
    (m / sqrt(v) is ~ +-1), so clipping the gradient norm does not tame a too-high lr. The adapter
    update is dW = s B A with s = alpha / r, and one step changes it by about
    s (dB A + B dA) ~ s * lr * (|A| + |B|). Lowering alpha shrinks that product, but not the
    steps of A and B themselves: at lr 0.1 one step is larger than A's initial entries
    (|A| <= 1/sqrt(128) = 0.088), so A is scrambled whatever alpha is. A warmup only postpones
    the trouble if the peak lr is itself too high. The table says which fix rescues the run.
(b) Schedules. Warmup (linear 0 -> lr) then cosine decay to lr * 0.1, versus a constant lr.
(c) Dropout on a small training set (64 examples): LoRA dropout zeroes entries of the adapter's
    input x in  s B A dropout(x)  (Hu et al. 2021 keep it in their recipes); it is meant to shrink
    the gap between training and validation loss. Measured here with dropout 0 and 0.1.
(d) Early stopping: validate every few steps; stop after `patience` validations without a new
    best validation loss; restore the best weights.
(e) Drift from the base, on the *pretraining* text (tiny_gpt/drift.py):
        KL(base || tuned) = mean_t sum_v p_base(v) (log p_base(v) - log p_tuned(v))
    and the tuned model's pretraining loss (forgetting), tracked at every validation, LoRA vs
    full fine-tuning. For LoRA the base is the same model with its adapters disabled.
(f) Reproducibility: the seed fixes lora_A's init, the batch order and dropout's masks, so the
    same seed gives bit-identical loss curves (read back from the JSON-lines logs).
(g) fp16 and loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2).
    fp16 keeps 5 exponent bits: its largest value is 65504 and its smallest (subnormal) 6e-8.
    Gradients of a mean loss over thousands of tokens are tiny and flush to 0; multiplying the
    loss by S shifts them up, and S too large overflows to inf. A dynamic scaler (the algorithm
    of torch.amp.GradScaler) halves S and skips the step on inf, and doubles S after N good
    steps. On a CPU we simulate fp16's storage (gradients rounded to float16); on CUDA the real
    fp16 autocast runs too. Last, why the trainable adapters stay fp32 under autocast: an AdamW
    step of ~1e-4 relative to a weight is below half of bf16's spacing (2^-8 relative), so a
    bf16-stored weight never moves, while an fp32 master copy does.
(h) Task sensitivity (the seed's Sec. 11): the same learning rates on two tasks.

Run it: ``python lessons/08_stability_and_evaluation.py`` (a few minutes on a 2-core CPU).
"""
import copy
import json
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from lessons.common import (DEFAULT_TASK, FINETUNE_LR, base_recipe, finetune_config,
                            get_base_model, lesson_dir, matplotlib_pyplot, parse_args,
                            print_table, run_main, save_figure, task_splits, write_summary)
from lora import apply_lora, disable_adapters
from tiny_gpt import exact_match, sample_batch, train
from tiny_gpt.evaluate import logits_of, measure_drift, task_loss
from tiny_gpt.memory.loss_scaling import DynamicLossScaler, Fp16Backward, scaled_fp16_grads
from tiny_gpt.pretrain import corpus_ids
from tiny_gpt.util.torch_compat import cuda_grad_scaler
from tiny_gpt.train import accumulate_gradients, lr_at, make_optimizer

NAME = "08_stability_and_evaluation"
BATCH = 32  # task examples per step, as in every lesson


@dataclass
class Budget:
    sweep_steps: int = 200       # (a), (h): each run of a sweep
    schedule_steps: int = 250    # (b)
    small_n: int = 64            # (c), (d): training examples of the small set
    small_steps: int = 250       # (c)
    stop_steps: int = 1000       # (d): the most early stopping may run
    patience: int = 3            # (d): validations without a new best before stopping
    drift_steps: int = 300       # (e)
    repro_steps: int = 40        # (f)
    amp_steps: int = 60          # (g): each simulated-fp16 run
    eval_every: int = 25         # steps between validations
    drift_windows: tuple = (4, 16, 128)  # (e): batches, windows per batch, window length
    high_lr: float = 0.1         # (a): the too-high learning rate
    test_examples: int = 100     # test prompts scored by exact match (greedy decoding)


# --quick: every code path, a step or two each; the numbers mean nothing.
QUICK = Budget(sweep_steps=2, schedule_steps=2, small_n=16, small_steps=2, stop_steps=6,
               patience=1, drift_steps=2, repro_steps=2, amp_steps=3, eval_every=2,
               drift_windows=(1, 4, 32), test_examples=4)


# --- runs ---------------------------------------------------------------------------------
def lora_copy(base, seed, alpha=16, dropout=0.0):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # lora_A's Kaiming init draws from the global generator
    return apply_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=alpha, dropout=dropout)


def config(args, steps, method="lora", **overrides):
    """The shared recipe with `steps` steps; the last weights are kept unless told otherwise."""
    base = dict(max_steps=steps, warmup_steps=min(50, steps // 3), restore_best=False,
                eval_every=args.budget.eval_every, progress=False)
    return finetune_config(args, method, **{**base, **overrides})


def fit(model, examples, cfg, args, evaluate):
    return train(model, lambda g: sample_batch(examples, BATCH, g), cfg, evaluate,
                 device=args.device)


def val_loss_eval(splits):
    return lambda m: {"val_loss": task_loss(m, splits["val"])}


def accuracy(model, splits, args):
    return exact_match(model, splits["test"][:args.budget.test_examples], args.device)


def tail_mean(values, frac=0.1):
    tail = values[-max(1, int(len(values) * frac)):]
    return sum(tail) / len(tail)


# --- (a) divergence and its fixes, (b) schedules ---------------------------------------
def verdict(losses, learned=0.1):
    """How a run went, from its loss curve: 'learned' if it ends below `learned` x its first
    loss; 'diverged' if it got there and then lost it; else 'never learned'."""
    start, end = losses[0], tail_mean(losses)
    if end != end:  # nan
        return "diverged (nan)"
    if end < learned * start:
        return "learned"
    return "diverged" if min(losses) < learned * start else "never learned"


def divergence(args, base, splits):
    b, hi = args.budget, args.budget.high_lr
    const = dict(warmup_steps=0, schedule="constant")
    runs = {f"lr {hi:g}, constant": dict(lr=hi, **const),
            f"fix: lr {hi / 10:g}": dict(lr=hi / 10, **const),
            "fix: alpha 16 -> 1.6": dict(lr=hi, alpha=1.6, **const),
            f"fix: warmup {b.sweep_steps // 3} + cosine": dict(lr=hi,
                                                                warmup_steps=b.sweep_steps // 3),
            "(seed's fix: dropout 0.1)": dict(lr=hi, dropout=0.1, **const)}
    rows, curves = [], {}
    for label, kw in runs.items():
        model = lora_copy(base, args.seed, kw.pop("alpha", 16), kw.pop("dropout", 0.0))
        res = fit(model, splits["train"], config(args, b.sweep_steps, **kw), args,
                  val_loss_eval(splits))
        curves[label] = res.losses
        rows.append([label, res.losses[0], min(res.losses), tail_mean(res.losses),
                     verdict(res.losses), res.evals[-1][1]["val_loss"],
                     f"{100 * accuracy(model, splits, args):.1f}%"])
    print_table(f"(a) A too-high learning rate, and the fixes (LoRA r=8 Q,V, {b.sweep_steps} "
                "steps each, grad clip 1.0; 'learned': the last 10% of the losses average "
                "below a tenth of the first)",
                ["run", "first loss", "min loss", "last-10% loss", "outcome", "val loss",
                 "test acc"], rows)
    return rows, curves


def schedules(args, base, splits):
    steps, rows, curves = args.budget.schedule_steps, [], {}
    for label, kw in {"constant lr": dict(warmup_steps=0, schedule="constant"),
                      "warmup 50 + cosine": dict(warmup_steps=min(50, steps // 3))}.items():
        model = lora_copy(base, args.seed)
        res = fit(model, splits["train"], config(args, steps, **kw), args, val_loss_eval(splits))
        curves[label] = res.losses
        rows.append([label, tail_mean(res.losses[:max(1, steps // 5)], 0.5), tail_mean(res.losses),
                     res.evals[-1][1]["val_loss"], f"{100 * accuracy(model, splits, args):.1f}%"])
    print_table(f"(b) Warmup + cosine vs constant lr {FINETUNE_LR['lora']:g} ({steps} steps)",
                ["schedule", "loss at 10-20%", "last-10% loss", "val loss", "test acc"], rows)
    return rows, curves


# --- (c) dropout on a small set, (d) early stopping -----------------------------------
def small_set_eval(splits, small):
    return lambda m: {"val_loss": task_loss(m, splits["val"]), "train_loss": task_loss(m, small)}


def dropout_gap(args, base, splits, small):
    rows, curves = [], {}
    for p in (0.0, 0.1):
        model = lora_copy(base, args.seed, dropout=p)
        res = fit(model, small, config(args, args.budget.small_steps), args,
                  small_set_eval(splits, small))
        curves[p] = res.evals
        last = res.evals[-1][1]
        rows.append([p, last["train_loss"], last["val_loss"], last["val_loss"] - last["train_loss"],
                     min(m["val_loss"] for _, m in res.evals),
                     f"{100 * accuracy(model, splits, args):.1f}%"])
    print_table(f"(c) LoRA dropout on {len(small)} training examples ({args.budget.small_steps} "
                f"steps; losses in eval mode at the last step)",
                ["lora_dropout", "train loss", "val loss", "gap", "best val loss", "test acc"],
                rows)
    return rows, curves


def early_stopping(args, base, splits, small, full_length_acc):
    b, last = args.budget, {}
    model = lora_copy(base, args.seed)
    evaluate = small_set_eval(splits, small)

    def evaluate_and_keep(m):  # the stop happens right after a validation: keep those weights
        last.update({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return evaluate(m)

    cfg = config(args, b.stop_steps, patience=b.patience, restore_best=True)
    res = fit(model, small, cfg, args, evaluate_and_keep)
    best_acc = accuracy(model, splits, args)
    model.load_state_dict(last, strict=False)
    last_acc = accuracy(model, splits, args)
    rows = [["stopped early / at step", f"{res.stopped_early} / {res.steps}"],
            ["best step / best val loss", f"{res.best_step} / {res.best_score:.4f}"],
            ["val loss at the stop", f"{res.evals[-1][1]['val_loss']:.4f}"],
            ["test acc, restored best weights", f"{100 * best_acc:.1f}%"],
            ["test acc, last weights (at the stop)", f"{100 * last_acc:.1f}%"],
            [f"test acc, no early stop ({b.small_steps} steps, (c))",
             f"{100 * full_length_acc:.1f}%"]]
    print_table(f"(d) Early stopping on val loss (patience {b.patience} validations x "
                f"{b.eval_every} steps, at most {b.stop_steps} steps, {len(small)} examples)",
                ["", "value"], rows)
    return res, best_acc, last_acc


# --- (e) drift from the base ---------------------------------------------------------------
def lora_base_logits(model):
    def base(idx):
        with disable_adapters(model):
            return model(idx)[0]
    return base


def drift_run(args, base, splits, method, val_ids):
    n_batches, batch_size, seq_len = args.budget.drift_windows
    if method == "lora":
        model = lora_copy(base, args.seed)
        base_fn = lora_base_logits(model)
    else:
        model, frozen = copy.deepcopy(base).requires_grad_(True), copy.deepcopy(base).eval()
        base_fn = logits_of(frozen)

    def evaluate(m):
        d = measure_drift(base_fn, logits_of(m), val_ids, seq_len, n_batches, batch_size,
                          device=args.device)
        return {"val_loss": task_loss(m, splits["val"]), "kl": d["kl"],
                "pretrain_loss": d["tuned_loss"], "base_pretrain_loss": d["base_loss"]}

    model.to(args.device).eval()
    with torch.no_grad():
        start = evaluate(model)
    res = fit(model, splits["train"], config(args, args.budget.drift_steps, method), args,
              evaluate)
    return [(0, start)] + res.evals, accuracy(model, splits, args), model


def drift(args, base, splits):
    val_ids = corpus_ids(base_recipe(args))[1]
    tracks = {m: drift_run(args, base, splits, m, val_ids) for m in ("lora", "full")}
    rows = []
    for (step, lo), (_, fu) in zip(tracks["lora"][0], tracks["full"][0]):
        rows.append([step, lo["val_loss"], lo["kl"], lo["pretrain_loss"], fu["val_loss"],
                     fu["kl"], fu["pretrain_loss"]])
    stride = max(1, len(rows) // 6)
    shown = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    print_table(f"(e) Drift from the base on pretraining text (LoRA lr {FINETUNE_LR['lora']:g} vs "
                f"full fine-tuning lr {FINETUNE_LR['full']:g}, {args.budget.drift_steps} steps; "
                f"base pretraining loss {rows[0][3]:.4f})",
                ["step", "LoRA val", "LoRA KL", "LoRA pretrain", "full val", "full KL",
                 "full pretrain"], shown)
    print_table("(e) Test accuracy after the drift runs", ["method", "test acc"],
                [[m, f"{100 * acc:.1f}%"] for m, (_, acc, _) in tracks.items()])
    return tracks

# --- (f) same seed, same curve -----------------------------------------------------------
def reproducibility(args, base, splits, out):
    """Three runs with LoRA dropout on (so the dropout masks are part of what the seed fixes);
    the loss curves are read back from the runs' JSON-lines logs."""
    curves, adapters = {}, {}
    for label, seed in (("seed A, run 1", args.seed), ("seed A, run 2", args.seed),
                        ("seed B", args.seed + 1)):
        log = out / f"log_{label.replace(' ', '_').replace(',', '')}.jsonl"
        log.unlink(missing_ok=True)  # train() appends to a log; start each run afresh
        model = lora_copy(base, seed, dropout=0.1)
        cfg = config(args, args.budget.repro_steps, seed=seed, log_path=str(log), eval_every=0)
        fit(model, splits["train"], cfg, args, None)
        curves[label] = torch.tensor([json.loads(line)["loss"] for line in open(log)])
        adapters[label] = [p.detach() for p in model.parameters() if p.requires_grad]
    rows = []
    for other in ("seed A, run 2", "seed B"):
        same = all(torch.equal(a, b) for a, b in zip(adapters["seed A, run 1"], adapters[other]))
        rows.append([f"seed A, run 1 vs {other}",
                     (curves["seed A, run 1"] - curves[other]).abs().max().item(),
                     "yes" if same else "no"])
    print_table(f"(f) Reproducibility (LoRA dropout 0.1, {args.budget.repro_steps} steps, "
                f"seeds A={args.seed}, B={args.seed + 1}; curves read from the logs in {out})",
                ["runs", "max |loss difference|", "adapter weights identical"], rows)
    return rows


# --- (g) fp16, loss scaling, and fp32 master weights ---------------------------------------
def fp16_gradient_table(args, model, splits):
    batch = [t.to(args.device) for t in
             sample_batch(splits["train"], BATCH, torch.Generator().manual_seed(args.seed))]
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model(*batch)[1].backward()
    ref = torch.cat([p.grad.flatten() for p in params])  # fp32 reference gradients
    rows = []
    for log2 in (0, 8, 16, 24, 32):
        unscaled, stored, sim = scaled_fp16_grads(model, batch, 2.0 ** log2)
        finite = bool(torch.isfinite(unscaled).all())
        rel = ((unscaled - ref).norm() / ref.norm()).item() if finite else float("inf")
        rows.append([f"2^{log2}", f"{100 * sim.flushed / max(1, sim.nonzero):.2f}%",
                     f"{100 * ((ref != 0) & (stored == 0)).sum().item() / (ref != 0).sum().item():.2f}%",
                     sim.overflowed + int(torch.isinf(stored).sum()), rel])
    model.zero_grad(set_to_none=True)
    print_table("(g1) One batch's gradients with fp16 storage simulated, by loss scale S "
                f"(LoRA adapters of the tuned model; max |fp32 grad| {ref.abs().max():.2e})",
                ["S", "activation grads -> 0", "adapter grads -> 0", "entries -> inf",
                 "rel. error after unscaling"], rows)
    return rows


def amp_run(args, base, splits, scaler, simulate=True, precision="fp32"):
    """A short LoRA run through our own loop: scaled backward, fp16 storage of the grads
    (simulated on CPU, or real autocast with precision='fp16' on CUDA), unscale, clip, step."""
    model = lora_copy(base, args.seed).to(args.device).train()
    cfg = config(args, args.budget.amp_steps)
    torch.manual_seed(cfg.seed)
    gen, optimizer = torch.Generator().manual_seed(cfg.seed), make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, scales, skipped = [], [], 0
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = [sample_batch(splits["train"], BATCH, gen)]
        with Fp16Backward(model) if simulate else nullcontext():
            loss, _ = accumulate_gradients(model, batch, args.device, precision, scaler)
        losses.append(loss)
        before = [p.detach().clone() for p in params]
        if scaler is not None:
            if simulate:  # fp16 training keeps its gradients in fp16: round them to its
                for p in params:  # values (torch refuses an fp16 .grad on an fp32 parameter)
                    p.grad = p.grad.to(torch.float16).to(p.dtype)
            scales.append(scaler.get_scale())
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        skipped += all(torch.equal(b, p) for b, p in zip(before, params))
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "scales": scales, "skipped": skipped, "model": model}


def loss_scaler_runs(args, base, splits):
    g = max(2, args.budget.amp_steps // 6)  # growth interval, short for a short run (torch: 2000)
    runs = {"fp32, no scaler": (None, False),
            "fp16 sim, S = 1 (no scaling)": (DynamicLossScaler(1.0, 1.0, 1.0), True),
            "fp16 sim, static S = 2^32": (DynamicLossScaler(2.0 ** 32, 1.0, 1.0), True),
            f"fp16 sim, dynamic from 2^32, growth every {g}":
                (DynamicLossScaler(2.0 ** 32, growth_interval=g), True)}
    results = {label: amp_run(args, base, splits, scaler, sim)
               for label, (scaler, sim) in runs.items()}
    ref = torch.tensor(results["fp32, no scaler"]["losses"])
    rows = []
    for label, r in results.items():
        diff = (torch.tensor(r["losses"]) - ref).abs()
        rows.append([label, r["skipped"], f"{r['scales'][-1]:.3g}" if r["scales"] else "-",
                     tail_mean(r["losses"]), diff.mean().item()])
    print_table(f"(g2) Loss scaling in training ({args.budget.amp_steps} steps each, same batches)",
                ["run", "steps skipped", "final S", "last-10% loss", "mean |loss - fp32 loss|"],
                rows)
    unscaled_gap = rows[1][-1]
    if unscaled_gap < 0.01:  # say what the run showed, whichever way it went
        print(f"Here S = 1 trained like fp32 (mean |loss difference| {unscaled_gap:.1e}): the "
              "gradients that fp16 flushed to zero (table g1) were not the ones this task "
              "needed. The smaller a model's gradients (a mean over more tokens, deeper "
              "networks), the more of them fall below fp16's 6e-8, and scaling is what keeps "
              "them.\n")
    else:
        print(f"S = 1 drifted from fp32 (mean |loss difference| {unscaled_gap:.2g}): the "
              "gradients flushed to zero in table g1 were missed.\n")
    return results, rows


def cuda_fp16(args, base, splits):
    """Real fp16 autocast on CUDA with torch's GradScaler and with ours, side by side."""
    if args.device.type != "cuda":
        print(f"(g3) real fp16 autocast: skipped -- it needs a CUDA device and this run is on "
              f"'{args.device}'; the simulation in (g1)/(g2) stands in for it.\n")
        return None
    g = max(2, args.budget.amp_steps // 6)
    scalers = {"torch.amp.GradScaler": cuda_grad_scaler(init_scale=2.0 ** 32, growth_interval=g),
               "DynamicLossScaler (this lesson)": DynamicLossScaler(2.0 ** 32,
                                                                    growth_interval=g)}
    results = {k: amp_run(args, base, splits, s, simulate=False, precision="fp16")
               for k, s in scalers.items()}
    same = results["torch.amp.GradScaler"]["scales"] == results[
        "DynamicLossScaler (this lesson)"]["scales"]
    layer = results["torch.amp.GradScaler"]["model"].blocks[0].attn.q_proj
    rows = [[k, r["skipped"], f"{r['scales'][-1]:.3g}", tail_mean(r["losses"])]
            for k, r in results.items()]
    print_table(f"(g3) Real fp16 autocast on {args.device} ({args.budget.amp_steps} steps; "
                f"same scale history: {'yes' if same else 'no'}; adapters stay "
                f"{layer.lora_A.dtype} under autocast)",
                ["scaler", "steps skipped", "final S", "last-10% loss"], rows)
    return same


def master_weights(args, base, steps=100, relative_step=1e-4):
    """AdamW on a real weight matrix, stored in fp32 and in bf16. Adam's step is ~lr per entry,
    set to relative_step times the median |w|; the gradient is a fixed random direction."""
    w0 = base.blocks[0].attn.q_proj.weight.detach().float().cpu().clone()  # (128, 128)
    lr = relative_step * w0.abs().median().item()
    grad = torch.randn(w0.shape, generator=torch.Generator().manual_seed(args.seed))
    final, rows = {}, []
    for label, dtype in (("fp32 weight", torch.float32), ("bf16 weight", torch.bfloat16)):
        p = nn.Parameter(w0.to(dtype, copy=True))  # a copy: w0 stays the start point
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
        for t in range(steps):
            p.grad = grad.to(dtype)
            opt.step()
            if t == 0:
                after_one = (p.detach() != w0.to(dtype)).float().mean().item()
        final[label] = p.detach()
        moved = (p.detach().float() - w0.to(dtype).float()).abs().mean().item()
        rows.append([label, f"{100 * after_one:.1f}%", moved])
    start16, copy16 = w0.to(torch.bfloat16), final["fp32 weight"].to(torch.bfloat16)
    rows.append(["bf16 copy of the fp32 master (what autocast multiplies with)", "-",
                 (copy16.float() - start16.float()).abs().mean().item()])
    print_table(f"(g4) Why adapters stay fp32: AdamW steps of {relative_step:g} x median |w| "
                f"(lr {lr:.2e}) on blocks.0.attn.q_proj.weight, {steps} steps "
                f"(ideal movement {steps * lr:.2e})",
                ["storage", "entries changed by step 1", f"mean |w_{steps} - w_0|"], rows)
    return rows


# --- (h) task sensitivity ----------------------------------------------------------------
def task_sensitivity(args, base):
    lrs, tasks = (3e-3, 1e-2, 3e-2), (DEFAULT_TASK, "swap")
    acc = {}
    for task in tasks:
        splits = task_splits(args, task)
        for lr in lrs:
            model = lora_copy(base, args.seed)
            res = fit(model, splits["train"], config(args, args.budget.sweep_steps, lr=lr), args,
                      val_loss_eval(splits))
            acc[task, lr] = (accuracy(model, splits, args), res.evals[-1][1]["val_loss"])
    rows = [[f"{lr:g}"] + [v for t in tasks for v in (f"{100 * acc[t, lr][0]:.1f}%",
                                                     acc[t, lr][1])] for lr in lrs]
    best = {t: max(lrs, key=lambda lr: (acc[t, lr][0], -acc[t, lr][1])) for t in tasks}
    rows.append(["best lr"] + [v for t in tasks for v in (f"{best[t]:g}", "")])
    print_table(f"(h) One learning rate, two tasks (LoRA r=8 Q,V, {args.budget.sweep_steps} "
                "steps, warmup + cosine)",
                ["lr"] + [f"{t} {w}" for t in tasks for w in ("test acc", "val loss")], rows)
    return best


# --- plots and main ------------------------------------------------------------------------
def smooth(values, k=10):
    t = torch.tensor(values, dtype=torch.float64)
    k = max(1, min(k, len(t)))
    return (t.cumsum(0)[k - 1:] - torch.cat([torch.zeros(1, dtype=t.dtype), t.cumsum(0)[:-k]])) / k


def plot_curves(out, name, title, curves, log_y=True):
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, losses in curves.items():
        ax.plot(smooth(losses).tolist(), lw=1, label=str(label))
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", title=title)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    save_figure(fig, out / name)
    plt.close(fig)


def plot_drift(out, tracks):
    plt = matplotlib_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for method, (evals, _, _) in tracks.items():
        steps = [s for s, _ in evals]
        for ax, key in zip(axes, ("val_loss", "kl", "pretrain_loss")):
            ax.plot(steps, [m[key] for _, m in evals], marker=".", label=method)
    base_loss = tracks["lora"][0][0][1]["base_pretrain_loss"]
    axes[2].axhline(base_loss, color="gray", ls=":", label="base")
    for ax, title in zip(axes, ("task val loss", "KL(base || tuned), pretraining text",
                                "pretraining val loss (forgetting)")):
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=8)
    save_figure(fig, out / "drift.png")
    plt.close(fig)


def plot_small_set(out, gap_curves, stop_res):
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for p, evals in gap_curves.items():
        steps = [s for s, _ in evals]
        line, = ax.plot(steps, [m["val_loss"] for _, m in evals], label=f"val, dropout {p}")
        ax.plot(steps, [m["train_loss"] for _, m in evals], ls="--", color=line.get_color(),
                label=f"train, dropout {p}")
    if stop_res.best_step:
        ax.axvline(stop_res.best_step, color="gray", ls=":", label="early stop: best step")
        ax.axvline(stop_res.steps, color="black", ls=":", label="early stop: stopped")
    ax.set(xlabel="step", ylabel="answer loss", yscale="log", title="Small training set")
    ax.legend(fontsize=7)
    save_figure(fig, out / "small_set.png")
    plt.close(fig)


def add_args(parser):
    parser.add_argument("--high-lr", type=float, default=Budget.high_lr,
                        help="the too-high learning rate of part (a)")


def main(argv=None):
    args = parse_args(__doc__, argv, add_args)
    args.budget = QUICK if args.quick else Budget(high_lr=args.high_lr)
    out = lesson_dir(args, NAME)
    base, _ = get_base_model(args)
    base.eval().requires_grad_(False)
    splits = task_splits(args, DEFAULT_TASK)
    small = splits["train"][:args.budget.small_n]

    div_rows, div_curves = divergence(args, base, splits)
    plot_curves(out, "divergence.png", "(a) too-high lr and its fixes", div_curves)
    sched_rows, sched_curves = schedules(args, base, splits)
    plot_curves(out, "schedules.png", "(b) warmup + cosine vs constant lr", sched_curves)
    gap_rows, gap_curves = dropout_gap(args, base, splits, small)
    no_stop_acc = float(gap_rows[0][-1].rstrip("%")) / 100
    stop_res, best_acc, last_acc = early_stopping(args, base, splits, small, no_stop_acc)
    plot_small_set(out, gap_curves, stop_res)
    tracks = drift(args, base, splits)
    plot_drift(out, tracks)
    repro_rows = reproducibility(args, base, splits, out)
    fp16_rows = fp16_gradient_table(args, tracks["lora"][2], splits)
    scaler_results, scaler_rows = loss_scaler_runs(args, base, splits)
    cuda_same = cuda_fp16(args, base, splits)
    master_rows = master_weights(args, base)
    best_lr = task_sensitivity(args, base)

    final = {m: evals[-1][1] for m, (evals, _, _) in tracks.items()}
    write_summary(args, NAME, {
        "high_lr_last_loss": div_rows[0][3], "lower_lr_last_loss": div_rows[1][3],
        "cosine_vs_constant_last_loss": [sched_rows[1][2], sched_rows[0][2]],
        "dropout_gap": {str(r[0]): r[3] for r in gap_rows},
        "early_stop_step": stop_res.steps, "best_step": stop_res.best_step,
        "acc_restored_best": best_acc, "acc_last": last_acc,
        "kl_lora": final["lora"]["kl"], "kl_full": final["full"]["kl"],
        "pretrain_loss_lora": final["lora"]["pretrain_loss"],
        "pretrain_loss_full": final["full"]["pretrain_loss"],
        "acc_lora": tracks["lora"][1], "acc_full": tracks["full"][1],
        "same_seed_max_diff": repro_rows[0][1], "other_seed_max_diff": repro_rows[1][1],
        "scaler_skipped_steps": scaler_rows[-1][1], "cuda_scalers_agree": cuda_same,
        "bf16_entries_changed": master_rows[1][1], "best_lr": best_lr})
    return 0


if __name__ == "__main__":
    run_main(main)
