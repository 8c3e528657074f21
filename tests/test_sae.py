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


def rand_weights(dtype=torch.float32):
    """Weights and inputs from torch's global generator (conftest seeds it afresh for every run)."""
    return dict(W_enc=torch.randn(D, F, dtype=dtype), b_enc=torch.randn(F, dtype=dtype) * 0.5,
                W_dec=torch.randn(F, D, dtype=dtype), b_dec=torch.randn(D, dtype=dtype),
                threshold=torch.rand(F, dtype=dtype) * 2, x=torch.randn(5, 7, D, dtype=dtype) * 2)


def test_relu_formula():
    w = rand_weights()
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
    w = rand_weights()
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
    w = rand_weights()
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
    w = rand_weights()
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
    w = rand_weights()
    write_dl(tmp_path, {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]}, "JumpReluAutoEncoder")
    sae = load_sae(tmp_path)
    pre = w["x"] @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction in this class
    assert torch.allclose(sae.encode(w["x"]), torch.relu(pre * (pre > w["threshold"])), atol=1e-5)


def test_dictionary_learning_topk_and_batchtopk(tmp_path):
    w = rand_weights()
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
    w = rand_weights()
    write_saelens(tmp_path, saelens_cfg("standard", apply_b_dec_to_input=apply_b_dec),
                  {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]})
    sae = load_sae(tmp_path)
    s = w["x"] - w["b_dec"] if apply_b_dec else w["x"]
    assert torch.allclose(sae.encode(w["x"]), torch.relu(s @ w["W_enc"] + w["b_enc"]), atol=1e-5)


def test_saelens_jumprelu(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path, saelens_cfg("jumprelu"), {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]})
    h = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(load_sae(tmp_path).encode(w["x"]), torch.relu(h) * (h > w["threshold"]), atol=1e-5)


@pytest.mark.parametrize("layout", ["6.x", "pre-6", "rescaled"])
def test_saelens_topk(tmp_path, layout):
    w = rand_weights()
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
    w = rand_weights()
    write_saelens(tmp_path, saelens_cfg("standard", normalize_activations="covariance_whitening"),
                  {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]})
    with pytest.raises(MinicircError, match="normalize_activations"):
        load_sae(tmp_path)


# --- trees -----------------------------------------------------------------------------------------

def random_relu(d, n):
    return Dictionary(torch.randn(d, n), torch.randn(n), torch.randn(n, d), torch.randn(d), "relu")


def test_tree_roundtrip_one_level_deeper(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)
    saes = {s: random_relu(model.cfg.d_model, 24) for s in model.sites}
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
    saes = {s: random_relu(d, 8) for s in model.sites}
    minicirc.save_saes(saes, tmp_path / "t")
    # Ambiguous: two dictionaries one level deeper.
    from minicirc.sae import save_dictionary_learning
    save_dictionary_learning(random_relu(d, 8), tmp_path / "t" / "mlp_out_layer0" / "other")
    os.makedirs(tmp_path / "t" / "mlp_out_layer0" / "second")
    os.rename(tmp_path / "t" / "mlp_out_layer0" / "ae.pt", tmp_path / "t" / "mlp_out_layer0" / "second" / "ae.pt")
    with pytest.raises(MinicircError, match="ambiguous"):
        minicirc.load_saes(tmp_path / "t", model)
    # Width mismatch.
    minicirc.save_saes(saes, tmp_path / "w")
    minicirc.save_saes({"attn_0": random_relu(d + 1, 8)}, tmp_path / "w")
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
    w = rand_weights()
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
    with pytest.raises(MinicircError, match=r"SAELens gated file lacks \['b_gate', 'b_mag', 'r_mag'\]"):
        load_sae(tmp_path / "gated")
    write_saelens(tmp_path / "transcoder", saelens_cfg("transcoder"), {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]})
    with pytest.raises(MinicircError, match="architecture 'transcoder' is not supported"):
        load_sae(tmp_path / "transcoder")
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


# --- gaps found by mutation testing: validation, edge cases of each formula, format detection ------

# The dictionaries compute in float32 and the oracles here in float64: an entry within rounding (~1e-5 here)
# of a decision point (a jumprelu threshold, the top-k cut) may land on the other side. Compare away from
# those points, and check that almost everything is compared.
MARGIN = 1e-3


def assert_close_where(got, want, keep):
    assert keep.float().mean() > 0.75
    torch.testing.assert_close(got.double()[keep], want[keep], rtol=1e-5, atol=1e-4)


