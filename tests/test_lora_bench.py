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
