"""The LoRA paper's analyses as small functions (Hu et al. 2021, Sec. 7).

Three questions the paper asks about a trained update dW = s B A, and the tools to ask them:

1. Where to spend a parameter budget (Sec. 7.1, Table 5). An adapter of rank r on a layer
   mapping in -> out costs r * (in + out) parameters (A is (r, in), B is (out, r)), so
   comparing target sets fairly means choosing r per set so that the totals match:
   `lora_param_count`, `rank_for_budget`.

2. How much of the rank is used (Sec. 7.2, Fig. 3-4). Take the right-singular vectors of two
   A matrices (A is (r, in): its row space, the input directions the adapter reads, lives in
   R^in). With U_i the top-i of one and U_j the top-j of the other (orthonormal columns),

       phi(A1, A2, i, j) = ||U_i^T U_j||_F^2 / min(i, j)      in [0, 1]

   is 1 when the smaller subspace lies inside the larger and 0 when they are orthogonal.
   Random subspaces of R^d give phi = max(i, j) / d on average (`random_phi`): E||U_i^T U_j||^2
   = i j / d, because each of the i*j entries is an inner product of independent random unit
   directions, whose square averages 1/d.

3. What the update amplifies (Sec. 7.3, Table 7). With U, V the top-r left / right singular
   vectors of dW, project the pretrained W onto dW's subspace, U^T W V (r, r). The
   amplification factor

       ||dW||_F / ||U^T W V||_F

   is large when dW points in directions that W barely uses, and scales them up. Random
   orthonormal U, V (`random_orthonormal`) give the baseline projection ||U^T W V||_F.

All functions take plain tensors and compute in float64, so they also serve the tests.
"""
import torch

from tiny_gpt import masked_cross_entropy

from .inject import lora_layers, match_targets


# --- 1. parameter budgets ------------------------------------------------------------------
def lora_param_count(model, targets, r):
    """Parameters that apply_lora(model, targets, r) would add: sum of r * (in + out)."""
    paths = match_targets(model, targets)
    return sum(r * (m.in_features + m.out_features)
               for m in (model.get_submodule(p) for p in paths))