def topk_oracle(h, k):
    """relu of the k largest h per row (sort, not topk), and which rows have a clear gap at the cut."""
    s = h.sort(dim=-1, descending=True).values
    want = torch.relu(h) * (h >= s[..., k - 1:k])
    clear = (s[..., k - 1] - s[..., k]) > MARGIN if k < h.shape[-1] else torch.ones(h.shape[:-1], dtype=torch.bool)
    return want, clear[..., None].expand_as(h)


def test_dictionary_rejects_inconsistent_construction():
    w = rand_weights(torch.float64)
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    with pytest.raises(MinicircError, match="unknown dictionary kind 'sigmoid'"):
        Dictionary(W_enc, b_enc, W_dec, b_dec, "sigmoid")
    with pytest.raises(MinicircError, match=rf"gated needs W_gate \({D}, {F}\) and b_gate \({F},\)"):
        Dictionary(W_enc, b_enc, W_dec, b_dec, "gated", W_gate=W_enc.T, b_gate=b_enc)
    for bad in [(W_enc, b_enc, W_dec.T, b_dec), (W_enc, b_enc[:-1], W_dec, b_dec), (W_enc, b_enc, W_dec, b_dec[:-1])]:
        with pytest.raises(MinicircError, match="inconsistent shapes"):
            Dictionary(*bad, "relu")
    for thr in [None, torch.rand(F - 1)]:
        with pytest.raises(MinicircError, match=rf"jumprelu needs a threshold of shape \({F},\)"):
            Dictionary(W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=thr)
    for k in [None, 0, -2]:
        with pytest.raises(MinicircError, match="topk needs k >= 1"):
            Dictionary(W_enc, b_enc, W_dec, b_dec, "topk", k=k)
    # Finite values are checked where files enter (the loaders, through sae.checked), not by the constructor.
    thr = torch.rand(F)
    thr[int(torch.randint(0, F, ()))] = float("inf")
    with pytest.raises(MinicircError, match="threshold contains NaN or inf"):
        minicirc.sae.checked(Dictionary(W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=thr))
    # k given as a 0-d tensor (as stored in state dicts) is kept as a Python int.
    sae = Dictionary(W_enc, b_enc, W_dec, b_dec, "topk", k=torch.tensor(5))
    assert type(sae.k) is int and sae.k == 5


def test_input_width_checked_on_both_sides_and_for_identity():
    w = rand_weights(torch.float64)
    sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "relu")
    for width in (D - 1, D + 1):
        with pytest.raises(MinicircError, match=f"expects inputs of width {D}, got {width}"):
            sae.encode(torch.randn(3, width))
    ident = minicirc.sae.IdentityDictionary(D)
    with pytest.raises(MinicircError, match=f"expects inputs of width {D}, got {D - 1}"):
        ident.encode(torch.randn(3, D - 1))


def test_jumprelu_negative_threshold_acts_as_zero():
    """Libraries apply relu before (DL: relu(pre * (pre > t))) or with (SAELens: relu(h) * (h > t)) the
    threshold, so a stored threshold below 0 must not let negative pre-activations through."""
    w = rand_weights(torch.float64)
    thr = torch.rand(F, dtype=torch.float64) * 2
    thr[: F // 2] = -2 * torch.rand(F // 2, dtype=torch.float64) - 0.5   # half the features: negative
    sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "jumprelu", threshold=thr)
    pre = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = torch.relu(pre) * (pre > thr)            # SAELens' formula
    assert ((pre > thr) & (pre < 0)).any()              # the case the test is about occurs
    assert_close_where(sae.encode(w["x"].float()), expected, (pre - thr).abs() > MARGIN)
    assert (sae.encode(w["x"].float()) >= 0).all()


def test_topk_with_k_above_n_features_keeps_every_positive():
    w = rand_weights(torch.float64)
    sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "topk", k=F + 3)
    pre = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(w["x"].float()).double(), torch.relu(pre), rtol=1e-5, atol=1e-4)


