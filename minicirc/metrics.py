"""Scores of the package: AUROC (threshold-free, SHIFT's probe scores use it) and the demo's interpretability
score, the share of a unit's activation variance that its best single known latent explains."""
import torch

from .errors import MinicircError


def auroc(scores, labels):
    """P(score of a random positive > score of a random negative), ties counting half, for scores (n,) and
    0/1 labels (n,) (tensors or sequences) -> float. Computed as the Mann-Whitney U statistic from average
    ranks in float64: sum of the positives' ranks minus n1 (n1 + 1) / 2 is exactly the pairwise count
    (ranks are half-integers), so the result is that count divided by n1 n0, rounded once."""
    # A tensor stays on its device; anything else is made on the CPU (never on torch's default device).
    scores = (scores if isinstance(scores, torch.Tensor) else torch.as_tensor(scores, device="cpu")).to(torch.float64)
    labels = torch.as_tensor(labels, device=scores.device)
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise MinicircError(f"AUROC needs scores (n,) and labels (n,), got {tuple(scores.shape)} and "
                            f"{tuple(labels.shape)}")
    if not ((labels == 0) | (labels == 1)).all():
        raise MinicircError("AUROC needs labels 0 or 1")
    n1 = int((labels == 1).sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        raise MinicircError("AUROC needs both labels present")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]     # average 1-based rank of each tied group
    return (ranks[labels == 1].sum().item() - n1 * (n1 + 1) / 2) / (n1 * n0)


def best_latent_share(acts, latents, positions=None):
    """Interpretability of units against known binary latents, over every token: for acts (N, U) (N tokens,
    U units) and latents (N, K) of 0/1 -> (share (U,) float64, best (U,) long).

    share = max over latents k of corr(a, L_k)^2: the share of the unit's variance that the best function of
    ONE latent explains (a binary latent admits only a + b L_k, so this is the between-group share of the
    split by L_k). It is the penalty for mixtures: a unit that is the sum of two unrelated latents of equal
    variance scores 1/2 (of m such latents 1/m), because each latent leaves the other's variance unexplained;
    a pure unit scores 1 and noise near 0. Computed over all tokens, not only where a variable is defined, so
    a unit that also fires elsewhere pays for it.

    positions (N,) ints: score within positions instead (units and latents centred on their mean at each
    position, i.e. the partial correlation given the position). In templated sentences a role or a ramp over
    the sentence is a function of the position; with positions given, a unit that only follows the position
    scores 0 and a latent is credited only for what it explains beyond the position.

    Constant latents explain nothing and are skipped; a unit with no variance left (dead, or position only
    when positions are given) scores 0 with best = -1."""
    a = torch.as_tensor(acts, device="cpu").to(torch.float64)
    lat = torch.as_tensor(latents, device="cpu").to(torch.float64)
    if a.dim() != 2 or lat.dim() != 2 or a.shape[0] != lat.shape[0]:
        raise MinicircError(f"best_latent_share needs acts (N, U) and latents (N, K) over the same tokens, got "
                            f"{tuple(a.shape)} and {tuple(lat.shape)}")
    if not ((lat == 0) | (lat == 1)).all():
        raise MinicircError("best_latent_share needs latents of 0 or 1")
    if not torch.isfinite(a).all():
        raise MinicircError("best_latent_share: the activations hold NaN or inf")
    scale = a.abs().amax(0) if len(a) else a.new_zeros(a.shape[1])
    if positions is None:
        a, lat = a - a.mean(0), lat - lat.mean(0)
    else:
        pos = torch.as_tensor(positions, device="cpu").long()
        if pos.shape != (a.shape[0],) or (pos < 0).any():
            raise MinicircError(f"best_latent_share needs positions (N,) of non-negative ints, got {tuple(pos.shape)}")
        a, lat = centred_within(a, pos), centred_within(lat, pos)
    var_a, var_l = (a * a).mean(0), (lat * lat).mean(0)
    cov = a.T @ lat / max(a.shape[0], 1)                            # (U, K)
    # Relative floors: float rounding leaves a constant column a variance of ~1e-32 times its square.
    live_a = var_a > 1e-12 * scale ** 2
    live_l = var_l > 1e-12
    r2 = torch.where(live_a[:, None] & live_l[None], cov ** 2 / (var_a[:, None] * var_l[None]).clamp_min(1e-300),
                     a.new_zeros(())).clamp(0, 1)
    if r2.shape[1] == 0:
        return a.new_zeros(len(var_a)), torch.full((len(var_a),), -1, device="cpu")
    share, best = r2.max(1)
    return torch.where(live_a, share, torch.zeros_like(share)), torch.where(live_a, best, torch.full_like(best, -1))


def centred_within(x, groups):
    """x (N, C) minus the mean of its group (groups (N,) ints) in every column."""
    n = int(groups.max()) + 1 if len(groups) else 0
    sums = x.new_zeros(n, x.shape[1]).index_add_(0, groups, x)
    counts = torch.bincount(groups, minlength=n).to(x.dtype).clamp_min(1)
    return x - (sums / counts[:, None])[groups]
