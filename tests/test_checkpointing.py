"""Hand-written gradient checkpointing: gradients by gradcheck and finite differences, equal to
plain backward and to torch.utils.checkpoint, and the reentrant pitfall with a frozen input."""
import copy
import warnings

import pytest
import torch

from lora import apply_lora, lora_layers
from tiny_gpt import GPT, GPTConfig, VOCAB_SIZE
from tiny_gpt.memory.checkpointing import (IMPLS, checkpoint_module,
                                    checkpoint_submodules, enable_input_require_grads,
                                    run_checkpointed)
from tiny_gpt.util.finite_differences import central_differences
from tiny_gpt.memory.ledger import SavedTensorMeter
from tiny_gpt.model import Block

# float64 throughout: recomputation repeats the very same operations, so results should agree
# to rounding of the last bit; 1e-12 leaves room for summation order and nothing else.
EXACT = dict(rtol=0, atol=1e-12)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which on a busy
    machine costs more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_block(dropout=0.0):
    torch.manual_seed(0)
    return Block(GPTConfig(n_embd=4, n_head=2, block_size=8, dropout=dropout)).double()


def test_gradcheck_input_and_parameters():
    block = tiny_block()
    params = list(block.parameters())
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    # the params passed to gradcheck are the block's own: its in-place perturbations reach run
    assert torch.autograd.gradcheck(lambda x, *ps: checkpoint_module(block, x), (x, *params))


def test_central_finite_differences():
    """dL/dθ = (L(θ + h) - L(θ - h)) / 2h for every entry of x and two weights; L = <out, w>."""
    block = tiny_block()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    (checkpoint_module(block, x) * w).sum().backward()
    h = 1e-6  # float64: truncation error O(h^2) ~ 1e-12, rounding ~ 1e-16 / h ~ 1e-10
    for tensor in (x, block.attn.q_proj.weight, block.mlp.up_proj.weight):
        numeric = central_differences(lambda: (block(x) * w).sum(), tensor, eps=h)
        torch.testing.assert_close(tensor.grad, numeric, rtol=1e-6, atol=1e-8)


def grads_of(model, idx, tgt, seed=1):
    torch.manual_seed(seed)  # the same dropout masks for every model
    loss = model(idx, tgt)[1]
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def gpt64():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)).double()
    idx, tgt = torch.randint(VOCAB_SIZE, (3, 12)), torch.randint(VOCAB_SIZE, (3, 12))
    return model, idx, tgt


def with_checkpointing(model, impl):
    model = copy.deepcopy(model)
    model.config = copy.copy(model.config)
    model.config.gradient_checkpointing, model.config.checkpoint_impl = True, impl
    return model


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_and_every_grad_equal_plain_backward_with_dropout(gpt64, impl):
    model, idx, tgt = gpt64
    loss0, g0 = grads_of(copy.deepcopy(model), idx, tgt)
    loss, g = grads_of(with_checkpointing(model, impl), idx, tgt)
    torch.testing.assert_close(loss, loss0, **EXACT)  # the RNG replay draws the same masks
    for name in g0:
        torch.testing.assert_close(g[name], g0[name], **EXACT)


def test_gradients_accumulate_over_two_backward_passes(gpt64):
    """The Function returns parameter gradients to the engine, which adds them into .grad."""
    model, idx, tgt = gpt64
    plain, ckpt = copy.deepcopy(model), with_checkpointing(model, "manual")
    for m in (plain, ckpt):
        for half in (slice(0, 2), slice(2, 3)):
            torch.manual_seed(1)
            m(idx[half], tgt[half])[1].backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **EXACT)


def test_selective_checkpointing_of_the_mlp_gives_the_same_grads(gpt64):
    model, idx, tgt = gpt64
    _, g0 = grads_of(copy.deepcopy(model), idx, tgt)
    wrapped = copy.deepcopy(model)
    assert checkpoint_submodules(wrapped, "mlp") == ["blocks.0.mlp", "blocks.1.mlp"]
    _, g = grads_of(wrapped, idx, tgt)
    for name in g0:
        torch.testing.assert_close(g[name.replace(".mlp.", ".mlp.module.")], g0[name], **EXACT)


def test_checkpointing_keeps_only_the_block_inputs(gpt64):
    model, idx, tgt = gpt64
    sizes = {}
    for impl in (None, "torch", "manual"):
        m = copy.deepcopy(model) if impl is None else with_checkpointing(model, impl)
        with SavedTensorMeter(m) as meter:
            loss = m(idx, tgt)[1]
        sizes[impl] = meter.bytes
        loss.backward()
    assert sizes["manual"] == sizes["torch"] < sizes[None] / 2


