"""python -m lessons.gpu_check: one line and exit 0 without CUDA; the checks a CPU can run pass
on the CPU; and each check fails, exit status 1, when the path it checks is broken.

The checks train a small GPT here (the command's own is the lessons' tiny GPT), so that the file
runs in seconds; what is checked is the same code path."""
import dataclasses
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from lessons import gpu_check
from tiny_gpt import GPT, GPTConfig

CPU = torch.device("cpu")
SMALL = gpu_check.Subject("small GPT", lambda: GPT(small_config()), vocab=96, batch=4, seq=16)
CPU_CHECKS = ["fp32", "bf16", "4bit", "qlora", "offload"]  # and times, in a test of its own


def small_config():
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(autouse=True)
def small_model(monkeypatch):
    """The small GPT in place of the tiny one, fewer steps and rounds, and no run remembered
    from another test."""
    monkeypatch.setattr(gpu_check, "TINY", SMALL)
    monkeypatch.setattr(gpu_check, "STEPS", 4)
    monkeypatch.setattr(gpu_check, "TIME_ROUNDS", 2)  # the fewest a ratio's spread reads
    monkeypatch.setattr(gpu_check, "TIME_WARMUP", 0)
    gpu_check.train_losses.cache_clear()
    gpu_check.base_model.cache_clear()
    yield
    gpu_check.train_losses.cache_clear()


def check(key, device=CPU):
    """The first check of the table under `key`."""
    return next(fn for k, _, fn in gpu_check.all_checks(device) if k == key)


def results(capsys, argv):
    """main(argv) -> (exit status, {label: result}) read from the progress lines it prints."""
    status = gpu_check.main(argv)
    lines = capsys.readouterr().out.splitlines()
    found = {}
    for line in lines:
        if line.startswith("[") and "] " in line:
            result, label = line[1:].split("] ", 1)
            found[label] = result
    return status, found


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_prints_one_line_and_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "all_checks", None)  # reaching any check would raise
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "No CUDA GPU" in out[0]


def test_only_names_every_check_in_the_table_order():
    keys = [key for key, _, _ in gpu_check.all_checks(CPU)]
    assert list(dict.fromkeys(keys)) == list(gpu_check.CHECK_KEYS)


