"""The embedded default (training loops, cache, files). The demo's tests are in test_demo.py."""
import json
import math
import os

import pytest
import torch

import minicirc
from minicirc.experiments import default, train
from minicirc.experiments.tasks import corpus
from minicirc.sae import site_hook


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICIRC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_short_training_lowers_the_loss():
    tok = corpus.build_tokenizer()
    seqs = corpus.training_sequences(tok, 400, seed=int(torch.randint(0, 1000, ()).item()))
    model = minicirc.GPTNeoX(minicirc.Config(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=2,
                                             d_mlp=64, max_len=64))
    losses = train.train_lm(model, seqs, steps=40, batch_size=16, lr=1e-2, seed=0, progress=False)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_sae_training_explains_variance():
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    # Sparse ground truth: each sample is a few of 32 random directions in 16 dims.
    dirs = torch.randn(32, 16, generator=g)
    codes = torch.rand(4000, 32, generator=g) * (torch.rand(4000, 32, generator=g) < 0.1)
    x = codes @ dirs
    sae, stats = train.train_sae(x, 64, steps=400, seed=1)
    assert stats["variance_explained"] > 0.8
    assert 0 < stats["l0"] < 32
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert stats == pytest.approx(train.sae_stats(sae, x))


def _brute_clean_agreement_accuracy(model, tok, n=200, seed=1):
    """Per template, the fraction of held-out examples whose right verb form outscores the wrong one at the
    last prefix token: each prefix encoded on its own, prefixes of one length run together (no padding)."""
    from minicirc.experiments.tasks import agreement
    out = {}
    for template in agreement.TEMPLATES:
        examples = agreement.make_examples(template, n, seed=seed, split="test")
        by_length = {}
        for ex in examples:
            good, bad = (tok.encode(a).ids for a in (ex.clean_answer, ex.patch_answer))
            assert len(good) == len(bad) == 1
            ids = tok.encode(ex.clean_prefix).ids
            by_length.setdefault(len(ids), []).append((ids, good[0], bad[0]))
        right = 0
        with torch.no_grad():
            for rows in by_length.values():
                logits = model(torch.tensor([ids for ids, _, _ in rows]))[:, -1]
                right += sum(int(lg[g] > lg[b]) for lg, (_, g, b) in zip(logits, rows))
        out[template] = right / len(examples)
    return out


