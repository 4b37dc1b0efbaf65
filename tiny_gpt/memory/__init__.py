"""Memory and precision: what a training step holds, and the tricks that make it hold less.

    ledger.py        bytes of weights, gradients, optimizer state and saved activations,
                     measured from the tensors of one real step
    step_time.py     seconds of a step's forward, backward and optimizer phases
    checkpointing.py gradient checkpointing written by hand (and torch's, side by side)
    offload.py       the frozen base kept in CPU memory, one block on the device at a time
    loss_scaling.py  fp16: the dynamic loss scaler and a CPU simulation of fp16 gradients

Import from the modules (``from tiny_gpt.memory.ledger import measure_step``): the model itself
uses checkpointing.py, so this package imports nothing eagerly.
"""
