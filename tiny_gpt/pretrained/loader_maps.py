"""Where each tensor of a Hugging Face file goes in this package's models, and back.

The Llama family needs no map: module paths follow the files (model.layers.N.self_attn.q_proj,
...), so every file tensor is one parameter, as it is. GPT-2's files differ in two ways:

    c_attn.weight  (C, 3C)  q, k and v fused, stored (in, out) by GPT-2's Conv1D:
                            q_proj.weight = W[:, 0:C]^T,  k_proj = W[:, C:2C]^T,  v_proj = W[:, 2C:3C]^T
    c_attn.bias    (3C,)    q_proj.bias = b[0:C], k_proj.bias = b[C:2C], v_proj.bias = b[2C:3C]
    attn.c_proj, mlp.c_fc, mlp.c_proj   Conv1D too: our nn.Linear weight is their transpose
                            (attn.c_proj is our attn.o_proj)

and the original GPT-2 files name their tensors without the "transformer." prefix. A Part says
how one of our parameters is cut from one file tensor; the same Part, read backwards, puts it
into a file (ours_to_file), which is how this package writes a Hugging Face folder.
"""
from dataclasses import dataclass

import torch

# Keys that carry no weights: the rotary frequencies some Llama files keep, GPT-2's causal
# mask buffers in older files. A tied head saved anyway is the embedding again.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class Part:
    ours: str              # our parameter's name
    kind: str = "as_is"    # "as_is", "T" (transpose), "cols" (W[:, start:stop]^T), "rows"
    start: int = 0
    stop: int = 0

    def take(self, t):
        """The file tensor -> our parameter's values (a view where it can be)."""
        if self.kind == "T":
            return t.T
        if self.kind == "cols":
            return t[:, self.start:self.stop].T
        if self.kind == "rows":
            return t[self.start:self.stop]
        return t


def is_ignored(name, cfg):
    if name.endswith(IGNORED_SUFFIXES):
        return True
    return name == "lm_head.weight" and cfg.tie_word_embeddings


def canonical_name(name, cfg):
    """GPT-2 files from OpenAI's conversion have no "transformer." prefix: add it."""
    if cfg.model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def file_layout(model):
    """{file tensor name: (its shape, [Part, ...])} for the model's config."""
    if model.config.model_type == "gpt2":
        return gpt2_layout(model.config)
    return {name: (tuple(p.shape), [Part(name)]) for name, p in model.state_dict().items()}


def gpt2_layout(cfg):
    C, H = cfg.hidden_size, cfg.intermediate_size
    layout = {}

    def same(name, shape):
        layout[name] = (shape, [Part(name)])

    same("transformer.wte.weight", (cfg.vocab_size, C))
    same("transformer.wpe.weight", (cfg.max_position_embeddings, C))
    for i in range(cfg.num_hidden_layers):
        h = f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            same(f"{h}.{norm}.weight", (C,))
            same(f"{h}.{norm}.bias", (C,))
        qkv = list(enumerate(("q_proj", "k_proj", "v_proj")))
        layout[f"{h}.attn.c_attn.weight"] = ((C, 3 * C), [
            Part(f"{h}.attn.{p}.weight", "cols", j * C, (j + 1) * C) for j, p in qkv])
        layout[f"{h}.attn.c_attn.bias"] = ((3 * C,), [
            Part(f"{h}.attn.{p}.bias", "rows", j * C, (j + 1) * C) for j, p in qkv])
        for file, ours, shape in ((f"{h}.attn.c_proj", f"{h}.attn.o_proj", (C, C)),
                                  (f"{h}.mlp.c_fc", f"{h}.mlp.c_fc", (C, H)),
                                  (f"{h}.mlp.c_proj", f"{h}.mlp.c_proj", (H, C))):
            layout[f"{file}.weight"] = (shape, [Part(f"{ours}.weight", "T")])
            layout[f"{file}.bias"] = ((shape[1],), [Part(f"{ours}.bias")])
    same("transformer.ln_f.weight", (C,))
    same("transformer.ln_f.bias", (C,))
    if not cfg.tie_word_embeddings:
        same("lm_head.weight", (cfg.vocab_size, C))
    return layout


def ours_to_file(state, layout):
    """Our state dict -> {file tensor name: tensor}, every Part put back where it came from."""
    out = {}
    for name, (_, parts) in layout.items():
        kind = parts[0].kind
        if kind == "cols":  # W = [q^T | k^T | v^T]
            out[name] = torch.cat([state[p.ours].T for p in parts], dim=1)
        elif kind == "rows":
            out[name] = torch.cat([state[p.ours] for p in parts], dim=0)
        elif kind == "T":
            out[name] = state[parts[0].ours].T.contiguous()
        else:
            out[name] = state[parts[0].ours]
    return out


def check_against(found, layout, cfg, where):
    """found {canonical file name: shape} against the layout: one ValueError naming every
    missing, unexpected and misshapen tensor, raised before any weight is read."""
    found = {k: v for k, v in found.items() if not is_ignored(k, cfg)}
    missing = sorted(set(layout) - set(found))
    unexpected = sorted(set(found) - set(layout))
    wrong = [f"{k} has shape {tuple(found[k])}, the config needs {layout[k][0]}"
             for k in sorted(set(found) & set(layout)) if tuple(found[k]) != layout[k][0]]
    problems = ([f"missing tensors {_few(missing)}"] if missing else []) + \
        ([f"unexpected tensors {_few(unexpected)}"] if unexpected else []) + wrong[:10]
    if problems:
        raise ValueError(f"{where}: the weights do not fit this config.json "
                         f"({cfg.model_type}, {cfg.num_hidden_layers} layers): "
                         + "; ".join(problems))


def _few(names, n=10):
    return names[:n] + ([f"... {len(names) - n} more"] if len(names) > n else [])