def test_saved_default_reproduces_the_in_memory_model(cache, monkeypatch):
    folder = default.default_dir("quick", 3)
    # The cache folder is under $MINICIRC_CACHE and named by recipe and seed.
    assert os.path.dirname(folder) == str(cache)
    assert len({default.default_dir(r, s) for r in ("quick", "full") for s in (3, 4)}) == 4
    seen = []
    real_train_lm = train.train_lm
    with monkeypatch.context() as m:
        m.setattr(train, "train_lm", lambda *a, **kw: seen.append(real_train_lm(*a, **kw)) or seen[-1])
        model, saes, tok, stats = default.make_default(folder, "quick", seed=3, progress=False)
    (losses,) = seen
    assert stats["lm_loss_first"] == losses[0]
    assert stats["lm_loss_last"] == pytest.approx(sum(losses[-50:]) / len(losses[-50:]))
    assert stats["agreement_accuracy"] == pytest.approx(_brute_clean_agreement_accuracy(model, tok))
    assert set(stats["saes"]) == set(model.sites)
    # Ordinary user data: others may read it; no temporary folder is left behind.
    assert os.stat(folder).st_mode & 0o777 == 0o755
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp-default-")]
    # A failure while writing leaves an earlier folder as it was and no temporary folder behind.
    broken = default.default_dir("quick", 5)
    os.makedirs(broken)
    open(os.path.join(broken, "earlier.txt"), "w").close()
    with monkeypatch.context() as m:
        m.setattr(train, "train_lm", lambda model, seqs, steps, **kw: [float(s) for s in range(steps, 0, -1)])
        m.setattr(default, "save_saes", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            default.make_default(broken, "quick", seed=5, progress=False)
    assert os.listdir(broken) == ["earlier.txt"]
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp-default-")]
    # A cached default is loaded, never retrained.
    with monkeypatch.context() as m:
        m.setattr(default, "make_default", lambda *a, **kw: pytest.fail("retrained a cached default"))
        loaded, loaded_saes, loaded_tok, loaded_stats, _ = default.get_default("quick", seed=3, progress=False)
    assert loaded_stats == json.loads(json.dumps(stats))
    tokens = torch.tensor([tok.encode("the author near the guards").ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=1e-6)
    x = torch.randn(5, model.cfg.d_model)
    for s in model.sites:
        torch.testing.assert_close(loaded_saes[s].encode(x), saes[s].encode(x), rtol=1e-5, atol=1e-5)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert set(stats["agreement_accuracy"]) == {"simple", "nounpp", "within_rc", "rc"}
    # Same seed, same files.
    again = default.default_dir("quick", 4)
    assert os.path.dirname(again) == str(cache)
    os.makedirs(os.path.join(again, "model"))
    open(os.path.join(again, "model", "stale.txt"), "w").close()     # an earlier, broken folder is replaced
    default.make_default(again, "quick", seed=3, progress=False)
    assert not os.path.exists(os.path.join(again, "model", "stale.txt"))
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp-default-")]
    for name in ["model/model.safetensors", "saes/resid_out_layer1/ae.pt"]:
        assert (open(os.path.join(folder, name), "rb").read() == open(os.path.join(again, name), "rb").read()), name


def test_auroc_equals_pairwise_count():
    from minicirc.metrics import auroc
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    scores = torch.randint(0, 6, (80,), generator=g).float()   # many ties
    labels = torch.randint(0, 2, (80,), generator=g)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = sum(float(a > b) + 0.5 * float(a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert auroc(scores.numpy(), labels.tolist()) == auroc(scores, labels)      # arrays and lists alike


def _tiny_lm(seed, vocab=23):
    torch.manual_seed(seed)
    return minicirc.GPTNeoX(minicirc.Config(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, d_mlp=24, max_len=32))


@pytest.mark.parametrize("steps, tol", [(3, 1e-4), (40, 2e-3)])
def test_train_lm_is_masked_next_token_adamw(steps, tol):
    """train_lm on one sequence (every batch is that row) against the loop written out: masked next-token
    cross-entropy, gradients clipped to norm 1, AdamW (betas 0.9/0.98, weight decay 0.01), linear warm-up over
    a twentieth of the steps (2 of 40) then cosine decay of the learning rate; the model ends in eval mode.
    40 steps drift further apart in float32 rounding, hence the wider tolerance."""
    import copy
    seed = int(torch.randint(0, 10**6, ()).item())
    model, pad, lr = _tiny_lm(seed), 5, 1e-2
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(6, 23, (1, 12), generator=g)
    row[0, 8:] = pad
    ref = copy.deepcopy(model)
    losses = train.train_lm(model, row, steps=steps, batch_size=2, lr=lr, seed=seed, pad_id=pad, progress=False)
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    want, lrs = [], []
    for s in range(steps):
        logits = ref(row[:, :-1])[0]
        terms = [-torch.log_softmax(logits[t], -1)[row[0, t + 1]] for t in range(11) if row[0, t + 1] != pad]
        loss = sum(terms) / len(terms)
        want.append(loss.item())
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((gr ** 2).sum() for gr in grads))
        grads = [gr * min(1.0, 1.0 / (norm.item() + 1e-6)) for gr in grads]
        warmup = max(1, steps // 20)
        step_lr = lr * min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
        with torch.no_grad():
            for p, gr, mi, vi in zip(params, grads, m, v):
                p.mul_(1 - step_lr * 0.01)
                mi.mul_(0.9).add_(0.1 * gr)
                vi.mul_(0.98).add_(0.02 * gr * gr)
                p.sub_(step_lr * (mi / (1 - 0.9 ** (s + 1))) / ((vi / (1 - 0.98 ** (s + 1))).sqrt() + 1e-8))
        lrs.append(step_lr)
    assert not model.training
    if steps >= 40:   # a multi-step warm-up: the rate rises, then decays
        assert lrs[0] < lrs[1] and lrs[1] > lrs[-1]
    assert losses == pytest.approx(want, rel=tol, abs=1e-6)
    # Compared through the outputs: the key bias has a zero gradient (softmax ignores it), which Adam turns
    # into rounding-noise updates that change nothing downstream.
    with torch.no_grad():
        torch.testing.assert_close(model(row), ref(row), rtol=tol, atol=10 * tol)


def test_collect_activations_keeps_every_real_token_in_order():
    seed = int(torch.randint(0, 10**6, ()).item())
    model, pad = _tiny_lm(seed), 4
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(5, 23, (7, 9), generator=g)
    for i, n in enumerate(torch.randint(1, 10, (7,), generator=g).tolist()):
        seqs[i, n:] = pad
    got = train.collect_activations(model, seqs, pad_id=pad, batch_size=3)
    assert set(got) == set(model.sites)
    want = {s: [] for s in model.sites}
    with torch.no_grad():
        for i in range(7):
            cache = {}
            model(seqs[i:i + 1], cache=cache)
            for t in range(9):
                if seqs[i, t] != pad:
                    for s in model.sites:
                        want[s].append(cache[s][0, t])
    for s in model.sites:
        torch.testing.assert_close(got[s], torch.stack(want[s]), rtol=1e-5, atol=1e-6)


def test_sae_stats_by_their_definitions():
    import numpy as np
    from minicirc.sae import Dictionary
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    d, F, N = 6, 10, 50
    b_enc = torch.randn(F, generator=g) - 0.5
    b_enc[:3] = -100.0                       # three features that never fire
    sae = Dictionary(torch.randn(d, F, generator=g), b_enc, torch.randn(F, d, generator=g),
                     torch.randn(d, generator=g), "relu")
    acts = 3.0 + torch.randn(N, d, generator=g)      # far from zero mean: centring matters
    got = train.sae_stats(sae, acts)
    x, f = acts.double().numpy(), sae.encode(acts).double().numpy()
    x_hat = sae.decode(sae.encode(acts)).double().numpy()
    ve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    l0 = np.mean([np.count_nonzero(row) for row in f])
    dead = np.mean([not f[:, j].any() for j in range(F)])
    assert dead >= 0.3 and 0 < l0 < F
    assert got == pytest.approx({"variance_explained": ve, "l0": l0, "dead_fraction": dead, "n_features": F},
                                rel=1e-5, abs=1e-6)


def test_train_sae_does_not_depend_on_the_input_scale():
    """Training runs on unit-RMS inputs, so activations scaled by c (a power of two) give the same dictionary up
    to that scale: encode(c x) = c encode(x) and decode(encode(c x)) = c decode(encode(x))."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    dirs = torch.randn(24, 12, generator=g)
    x = (torch.rand(1500, 24, generator=g) * (torch.rand(1500, 24, generator=g) < 0.1)) @ dirs + 0.5
    c = 2.0 ** int(torch.randint(5, 9, (), generator=g))
    sae, _ = train.train_sae(x, 32, steps=150, seed=2)
    big, _ = train.train_sae(c * x, 32, steps=150, seed=2)
    rms = x.pow(2).mean().sqrt()
    torch.testing.assert_close(big.encode(c * x) / c, sae.encode(x), rtol=0, atol=1e-3 * rms.item())
    torch.testing.assert_close(big.decode(big.encode(c * x)) / c, sae.decode(sae.encode(x)), rtol=0,
                               atol=1e-3 * rms.item())


def test_auroc_of_one_class_is_undefined():
    from minicirc.errors import MinicircError
    from minicirc.metrics import auroc
    scores = torch.rand(int(torch.randint(1, 20, ()).item()))
    for label in (0, 1):
        with pytest.raises(MinicircError, match="both labels"):
            auroc(scores, [label] * len(scores))
    with pytest.raises(MinicircError, match="labels 0 or 1"):
        auroc(scores, [2] * len(scores))
    with pytest.raises(MinicircError, match=r"scores \(n,\)"):
        auroc(scores[:, None], [0, 1] * (len(scores) // 2) + [0] * (len(scores) % 2))


def test_monosemantic_on_synthetic_units():
    """Units built from known latents against np.corrcoef written out per (unit, latent): a pure unit (one
    latent, scaled, plus a little noise) and a negated one are monosemantic; the sum of two independent
    latents, a position-only unit, noise and a dead unit are not."""
    import numpy as np
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    N, T = 3000, 6
    latents = (torch.rand(N, 4, generator=g) < torch.tensor([0.3, 0.3, 0.5, 0.2])).double()
    position = torch.arange(N) % T
    noise = torch.randn(N, generator=g)
    units = torch.stack([
        2.0 * latents[:, 0] + 0.05 * noise,         # pure
        latents[:, 0] + latents[:, 1],              # mixture of two latents
        position.double(),                          # position only
        torch.randn(N, generator=g),                # noise
        torch.zeros(N),                             # dead
        1.0 - 3.0 * latents[:, 3],                  # pure, negated
        latents[:, 2] * (1 + 0.2 * noise.abs()),    # pure with a varying magnitude
    ], dim=1)
    mask, best, best_r = default.monosemantic(units, latents)
    want_r = []
    for u in range(units.shape[1]):
        rs = [0.0 if units[:, u].std() == 0 else abs(np.corrcoef(units[:, u].numpy(), latents[:, k].numpy())[0, 1])
              for k in range(latents.shape[1])]
        want_r.append(max(rs))
        if rs[int(best[u])] > 0:
            assert rs[int(best[u])] == pytest.approx(max(rs), abs=1e-12)
    assert best_r.tolist() == pytest.approx(want_r, abs=1e-9)
    assert mask.tolist() == [r >= default.MONOSEMANTIC_R for r in want_r]
    assert mask.tolist() == [True, False, False, False, False, True, True]
    assert best[0] == 0 and best[5] == 3 and best[6] == 2


def test_monosemantic_shares_count_units_of_each_site(monkeypatch):
    """monosemantic_shares on a tiny random model equals `monosemantic` applied by hand to the site's
    values and SAE codes over the held-out prefixes, with rare latents left out."""
    from minicirc.sae import Dictionary
    from minicirc.experiments.tasks import agreement
    tok = corpus.build_tokenizer()
    torch.manual_seed(0)
    model = minicirc.GPTNeoX(minicirc.Config(vocab_size=tok.get_vocab_size(), d_model=16, n_layers=1, n_heads=2,
                                             d_mlp=32, max_len=16)).eval()
    saes = {}
    for s in model.sites:
        W = torch.randn(16, 40)
        saes[s] = Dictionary(W, torch.zeros(40) - 0.5, W.T / W.T.norm(dim=1, keepdim=True), torch.zeros(16), "relu")
    got = default.monosemantic_shares(model, saes, tok, n=20, seed=0)
    rows, acts = [], {s: [] for s in model.sites}
    for template in agreement.TEMPLATES:
        for ex in agreement.make_examples(template, 20, seed=0, split="test"):
            cache = {}
            with torch.no_grad():
                model(torch.tensor([tok.encode(ex.clean_prefix).ids]), cache=cache)
            for s in model.sites:
                acts[s].append(cache[s][0])
            lat = agreement.token_latents(ex)
            rows += [[lat[k][t] for k in agreement.latent_names()] for t in range(len(ex.clean_prefix.split()))]
    latents = torch.tensor(rows, dtype=torch.float64)
    latents = latents[:, latents.sum(0) >= default.MIN_POSITIVES]
    assert got["n_latents"] == latents.shape[1] and got["n_tokens"] == latents.shape[0]
    for s in model.sites:
        v = torch.cat(acts[s])
        with torch.no_grad():
            f = saes[s].encode(v)
        assert got["sites"][s]["neurons"] == pytest.approx(default.monosemantic(v, latents)[0].double().mean().item())
        assert got["sites"][s]["features"] == pytest.approx(default.monosemantic(f, latents)[0].double().mean().item())
        assert got["sites"][s]["features_alive"] == pytest.approx((f != 0).any(0).double().mean().item())


def test_shipped_default_reproduces_its_recorded_stats():
    """The package's files load without training and give the numbers stats.json records: agreement
    accuracy (also by the brute-force count, >= 95% per template), each SAE's variance explained / L0 /
    dead share on the corpus rows it was trained on, the monosemantic shares; safetensors/json, <= 20 MB."""
    folder = default.SHIPPED
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    sites = ["embed"] + [f"{k}_{l}" for l in range(3) for k in ("attn", "mlp", "resid")]
    assert files == sorted(["model/config.json", "model/model.safetensors", "model/tokenizer.json", "stats.json"] +
                           [f"saes/{site_hook(s)}/{f}" for s in sites for f in ("cfg.json", "sae_weights.safetensors")])
    assert all(f.endswith(".json") or f.endswith(".safetensors") for f in files)
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in files) <= 20 * 2**20
    model, saes, tok, stats, where = default.get_default("full", seed=0, progress=False)
    assert where == folder and stats["recipe"] == "full" and stats["seed"] == 0
    assert sorted(saes) == sorted(sites) == sorted(model.sites)
    # The CLI reads the same files: --model <folder>/model --saes <folder>/saes.
    from minicirc.sae import hook_site, load_saes
    assert all(hook_site(site_hook(s)) == s for s in sites)
    again = load_saes(os.path.join(folder, "saes"), model)
    assert all(torch.equal(again[s].W_enc, saes[s].W_enc) and torch.equal(again[s].b_dec, saes[s].b_dec) for s in sites)
    cfg = default.RECIPES["full"]
    assert model.cfg.d_model == cfg["d_model"] and all(s.n_features >= 8 * cfg["d_model"] for s in saes.values())
    assert stats["agreement_accuracy"] == default.clean_agreement_accuracy(model, tok)
    brute = _brute_clean_agreement_accuracy(model, tok)
    assert brute == pytest.approx(stats["agreement_accuracy"], abs=1e-12)
    assert min(brute.values()) >= 0.95
    seqs = corpus.packed_sequences(tok, cfg["n_rows"], seq_len=32, seed=0)
    acts = train.collect_activations(model, seqs[:default.N_STATS_ROWS], pad_id=corpus.PAD_ID)
    for s in model.sites:
        got = train.sae_stats(saes[s], acts[s])
        want = stats["saes"][s]
        assert got["n_features"] == want["n_features"] and got["dead_fraction"] == want["dead_fraction"], s
        assert got["variance_explained"] == pytest.approx(want["variance_explained"], abs=1e-5), s
        assert got["l0"] == pytest.approx(want["l0"], abs=1e-3), s
    mono = default.monosemantic_shares(model, saes, tok)
    assert {k: v for k, v in mono.items() if k != "sites"} == {k: v for k, v in stats["monosemantic"].items() if k != "sites"}
    for s in model.sites:
        assert mono["sites"][s] == pytest.approx(stats["monosemantic"]["sites"][s]), s
