"""The training-step configurations a memory comparison lines up, and one measuring pass over
them: each configuration's ledger (tiny_gpt/memory/ledger.py) and its phases' times
(tiny_gpt/memory/step_time.py), the configurations taking turns.

A configuration is (model, optimizer, precision, micro-batches). Its optimizer runs at lr 0
(idle_adamw, idle_sgd): every step does the full work, and the weights stay put, so the
gradients of every configuration can be compared afterwards.
"""
from ..util.timing import round_robin_phase_medians
from .checkpointing import checkpoint_submodules, enable_input_require_grads
from .ledger import measure_step
from .probes import idle_sgd
from .step_time import idle_adamw, time_step

IMPLS = (None, "torch", "torch_reentrant", "manual")


def with_checkpointing(model, impl=None, parts=None, fix_reentrant=True):
    """Checkpoint every block with ``impl`` (None: no per-block checkpointing), and/or the
    submodules ``parts`` picks (selective checkpointing, e.g. "mlp"), in place -> the model.

    "torch_reentrant" comes with its fix (the embedding's output requires grad, so that frozen
    embeddings do not leave the adapters without gradient) unless ``fix_reentrant`` is False:
    the pitfall itself."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    model.config.gradient_checkpointing, model.config.checkpoint_impl = bool(impl), impl or "torch"
    if impl == "torch_reentrant" and fix_reentrant:
        enable_input_require_grads(model)
    if parts:
        checkpoint_submodules(model, parts, impl="manual")
    return model


def idle_config(model, micro_batches, precision="fp32", sgd=False):
    """(model, optimizer at lr 0 -- SGD with momentum or AdamW --, precision, micro-batches)."""
    return model, idle_sgd(model) if sgd else idle_adamw(model), precision, micro_batches


def measure_configs(configs, repeats, warmup=1):
    """{name: (model, optimizer, precision, micro-batches)} -> ({name: Ledger of one step},
    {name: {phase: median seconds}}), the phases forward, backward, optimizer and total timed
    with the configurations taking turns (round_robin_phase_medians)."""
    ledgers = {n: measure_step(m, mb, o, p) for n, (m, o, p, mb) in configs.items()}
    phases = round_robin_phase_medians(
        {n: (lambda m=m, o=o, p=p, mb=mb: time_step(m, mb, o, p))
         for n, (m, o, p, mb) in configs.items()}, repeats, warmup)
    return ledgers, phases
