"""Mutation sweep: put one plausible bug at a time into the hand-written math, run the tests
that should catch it, and report which bugs the suite catches and which survive it.

    python tests/mutation_sweep.py                 # every mutation (tens of minutes on 2 cores)
    python tests/mutation_sweep.py --list          # what each one does, runs nothing
    python tests/mutation_sweep.py --only dora     # those whose name or file holds "dora"
                                                   # (repeat --only for several)
    python tests/mutation_sweep.py --jobs 2        # two at a time, each in its own copy

A mutation is (name, file, exact old text, new text, the pytest selection that should catch
it). The tool copies the tree to a temporary folder -- the working tree is never touched --
and first runs every selection on the unmutated copy: a selection that fails there proves
nothing and its mutations are reported "baseline fails", not counted. Then, one mutation at a
time, it replaces the old text (which must occur exactly once in the file), runs the
selection, and puts the file back:

    caught      the selection failed (a test, or the import of the mutated code)
    survived    every selected test passed with the bug in place: a test is missing
    timed out   the selection ran past --timeout: not counted (a bug that makes a test hang
                is caught in a sense, but a slow, busy machine looks the same); rerun it
    not found   the old text is not in the file exactly once: the code moved or changed;
                re-point the mutation (its file and snippet) rather than count it

Exit status 0 when every counted mutation was caught, 1 otherwise. This is a tool for people
changing the math, not a test: pytest does not collect it (its name does not start with test_).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".git", "runs", "docs", "__pycache__", "*.pyc",
                                     ".pytest_cache")


@dataclass(frozen=True)
class Mutation:
    name: str       # what the bug is, in a few words
    file: str       # path from the repository root
    old: str        # exact text, found exactly once in the file
    new: str        # what it becomes
    tests: tuple    # pytest arguments: files, and -k expressions


def m(name, file, old, new, *tests):
    return Mutation(name, file, old, new, tuple(tests))


FUNCTION = ("tests/test_lora_function.py", "tests/test_lora_dropout.py")
TUNED = ("tests/test_lora_tuned.py", "tests/test_lora_dropout.py")
DORA = ("tests/test_dora.py",)
MIXED = ("tests/test_lora_mixed.py",)
LINEAR4BIT = ("tests/test_quant_linear4bit.py",)
CKPT = ("tests/test_checkpointing.py",)
NF4 = ("tests/test_quant_nf4.py", "tests/test_quant_baselines.py", "tests/test_quant_tuned.py")
LOFTQ = ("tests/test_lora_init.py", "-k", "loftq")
MULTI = ("tests/test_lora_multi.py",)
SCALER = ("tests/test_stability.py",)
TRAIN = ("tests/test_train.py",)
RESUME = ("tests/test_train_resume.py",)
PARALLEL = ("tests/test_parallel.py", "-k", "one_process")
LLAMA = ("tests/test_pretrained_models.py",)
TOKENIZER = ("tests/test_tokenizer.py",)

MUTATIONS = [
    # --- lora/function.py: LoRAFunction, the reference (hand-derived backward) --------------
    m("LoRA forward: s missing from s B", "lora/function.py",
      "+ scaling * (u @ lora_B.t())", "+ (u @ lora_B.t())", *FUNCTION),
    m("LoRA forward: the adapter reads x, not the dropped-out x_d", "lora/function.py",
      "u = x_d @ lora_A.t()", "u = x @ lora_A.t()", *FUNCTION),
    m("LoRA forward: dropout on the frozen path too (W0 reads x_d)", "lora/function.py",
      "y = torch.nn.functional.linear(x, W0, bias)",
      "y = torch.nn.functional.linear(x_d, W0, bias)", *FUNCTION),
    m("LoRA forward: x saved, not x_d (dL/dA without the dropout mask)", "lora/function.py",
      "ctx.save_for_backward(x_d, ", "ctx.save_for_backward(x, ", *FUNCTION),
    m("LoRA backward: dL/dx without the dropout mask (mask in forward only)",
      "lora/function.py", "grad_x = g @ W0 + (vA if mask is None else vA * mask)",
      "grad_x = g @ W0 + vA", *FUNCTION),
    m("LoRA backward: dL/dB without s", "lora/function.py",
      "grad_B = s * (g.t() @ u)", "grad_B = g.t() @ u", *FUNCTION),
    m("LoRA backward: dL/dx without the sBA term", "lora/function.py",
      "vA = v @ lora_A", "vA = 0 * (v @ lora_A)", *FUNCTION),
    m("LoRA backward: s applied twice in dL/dA (v = s g B holds it already)",
      "lora/function.py", "grad_A = v.t() @ x_d", "grad_A = s * (v.t() @ x_d)", *FUNCTION),
    # --- lora/tuned/function.py: TunedLoRAFunction, token_sum_product, split_tokens --------
    m("tuned LoRA forward: s missing from s B", "lora/tuned/function.py",
      "sBt = lora_B.t() * scaling ", "sBt = lora_B.t() ", *TUNED),
    m("tuned LoRA forward: the adapter reads x, not the dropped-out x_d",
      "lora/tuned/function.py", "u = x_d @ lora_A.t()", "u = x @ lora_A.t()", *TUNED),
    m("tuned LoRA backward: dL/dx without the dropout mask (mask in forward only)",
      "lora/tuned/function.py", "grad_x = torch.addcmul(g @ W0, v @ lora_A, mask)",
      "grad_x = g @ W0 + v @ lora_A", *TUNED),
    m("tuned LoRA backward: dL/dB without s", "lora/tuned/function.py",
      "grad_B = product(u, g).t() * s", "grad_B = product(u, g).t()", *TUNED),
    m("tuned LoRA backward: dL/dx without the sBA term", "lora/tuned/function.py",
      "grad_x = (g @ W0).addmm_(v, lora_A)", "grad_x = (g @ W0)", *TUNED),
    m("tuned LoRA backward: s applied twice in dL/dA (v = s g B holds it already)",
      "lora/tuned/function.py", "grad_A = product(v, x_d)", "grad_A = product(v, x_d) * s",
      *TUNED),
    m("token_sum_product: the runs averaged instead of summed", "lora/tuned/function.py",
      "b.reshape(parts, n // parts, b.shape[1])).sum(0)",
      "b.reshape(parts, n // parts, b.shape[1])).mean(0)", *TUNED),
    m("split rule: off by one (512 tokens not split)", "lora/tuned/function.py",
      "return n_tokens >= MIN_SPLIT_TOKENS", "return n_tokens > MIN_SPLIT_TOKENS", *TUNED),
    # --- lora/variants/dora.py: DoRAFunction ------------------------------------------------
    m("DoRA 16-bit forward: s B A without alpha=scaling", "lora/variants/dora.py",
      "z = torch.addmm(x @ weight.t(), u, lora_B.t(), alpha=scaling)",
      "z = torch.addmm(x @ weight.t(), u, lora_B.t())", *DORA),
    m("DoRA backward: dL/dm without / n", "lora/variants/dora.py",
      "grad_m = gc / n", "grad_m = gc", *DORA),
    m("DoRA backward: g_z without the column scale c", "lora/variants/dora.py",
      "\n        g_z = g * c", "\n        g_z = g", *DORA),
    m("DoRA backward: the norm term with the wrong sign", "lora/variants/dora.py",
      "d = -gc * magnitude / n ** 3", "d = gc * magnitude / n ** 3", *DORA),
    m("DoRA backward: the norm term of dL/dB without s", "lora/variants/dora.py",
      "grad_B = grad_B + s * d[:, None] * VAt", "grad_B = grad_B + d[:, None] * VAt", *DORA),
    m("DoRA backward: s where s^2 belongs in the norm term of dL/dA", "lora/variants/dora.py",
      "s * s * ((dB.t() @ lora_B) @ lora_A)", "s * ((dB.t() @ lora_B) @ lora_A)", *DORA),
    m("DoRA backward: dL/dA without s (v = g_z B, not s g_z B)", "lora/variants/dora.py",
      "fused = torch.cat([weight, sB], dim=1)", "fused = torch.cat([weight, lora_B], dim=1)",
      *DORA),
    # --- lora/many/mixed_function.py: MixedLoRAFunction ------------------------------------
    m("mixed backward: dL/dx without the dropout mask", "lora/many/mixed_function.py",
      "grad_x = grad_x * mask", "grad_x = grad_x", *MIXED),
    m("mixed backward: dL/dB without s_j", "lora/many/mixed_function.py",
      "grad_B = grad_sB * scalings[:, None, None]", "grad_B = grad_sB", *MIXED),
    m("mixed backward: dL/dA summed into the wrong adapters' slots",
      "lora/many/mixed_function.py", "grad_A.index_add_(0, rows, per_row)",
      "grad_A.index_add_(0, rows.flip(0), per_row)", *MIXED),
    m("mixed forward: s_j missing", "lora/many/mixed_function.py",
      "sB_rows = (lora_B * scalings[:, None, None]).index_select(0, rows)",
      "sB_rows = lora_B.index_select(0, rows)", *MIXED),
    # --- quant/linear4bit.py: DequantMatmul ------------------------------------------------
    m("DequantMatmul backward: dL/db averaged instead of summed", "quant/linear4bit.py",
      "grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)",
      "grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).mean(0)", *LINEAR4BIT),
    m("DequantMatmul forward: the bias dropped", "quant/linear4bit.py",
      "return F.linear(x, dense(qweight, x.dtype), bias)",
      "return F.linear(x, dense(qweight, x.dtype))", *LINEAR4BIT),
    m("DequantMatmul backward: dL/dx decoded in float32 whatever g's dtype",
      "quant/linear4bit.py", "grad_x = grad_out @ dense(ctx.qweight, grad_out.dtype)",
      "grad_x = (grad_out.float() @ dense(ctx.qweight, torch.float32)).to(torch.bfloat16)",
      *LINEAR4BIT),
    # --- tiny_gpt/memory/checkpointing.py: CheckpointFunction ------------------------------
    m("checkpointing: no fork_rng, the recompute advances the global RNG",
      "tiny_gpt/memory/checkpointing.py",
      "with torch.random.fork_rng(devices=cuda_devices(ctx.device)), torch.enable_grad():",
      "with torch.enable_grad():", *CKPT),
    m("checkpointing: the RNG state not restored before the recompute",
      "tiny_gpt/memory/checkpointing.py", "set_rng_state(ctx.device, ctx.rng)", "pass", *CKPT),
    m("checkpointing: the recompute ignores the forward's autocast state",
      "tiny_gpt/memory/checkpointing.py", "with autocast(ctx.device.type, **ctx.autocast):",
      "with autocast(ctx.device.type, enabled=False):", *CKPT),
    m("checkpointing: parameters not passed as inputs (the reentrant pitfall)",
      "tiny_gpt/memory/checkpointing.py",
      "params = [p for p in module.parameters() if p.requires_grad]", "params = []", *CKPT),
    # --- quant/blockwise.py: the reference -------------------------------------------------
    m("nearest level (bucketize): ties to the upper level", "quant/blockwise.py",
      "torch.bucketize(x, midpoints(code), right=False, out_int32=True)",
      "torch.bucketize(x, midpoints(code), right=True, out_int32=True)", *NF4),
    m("block absmax ignores negative values", "quant/blockwise.py",
      "return blocks.abs().amax(dim=1)", "return blocks.amax(dim=1)", *NF4),
    m("pack: the nibble order flipped", "quant/blockwise.py",
      "return pairs[:, 0] * 16 + pairs[:, 1]", "return pairs[:, 1] * 16 + pairs[:, 0]", *NF4),
    m("unpack: the nibble order flipped", "quant/blockwise.py",
      "torch.stack([packed >> 4, packed & 15], dim=1)",
      "torch.stack([packed & 15, packed >> 4], dim=1)", *NF4),
    m("all-zero block: 1 / 0 instead of 0", "quant/blockwise.py",
      "return torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))",
      "return 1.0 / absmax", *NF4),
    m("dequantize: every block with block 0's scale", "quant/blockwise.py",
      "values = levels.view(-1, blocksize) * scales.unsqueeze(1)",
      "values = levels.view(-1, blocksize) * scales[:1].unsqueeze(1)", *NF4),
    # --- quant/tuned.py: the same codes and values, faster ---------------------------------
    m("tuned quantize: every chunk with chunk 0's scales", "quant/tuned.py",
      "scaled = blocks[start:stop] * inverse[start:stop, None]",
      "scaled = blocks[start:stop] * inverse[:stop - start, None]", *NF4),
    m("tuned block absmax ignores negative values", "quant/tuned.py",
      "return torch.maximum(-lo, hi)", "return hi", *NF4),
    m("cell lookup: ties to the upper level", "quant/tuned.py",
      "return count.add_(y > torch.index_select(inside, 0, cell).view(x.shape))",
      "return count.add_(y >= torch.index_select(inside, 0, cell).view(x.shape))", *NF4),
    m("cell lookup: a midpoint on a cell's lower edge counted below it", "quant/tuned.py",
      "below = (scaled[None, :] < edges[:, None])", "below = (scaled[None, :] <= edges[:, None])",
      *NF4),
    m("cell lookup: cells off by one", "quant/tuned.py",
      "cell = torch.floor(scaled).long() + h ", "cell = torch.floor(scaled).long() + h + 1 ",
      *NF4),
    m("decode in steps: every step with the first step's scales", "quant/tuned.py",
      "torch.mul(levels, scales[blocks, None], out=out[blocks])",
      "torch.mul(levels, scales[: levels.shape[0], None], out=out[blocks])", *NF4),
    m("pair table: high and low nibble swapped", "quant/tuned.py",
      "return torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)",
      "return torch.stack([levels[byte & 15], levels[byte >> 4]], dim=1)", *NF4),
    # --- quant/double_quant.py, quant/nf4.py, quant/qtensor.py ------------------------------
    m("8-bit scale codes: ties to the upper level (bucketize right=True)",
      "quant/double_quant.py",
      "codes = nearest_level(normalised, DYNAMIC_MAP.to(scales.device))",
      "codes = torch.bucketize(normalised, ((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2)"
      ".to(scales.device), right=True, out_int32=True)", *NF4),
    m("double quant: the mean not subtracted", "quant/double_quant.py",
      "groups = to_blocks(scales - offset, SCALE_BLOCKSIZE)",
      "groups = to_blocks(scales, SCALE_BLOCKSIZE)", *NF4),
    m("double quant: the mean not added back", "quant/double_quant.py",
      "scales = scales.mul_(self.absmax.unsqueeze(1)).add_(self.offset).view(-1)",
      "scales = scales.mul_(self.absmax.unsqueeze(1)).view(-1)", *NF4),
    m("double quant: the real scales cut off one place late", "quant/double_quant.py",
      "else scales[: self.count]", "else scales[1: self.count + 1]", *NF4),
    m("dynamic map: one fraction too few a decade", "quant/double_quant.py",
      "bounds = torch.linspace(0.1, 1.0, 2 ** k + 1, dtype=torch.float64)",
      "bounds = torch.linspace(0.1, 1.0, 2 ** k, dtype=torch.float64)", *NF4),
    m("NF4 levels: negative quantiles off by one", "quant/nf4.py",
      "p_neg = torch.linspace(offset, 0.5, half)[:-1].double()",
      "p_neg = torch.linspace(offset, 0.5, half + 1)[:-2].double()", *NF4),
    m("state dict: block count by floor, not ceil", "quant/qtensor.py",
      "n_blocks = -(-shape.numel() // blocksize)  # ceil division",
      "n_blocks = shape.numel() // blocksize", *NF4),
    # --- lora/variants/loftq.py, lora/many/multi.py ----------------------------------------
    m("LoftQ: quantize W every time, no alternation", "lora/variants/loftq.py",
      "q = quantize_4bit((W - low_rank).to(weight.dtype)", "q = quantize_4bit((W).to(weight.dtype)",
      *LOFTQ),
    m("LoftQ: the factors not divided by sqrt(s)", "lora/variants/loftq.py",
      "root = S[:r].sqrt() / math.sqrt(scaling)", "root = S[:r].sqrt()", *LOFTQ),
    m("LoftQ: the low-rank part without s", "lora/variants/loftq.py",
      "low_rank = scaling * B @ A", "low_rank = B @ A", *LOFTQ),
    m("combine cat: B without s_i", "lora/many/multi.py",
      "B = torch.cat([w * a.scaling * a.lora_B for w, a in adapters], 1)",
      "B = torch.cat([w * a.lora_B for w, a in adapters], 1)", *MULTI),
    # --- tiny_gpt/memory/loss_scaling.py -------------------------------------------------
    m("fp16 storage: gradients counted but not rounded", "tiny_gpt/memory/loss_scaling.py",
      "return half.to(grad.dtype)", "return grad", *SCALER),
    m("loss scaler: the good-step count not reset on overflow",
      "tiny_gpt/memory/loss_scaling.py",
      "self._scale *= self.backoff_factor\n            self.good_steps = 0",
      "self._scale *= self.backoff_factor", *SCALER),
    m("loss scaler: unscale_ does not divide", "tiny_gpt/memory/loss_scaling.py",
      "p.grad = p.grad.to(p.dtype) * (1.0 / self._scale)", "p.grad = p.grad.to(p.dtype)",
      *SCALER),
    m("loss scaler: growth one step late", "tiny_gpt/memory/loss_scaling.py",
      "if self.good_steps == self.growth_interval:",
      "if self.good_steps == self.growth_interval + 1:", *SCALER),
    m("loss scaler: steps even when it found inf", "tiny_gpt/memory/loss_scaling.py",
      "if not self.found_inf:\n            optimizer.step()", "optimizer.step()", *SCALER),
    m("loss scaler: a second unscale_ divides again", "tiny_gpt/memory/loss_scaling.py",
      "if id(optimizer) in self.unscaled:", "if False:", *SCALER),
    # --- tiny_gpt/step.py (the step's rules), tiny_gpt/train.py (the driver, LoRA+ groups),
    #     tiny_gpt/checkpoint.py ------------------------------------------------------------
    m("step: the logged loss W times too large under data parallelism", "tiny_gpt/step.py",
      "mean_loss += loss.item() / ranks", "mean_loss += loss.item()", *PARALLEL),
    m("step: each rank's loss not multiplied by W (DDP averages)", "tiny_gpt/step.py",
      "loss = micro_batch_loss(model, x, y, mask, total_tokens) * ranks",
      "loss = micro_batch_loss(model, x, y, mask, total_tokens)", *PARALLEL),
    m("step: accumulation normalised per micro-batch", "tiny_gpt/step.py",
      "loss = micro_batch_loss(model, x, y, mask, total_tokens) * ranks",
      "loss = micro_batch_loss(model, x, y, mask, count_loss_tokens([batch])) * ranks", *TRAIN),
    m("step: tokens counted over every position, not the mask's ones", "tiny_gpt/step.py",
      "return sum(int(m.sum()) if m is not None", "return sum(m.numel() if m is not None",
      *TRAIN),
    m("step: all-reduce on the first micro-batch, not the last", "tiny_gpt/step.py",
      "with sync_unless_last(model, i == len(micro_batches) - 1):",
      "with sync_unless_last(model, i == 0):", *PARALLEL),
    m("step: a step with no loss token divides 0 by 0", "tiny_gpt/step.py",
      "if total_tokens == 0:", "if False:", *TRAIN),
    m("step: clipping inverted", "tiny_gpt/step.py",
      "    if grad_clip:\n        torch.nn.utils.clip_grad_norm_",
      "    if not grad_clip:\n        torch.nn.utils.clip_grad_norm_", *TRAIN),
    m("step: gradients never zeroed between steps", "tiny_gpt/step.py",
      "optimizer.zero_grad(set_to_none=True)", "pass", *TRAIN, *RESUME),
    m("schedule: warmup off by one", "tiny_gpt/step.py",
      "return cfg.lr * (step + 1) / cfg.warmup_steps", "return cfg.lr * step / cfg.warmup_steps",
      *TRAIN),
    m("schedule: cosine counted from step 0, not from the end of warmup", "tiny_gpt/step.py",
      "progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)",
      "progress = step / max(1, cfg.max_steps)", *TRAIN),
    m("schedule: decays to 0, not to lr * min_lr_ratio", "tiny_gpt/step.py",
      "return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)",
      "return cfg.lr * cosine", *TRAIN),
    m("LoRA+: B's group at lr, not at ratio x lr", "tiny_gpt/train.py",
      '"lr_scale": float(cfg.loraplus_lr_ratio)}]', '"lr_scale": 1.0}]', *TRAIN),
    m("LoRA+: the schedule ignores each group's lr_scale", "tiny_gpt/train.py",
      'group["lr"] = lr * group.get("lr_scale", 1.0)', 'group["lr"] = lr', *TRAIN),
    m("LoRA+: B found by a substring of the path", "tiny_gpt/train.py",
      'is_B = [n.rsplit(".", 1)[-1] == "lora_B" for n, _ in named]',
      'is_B = ["lora_B" in n for n, _ in named]', *TRAIN),
    m("train: the best weights not restored at the end", "tiny_gpt/train.py",
      "_load_trainable(self.model, self.best_weights)", "pass", *TRAIN, *RESUME),
    m("resume: torch's RNG state not restored", "tiny_gpt/checkpoint.py",
      'torch.set_rng_state(tensors["rng.torch"])', "pass", *RESUME),
    m("resume: the batch generator's state not restored", "tiny_gpt/checkpoint.py",
      'batch_gen.set_state(tensors["rng.batch"])', "pass", *RESUME),
    m("resume: the optimizer's state not restored", "tiny_gpt/checkpoint.py",
      'optimizer.load_state_dict(_optimizer_state(tensors, trainer.pop("param_groups")))',
      'trainer.pop("param_groups")', *RESUME),
    # --- tiny_gpt/pretrained/llama.py and bpe.py ---------------------------------------------
    m("RoPE: rotate-half with the wrong sign ([x2, -x1] for [-x2, x1])",
      "tiny_gpt/pretrained/llama.py", "return torch.cat([-x2, x1], dim=-1)",
      "return torch.cat([x2, -x1], dim=-1)", *LLAMA),
    m("RMSNorm: eps added after the rsqrt, not inside it", "tiny_gpt/pretrained/llama.py",
      "torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)",
      "(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True)) + self.eps)", *LLAMA),
    m("BPE: merges the first mergeable pair by position, not the lowest rank",
      "tiny_gpt/pretrained/bpe.py",
      "best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, never))",
      "best = next((pair for pair in zip(parts, parts[1:]) if pair in self.ranks), None)",
      *TOKENIZER),
]


def locate(root, mutation):
    """The file's text if the old text occurs in it exactly once, else None."""
    path = root / mutation.file
    if not path.is_file():
        return None
    text = path.read_text()
    return text if text.count(mutation.old) == 1 else None