def test_dictionary_learning_checkpoint_and_non_dict_files(tmp_path):
    # A pickle holding a global outside torch's weights-only allowlist: a full unpickle would load it.
    import fractions
    os.makedirs(tmp_path / "p")
    torch.save({"encoder.weight": torch.randn(F, D), "note": fractions.Fraction(1, 3)}, tmp_path / "p" / "ae.pt")
    with pytest.raises(MinicircError, match="weights_only=True.*pickled code"):
        load_sae(tmp_path / "p")
    os.makedirs(tmp_path / "t")
    torch.save(torch.randn(D, F), tmp_path / "t" / "ae.pt")
    with pytest.raises(MinicircError, match="expected a state dict, found Tensor"):
        load_sae(tmp_path / "t")
    for i, ckpt in enumerate([{"ae": {}, "step": 3}, {"ae": {}, "optimizer": {}}]):
        write_dl(tmp_path / f"ck{i}", ckpt)
        with pytest.raises(MinicircError, match="training checkpoint"):
            load_sae(tmp_path / f"ck{i}")


def test_dictionary_learning_unsupported_class(tmp_path):
    m = {"W_enc": torch.randn(D, F), "b_enc": torch.randn(F), "W_dec": torch.randn(F, D), "b_dec": torch.randn(D)}
    write_dl(tmp_path / "crosscoder", m, "CrossCoder")
    with pytest.raises(MinicircError, match="dictionary class CrossCoder is not supported"):
        load_sae(tmp_path / "crosscoder")


def test_dictionary_learning_class_inferred_without_config(tmp_path):
    """No config.json: AutoEncoder (encoder.weight + bias) and JumpReluAutoEncoder (W_enc + threshold) are
    told apart by their keys, each with its own encoder formula."""
    w = rand_weights(torch.float64)
    x = w["x"]
    write_dl(tmp_path / "ae", {"encoder.weight": w["W_enc"].T.float(), "encoder.bias": w["b_enc"].float(),
                               "decoder.weight": w["W_dec"].T.float(), "bias": w["b_dec"].float()})
    norms = w["W_dec"].norm(dim=1)
    want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    torch.testing.assert_close(load_sae(tmp_path / "ae").encode(x.float()).double(), want, rtol=1e-5, atol=1e-4)
    thr = torch.rand(F, dtype=torch.float64)
    write_dl(tmp_path / "jr", {"W_enc": w["W_enc"].float(), "b_enc": w["b_enc"].float(), "W_dec": w["W_dec"].float(),
                               "b_dec": w["b_dec"].float(), "threshold": thr.float()})
    pre = x @ w["W_enc"] + w["b_enc"]
    sae = load_sae(tmp_path / "jr")
    assert sae.kind == "jumprelu"
    assert_close_where(sae.encode(x.float()), torch.relu(pre * (pre > thr)), (pre - thr).abs() > MARGIN)


def test_dictionary_learning_errors_and_k_from_state(tmp_path):
    w = rand_weights(torch.float64)
    dec = w["W_dec"].T.float().clone()
    dec[:, int(torch.randint(0, F, ()))] = 0
    write_dl(tmp_path / "zero", {"encoder.weight": w["W_enc"].T.float(), "encoder.bias": w["b_enc"].float(),
                                 "decoder.weight": dec, "bias": w["b_dec"].float()}, "AutoEncoder")
    with pytest.raises(MinicircError, match="all-zero feature direction"):
        load_sae(tmp_path / "zero")
    state = {"encoder.weight": w["W_enc"].T.float(), "encoder.bias": w["b_enc"].float(),
             "decoder.weight": w["W_dec"].T.float(), "b_dec": w["b_dec"].float(), "k": torch.tensor(5)}
    write_dl(tmp_path / "batch", state, "BatchTopKSAE")
    with pytest.raises(MinicircError, match="BatchTopKSAE file lacks its threshold"):
        load_sae(tmp_path / "batch")
    # AutoEncoderTopK keeps k as a buffer: the state's k is used when the config has none.
    write_dl(tmp_path / "topk", state, "AutoEncoderTopK")
    sae = load_sae(tmp_path / "topk")
    assert sae.k == 5
    want, clear = topk_oracle((w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 5)
    assert_close_where(sae.encode(w["x"].float()), want, clear)


def test_save_dictionary_learning_refuses_other_kinds(tmp_path):
    from minicirc.sae import save_dictionary_learning
    w = rand_weights(torch.float64)
    for kw in [dict(kind="jumprelu", threshold=torch.rand(F)), dict(kind="topk", k=3),
               dict(kind="relu", subtract_b_dec=False)]:
        sae = Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], **kw)
        with pytest.raises(MinicircError, match="only relu dictionaries that subtract b_dec"):
            save_dictionary_learning(sae, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "ae.pt")


