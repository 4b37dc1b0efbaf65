"""tiny_gpt.evaluate: KL(base || tuned) on pretraining text, and the forgetting it goes with."""
import copy

import torch
import torch.nn.functional as F

from tiny_gpt import VOCAB_SIZE
from tiny_gpt.evaluate import kl_divergence, logits_of, measure_drift, next_token_loss

# float64 on both sides, the same sums in a different order: agreement to ~1e-15 relative.
F64_TOL = 1e-10


def _val_ids(n=400, seed=0):
    return torch.randint(VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed))


def test_kl_of_a_model_with_itself_is_exactly_zero(small_model):
    small_model.eval()
    fn = logits_of(small_model)
    out = measure_drift(fn, fn, _val_ids(), seq_len=16, n_batches=2, batch_size=4)
    # identical logits give identical log-probs, so every term p (log p - log p) is exactly 0
    assert out["kl"] == 0.0
    assert out["forgetting"] == 0.0
    assert out["base_loss"] == out["tuned_loss"] > 0


def test_kl_is_nonnegative_on_random_pairs():
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 10.0, 100.0):
        p = scale * torch.randn(64, 7, VOCAB_SIZE, generator=g)
        q = scale * torch.randn(64, 7, VOCAB_SIZE, generator=g)
        per_row = [kl_divergence(p[i], q[i]).item() for i in range(0, 64, 4)]
        # Gibbs' inequality; float32 rounding could only push an exact 0 to ~-1e-7
        assert min(per_row) > 0.0, scale


def test_kl_matches_torch_kl_div_in_float64():
    g = torch.Generator().manual_seed(1)
    base = 3 * torch.randn(5, 11, VOCAB_SIZE, generator=g, dtype=torch.float64)
    tuned = 3 * torch.randn(5, 11, VOCAB_SIZE, generator=g, dtype=torch.float64)
    ours = kl_divergence(base, tuned)
    # kl_div(input=log q, target=log p, log_target=True) sums p (log p - log q); batchmean
    # divides by the number of rows, i.e. averages over positions as ours does
    ref = F.kl_div(F.log_softmax(tuned.flatten(0, 1), -1), F.log_softmax(base.flatten(0, 1), -1),
                   reduction="batchmean", log_target=True)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=F64_TOL, atol=F64_TOL)


def test_kl_is_finite_where_softmax_then_log_is_not():
    """Logits 200 apart: exp underflows in float32, so log(softmax) gives -inf and the naive KL
    is nan; log_softmax keeps every term finite and matches the float64 value."""
    base = torch.tensor([[0.0, 200.0, -200.0]])
    tuned = torch.tensor([[200.0, 0.0, -200.0]])
    naive_log_q = torch.log(torch.softmax(tuned, -1))
    assert torch.isinf(naive_log_q).any()
    ours = kl_divergence(base, tuned)
    exact = kl_divergence(base.double(), tuned.double())
    assert torch.isfinite(ours)
    # float32: ~1e-7 relative on a value of ~200
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=0.0)


def test_bf16_logits_are_compared_in_float32():
    g = torch.Generator().manual_seed(2)
    base, tuned = torch.randn(2, 4, 10, generator=g), torch.randn(2, 4, 10, generator=g)
    out = kl_divergence(base.bfloat16(), tuned.bfloat16())
    assert out.dtype == torch.float32
    # the inputs were rounded to bf16 (8 bits of mantissa): agreement to ~1e-2 relative
    torch.testing.assert_close(out, kl_divergence(base, tuned), rtol=2e-2, atol=1e-3)


def test_next_token_loss_is_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, VOCAB_SIZE, generator=g, dtype=torch.float64)
    targets = torch.randint(VOCAB_SIZE, (3, 5), generator=g)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(next_token_loss(logits, targets), ref, rtol=F64_TOL, atol=F64_TOL)


def test_a_perturbed_model_drifts_and_the_numbers_are_consistent(small_model):
    small_model.eval()
    tuned = copy.deepcopy(small_model)
    with torch.no_grad():  # (a constant shift would do nothing: LayerNorm'd inputs sum to 0)
        w = tuned.blocks[0].attn.v_proj.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(4)))
    ids = _val_ids()
    out = measure_drift(logits_of(small_model), logits_of(tuned), ids, seq_len=16, n_batches=2,
                        batch_size=4)
    assert out["kl"] > 0
    assert out["forgetting"] == out["tuned_loss"] - out["base_loss"]
    # the windows depend only on the seed: a second call gives the same numbers
    again = measure_drift(logits_of(small_model), logits_of(tuned), ids, seq_len=16,
                          n_batches=2, batch_size=4)
    assert again == out
