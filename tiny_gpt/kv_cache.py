"""A key-value cache for greedy decoding of right-padded prompts.

Decoding token by token without a cache runs the whole sequence again at every step: for a
prompt of L tokens and n new ones, about n * (L + n / 2) token passes. With a cache, each
attention layer keeps the keys and values it has computed, the prompt runs once, and every
step runs only the new token: L + n passes.

Prompts of different lengths share one right-padded buffer (B, W): row b's prompt fills
positions 0 .. L_b - 1 and padding follows. The prompt pass is causal, so no real position sees
the padding to its right. After it, the cache holds W keys per row, of which the first L_b are
real; every new token is appended after them, at slot W + t in the cache but at *position*
L_b + t in the model (its position embedding), and may see:
    the prompt keys j < L_b (not the row's padding),  and every token generated so far.
Attention does not care in which slot a key sits, only what it holds and whether it is seen,
so appending at W + t gives exactly the attention of the unpadded row.
"""
import torch


class KVCache:
    """Per attention layer, the keys and values so far; and which cache slots each row sees.

    lengths: (B,) prompt lengths in a right-padded buffer of width `width`."""

    def __init__(self, lengths: torch.Tensor, width: int):
        self.prompt_seen = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        self.layers = {}  # attention module -> (keys, values), each (B, nh, S, hs)

    def attend(self, layer, k, v):
        """Store this call's k, v (B, nh, T, hs) for `layer`; return the keys and values of
        every slot so far and the mask (B, 1, T, S) of the slots each new position sees."""
        B, _, T, _ = k.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()  # (T, T)
        if layer not in self.layers:  # the prompt pass: causal over the padded buffer
            if T != self.prompt_seen.shape[1]:
                raise ValueError(f"KVCache made for prompts of width {self.prompt_seen.shape[1]}"
                                 f", but the first pass has {T} positions")
            self.layers[layer] = (k, v)
            return k, v, causal
        old_k, old_v = self.layers[layer]
        k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)  # (B, nh, S, hs)
        self.layers[layer] = (k, v)
        old = old_k.shape[2]
        generated = old - self.prompt_seen.shape[1]
        seen = torch.cat([self.prompt_seen,
                          self.prompt_seen.new_ones(B, generated)], dim=1)  # (B, old)
        mask = torch.cat([seen[:, None, :].expand(B, T, old), causal.expand(B, T, T)], dim=2)
        return k, v, mask[:, None]  # (B, 1, T, S)