def _saelens_tensors(w, threshold=None):
    t = {k: w[k].float() for k in ["W_enc", "b_enc", "W_dec", "b_dec"]}
    if threshold is not None:
        t["threshold"] = threshold.float()
    return t


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_saelens_apply_b_dec_false_for_jumprelu_and_topk(tmp_path, arch):
    w = rand_weights(torch.float64)
    w["b_dec"] += 2.0   # far from 0, so the two readings differ
    thr = torch.rand(F, dtype=torch.float64)
    write_saelens(tmp_path, saelens_cfg(arch, apply_b_dec_to_input=False, k=6),
                  _saelens_tensors(w, thr if arch == "jumprelu" else None))
    h = w["x"] @ w["W_enc"] + w["b_enc"]   # no b_dec subtraction
    if arch == "jumprelu":
        want, keep = torch.relu(h) * (h > thr), (h - thr).abs() > MARGIN
    else:
        want, keep = topk_oracle(h, 6)
    assert_close_where(load_sae(tmp_path).encode(w["x"].float()), want, keep)


@pytest.mark.parametrize("cfg_extra, expected_k", [
    ({}, 7),                                                     # flat, no version, no metadata: pre-6
    ({"metadata": {"hook_name": "blocks.0.hook_resid_post"}}, 3),  # metadata block: 6.x
    ({"metadata": {"sae_lens_version": "6.0.0"}}, 3),
    ({"metadata": {"sae_lens_version": "5.9.1"}}, 7),          # version only in metadata
    ({"sae_lens_version": "not-a-version"}, 3),                  # unparsable: not read as pre-6
])
def test_saelens_layout_decides_which_k(tmp_path, cfg_extra, expected_k):
    """SAELens: a version below 6.0 (top level, else metadata), or no version and no metadata block,
    means the flat pre-6.0 layout, where k is activation_fn_kwargs.k; otherwise the top-level k."""
    w = rand_weights(torch.float64)
    cfg = {"architecture": "topk", "d_in": D, "d_sae": F, "k": 3, "activation_fn_kwargs": {"k": 7},
           "apply_b_dec_to_input": True, "normalize_activations": "none", **cfg_extra}
    write_saelens(tmp_path, cfg, _saelens_tensors(w))
    assert load_sae(tmp_path).k == expected_k