def test_prefix_pairs_get_their_gradients_through_the_function(gpt64):
    model, idx, tgt = gpt64
    kv = [tuple(torch.randn(3, 2, 4, 8, dtype=torch.float64, requires_grad=True)
                for _ in range(2)) for _ in range(2)]
    flat = [t for pair in kv for t in pair]
    grads = []
    for m in (model, with_checkpointing(model, "manual")):
        torch.manual_seed(1)
        m(idx, tgt, prefix_kv=kv)[1].backward()
        grads.append([t.grad.clone() for t in flat])
        for t in flat:
            t.grad = None
    for got, want in zip(*grads[::-1]):
        torch.testing.assert_close(got, want, **EXACT)


def test_recompute_uses_the_forward_autocast_state():
    """bf16 autocast in forward must be replayed in backward: a float32 recompute would give
    gradients that differ at the bf16 rounding level (~1e-2 relative), far above 1e-6."""
    torch.manual_seed(0)
    block = Block(GPTConfig(n_embd=16, n_head=2, block_size=8))
    x = torch.randn(2, 8, 16, requires_grad=True)
    grads = []
    for run in (block, lambda t: checkpoint_module(block, t)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(x)
        out.float().square().sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


# --- the reentrant pitfall: a frozen embedding feeds the first checkpointed block -------------

def lora_model(gpt, impl, train_final_norm=True):
    model = with_checkpointing(gpt, impl)
    torch.manual_seed(2)  # the same adapters for every variant
    apply_lora(model, r=2, alpha=4)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # B = 0 would zero A's gradient anyway
    model.ln_f.requires_grad_(train_final_norm)  # something trainable after the blocks
    return model


def adapter_grads(model):
    return [p.grad for n, p in model.named_parameters() if "lora_" in n]


def test_reentrant_checkpointing_silently_gives_adapters_no_gradient(gpt64):
    model, idx, tgt = gpt64
    broken = lora_model(model, "torch_reentrant")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads_of(broken, idx, tgt)  # no error: ln_f after the blocks still gets a gradient
    assert any("requires_grad" in str(w.message) for w in caught)  # only a warning says so
    assert broken.ln_f.weight.grad is not None
    assert all(g is None for g in adapter_grads(broken))


def test_reentrant_with_only_adapters_trainable_cannot_backward(gpt64):
    model, idx, tgt = gpt64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="does not require grad"):
            grads_of(lora_model(model, "torch_reentrant", train_final_norm=False), idx, tgt)


@pytest.mark.parametrize("fix", ["non-reentrant", "input requires grad", "manual"])
def test_the_fixes_give_the_adapters_their_true_gradients(gpt64, fix):
    model, idx, tgt = gpt64
    plain = lora_model(model, "torch")
    plain.config.gradient_checkpointing = False
    _, want = grads_of(plain, idx, tgt)
    impl = {"non-reentrant": "torch", "manual": "manual"}.get(fix, "torch_reentrant")
    fixed = lora_model(model, impl)
    if fix == "input requires grad":
        enable_input_require_grads(fixed)
    _, got = grads_of(fixed, idx, tgt)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **EXACT)


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint_impl"):
        GPTConfig(checkpoint_impl="magic")
    with pytest.raises(ValueError, match="unknown checkpoint implementation"):
        run_checkpointed(torch.nn.Identity(), torch.zeros(1), impl="magic")


@pytest.mark.parametrize("impl", IMPLS)
def test_the_recompute_leaves_the_global_rng_where_plain_backward_leaves_it(gpt64, impl):
    """The recompute in backward replays the forward's dropout masks from a saved RNG state,
    inside fork_rng: the global generator must come out of backward where it went in. Without
    that, every backward advances it, and the NEXT step's masks differ from a run without
    checkpointing -- invisible in one step, visible in the three compared here (dropout on,
    one seed set once, an SGD step between)."""
    model, idx, tgt = gpt64
    runs = {}
    for name, m in (("plain", copy.deepcopy(model)), ("ckpt", with_checkpointing(model, impl))):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        torch.manual_seed(1)
        losses = []
        for _ in range(3):
            loss = m(idx, tgt)[1]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[name] = losses, torch.get_rng_state()
    assert runs["ckpt"][0] == runs["plain"][0]
    assert torch.equal(runs["ckpt"][1], runs["plain"][1])