def run_tests(root, tests, timeout):
    """pytest on `tests` inside `root`, stopping at the first failure -> ("passed", "failed"
    or "timed out", seconds)."""
    start = time.time()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, timeout=timeout)
        result = "passed" if done.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        result = "timed out"
    return result, time.time() - start


def try_mutation(root, mutation, timeout):
    """Apply one mutation inside the copy `root`, run its tests, put the file back."""
    text = locate(root, mutation)
    if text is None:
        return "not found", 0.0
    path = root / mutation.file
    path.write_text(text.replace(mutation.old, mutation.new))
    try:
        result, seconds = run_tests(root, mutation.tests, timeout)
    finally:
        path.write_text(text)
    return {"passed": "survived", "failed": "caught"}.get(result, result), seconds


def make_copies(n):
    """n copies of the tree in a temporary folder: one per worker, never the working tree."""
    base = Path(tempfile.mkdtemp(prefix="mutation_sweep_"))
    copies = [base / f"tree{i}" for i in range(n)]
    for copy in copies:
        shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
    return base, copies


def in_parallel(copies, jobs, fn):
    """fn(copy, item) for every item of `jobs`, each worker keeping its own copy."""
    free = list(copies)

    def work(item):
        root = free.pop()
        try:
            return fn(root, item)
        finally:
            free.append(root)
    with ThreadPoolExecutor(len(copies)) as pool:
        return list(pool.map(work, jobs))


