"""Loss scaling for fp16, written out: the dynamic loss scaler and a CPU simulation of fp16
gradient storage.

fp16 keeps 5 exponent bits: its largest value is 65504 and its smallest subnormal 6e-8.
Gradients of a mean loss over thousands of tokens are tiny and flush to zero when stored in
fp16; multiplying the loss by S shifts them up, and S too large overflows to inf
(Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2). ``DynamicLossScaler`` is the
algorithm of ``torch.amp.GradScaler``; ``Fp16Backward`` rounds the gradients that flow back
through every linear layer to float16, which is what fp16 autocast stores, so that a CPU run
shows underflow and overflow as a GPU run would.
"""
import torch

from ..util.modules import is_linear_like


class DynamicLossScaler:
    """The algorithm of torch.amp.GradScaler, written out. Used like it:
    scale(loss).backward(); unscale_(opt); [clip]; step(opt); update().

    Scale S starts at init_scale. After a backward of S * loss, unscale_ divides the gradients
    by S (in the parameters' dtype) and looks for inf/nan. step() skips the optimizer step if
    it found any; update() then multiplies S by backoff_factor, or, after growth_interval
    finite steps in a row, by growth_factor. Factors of 1 give a static scale. As with
    GradScaler, unscale_ runs at most once per optimizer between two update() calls: a second
    call would divide the gradients by S again, so it is refused."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self._scale, self.growth_factor = float(init_scale), growth_factor
        self.backoff_factor, self.growth_interval = backoff_factor, growth_interval
        self.good_steps, self.found_inf = 0, None
        self.unscaled = set()  # id() of the optimizers unscaled since the last update()

    def get_scale(self):
        return self._scale

    def scale(self, loss):
        return loss * self._scale

    def unscale_(self, optimizer):
        """grad <- grad / S in the parameter's dtype (an fp16-stored grad comes back to fp32)."""
        if id(optimizer) in self.unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the "
                               "last update(); call it once per step, before clipping")
        self.unscaled.add(id(optimizer))
        self.found_inf = bool(self.found_inf)  # several optimizers: any inf skips the step
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = p.grad.to(p.dtype) * (1.0 / self._scale)
                    self.found_inf |= not bool(torch.isfinite(p.grad).all())

    def step(self, optimizer):
        if id(optimizer) not in self.unscaled:
            self.unscale_(optimizer)
        if not self.found_inf:
            optimizer.step()

    def update(self):
        if self.found_inf:
            self._scale *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self._scale *= self.growth_factor
                self.good_steps = 0
        self.found_inf = None
        self.unscaled.clear()


class Fp16Backward:
    """While active, the gradient flowing back into the output of every linear layer (anything
    with in_features and out_features: nn.Linear, a LoRA-wrapped or a 4-bit one) is rounded
    to float16 -- what fp16 autocast stores, since those outputs are fp16 tensors there. Counts
    the entries that rounding flushed to zero (underflow) or turned into inf (overflow)."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if is_linear_like(m)]
        self.nonzero = self.flushed = self.overflowed = 0

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook_output) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook_output(self, module, inputs, output):
        if output.requires_grad:
            output.register_hook(self._round)

    def _round(self, grad):
        half = grad.to(torch.float16)
        self.nonzero += int((grad != 0).sum())
        self.flushed += int(((grad != 0) & (half == 0)).sum())
        self.overflowed += int((torch.isinf(half) & torch.isfinite(grad)).sum())
        return half.to(grad.dtype)


def scaled_fp16_grads(model, batch, scale):
    """Gradients of scale * loss with fp16 storage simulated, stored as float16, then unscaled
    in float32. Returns (flat unscaled grads, flat stored fp16 grads, Fp16Backward stats)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    with Fp16Backward(model) as sim:
        (model(*batch)[1] * scale).backward()
    stored = torch.cat([p.grad.flatten() for p in params]).to(torch.float16)
    return stored.float() / scale, stored, sim
