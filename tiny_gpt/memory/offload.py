"""CPU offload of a frozen base: the frozen block weights live in CPU memory and visit the
accelerator one block at a time, in forward and again in backward (FrozenBaseOffload says how).
"""
import torch

from .ledger import storage_key


class FrozenBaseOffload:
    """CPU offload of the frozen weights of ``model.blocks``: a context manager.

    Inside it, each block's frozen parameters live in CPU memory (pinned, when CUDA is there,
    so copies can overlap compute). A forward pre-hook copies a block's weights to ``device``
    just before the block runs and a forward hook points them back at the CPU copies right after.
    That alone would not free anything: a frozen layer saves its weight for backward (it needs
    dL/dx = g W), and the saved device copy would live until backward. So a saved-tensor hook
    replaces every saved view of an offloaded weight by a note of where it lives (the CPU
    tensor and the view's size, stride and offset) and copies it to the device again when
    backward unpacks it. Device memory then holds one block's frozen weights at a time.

    Only parameters are offloaded: a Linear4bit keeps its 4-bit buffers on the device (its
    backward holds them itself). ``pack`` / ``unpack`` can be chained by SavedTensorMeter.
    On a CPU-only machine it still runs (the "device" copy is then a second CPU tensor), which
    is how the tests check it; it saves nothing there.
    """

    def __init__(self, model, device):
        self.device = torch.device(device)
        self.blocks = list(model.blocks)
        self.frozen = [[p for p in b.parameters() if not p.requires_grad] for b in self.blocks]
        self.home, self.live, self.handles = {}, {}, []
        self.offloaded_saves = 0  # saved tensors replaced by a note (for tests and tables)

    def __enter__(self):
        pin = torch.cuda.is_available()
        for block, params in zip(self.blocks, self.frozen):
            for p in params:
                home = p.data.to("cpu", copy=True)
                self.home[p] = home.pin_memory() if pin else home
                p.data = self.home[p]
            self.handles.append(block.register_forward_pre_hook(self._fetch(params)))
            self.handles.append(block.register_forward_hook(self._evict(params)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        for p, home in self.home.items():
            p.data = home.to(self.device, copy=True)
        self.handles, self.home, self.live = [], {}, {}

    def _fetch(self, params):
        def hook(module, args):
            for p in params:
                p.data = self.home[p].to(self.device, non_blocking=True, copy=True)
                self.live[storage_key(p.data)] = self.home[p]
        return hook

    def _evict(self, params):
        def hook(module, args, output):
            for p in params:
                self.live.pop(storage_key(p.data), None)
                p.data = self.home[p]
        return hook

    def pack(self, t):
        home = self.live.get(storage_key(t))
        if home is None:
            return t
        self.offloaded_saves += 1
        return home, t.size(), t.stride(), t.storage_offset()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        home, size, stride, offset = packed
        return home.to(self.device, non_blocking=True, copy=True).as_strided(size, stride, offset)
