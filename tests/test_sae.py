"""Dictionaries against formulas written out here, and files in each library's own layout."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import minicirc
from minicirc.errors import MinicircError
from minicirc.sae import Dictionary, load_sae, site_folder

D, F = 12, 40


def rand_weights(seed):
    g = torch.Generator().manual_seed(seed)
    return dict(W_enc=torch.randn(D, F, generator=g), b_enc=torch.randn(F, generator=g) * 0.5,
                W_dec=torch.randn(F, D, generator=g), b_dec=torch.randn(D, generator=g),
                threshold=torch.rand(F, generator=g) * 2, x=torch.randn(5, 7, D, generator=g) * 2)


def test_relu_formula():
    w = rand_weights(1)
    sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "relu")
    x = w["x"]
    expected = torch.clamp((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], min=0)
    f = sae.encode(x)
    assert torch.allclose(f, expected, atol=1e-5)
    assert 0 < (f > 0).float().mean() < 1
    assert torch.allclose(sae.decode(f), f @ w["W_dec"] + w["b_dec"], atol=1e-5)
    f2, err = sae(x)
    assert torch.allclose(sae.decode(f2) + err, x, atol=1e-5)


def test_jumprelu_formula_is_strict():
    w = rand_weights(2)
    sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "jumprelu", threshold=w["threshold"],
                     subtract_b_dec=False)
    x = w["x"]
    pre = x @ w["W_enc"] + w["b_enc"]
    expected = torch.where(pre > w["threshold"], pre, torch.zeros_like(pre))
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)
    # A pre-activation exactly at the threshold is off (strict >).
    thr = torch.full((F,), 0.7)
    sae_eq = Dictionary(torch.eye(D, F), torch.zeros(F), w["W_dec"], torch.zeros(D), "jumprelu", threshold=thr,
                        subtract_b_dec=False)
    x_at = torch.zeros(1, D)
    x_at[0, 0], x_at[0, 1] = 0.7, 0.70001
    f = sae_eq.encode(x_at)
    assert f[0, 0] == 0 and f[0, 1] == pytest.approx(0.70001)


def test_topk_formula():
    w = rand_weights(3)
    k = 5
    sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "topk", k=k)
    x = w["x"].reshape(-1, D)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = sae.encode(x)
    for n in range(x.shape[0]):
        order = sorted(range(F), key=lambda i: -pre[n, i].item())
        keep = set(order[:k])
        for i in range(F):
            want = max(pre[n, i].item(), 0.0) if i in keep else 0.0
            assert f[n, i].item() == pytest.approx(want, abs=1e-5)
    # k larger than the number of positive pre-activations: only positives survive.
    sae_big = Dictionary(w["W_enc"], w["b_enc"] - 100, w["W_dec"], w["b_dec"], "topk", k=F)
    assert (sae_big.encode(x) >= 0).all() and torch.allclose(sae_big.encode(x), torch.relu(pre - 100), atol=1e-4)


def test_identity_is_the_neuron_basis(tiny_model_dir):
    model = minicirc.load_model(tiny_model_dir)
    saes = minicirc.identity_saes(model)
    assert set(saes) == set(model.sites)
    x = torch.randn(3, model.cfg.d_model)
    sae = saes["resid_0"]
    assert torch.equal(sae.encode(x), x) and torch.equal(sae.decode(x), x)
    assert sae.n_features == sae.d_in == model.cfg.d_model


# --- external formats, written in each library's own layout --------------------------------------

def write_dl(folder, state, dict_class=None, **trainer):
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "ae.pt"))
    if dict_class:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": F, **trainer}}, f)


def test_dictionary_learning_autoencoder(tmp_path):
    w = rand_weights(4)
    # nn.Linear layout: encoder.weight (F, D), decoder.weight (D, F); decoder columns not unit norm.
    write_dl(tmp_path, {"encoder.weight": w["W_enc"].T.clone(), "encoder.bias": w["b_enc"],
                        "decoder.weight": w["W_dec"].T.clone(), "bias": w["b_dec"]}, "AutoEncoder")
    sae = load_sae(tmp_path / "ae.pt")
    x = w["x"]
    f_file = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    norms = w["W_dec"].norm(dim=1)
    # from_pretrained(normalize_decoder=True) semantics: unit decoder rows, f scaled by the norms.
    assert torch.allclose(sae.encode(x), f_file * norms, atol=1e-4)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(F), atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), f_file @ w["W_dec"] + w["b_dec"], atol=1e-4)


def test_dictionary_learning_jumprelu(tmp_path):
    w = rand_weights(5)
    write_dl(tmp_path, {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]}, "JumpReluAutoEncoder")
    sae = load_sae(tmp_path)
    pre = w["x"] @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction in this class
    assert torch.allclose(sae.encode(w["x"]), torch.relu(pre * (pre > w["threshold"])), atol=1e-5)


def test_dictionary_learning_topk_and_batchtopk(tmp_path):
    w = rand_weights(6)
    state = {"encoder.weight": w["W_enc"].T.clone(), "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T.clone(),
             "b_dec": w["b_dec"], "k": torch.tensor(4), "threshold": torch.tensor(0.9)}
    write_dl(tmp_path / "topk", state, "AutoEncoderTopK", k=4)
    write_dl(tmp_path / "batch", state, "BatchTopKSAE", k=4)
    write_dl(tmp_path / "unknown", state)
    x = w["x"].reshape(-1, D)
    post = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    top = post.topk(4, dim=-1)
    expected_topk = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    assert torch.allclose(load_sae(tmp_path / "topk").encode(x), expected_topk, atol=1e-5)
    assert torch.allclose(load_sae(tmp_path / "batch").encode(x), post * (post > 0.9), atol=1e-5)
    with pytest.raises(MinicircError, match="same keys"):
        load_sae(tmp_path / "unknown")


def write_saelens(folder, cfg, tensors):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def saelens_cfg(arch, **extra):
    # 6.x inference save layout.
    return {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.18.0", "hook_name": "blocks.0.hook_resid_post"}, **extra}


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    w = rand_weights(7)
    write_saelens(tmp_path, saelens_cfg("standard", apply_b_dec_to_input=apply_b_dec),
                  {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]})
    sae = load_sae(tmp_path)
    s = w["x"] - w["b_dec"] if apply_b_dec else w["x"]
    assert torch.allclose(sae.encode(w["x"]), torch.relu(s @ w["W_enc"] + w["b_enc"]), atol=1e-5)


def test_saelens_jumprelu(tmp_path):
    w = rand_weights(8)
    write_saelens(tmp_path, saelens_cfg("jumprelu"), {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]})
    h = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(load_sae(tmp_path).encode(w["x"]), torch.relu(h) * (h > w["threshold"]), atol=1e-5)


@pytest.mark.parametrize("layout", ["6.x", "pre-6", "rescaled"])
def test_saelens_topk(tmp_path, layout):
    w = rand_weights(9)
    tensors = {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]}
    if layout == "6.x":
        cfg = saelens_cfg("topk", k=6)
    elif layout == "rescaled":
        cfg = saelens_cfg("topk", k=6, rescale_acts_by_decoder_norm=True)
    else:  # flat pre-6.0 layout: k only in activation_fn_kwargs
        cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "activation_fn": "topk",
               "activation_fn_kwargs": {"k": 6}, "apply_b_dec_to_input": True, "hook_name": "blocks.0.hook_resid_post",
               "normalize_activations": "none", "sae_lens_version": "5.11.0"}
    write_saelens(tmp_path, cfg, tensors)
    sae = load_sae(tmp_path)
    x = w["x"].reshape(-1, D)
    h = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=1)
    if layout == "rescaled":
        h = h * norms
    top = h.topk(6, dim=-1)
    f_lib = torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
    if layout == "rescaled":
        f_lib = f_lib / norms  # what SAELens decodes
        assert torch.allclose(sae.encode(x) / norms, f_lib, atol=1e-4)
    else:
        assert torch.allclose(sae.encode(x), f_lib, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), f_lib @ w["W_dec"] + w["b_dec"], atol=1e-4)


def test_saelens_unsupported_normalisation(tmp_path):
    w = rand_weights(10)
    write_saelens(tmp_path, saelens_cfg("standard", normalize_activations="layer_norm"),
                  {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]})
    with pytest.raises(MinicircError, match="normalize_activations"):
        load_sae(tmp_path)


# --- trees -----------------------------------------------------------------------------------------

def random_relu(d, n, seed):
    g = torch.Generator().manual_seed(seed)
    return Dictionary(torch.randn(d, n, generator=g), torch.randn(n, generator=g), torch.randn(n, d, generator=g),
                      torch.randn(d, generator=g), "relu")


def test_tree_roundtrip_one_level_deeper(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)
    saes = {s: random_relu(model.cfg.d_model, 24, i) for i, s in enumerate(model.sites)}
    minicirc.save_saes(saes, tmp_path / "tree")
    # Move one dictionary one folder deeper, as the original's "10_32768/ae.pt".
    os.makedirs(tmp_path / "tree" / "resid_out_layer1" / "10_24")
    for name in ["ae.pt", "config.json"]:
        os.rename(tmp_path / "tree" / "resid_out_layer1" / name, tmp_path / "tree" / "resid_out_layer1" / "10_24" / name)
    loaded = minicirc.load_saes(tmp_path / "tree", model)
    assert set(loaded) == set(model.sites)
    x = torch.randn(4, model.cfg.d_model)
    for s in model.sites:
        assert torch.allclose(loaded[s].decode(loaded[s].encode(x)), saes[s].decode(saes[s].encode(x)), atol=1e-4)
    assert site_folder("attn_1") == "attn_out_layer1" and site_folder("embed") == "embed"


def test_tree_errors(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)
    d = model.cfg.d_model
    saes = {s: random_relu(d, 8, i) for i, s in enumerate(model.sites)}
    minicirc.save_saes(saes, tmp_path / "t")
    # Ambiguous: two dictionaries one level deeper.
    from minicirc.sae import save_dictionary_learning
    save_dictionary_learning(random_relu(d, 8, 99), tmp_path / "t" / "mlp_out_layer0" / "other")
    os.makedirs(tmp_path / "t" / "mlp_out_layer0" / "second")
    os.rename(tmp_path / "t" / "mlp_out_layer0" / "ae.pt", tmp_path / "t" / "mlp_out_layer0" / "second" / "ae.pt")
    with pytest.raises(MinicircError, match="ambiguous"):
        minicirc.load_saes(tmp_path / "t", model)
    # Width mismatch.
    minicirc.save_saes(saes, tmp_path / "w")
    minicirc.save_saes({"attn_0": random_relu(d + 1, 8, 5)}, tmp_path / "w")
    with pytest.raises(MinicircError, match="does not match the model's d_model"):
        minicirc.load_saes(tmp_path / "w", model)
    # A tree for a deeper model, and a missing site.
    minicirc.save_saes(saes, tmp_path / "m")
    os.makedirs(tmp_path / "m" / "resid_out_layer5")
    with pytest.raises(MinicircError, match="match no site"):
        minicirc.load_saes(tmp_path / "m", model)
    minicirc.save_saes({s: v for s, v in saes.items() if s != "embed"}, tmp_path / "x")
    with pytest.raises(MinicircError, match="no dictionary for"):
        minicirc.load_saes(tmp_path / "x", model)


def test_bad_sae_files(tmp_path):
    w = rand_weights(11)
    # Corrupt ae.pt.
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "ae.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MinicircError, match="weights_only"):
        load_sae(tmp_path / "c")
    # A training checkpoint instead of a state dict.
    write_dl(tmp_path / "ck", {"step": 10, "ae": {}, "optimizer": {}})
    with pytest.raises(MinicircError, match="training checkpoint"):
        load_sae(tmp_path / "ck")
    # NaN in weights.
    bad = {k: w[k].clone() for k in ["W_enc", "b_enc", "W_dec", "b_dec"]}
    bad["W_dec"][3, 2] = float("nan")
    write_saelens(tmp_path / "nan", saelens_cfg("standard"), bad)
    with pytest.raises(MinicircError, match="NaN"):
        load_sae(tmp_path / "nan")
    # Truncated safetensors.
    write_saelens(tmp_path / "trunc", saelens_cfg("standard"), {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]})
    p = tmp_path / "trunc" / "sae_weights.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(MinicircError, match="safetensors"):
        load_sae(tmp_path / "trunc")
    # Missing tensors, gated architecture, empty folder.
    write_saelens(tmp_path / "miss", saelens_cfg("jumprelu"), {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]})
    with pytest.raises(MinicircError, match="threshold"):
        load_sae(tmp_path / "miss")
    write_saelens(tmp_path / "gated", saelens_cfg("gated"), {k: w[k] for k in ["W_enc", "W_dec", "b_dec"]})
    with pytest.raises(MinicircError, match="not supported"):
        load_sae(tmp_path / "gated")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MinicircError, match="no dictionary"):
        load_sae(tmp_path / "empty")
    # Input of the wrong width.
    sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "relu")
    with pytest.raises(MinicircError, match="width"):
        sae.encode(torch.randn(2, D + 1))


# --- config defaults and precedence, against numpy ---------------------------------------------------

def _np_weights():
    import numpy as np
    rng = np.random.default_rng(int(torch.randint(0, 10**9, ()).item()))
    w = {"W_enc": rng.standard_normal((D, F)), "b_enc": 0.5 * rng.standard_normal(F),
         "W_dec": rng.standard_normal((F, D)), "b_dec": 2.0 + rng.standard_normal(D)}   # b_dec far from 0
    x = 2 * rng.standard_normal((6, D))
    return {k: v.astype(np.float32) for k, v in w.items()}, x.astype(np.float32)


def test_saelens_apply_b_dec_to_input_defaults_to_true(tmp_path):
    """SAELens' handle_config_defaulting: cfg_dict.setdefault("apply_b_dec_to_input", True)."""
    import numpy as np
    w, x = _np_weights()
    cfg = saelens_cfg("standard")
    del cfg["apply_b_dec_to_input"]
    write_saelens(tmp_path, cfg, {k: torch.from_numpy(v) for k, v in w.items()})
    expected = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    got = load_sae(tmp_path).encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Not the other reading (the test can tell them apart).
    assert not np.allclose(np.maximum(x @ w["W_enc"] + w["b_enc"], 0), expected, atol=1e-2)


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_saelens_pre6_topk_uses_activation_fn_kwargs_k(tmp_path, arch):
    """A pre-6.0 cfg: SAELens' handle_pre_6_0_config sets k = activation_fn_kwargs["k"] (5.x builds the activation
    from activation_fn_kwargs and has no top-level k), so that k wins over a stray top-level one."""
    import numpy as np
    w, x = _np_weights()
    k_kwargs, k_top = 7, 3
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "activation_fn": "topk", "k": k_top,
           "activation_fn_kwargs": {"k": k_kwargs}, "apply_b_dec_to_input": True,
           "hook_name": "blocks.0.hook_resid_post", "normalize_activations": "none", "sae_lens_version": "5.11.0"}
    write_saelens(tmp_path, cfg, {k: torch.from_numpy(v) for k, v in w.items()})
    h = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = np.zeros_like(h)
    for r in range(h.shape[0]):
        top = np.argsort(-h[r], kind="stable")[:k_kwargs]
        expected[r, top] = np.maximum(h[r, top], 0)
    sae = load_sae(tmp_path)
    assert sae.k == k_kwargs
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), expected, rtol=1e-4, atol=1e-4)