def rank_for_budget(model, targets, budget):
    """The integer r >= 1 whose lora_param_count is closest to `budget` (the smaller r on a
    tie). The count is linear in r, so r = budget / (count at r=1), rounded."""
    per_rank = lora_param_count(model, targets, 1)
    low = max(1, budget // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - budget), r))


# --- 2. subspace similarity ----------------------------------------------------------------
def right_singular_vectors(a):
    """(k, n) matrix -> (n, k') orthonormal columns: its right-singular vectors, largest
    singular value first (k' = min(k, n))."""
    _, _, vh = torch.linalg.svd(a.detach().double(), full_matrices=False)  # vh (k', n)
    return vh.T


def phi_grid(a1, a2, r1=None, r2=None):
    """phi(a1, a2, i, j) for all 1 <= i <= r1, 1 <= j <= r2, as an (r1, r2) tensor.

    a1 (k1, n), a2 (k2, n): two LoRA A matrices of the same layer (Hu et al. 2021, Sec. 7.2),
    or any matrices acting on R^n, e.g. two updates dW (out, n); r1, r2 (default: all)
    keep only the top r1, r2 right-singular vectors -- the rank, for a dW.
    ||U_i^T U_j||_F^2 is the sum of the squared entries of the top-left (i, j) corner of
    M = V1^T V2, so one matrix product and two cumulative sums give every (i, j) at once."""
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A matrices read different input sizes: {a1.shape} vs {a2.shape}")
    v1 = right_singular_vectors(a1)[:, :r1]                          # (n, r1)
    v2 = right_singular_vectors(a2)[:, :r2]                          # (n, r2)
    overlap = (v1.T @ v2).square()                                   # (r1, r2)
    corner = overlap.cumsum(0).cumsum(1)                             # corner[i-1, j-1]
    i = torch.arange(1, corner.shape[0] + 1, dtype=corner.dtype)[:, None]
    j = torch.arange(1, corner.shape[1] + 1, dtype=corner.dtype)[None, :]
    return corner / torch.minimum(i, j)


def subspace_similarity(a1, a2, i, j):
    """phi(a1, a2, i, j) = ||U_i^T U_j||_F^2 / min(i, j), a float in [0, 1] (Sec. 7.2)."""
    grid = phi_grid(a1, a2)
    if not (1 <= i <= grid.shape[0] and 1 <= j <= grid.shape[1]):
        raise ValueError(f"need 1 <= i <= {grid.shape[0]} and 1 <= j <= {grid.shape[1]}, "
                         f"got i={i}, j={j}")
    return grid[i - 1, j - 1].item()


def random_phi(n, i, j):
    """The average phi of an i- and a j-dimensional random subspace of R^n: max(i, j) / n."""
    return max(i, j) / n


def phi_corners(m_small, m_large, m_seed, rs, rl):
    """The paper's two comparisons (Fig. 3 and Fig. 4) of three matrices acting on the same
    R^n: m_small and m_seed trained at rank rs with two seeds, m_large at rank rl.
    Returns the grids (phi_grid(m_small, m_large, rs, rl), phi_grid(m_small, m_seed, rs, rs))
    and their corners [phi(1, 1), phi(rs, rl)] small vs large, then [phi(1, 1), phi(rs, rs)]
    seed vs seed: do the top directions agree, and do the whole subspaces."""
    g, g_seed = phi_grid(m_small, m_large, rs, rl), phi_grid(m_small, m_seed, rs, rs)
    return (g, g_seed), [g[0, 0].item(), g[-1, -1].item(), g_seed[0, 0].item(),
                         g_seed[-1, -1].item()]


# --- 3. amplification ----------------------------------------------------------------------
def top_singular_subspaces(m, r):
    """Top-r left (out, r) and right (in, r) singular vectors of m (out, in)."""
    u, _, vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
    return u[:, :r], vh[:r].T


def projected_norm(w, u, v):
    """||U^T W V||_F: how much of W acts between the columns of v (input side) and u (output
    side). u (out, r) and v (in, r) have orthonormal columns."""
    return torch.linalg.matrix_norm(u.T @ w.detach().double() @ v).item()  # (r, r) inside


def amplification_factor(delta_w, w, r):
    """||dW||_F / ||U^T W V||_F with U, V the top-r singular vectors of dW (Sec. 7.3)."""
    u, v = top_singular_subspaces(delta_w, r)
    return torch.linalg.matrix_norm(delta_w.detach().double()).item() / projected_norm(w, u, v)


def random_orthonormal(n, r, generator=None):
    """(n, r) orthonormal columns spanning a uniformly random r-dimensional subspace (QR of a
    Gaussian matrix, signs fixed so the distribution is exactly uniform)."""
    g = torch.randn(n, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(rr))[None, :]


def random_projected_norm(w, r, draws=20, seed=0):
    """Mean ||U^T W V||_F over `draws` random orthonormal U (out, r) and V (in, r)."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = w.shape
    norms = [projected_norm(w, random_orthonormal(out, r, gen), random_orthonormal(inp, r, gen))
             for _ in range(draws)]
    return sum(norms) / draws


def amplification_norms(delta_w, w, r, draws=20, seed=0) -> dict:
    """The numbers of the paper's Table 7 for one layer, W (out, in) and its update dW:

        dw, w       ||dW||_F, ||W||_F
        along_dw    ||U^T W V||_F, U, V the top-r singular vectors of dW
        along_w     the same along W's own top-r singular vectors (the most W can give)
        along_rand  the same along random U, V (mean of `draws`)
        amp         ||dW||_F / along_dw: the amplification factor
        vs_rand     ||dW||_F / along_rand"""
    dw_norm = torch.linalg.matrix_norm(delta_w.detach().double()).item()
    along_rand = random_projected_norm(w, r, draws, seed)
    along_dw = projected_norm(w, *top_singular_subspaces(delta_w, r))
    return dict(dw=dw_norm, w=torch.linalg.matrix_norm(w.detach().double()).item(),
                along_dw=along_dw, along_w=projected_norm(w, *top_singular_subspaces(w, r)),
                along_rand=along_rand, amp=dw_norm / along_dw, vs_rand=dw_norm / along_rand)


# --- reading a trained model ---------------------------------------------------------------
def adapter_factors(model):
    """{layer path: (A (r, in), dW (out, in), W0 (out, in))} for every LoRA layer's single
    active adapter, detached. The layers must be unmerged (else W0 would hold dW) and their
    base a float layer (an nn.Linear)."""
    out = {}
    for path, layer in lora_layers(model):
        active = getattr(layer, "active", ["default"])  # several adapters: lora/many
        if layer.merged or len(active) != 1:
            raise ValueError(f"{path}: need one active, unmerged adapter (active "
                             f"{active}, merged {layer.merged})")
        out[path] = (layer.lora_A.detach(), layer.delta_weight().detach(),
                     layer.base.weight.detach())
    return out


def first_step_norm(model, batch, lr):
    """Mean over the LoRA layers of ||dW_1||_F / lr: the update's size after one AdamW step
    (lr) from B = 0 on `batch` (x, y, mask), the model's adapters still at their start.

    Why it measures the scaling rule: AdamW moves every entry by about lr on its first step
    whatever the gradient's size, and with B = 0 only B moves (dL/dA = 0), so
        B_1 = -lr sign(G_B),   dW_1 = s B_1 A = -s lr sign(G_B) A       (out, in)
    a signed sum of A's r rows; with A's rows random that norm grows like a random walk,
    ||dW_1||_F ~ s lr sqrt(r out / 3) for Kaiming-uniform A (|a|^2 ~ 1/3)."""
    x, y, mask = batch
    masked_cross_entropy(model(x)[0], y, mask).backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    norms = [dw.norm().item() for _, dw, _ in adapter_factors(model).values()]
    return sum(norms) / len(norms) / lr