def sweep(mutations, jobs, timeout):
    base, copies = make_copies(jobs)
    try:
        selections = sorted({mu.tests for mu in mutations if locate(copies[0], mu) is not None})
        baseline = dict(zip(selections, in_parallel(
            copies, selections, lambda root, tests: run_tests(root, tests, timeout)[0])))
        for tests, result in baseline.items():
            if result != "passed":
                print(f"baseline {result}, its mutations are not counted: {' '.join(tests)}",
                      flush=True)

        def one(root, mu):
            if locate(root, mu) is not None and baseline[mu.tests] != "passed":
                return "baseline fails", 0.0
            outcome = try_mutation(root, mu, timeout)
            print(f"{outcome[0]:>14}  {outcome[1]:6.1f} s  {mu.file}: {mu.name}", flush=True)
            return outcome
        return [(mu, *outcome) for mu, outcome in zip(mutations, in_parallel(copies, mutations,
                                                                               one))]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def report(results):
    """Print the summary; returns the exit status (0: every counted mutation caught)."""
    by = {}
    for mu, outcome, _ in results:
        by.setdefault(outcome, []).append(mu)
    counted = len(by.get("caught", [])) + len(by.get("survived", []))
    print(f"\ncaught {len(by.get('caught', []))} / tried {counted}")
    for outcome in ("survived", "timed out", "not found", "baseline fails"):
        for mu in by.get(outcome, []):
            print(f"  {outcome}: {mu.file}: {mu.name}")
    return 0 if not by.get("survived") else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--only", action="append", default=[], help="run the mutations whose "
                        "name or file contains this text (repeat it for several)")
    parser.add_argument("--list", action="store_true", help="list the mutations, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at a time (each "
                        "in its own copy of the tree)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per test run")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    chosen = [mu for mu in MUTATIONS
              if not args.only or any(t in mu.name or t in mu.file for t in args.only)]
    if not chosen:
        parser.error(f"no mutation matches --only {args.only}")
    if args.list:
        missing = [mu for mu in chosen if locate(ROOT, mu) is None]
        for mu in chosen:
            found = "   [not found]" if mu in missing else ""
            print(f"{mu.file}: {mu.name}   <- {' '.join(mu.tests)}{found}")
        print(f"\n{len(chosen)} mutations in {len({mu.file for mu in chosen})} files, "
              f"{len(missing)} not found")
        return 0
    return report(sweep(chosen, args.jobs, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
