"""The lesson-01 benchmark runs and reports every variant (timings themselves are not tested:
the machine is shared)."""
import torch

from lora.bench import benchmark_lora_linear


def test_benchmark_reports_all_variants_and_restores_threads():
    before = torch.get_num_threads()
    result = benchmark_lora_linear(tokens=64, features=16, r=2, repeats=1, threads=1)
    assert torch.get_num_threads() == before and result["threads"] == 1
    # "peft" joins only where peft is installed (never in CI: it is not a dependency)
    assert set(result["ratio"]) - {"peft"} == {"frozen", "lora", "naive", "autograd"}
    assert result["ratio"]["frozen"] == 1.0 and all(s > 0 for s in result["seconds"].values())


def test_tuned_forms_benchmark_reports_each_form_against_the_reference():
    from lora.bench import benchmark_tuned_forms
    ratios = benchmark_tuned_forms(tokens=64, features=16, r=2, repeats=2)
    assert set(ratios) - {"peft"} == {"reference", "tuned, in place", "tuned, + token split",
                                      "LoRALinear"}
    assert ratios["reference"].median == 1.0  # each ratio is read against the reference
    assert all(r.low <= r.median <= r.high and r.median > 0 for r in ratios.values())
