"""minicirc.train against its loops written out by hand: the SAE's initialisation, L1 warm-up, decoder-norm-weighted
penalty and Adam. (train_lm's loop is written out in test_default.py.)"""
import math

import torch

from minicirc.experiments import train


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


def test_topk_sae_under_bfloat16_matmuls_explains_as_much_as_in_float32():
    """bf16=True runs the SAE's matmuls in bfloat16 (weights and Adam in float32): on sparse data it reaches
    the float32 run's held-out variance explained to within 0.01, and its weights differ from float32's
    (the option does something)."""
    g = torch.Generator().manual_seed(5)
    d, n_dirs = 16, 64
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=1)

    def draw(n):
        idx = torch.rand(n, n_dirs, generator=g).argsort(1)[:, :3]
        coef = torch.zeros(n, n_dirs).scatter(1, idx, torch.rand(n, 3, generator=g) + 0.5)
        return coef @ dirs + 0.01 * torch.randn(n, d, generator=g)
    x, held = draw(4000), draw(1000)
    runs = {bf16: train.train_topk_sae(x, 128, k=4, epochs=8, batch_size=256, seed=1, progress=False, bf16=bf16)[0]
            for bf16 in (False, True)}
    ve = {b: train.sae_stats(sae, held)["variance_explained"] for b, sae in runs.items()}
    assert ve[False] > 0.5 and abs(ve[True] - ve[False]) < 0.01
    assert not torch.equal(runs[True].W_dec, runs[False].W_dec)
