"""The lesson-01 benchmark: its ratios are its own seconds divided, its spread brackets the
median ratio, and torch's thread count comes back even when the benchmark fails (timings
themselves are not tested: the machine is shared)."""
import pytest
import torch

import lora.bench
from lora.bench import benchmark_lora_linear


def test_benchmark_reports_every_variant_as_seconds_over_the_frozen_layers():
    before = torch.get_num_threads()
    result = benchmark_lora_linear(tokens=64, features=16, r=2, repeats=3, threads=1)
    assert torch.get_num_threads() == before and result["threads"] == 1
    # "peft" joins only where peft is installed (it is not a dependency)
    assert set(result["ratio"]) - {"peft"} == {"frozen", "lora", "naive", "autograd"}
    seconds = result["seconds"]
    assert all(s > 0 for s in seconds.values())
    assert result["ratio"] == {k: s / seconds["frozen"] for k, s in seconds.items()}
    for name, spread in result["spread"].items():  # quartiles of the per-round ratios
        assert spread.low <= spread.median <= spread.high, name
    frozen = result["spread"]["frozen"]
    assert (frozen.low, frozen.median, frozen.high) == (1.0, 1.0, 1.0)


def test_the_thread_count_comes_back_when_the_benchmark_fails(monkeypatch):
    def failing(*args):
        assert torch.get_num_threads() == 1  # the benchmark itself ran on one thread
        raise RuntimeError("out of memory")
    monkeypatch.setattr(lora.bench, "_benchmark", failing)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="out of memory"):
        benchmark_lora_linear(threads=1)
    assert torch.get_num_threads() == before


def test_tuned_forms_benchmark_reports_each_form_against_the_reference():
    from lora.bench import benchmark_tuned_forms
    ratios = benchmark_tuned_forms(tokens=64, features=16, r=2, repeats=2)
    assert set(ratios) - {"peft"} == {"reference", "tuned, in place", "tuned, + token split",
                                      "LoRALinear"}
    assert ratios["reference"].median == 1.0  # each ratio is read against the reference
    assert all(r.low <= r.median <= r.high and r.median > 0 for r in ratios.values())
