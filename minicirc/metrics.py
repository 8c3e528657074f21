"""AUROC, the one threshold-free score of the package: the demo's interpretability (how well a node's
activation predicts a latent variable) and SHIFT's probe scores both use it."""
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