@pytest.mark.parametrize("argv", [["--device", "mps"], ["--device", "gpu"], ["--dev", "cpu"],
                                  ["--only", "nothing"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(argv)
    assert exit_.value.code == 2
    assert "error" in capsys.readouterr().err


def test_the_checks_a_cpu_can_run_pass_on_the_cpu(capsys):
    status, found = results(capsys, ["--device", "cpu", "--only", *CPU_CHECKS])
    assert status == 0
    assert len(found) == len(CPU_CHECKS) and set(found.values()) == {"pass"}, found


def test_fp16_and_memory_say_why_they_are_skipped_on_a_cpu():
    fp16 = gpu_check.run_check(check("fp16"), CPU)
    memory = gpu_check.run_check(check("memory"), CPU)
    assert fp16[0] == "skipped: fp16 autocast runs on CUDA only (autocast_context refuses " \
                      "it on a CPU)"
    assert memory[0] == "skipped: torch.cuda.max_memory_allocated is CUDA's"


def test_step_times_name_every_recipe_with_its_ratio_to_lora():
    result, measured = gpu_check.run_check(check("times"), CPU)
    assert result == "pass"
    for name in ["full FT", "LoRA bf16", "QLoRA"]:
        assert f"{name} " in measured
    assert measured.count("x [") == 3  # every recipe but LoRA itself, as a ratio with spread


def test_a_loss_that_does_not_fall_fails_and_exits_1(capsys, monkeypatch):
    still = dataclasses.replace(SMALL, lr=0.0)  # the optimizer steps, the weights stay put
    monkeypatch.setattr(gpu_check, "TINY", still)
    status, found = results(capsys, ["--device", "cpu", "--only", "fp32"])
    assert status == 1 and list(found.values()) == ["fail"]


def test_a_16bit_run_that_loses_gradients_fails(monkeypatch):
    """Half the adapters' gradients flushed to zero in the bf16 run (as fp16 without a loss
    scaler would): it lags fp32 by more than LOSS_TOL_16BIT, though its loss still falls."""
    real = gpu_check.accumulate_gradients

    def lossy(model, batch, device, precision="fp32", scaler=None):
        out = real(model, batch, device, precision, scaler)
        if precision == "bf16":
            for name, grad in gpu_check.adapter_grads(model).items():
                if ".0." in name:  # block 0's adapters
                    grad.zero_()
        return out
    monkeypatch.setattr(gpu_check, "accumulate_gradients", lossy)
    ok, measured = check("bf16")(CPU)
    losses = gpu_check.train_losses(SMALL, CPU, "bf16")[0]
    assert not ok and losses[-1] < losses[0], measured


def test_a_qlora_base_that_trains_fails(monkeypatch):
    """prepare_qlora forgetting to freeze the biases: the base changes under the step."""
    real = gpu_check.prepare_qlora

    def leaky(model):
        model = real(model)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
        return model
    monkeypatch.setattr(gpu_check, "prepare_qlora", leaky)
    ok, measured = check("qlora")(CPU)
    assert not ok and "0 frozen tensors changed" not in measured


def test_offload_that_fetches_weights_rounded_fails(monkeypatch):
    """unpack fetching a saved weight through bf16 (a wrong dtype on the way back)."""
    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        home, size, stride, offset = packed
        return home.to(torch.bfloat16).float().as_strided(size, stride, offset)
    monkeypatch.setattr(gpu_check.FrozenBaseOffload, "unpack", unpack)
    ok, measured = check("offload")(CPU)
    assert not ok and "saved weights fetched back" in measured


def test_a_4bit_layer_that_drifts_from_its_twin_fails(monkeypatch):
    """DequantMatmul multiplying with a bf16-rounded weight in the float32 layer."""
    import quant.linear4bit as linear4bit

    class Rounded:
        @staticmethod
        def apply(x, qweight, bias):
            return F.linear(x, qweight.dequantize(torch.bfloat16).to(x.dtype), bias)
    monkeypatch.setattr(linear4bit, "DequantMatmul", Rounded)
    ok, measured = check("4bit")(CPU)
    assert not ok and "float32" in measured


def test_an_error_in_a_check_is_a_failed_row_with_its_message():
    def broken(device):
        raise RuntimeError("expected all tensors to be on the same device\nmore text")
    result, measured = gpu_check.run_check(broken, CPU)
    assert result == "fail"
    assert measured == "RuntimeError: expected all tensors to be on the same device"


def test_lessons_run_as_processes_with_quick_and_the_device(tmp_path, monkeypatch):
    """A fake lessons folder: 98 exits 0 only if given --quick --device cpu --runs; 99 fails."""
    import lessons.__main__ as run_all
    (tmp_path / "lessons").mkdir()
    (tmp_path / "lessons" / "98_fine.py").write_text(textwrap.dedent("""
        import sys
        args = sys.argv[1:]
        ok = "--quick" in args and args[args.index("--device") + 1] == "cpu" and "--runs" in args
        sys.exit(0 if ok else 1)
    """))
    (tmp_path / "lessons" / "99_broken.py").write_text("print('boom: a check failed')\n"
                                                        "raise SystemExit(3)\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path / "lessons")
    assert gpu_check.check_lesson("98", CPU)[0]
    ok, measured = gpu_check.check_lesson("99", CPU)
    assert not ok and measured.startswith("exit 3") and measured.endswith("boom: a check failed")


def test_the_real_checkpoint_row_says_why_it_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiny_gpt.pretrained", None)  # import fails
    rows = [row for row in gpu_check.all_checks(CPU) if row[0] == "real"]
    assert len(rows) == 1
    assert gpu_check.run_check(rows[0][2], CPU)[0] == \
        "skipped: tiny_gpt.pretrained not available"


def test_with_tiny_gpt_pretrained_the_real_model_gets_every_model_check(monkeypatch):
    """A stand-in for the package, with its interface: build_model(shipped_config(name))."""
    fake = types.ModuleType("tiny_gpt.pretrained")
    fake.shipped_config = lambda name: types.SimpleNamespace(name=name, vocab_size=96)
    fake.build_model = lambda config: GPT(small_config())
    monkeypatch.setitem(sys.modules, "tiny_gpt.pretrained", fake)
    rows = [(label, fn) for key, label, fn in gpu_check.all_checks(CPU) if key == "real"]
    assert [label.split(" (")[0] for label, _ in rows] == [
        label.split(" (")[0] for key, label, _ in gpu_check.model_checks(SMALL, None)]
    assert all("(tiny shape, random)" in label for label, _ in rows)  # the CPU's config
    assert gpu_check.run_check(rows[0][1], CPU)[0] == "pass"  # fp32 LoRA steps