def test_saelens_cfg_variants(tmp_path):
    w = rand_weights(torch.float64)
    tensors = _saelens_tensors(w)
    relu = torch.relu((w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    # Old configs: no architecture field (standard), normalize_activations null, or expected_average_only_in,
    # whose factor is not in the folder: refused without one, and a factor of 1 changes nothing.
    for i, norm in enumerate([None, "expected_average_only_in"]):
        cfg = {"d_in": D, "d_sae": F, "apply_b_dec_to_input": True, "normalize_activations": norm,
               "hook_name": "blocks.0.hook_resid_post"}
        write_saelens(tmp_path / f"old{i}", cfg, tensors)
        if norm is not None:
            with pytest.raises(MinicircError, match="expected_average_only_in, and its scaling factor is not in the folder"):
                load_sae(tmp_path / f"old{i}")
        sae = load_sae(tmp_path / f"old{i}", norm_scaling_factor=1.0)
        assert sae.kind == "relu"
        torch.testing.assert_close(sae.encode(w["x"].float()).double(), relu, rtol=1e-5, atol=1e-4)
    # activation_fn_str (older name of activation_fn) selects top-k in a "standard" config.
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True, "sae_lens_version": "3.0.0"}
    write_saelens(tmp_path / "str", cfg, tensors)
    sae = load_sae(tmp_path / "str")
    assert sae.kind == "topk" and sae.k == 4
    assert_close_where(sae.encode(w["x"].float()), *topk_oracle((w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 4))
    # top-k without any k; weights file missing.
    cfg = saelens_cfg("topk")
    write_saelens(tmp_path / "nok", cfg, tensors)
    with pytest.raises(MinicircError, match="topk architecture without k"):
        load_sae(tmp_path / "nok")
    write_saelens(tmp_path / "now", saelens_cfg("standard"), tensors)
    os.remove(tmp_path / "now" / "sae_weights.safetensors")
    with pytest.raises(MinicircError, match="lacks sae_weights.safetensors"):
        load_sae(tmp_path / "now")


def test_load_sae_path_errors(tmp_path):
    with pytest.raises(MinicircError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    (tmp_path / "weights.safetensors").write_bytes(b"{}")
    with pytest.raises(MinicircError, match="expected an ae.pt file, a params.npz file or a SAELens folder"):
        load_sae(tmp_path / "weights.safetensors")
    with pytest.raises(MinicircError, match="SAE directory .* does not exist"):
        minicirc.load_saes(tmp_path / "nowhere", None)


def test_saes_hash_identifies_dictionaries():
    """circuit.json records saes_hash; loading a circuit checks it. Same dictionaries in any insertion
    order: same hash; any difference that changes f (kind, k, threshold, a weight): another hash."""
    from minicirc.sae import saes_hash
    w = rand_weights(torch.float64)
    thr = torch.rand(F)

    def make(**kw):
        args = {"kind": "jumprelu", "threshold": thr, **kw}
        return Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], **args)

    base = {"embed": make(), "resid_0": make(kind="topk", k=4, threshold=None)}
    h = saes_hash(base)
    assert saes_hash({"resid_0": base["resid_0"], "embed": base["embed"]}) == h
    assert saes_hash({"embed": make(), "resid_0": make(kind="topk", k=torch.tensor(4), threshold=None)}) == h
    variants = [{"embed": make(threshold=thr + 0.25), "resid_0": base["resid_0"]},
                {"embed": make(), "resid_0": make(kind="topk", k=5, threshold=None)},
                {"embed": make(kind="relu", threshold=None), "resid_0": base["resid_0"]},
                {"embed": make(), "resid_1": base["resid_0"]},
                {"embed": make(subtract_b_dec=False), "resid_0": base["resid_0"]}]   # b_dec != 0: f differs
    assert len({saes_hash(v) for v in variants} | {h}) == len(variants) + 1
    # Where it changes nothing (b_dec == 0, the neuron baseline), subtracting b_dec or not hashes the same.
    zero = dict(w)
    zero["b_dec"] = torch.zeros(D, dtype=torch.float64)
    same = [Dictionary(zero["W_enc"], zero["b_enc"], zero["W_dec"], zero["b_dec"], "relu", subtract_b_dec=sub)
            for sub in (True, False)]
    assert saes_hash({"embed": same[0]}) == saes_hash({"embed": same[1]})
    # The kind alone: a relu dictionary with the identity's weights computes relu(x), not x.
    eye = torch.eye(D)
    relu_eye = Dictionary(eye, torch.zeros(D), eye, torch.zeros(D), "relu", subtract_b_dec=False)
    assert saes_hash({"embed": relu_eye}) != saes_hash({"embed": minicirc.sae.IdentityDictionary(D)})


def test_site_folder_names_match_the_original_tree():
    """docs/method.md §3: embed/, attn_out_layer{l}/, mlp_out_layer{l}/, resid_out_layer{l}/."""
    layer = int(torch.randint(0, 24, ()))
    assert [site_folder(s) for s in ["embed", f"attn_{layer}", f"mlp_{layer}", f"resid_{layer}"]] == \
        ["embed", f"attn_out_layer{layer}", f"mlp_out_layer{layer}", f"resid_out_layer{layer}"]


def test_load_saes_ignores_stray_files(tmp_path):
    """Only folders name sites: a README or .DS_Store beside them is not a 'folder that matches no site'."""
    from types import SimpleNamespace
    sites = ["embed", "attn_0", "mlp_0", "resid_0"]
    model = SimpleNamespace(sites=sites, all_sites=sites, site_width=lambda site: D,
                            cfg=SimpleNamespace(d_model=D, n_layers=1))
    w = rand_weights(torch.float64)
    saes = {s: Dictionary(w["W_enc"], w["b_enc"] + i, w["W_dec"], w["b_dec"], "relu") for i, s in enumerate(sites)}
    minicirc.save_saes(saes, tmp_path / "t")
    (tmp_path / "t" / "README.md").write_text("dictionaries for a 1-layer model\n")
    (tmp_path / "t" / ".DS_Store").write_bytes(b"\0")
    loaded = minicirc.load_saes(tmp_path / "t", model)
    assert sorted(loaded) == sorted(sites)
    x = w["x"].float()
    for s in sites:   # loading rescales to unit decoder rows: reconstructions are what is preserved
        torch.testing.assert_close(loaded[s].decode(loaded[s].encode(x)), saes[s].decode(saes[s].encode(x)),
                                   rtol=1e-4, atol=1e-4)
