"""Training loops for the embedded default: a tiny GPT-NeoX language model and one SAE per site.

Both are short on purpose (minutes on 2 CPU cores) and deterministic for a seed: batches are drawn from a
seeded generator and nothing depends on wall-clock or thread timing.
"""
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..sae import Dictionary


def train_lm(model, sequences, steps=1500, batch_size=64, lr=3e-3, seed=0, pad_id=0, progress=True):
    """Next-token training on padded sequences (N, T) (pad positions excluded from the loss).
    Returns the list of per-step losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="train language model", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, sequences.shape[0], (batch_size,), generator=g)
        x = sequences[idx]
        logits = model(x[:, :-1])
        target = x[:, 1:].clone()
        target[target == pad_id] = -100
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def collect_activations(model, sequences, pad_id=0, batch_size=256):
    """{site: (n_real_tokens, d_model)} over all non-pad positions."""
    out = {}
    for start in range(0, sequences.shape[0], batch_size):
        x = sequences[start:start + batch_size]
        cache = {}
        model(x, cache=cache)
        mask = x != pad_id
        for s, v in cache.items():
            out.setdefault(s, []).append(v[mask])
    return {s: torch.cat(v) for s, v in out.items()}


def train_sae(acts, n_features, l1=1e-2, steps=1500, batch_size=512, lr=3e-3, seed=0):
    """A ReLU SAE (x - b_dec) @ W_enc + b_enc -> relu -> @ W_dec + b_dec with an L1 penalty weighted by the
    decoder row norms (so shrinking W_dec cannot dodge it). Inputs are the site's activations (N, d).
    Returns (Dictionary with unit-norm decoder rows, stats dict)."""
    g = torch.Generator().manual_seed(seed)
    N, d = acts.shape
    scale = acts.pow(2).sum(-1).mean().sqrt().item() / math.sqrt(d) + 1e-8   # train on unit-RMS inputs
    x_all = acts / scale
    W_dec = torch.randn(n_features, d, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True) * 0.1)
    params = {"W_enc": W_dec.T.clone().contiguous(), "b_enc": torch.zeros(n_features), "W_dec": W_dec,
              "b_dec": x_all.median(dim=0).values.clone()}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    for step in range(steps):
        x = x_all[torch.randint(0, N, (batch_size,), generator=g)]
        f = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        x_hat = f @ params["W_dec"] + params["b_dec"]
        mse = (x_hat - x).pow(2).sum(-1).mean()
        sparsity = (f * params["W_dec"].norm(dim=1)).sum(-1).mean()
        ramp = min(1.0, step / (0.1 * steps))   # L1 warm-up avoids killing features early
        loss = mse + l1 * ramp * sparsity * d
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        norms = params["W_dec"].norm(dim=1).clamp(min=1e-8)
        # Fold the input scale and the decoder norms into the weights: same reconstruction, unit decoder rows.
        sae = Dictionary(params["W_enc"] * norms, params["b_enc"] * norms * scale,
                         params["W_dec"] / norms[:, None], params["b_dec"] * scale, "relu")
        stats = sae_stats(sae, acts)
    return sae, stats


@torch.no_grad()
def sae_stats(sae, acts):
    f = sae.encode(acts)
    x_hat = sae.decode(f)
    resid = (acts - x_hat).pow(2).sum()
    total = (acts - acts.mean(0)).pow(2).sum()
    return {"variance_explained": 1 - (resid / total).item(), "l0": (f != 0).float().sum(-1).mean().item(),
            "dead_fraction": ((f != 0).sum(0) == 0).float().mean().item(), "n_features": sae.n_features}


def train_topk_sae(acts, n_features, k, epochs=4, batch_size=1024, lr=1e-3, aux_k=None, aux_weight=1 / 32, seed=0,
                   progress=True, desc="train top-k SAE", stats_rows=8192, device="cpu", bf16=False):
    """A TopK SAE (Gao et al. 2024): f = topk(relu((x - b_dec) @ W_enc + b_enc), k), x_hat = f @ W_dec + b_dec,
    trained on the mean squared error over `epochs` passes through the site's activations (N, d), shuffled
    by a seeded generator. No sparsity penalty to tune: k fixes L0. Inputs are scaled to unit RMS (folded
    back into the weights at the end), decoder rows are kept at unit norm, W_enc starts as W_dec.T and b_dec
    at the mean. Features that have not fired for a whole epoch's worth of tokens are dead; the auxiliary
    loss (AuxK) lets the `aux_k` (default 2k) largest of them reconstruct what the live ones leave, so they
    get gradient and can come back.
    `device` trains there (the batches are drawn on the CPU generator either way, so a seed gives the same
    order on every device); `bf16` runs the matmuls under bfloat16 autocast (weights, Adam and the loss stay
    float32), 5x the float32 matmul rate on a CPU with AVX-512 bf16.
    Returns (Dictionary of kind "topk" on the CPU, stats on the first `stats_rows` training rows: variance
    explained, L0, dead features; a bounded sample, as a dense encode of every row is N x n_features floats,
    1 GB for a real model's site)."""
    g = torch.Generator().manual_seed(seed)
    N, d = acts.shape
    if N == 0:
        raise ValueError("no activations to train on")
    aux_k = aux_k or 2 * k
    scale = acts.pow(2).sum(-1).mean().sqrt().item() / math.sqrt(d) + 1e-8
    x_all = (acts / scale).to(device)
    W_dec = torch.randn(n_features, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone().contiguous(), "b_enc": torch.zeros(n_features), "W_dec": W_dec,
              "b_dec": x_all.mean(0).cpu()}
    params = {name: p.to(device).requires_grad_(True) for name, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    since_fired = torch.zeros(n_features, dtype=torch.long, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    steps = epochs * -(-N // batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(N, generator=g)
        for start in range(0, N, batch_size):
            x = x_all[order[start:start + batch_size].to(device)]
            with autocast:
                pre = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]).float()
            top = pre.topk(min(k, n_features), dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            with autocast:
                x_hat = (f @ params["W_dec"]).float() + params["b_dec"]
            total = (x - x.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
            loss = (x_hat - x).pow(2).sum(-1).mean() / total
            with torch.no_grad():
                fired = torch.zeros(n_features, dtype=torch.bool, device=device).scatter_(
                    0, top.indices[top.values > 0].flatten(), True)
                since_fired = torch.where(fired, 0, since_fired + x.shape[0])
                dead = since_fired >= N
            if dead.any():
                # AuxK: the dead features' largest pre-activations reconstruct the live ones' residual.
                aux_pre = pre.masked_fill(~dead, 0.0)
                aux = aux_pre.topk(min(aux_k, int(dead.sum())), dim=-1)
                with autocast:
                    e_hat = (torch.zeros_like(pre).scatter(-1, aux.indices, aux.values) @ params["W_dec"]).float()
                e = (x - x_hat).detach()
                loss = loss + aux_weight * (e_hat - e).pow(2).sum(-1).mean() / total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True).clamp(min=1e-8)
            bar.update(1)
            bar.set_postfix(fvu=f"{loss.item():.3f}", dead=int(dead.sum()))
    bar.close()
    with torch.no_grad():
        # Fold the input scale back in: encode(x) = scale * f(x / scale), decode the same rows times scale.
        w = {name: p.detach().cpu() for name, p in params.items()}
        sae = Dictionary(w["W_enc"].clone(), w["b_enc"] * scale, w["W_dec"].clone(), w["b_dec"] * scale, "topk", k=k)
        stats = sae_stats(sae, acts[:stats_rows])
    return sae, stats
