"""Gradient checkpointing written by hand: keep a block's input, recompute the rest in backward.

Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost", Sec. 3-4). A network of n
blocks saves every block's intermediate tensors for backward: memory O(n * per-block). If
instead each block is run under no_grad and only its *input* is kept, backward can rebuild the
block's graph when it needs it -- one extra forward per block -- and free it again right after.
What stays alive is n block inputs plus one block's intermediates at a time:

    memory   n * (input)  +  1 * (one block's saved tensors, during its backward)
    compute  forward + backward + one more forward of every checkpointed block

The trade is worst where backward is cheap. With full fine-tuning, backward computes two
matmuls for each forward one (a gradient for the input and one for the weight), so one more
forward is a modest share of the step. With a frozen base (LoRA) the weight gradients are
skipped, backward costs little more than the forward, and the same recompute weighs more.
That is why checkpointing *part* of a model (fewer blocks, or only the MLP or the attention
inside each) is worth measuring; lesson 07 prints the phases and the options.

How the gradients get where they belong (``CheckpointFunction``):

  * forward(x, *params): run the block under no_grad; save x (and the RNG state, so dropout
    draws the same masks when recomputed, and the autocast state, so it computes in the same
    dtypes). The block's trainable parameters are passed in as explicit inputs even though the
    block reaches them by itself: that is what makes the output require grad -- and backward be
    called at all -- when x does not (frozen embeddings under LoRA).
  * backward(g): rebuild the block's graph from a detached copy of x with grad enabled, then
    torch.autograd.grad(out, [x, *params], g) -- gradients of the recomputed output w.r.t.
    x and the very Parameter objects the block uses. They are *returned*, not accumulated by
    hand: the autograd engine adds each into param.grad through this node's edges, exactly as
    for any other input, so gradient accumulation, torch.autograd.grad and gradcheck all work.

``torch.utils.checkpoint(use_reentrant=True)`` does it the other way: it passes only the
tensor inputs, and in backward calls torch.autograd.backward on the recomputed graph, which
writes the parameters' .grad directly. If no input requires grad, its output does not either,
its backward never runs, and every adapter inside gets no gradient. If nothing after the blocks
is trainable either, loss.backward() fails ("element 0 of tensors does not require grad");
if something is (a trained final norm or head), training runs on, with only a UserWarning to
say the adapters learn nothing. Two fixes: the non-reentrant version, or making the blocks'
input require grad (``enable_input_require_grads``, as Hugging Face does).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..util.modules import replace_module, select_paths
from ..util.torch_compat import autocast, autocast_dtype, autocast_enabled

IMPLS = ("torch", "torch_reentrant", "manual")


class CheckpointFunction(torch.autograd.Function):
    """out = run(*inputs), keeping only the inputs for backward (see the module docstring).

    run: callable on n_inputs tensors (or None), returning one tensor. params: the trainable
    parameters that run uses; they are inputs so that they receive gradients."""

    @staticmethod
    def forward(ctx, run, n_inputs, *inputs_and_params):
        inputs, params = inputs_and_params[:n_inputs], inputs_and_params[n_inputs:]
        ctx.run, ctx.n_inputs = run, n_inputs
        ctx.params = params  # leaves: a plain reference, no graph kept alive
        ctx.device = next((t.device for t in inputs if t is not None), torch.device("cpu"))
        ctx.rng = rng_state(ctx.device)
        ctx.autocast = autocast_state(ctx.device)
        ctx.none = [t is None for t in inputs]
        ctx.save_for_backward(*[t for t in inputs if t is not None])
        with torch.no_grad():  # already off inside forward; said out loud here
            return run(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        inputs = [None if none else next(saved).detach().requires_grad_(need)
                  for none, need in zip(ctx.none, ctx.needs_input_grad[2:])]
        with torch.random.fork_rng(devices=cuda_devices(ctx.device)), torch.enable_grad():
            set_rng_state(ctx.device, ctx.rng)
            with autocast(ctx.device.type, **ctx.autocast):
                out = ctx.run(*inputs)
        wanted = [t for t, need in zip([*inputs, *ctx.params], ctx.needs_input_grad[2:])
                  if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (None, None, *[next(grads) if need else None
                              for need in ctx.needs_input_grad[2:]])


def rng_state(device):
    """The CPU generator's state, and the device's when it is CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(device, state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def cuda_devices(device):
    return [device] if device.type == "cuda" else []


def autocast_state(device):
    kind = device.type
    return {"enabled": autocast_enabled(kind), "dtype": autocast_dtype(kind)}


def checkpoint_module(module, *args):
    """module(*args) through CheckpointFunction. args: tensors, None, or tuples of tensors
    (a block's prefix_kv pair), flattened into the Function's inputs and rebuilt in run."""
    flat, layout = [], []
    for a in args:
        items = tuple(a) if isinstance(a, (tuple, list)) else (a,)
        layout.append(len(items) if isinstance(a, (tuple, list)) else 0)
        flat.extend(items)

    def run(*tensors):
        rebuilt, i = [], 0
        for n in layout:
            rebuilt.append(tuple(tensors[i:i + n]) if n else tensors[i])
            i += max(n, 1)
        return module(*rebuilt)

    params = [p for p in module.parameters() if p.requires_grad]
    return CheckpointFunction.apply(run, len(flat), *flat, *params)


def run_checkpointed(module, *args, impl="torch"):
    """module(*args) with its activations recomputed in backward, by the chosen implementation:
    "torch" (torch.utils.checkpoint, non-reentrant), "torch_reentrant", or "manual" (ours)."""
    if impl == "manual":
        return checkpoint_module(module, *args)
    if impl in ("torch", "torch_reentrant"):
        return torch_checkpoint(module, *args, use_reentrant=impl == "torch_reentrant")
    raise ValueError(f"unknown checkpoint implementation {impl!r}; use one of {IMPLS}")


class Checkpointed(nn.Module):
    """Wraps a module so that its forward is checkpointed while training with grad enabled;
    used to checkpoint part of a block (selective checkpointing)."""

    def __init__(self, module, impl="manual"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown checkpoint implementation {impl!r}; use one of {IMPLS}")
        self.module, self.impl = module, impl

    def forward(self, *args, **kwargs):
        """Keyword arguments that are set (the attention's KV cache, when decoding) go straight
        to the module, without checkpointing: a cache is for inference, not for backward."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        if self.training and torch.is_grad_enabled() and not given:
            return run_checkpointed(self.module, *args, impl=self.impl)
        return self.module(*args, **given)


def checkpoint_submodules(model, names, impl="manual"):
    """Wrap every submodule that one of `names` picks (e.g. "mlp", "attn"; matched as LoRA's
    targets are) in Checkpointed, in place. Returns the wrapped paths; a name matching nothing
    is an error, raised before anything is wrapped."""
    submodules = [p for p, _ in model.named_modules() if p]
    paths = select_paths(submodules, names, f"submodule of {type(model).__name__}", "name")
    for path in paths:
        replace_module(model, path, Checkpointed(model.get_submodule(path), impl))
    return paths


def enable_input_require_grads(model):
    """Make the token embedding's output require grad (Hugging Face's fix for reentrant
    checkpointing with a frozen embedding): the first block's input then requires grad, so
    the reentrant checkpoint's backward runs. Returns the hook handle (.remove() undoes it)."""
    def hook(module, args, output):
        return output.requires_grad_(True)
    return model.tok_emb.register_forward_hook(hook)
