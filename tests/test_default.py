"""The embedded default (training loops, cache, files) and a reduced-budget run of `minicirc demo`."""
import json
import math
import os

import pytest
import torch

import minicirc
from minicirc import default, train
from minicirc.tasks import corpus


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


def test_saved_default_reproduces_the_in_memory_model(cache):
    folder = default.default_dir("quick", 3)
    model, saes, tok, stats = default.make_default(folder, "quick", seed=3, progress=False)
    loaded, loaded_saes, loaded_tok, loaded_stats, _ = default.get_default("quick", seed=3, progress=False)
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
    default.make_default(again, "quick", seed=3, progress=False)
    for name in ["model/model.safetensors", "saes/resid_out_layer1/ae.pt"]:
        assert (open(os.path.join(folder, name), "rb").read() == open(os.path.join(again, name), "rb").read()), name


def test_demo_reduced_budget(cache, tmp_path):
    from minicirc.demo import run_demo
    results = run_demo(str(tmp_path / "demo"), quick=True, progress=False)
    report = (tmp_path / "demo" / "report.md").read_text()
    for t in ("simple", "nounpp", "within_rc", "rc"):
        assert f"## {t}" in report
        for kind in ("features", "neurons"):
            r = results[t][kind]
            assert math.isfinite(r["faithfulness"]) and math.isfinite(r["completeness"])
            assert (tmp_path / "demo" / t / kind / "circuit.json").exists()
            assert (tmp_path / "demo" / t / kind / "circuit.png").exists()
        assert results["_meta"]["full_model_faithfulness"][t] == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "demo" / "faithfulness_vs_nodes.png").stat().st_size > 0
    data = json.loads((tmp_path / "demo" / "nounpp" / "features" / "circuit.json").read_text())
    assert all("best_variable" in n for n in data["nodes"] if n["feature"] != "err")


def test_auroc_equals_pairwise_count():
    from minicirc.demo import auroc
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    scores = torch.randint(0, 6, (80,), generator=g).float()   # many ties
    labels = torch.randint(0, 2, (80,), generator=g)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = sum(float(a > b) + 0.5 * float(a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert auroc(scores.numpy(), labels.numpy()) == pytest.approx(brute, abs=1e-12)
