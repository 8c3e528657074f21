"""minicirc.train against its loops written out by hand: the language model's learning-rate schedule over a run long
enough for a multi-step warm-up, and the SAE's initialisation, L1 warm-up, decoder-norm-weighted penalty and Adam."""
import math

import pytest
import torch

import minicirc
from minicirc import train


def test_train_lm_warms_up_over_a_twentieth_of_the_steps_then_decays():
    """40 steps: warm-up over 2 steps (steps // 20), cosine after; clipping to norm 1 and AdamW as documented.
    Every batch is the one row, so the reference needs no batch draws. The model ends in eval mode."""
    seed = int(torch.randint(0, 10**6, ()).item())
    torch.manual_seed(seed)
    cfg = minicirc.Config(vocab_size=13, d_model=8, n_layers=1, n_heads=2, d_mlp=12, max_len=16)
    model, ref = minicirc.GPTNeoX(cfg), minicirc.GPTNeoX(cfg)
    ref.load_state_dict(model.state_dict())
    pad, steps, lr = 3, 40, 2e-2
    row = torch.randint(4, 13, (1, 9))
    row[0, 7:] = pad
    losses = train.train_lm(model, row, steps=steps, batch_size=1, lr=lr, seed=seed, pad_id=pad, progress=False)
    assert not model.training
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    want, lrs = [], []
    real = torch.tensor([t for t in range(8) if row[0, t + 1] != pad])
    for s in range(steps):
        logp = torch.log_softmax(ref(row[:, :-1])[0], -1)
        loss = -logp[real, row[0, real + 1]].sum() / len(real)
        want.append(loss.item())
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum((gr.double() ** 2).sum().item() for gr in grads))
        grads = [gr * min(1.0, 1.0 / (norm + 1e-6)) for gr in grads]
        step_lr = lr * min(1.0, (s + 1) / 2) * 0.5 * (1 + math.cos(math.pi * s / steps))
        lrs.append(step_lr)
        with torch.no_grad():
            for p, gr, mi, vi in zip(params, grads, m, v):
                p.mul_(1 - step_lr * 0.01)
                mi.mul_(0.9).add_(0.1 * gr)
                vi.mul_(0.98).add_(0.02 * gr * gr)
                p.sub_(step_lr * (mi / (1 - 0.9 ** (s + 1))) / ((vi / (1 - 0.98 ** (s + 1))).sqrt() + 1e-8))
    assert lrs[0] < lrs[1] and lrs[1] > lrs[-1]
    assert losses == pytest.approx(want, rel=2e-3, abs=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(row), ref(row), rtol=2e-3, atol=2e-4)


def test_train_sae_is_the_written_out_loop():
    """train_sae for a few steps against the documented algorithm: inputs scaled to unit RMS; decoder rows random
    with norm 0.1, encoder their transpose, b_enc 0, b_dec the coordinate-wise median; loss = summed squared error
    + l1 * ramp * d * sum_i f_i |W_dec,i| with ramp = step / (0.1 steps) capped at 1; Adam; finally the decoder
    norms and the input scale folded into unit-norm rows."""
    seed = int(torch.randint(0, 10**6, ()).item())
    g = torch.Generator().manual_seed(seed + 1)
    N, d, F, steps, bs, lr, l1 = 64, 5, 12, 20, 16, 3e-3, 3e-2
    acts = 4.0 * torch.randn(N, d, generator=g) + torch.randn(d, generator=g)
    sae, _ = train.train_sae(acts, F, l1=l1, steps=steps, batch_size=bs, lr=lr, seed=seed)

    r = torch.Generator().manual_seed(seed)
    a = acts.double()
    scale = math.sqrt((a ** 2).sum().item() / N / d) + 1e-8
    x_all = a / scale
    W_dec = torch.randn(F, d, generator=r).double()
    W_dec = 0.1 * W_dec / W_dec.norm(dim=1, keepdim=True)
    p = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(F, dtype=torch.float64), "W_dec": W_dec,
         "b_dec": x_all.sort(dim=0).values[(N - 1) // 2].clone()}
    for t in p.values():
        t.requires_grad_(True)
    m = {k: torch.zeros_like(t) for k, t in p.items()}
    v = {k: torch.zeros_like(t) for k, t in p.items()}
    for s in range(steps):
        x = x_all[torch.randint(0, N, (bs,), generator=r)]
        f = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
        err = f @ p["W_dec"] + p["b_dec"] - x
        penalty = sum(f[:, i] * p["W_dec"][i].norm() for i in range(F)).mean()
        loss = (err ** 2).sum() / bs + l1 * min(1.0, s / (0.1 * steps)) * d * penalty
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        with torch.no_grad():
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * grads[k]
                v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
                p[k] -= lr * (m[k] / (1 - 0.9 ** (s + 1))) / ((v[k] / (1 - 0.999 ** (s + 1))).sqrt() + 1e-8)
    with torch.no_grad():
        norms = p["W_dec"].norm(dim=1)
        want = {"W_enc": p["W_enc"] * norms, "b_enc": p["b_enc"] * norms * scale, "W_dec": p["W_dec"] / norms[:, None],
                "b_dec": p["b_dec"] * scale}
    for k, w in want.items():
        torch.testing.assert_close(getattr(sae, k).double(), w, rtol=1e-3, atol=1e-4 * w.abs().max().item(), msg=k)
    # The case where it matters: the penalty was on (some features fire) and moved the weights.
    assert (sae.encode(acts) > 0).any()
