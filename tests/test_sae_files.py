"""SAE files as SAELens, dictionary_learning and Gemma Scope write them: the site a file names, input
normalisations, gated and Matryoshka dictionaries. Each encode is checked against the formula written out
here in float64 on random inputs; each refused case by its message."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import minicirc
from minicirc.errors import MinicircError
from minicirc.sae import Dictionary, hook_site, load_sae, saes_hash
from test_sae import write_dl

D, F = 12, 40
MARGIN = 1e-3   # float32 encode vs float64 oracle: compare away from the jumps (thresholds, gates, top-k cut)


def draw():
    """Random float64 weights (b_dec far from 0, so readings that drop it differ) and inputs (not zeros)."""
    return dict(W_enc=torch.randn(D, F, dtype=torch.float64), b_enc=torch.randn(F, dtype=torch.float64) * 0.5,
                W_dec=torch.randn(F, D, dtype=torch.float64), b_dec=torch.randn(D, dtype=torch.float64) + 1.0,
                threshold=torch.rand(F, dtype=torch.float64), x=torch.randn(5, 7, D, dtype=torch.float64) * 2 + 0.5)


def close_where(got, want, keep, rtol=1e-5, atol=1e-4):
    assert keep.float().mean() > 0.75
    torch.testing.assert_close(got.double()[keep], want[keep], rtol=rtol, atol=atol)


def write_saelens(folder, cfg, tensors):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def cfg6(arch="standard", hook="blocks.0.hook_resid_post", d_in=D, d_sae=F, metadata=None, **extra):
    """SAELens 6.x inference save: fields, and a metadata block holding hook_name."""
    return {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.18.0", "hook_name": hook, "model_name": "tiny", **(metadata or {})},
            **extra}


def std_tensors(w):
    return {k: w[k] for k in ["W_enc", "b_enc", "W_dec", "b_dec"]}


# --- hook names decide the site ----------------------------------------------------------------------

@pytest.mark.parametrize("hook, site", [
    ("blocks.0.hook_resid_pre", "embed"), ("blocks.3.hook_resid_pre", "resid_2"),
    ("blocks.3.hook_resid_post", "resid_3"), ("blocks.2.hook_attn_out", "attn_2"),
    ("blocks.5.hook_mlp_out", "mlp_5"), ("blocks.1.hook_resid_mid", "resid_mid_1"), ("blocks.4.attn.hook_z", "z_4"),
    ("blocks.2.mlp.hook_post", "mlp_hidden_2")])
def test_hook_site(hook, site):
    assert hook_site(hook) == site


@pytest.mark.parametrize("hook", ["blocks.0.hook_mlp_in", "blocks.x.hook_resid_post", "hook_embed", "blocks.1.attn.hook_q"])
def test_unknown_hooks_are_refused(hook):
    with pytest.raises(MinicircError, match="is not a site minicirc knows"):
        hook_site(hook)


def tiny_saes_for(model, hooks, root, seed_shift=0.0, width=None, **cfg):
    """One SAELens folder per hook, named after the hook, as wide as its site (or `width`); returns the
    weights written, by hook."""
    written = {}
    for i, hook in enumerate(hooks):
        d = width or model.site_width(hook_site(hook))
        w = {"W_enc": torch.randn(d, 16), "b_enc": torch.randn(16) * 0.3 + seed_shift, "W_dec": torch.randn(16, d) / 4,
             "b_dec": torch.randn(d) * 0.1}
        write_saelens(os.path.join(root, hook.replace(".", "_")), cfg6(hook=hook, d_in=d, d_sae=16, **cfg), w)
        written[hook] = w
    return written


def test_hook_tree_places_each_dictionary_by_its_hook(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out",
             "blocks.1.hook_mlp_out"]
    written = tiny_saes_for(model, hooks, tmp_path / "tree")
    saes = minicirc.load_saes(tmp_path / "tree", model)
    assert sorted(saes) == sorted(["embed", "resid_0", "resid_1", "attn_0", "mlp_1"])
    x = torch.randn(3, model.cfg.d_model)
    for hook, w in written.items():
        want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        torch.testing.assert_close(saes[hook_site(hook)].encode(x), want, rtol=1e-5, atol=1e-5)


def test_mlp_hook_post_reads_mlp_hidden(tiny_model_dir, tmp_path):
    """A SAELens dictionary at blocks.L.mlp.hook_post (TransformerLens' MLP neurons) is placed at mlp_hidden_L,
    d_mlp wide; TransformerLens' centring of what is written to the residual stream does not reach it, and a
    d_model-wide one there is refused by name."""
    model = minicirc.load_model(tiny_model_dir)
    w = tiny_saes_for(model, ["blocks.1.mlp.hook_post"], tmp_path / "h",
                      metadata={"model_from_pretrained_kwargs": {"center_writing_weights": True}})["blocks.1.mlp.hook_post"]
    saes = minicirc.load_saes(tmp_path / "h", model)
    assert list(saes) == ["mlp_hidden_1"] and saes["mlp_hidden_1"].d_in == model.cfg.d_mlp == 48
    x = torch.randn(3, model.cfg.d_mlp)
    torch.testing.assert_close(saes["mlp_hidden_1"].encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]),
                               rtol=1e-5, atol=1e-5)
    tiny_saes_for(model, ["blocks.0.mlp.hook_post"], tmp_path / "narrow", width=model.cfg.d_model)
    with pytest.raises(MinicircError, match=r"dictionary width 32 does not match the model's d_mlp 48 \(site mlp_hidden_0\)"):
        minicirc.load_saes(tmp_path / "narrow", model)


def test_hook_tree_through_the_cli(tiny_model_dir, tmp_path, capsys):
    """--saes DIR of SAELens folders named anything: a circuit over the resid sites they name."""
    from test_cli import ROWS, write_data, write_tokenizer
    from minicirc.cli import main
    write_tokenizer(tiny_model_dir, 61)
    model = minicirc.load_model(tiny_model_dir)
    tiny_saes_for(model, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], tmp_path / "saes")
    write_data(tmp_path / "data.jsonl", ROWS)
    code = main([str(a) for a in ["circuit", "--model", tiny_model_dir, "--saes", tmp_path / "saes", "--data",
                                  tmp_path / "data.jsonl", "--out", tmp_path / "out", "--method", "attrib"]])
    assert code == 0, capsys.readouterr().err
    c = json.load(open(tmp_path / "out" / "circuit.json"))
    assert c["sites"] == ["resid_0", "resid_1"]
    assert c["settings"]["saes"] == saes_hash(minicirc.load_saes(tmp_path / "saes", model))


def test_hook_tree_refusals(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)   # 2 layers: embed, attn_l, mlp_l, resid_l
    tiny_saes_for(model, ["blocks.5.hook_resid_post"], tmp_path / "deep")
    with pytest.raises(MinicircError, match="hook blocks.5.hook_resid_post reads site resid_5, and this model has 2 layers"):
        minicirc.load_saes(tmp_path / "deep", model)
    tiny_saes_for(model, ["blocks.0.hook_resid_mid"], tmp_path / "mid")
    with pytest.raises(MinicircError, match="reads site resid_mid_0, and this model has no resid_mid sites"):
        minicirc.load_saes(tmp_path / "mid", model)
    # A z dictionary TransformerLens trained on z - b_V (fold_value_biases, its default) reads z shifted by the
    # model's value bias: the same file read as trained on z itself, given z - b_V, encodes alike.
    tiny_saes_for(model, ["blocks.1.attn.hook_z"], tmp_path / "z")
    shifted = minicirc.load_saes(tmp_path / "z", model)["z_1"]
    cfg_path = next((tmp_path / "z").rglob("cfg.json"))
    cfg = json.load(open(cfg_path))
    cfg.setdefault("model_from_pretrained_kwargs", {})["fold_value_biases"] = False
    cfg_path.write_text(json.dumps(cfg))
    plain = minicirc.load_saes(tmp_path / "z", model)["z_1"]
    b_V = model.value_bias(1)
    assert b_V.abs().max() > 0.01
    z = torch.randn(5, model.site_width("z_1"))
    torch.testing.assert_close(shifted.encode(z), plain.encode(z - b_V))
    assert not torch.equal(shifted.encode(z), plain.encode(z))
    # A model that does not give its value biases is refused for such a file.
    cfg["model_from_pretrained_kwargs"]["fold_value_biases"] = True
    cfg_path.write_text(json.dumps(cfg))

    class NoValueBias:
        def __getattr__(self, name):
            if name == "value_bias":
                raise AttributeError(name)
            return getattr(model, name)
    with pytest.raises(MinicircError, match="this z dictionary reads z - b_V, and this model does not give"):
        minicirc.load_saes(tmp_path / "z", NoValueBias())
    # Two folders for one site: resid_pre of layer 1 and resid_post of layer 0 are both resid_0.
    tiny_saes_for(model, ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"], tmp_path / "twice")
    with pytest.raises(MinicircError, match="two dictionaries for site resid_0"):
        minicirc.load_saes(tmp_path / "twice", model)
    # No hook_name: nothing names the site.
    tiny_saes_for(model, ["blocks.0.hook_resid_post"], tmp_path / "nohook")
    cfg_path = tmp_path / "nohook" / "blocks_0_hook_resid_post" / "cfg.json"
    cfg = json.load(open(cfg_path))
    del cfg["metadata"]["hook_name"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(MinicircError, match="no hook_name, so the folder names no site"):
        minicirc.load_saes(tmp_path / "nohook", model)


def original_tree(model, root, hooks):
    """The original dictionaries/ layout (one folder per site) with SAELens folders whose cfg names `hooks[site]`."""
    from minicirc.sae import site_folder
    d = model.cfg.d_model
    for s in model.sites:
        w = {"W_enc": torch.randn(d, 16), "b_enc": torch.randn(16), "W_dec": torch.randn(16, d), "b_dec": torch.randn(d)}
        write_saelens(os.path.join(root, site_folder(s)), cfg6(hook=hooks.get(s, f"blocks.0.hook_resid_pre" if s == "embed"
                                                                                 else _hook_of(s)), d_in=d, d_sae=16), w)


def _hook_of(site):
    kind, layer = site.rsplit("_", 1)
    return f"blocks.{layer}." + {"attn": "hook_attn_out", "mlp": "hook_mlp_out", "resid": "hook_resid_post"}[kind]


def test_hook_point_of_old_configs_names_the_site_too(tmp_path):
    """SAELens before 3.0 wrote hook_point (and hook_point_layer) where later versions write hook_name."""
    w = draw()
    write_saelens(tmp_path, {"d_in": D, "d_sae": F, "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
                             "apply_b_dec_to_input": True}, std_tensors(w))
    assert load_sae(tmp_path).site == "resid_1"
    write_saelens(tmp_path / "bad", {"d_in": D, "d_sae": F, "hook_point": "blocks.2.hook_q_input"}, std_tensors(w))
    with pytest.raises(MinicircError, match="cfg.json: hook 'blocks.2.hook_q_input' is not a site minicirc knows"):
        load_sae(tmp_path / "bad")


def test_original_tree_hooks_must_agree_with_their_folders(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)
    original_tree(model, tmp_path / "ok", {})
    assert sorted(minicirc.load_saes(tmp_path / "ok", model)) == sorted(model.sites)
    original_tree(model, tmp_path / "swap", {"resid_0": "blocks.1.hook_resid_post"})
    with pytest.raises(MinicircError, match="hook_name reads site resid_1, but it sits in folder resid_out_layer0 for site resid_0"):
        minicirc.load_saes(tmp_path / "swap", model)
    # resid_pre of layer 1 is resid_0: the same values, accepted in resid_out_layer0.
    original_tree(model, tmp_path / "pre", {"resid_0": "blocks.1.hook_resid_pre"})
    assert "resid_0" in minicirc.load_saes(tmp_path / "pre", model)


NO_FOLD = {"model_from_pretrained_kwargs": {"fold_value_biases": False}}


def test_optional_sites_load_at_their_own_width(tmp_path):
    """z_l and resid_mid_l dictionaries in both layouts, on a Qwen3 whose z width (n_heads * head_dim = 48)
    is not its d_model (32): each lands on its site, each encodes as its file says, a z dictionary of
    d_model width is refused, and the original tree needs no folder for an optional site."""
    from minicirc.sae import site_folder
    from test_families import CASES, write_hf
    kind, kw = CASES["qwen3 qk-norm head_dim"]
    write_hf(tmp_path / "model", kind, seed=3, **kw)
    model = minicirc.load_model(tmp_path / "model")
    assert model.site_width("z_0") == 48 and model.site_width("resid_mid_1") == model.cfg.d_model == 32
    hooks = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    written = tiny_saes_for(model, hooks, tmp_path / "hooks", metadata=NO_FOLD)
    saes = minicirc.load_saes(tmp_path / "hooks", model)
    assert list(saes) == ["z_0", "resid_mid_1", "resid_1"]
    for hook, w in written.items():
        x = torch.randn(3, w["W_enc"].shape[0])
        want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        torch.testing.assert_close(saes[hook_site(hook)].encode(x), want, rtol=1e-5, atol=1e-5)
    tiny_saes_for(model, ["blocks.0.attn.hook_z"], tmp_path / "narrow", width=32, metadata=NO_FOLD)
    with pytest.raises(MinicircError, match=r"dictionary width 32 does not match the model's n_heads x head_dim 48 \(site z_0\)"):
        minicirc.load_saes(tmp_path / "narrow", model)
    # The original tree: every site's folder, and optional folders where they are.
    original_tree(model, tmp_path / "tree", {})
    assert list(minicirc.load_saes(tmp_path / "tree", model)) == model.sites
    for hook in hooks[:2]:
        site = hook_site(hook)
        tiny_saes_for(model, [hook], tmp_path / "extra", metadata=NO_FOLD)
        os.rename(tmp_path / "extra" / hook.replace(".", "_"), tmp_path / "tree" / site_folder(site))
    got = minicirc.load_saes(tmp_path / "tree", model)
    assert list(got) == [s for s in model.all_sites if s in set(model.sites) | {"z_0", "resid_mid_1"}]
    assert got["z_0"].d_in == 48


def test_z_dictionary_is_refused_for_attn_out_whatever_the_widths(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)
    assert model.cfg.n_heads * model.cfg.head_dim == model.cfg.d_model   # the widths agree here
    original_tree(model, tmp_path / "t", {"attn_1": "blocks.1.attn.hook_z"})
    with pytest.raises(MinicircError, match="reads site z_1, but it sits in folder attn_out_layer1 for site attn_1 "
                                            r"\(z is the concatenated head outputs"):
        minicirc.load_saes(tmp_path / "t", model)


# --- Gemma Scope params.npz ---------------------------------------------------------------------------

def test_gemma_scope_npz(tmp_path):
    w = draw()
    np.savez(tmp_path / "params.npz", **{k: w[k].numpy().astype(np.float32) for k in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]})
    for path in (tmp_path / "params.npz", tmp_path):
        sae = load_sae(path)
        pre = w["x"] @ w["W_enc"] + w["b_enc"]           # not centred on b_dec
        want = torch.relu(pre) * (pre > w["threshold"])
        close_where(sae.encode(w["x"].float()), want, (pre - w["threshold"]).abs() > MARGIN)
        torch.testing.assert_close(sae.decode(want.float()).double(), want @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)


def test_gemma_scope_refusals(tmp_path):
    w = draw()
    os.makedirs(tmp_path / "miss")
    np.savez(tmp_path / "miss" / "params.npz", **{k: w[k].numpy() for k in ["W_enc", "W_dec", "b_enc", "b_dec"]})
    with pytest.raises(MinicircError, match=r"Gemma Scope file lacks \['threshold'\]"):
        load_sae(tmp_path / "miss")
    os.makedirs(tmp_path / "pickle")
    arrays = {k: w[k].numpy() for k in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]}
    arrays["threshold"] = np.array([object()] * F, dtype=object)
    np.savez(tmp_path / "pickle" / "params.npz", **arrays)
    with pytest.raises(MinicircError, match="cannot read as a numpy .npz without pickles"):
        load_sae(tmp_path / "pickle")
    os.makedirs(tmp_path / "nan")
    arrays = {k: w[k].numpy().copy() for k in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]}
    arrays["b_enc"][3] = np.nan
    np.savez(tmp_path / "nan" / "params.npz", **arrays)
    with pytest.raises(MinicircError, match="b_enc contains NaN or inf"):
        load_sae(tmp_path / "nan")


# --- normalize_activations and TransformerLens centring ----------------------------------------------

def relu_np(v):
    return torch.clamp(v, min=0)


@pytest.mark.parametrize("source", ["argument", "cfg", "per-site dict"])
def test_expected_average_only_in_folds_its_factor(tmp_path, source):
    w, c = draw(), float(torch.rand(()) * 3 + 0.2)
    extra = {"normalize_activations": "expected_average_only_in"}
    if source == "cfg":
        extra["norm_scaling_factor"] = c
    write_saelens(tmp_path / "s", cfg6(**extra), std_tensors(w))
    if source == "per-site dict":
        from types import SimpleNamespace
        model = SimpleNamespace(sites=["resid_0"], all_sites=["resid_0"], site_width=lambda site: D,
                                cfg=SimpleNamespace(d_model=D, n_layers=1))
        sae = minicirc.load_saes(tmp_path, model, norm_scaling_factor={"resid_0": c})["resid_0"]
    else:
        sae = load_sae(tmp_path / "s", norm_scaling_factor=c if source == "argument" else None)
    x = w["x"]
    f_lib = relu_np((x * c - w["b_dec"]) @ w["W_enc"] + w["b_enc"])     # the SAE saw x * c
    torch.testing.assert_close(sae.encode(x.float()).double(), f_lib, rtol=1e-5, atol=1e-4)
    x_hat = (f_lib @ w["W_dec"] + w["b_dec"]) / c                       # and reconstructed x * c
    torch.testing.assert_close(sae.decode(f_lib.float()).double(), x_hat, rtol=1e-4, atol=1e-4)
    assert sae.edge_form_error is None


def test_expected_average_only_in_refusals(tmp_path):
    w = draw()
    write_saelens(tmp_path, cfg6(normalize_activations="expected_average_only_in"), std_tensors(w))
    with pytest.raises(MinicircError, match="expected_average_only_in, and its scaling factor is not in the folder .*"
                                            "pass norm_scaling_factor= to load_sae/load_saes"):
        load_sae(tmp_path)
    for bad in (-1.0, 0, "2", True, float("nan")):
        with pytest.raises(MinicircError, match="norm_scaling_factor must be a positive number"):
            load_sae(tmp_path, norm_scaling_factor=bad)


def test_norm_scaling_factor_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    """--norm-scaling-factor X reaches load_saes on circuit, evaluate and explain: without it an
    expected_average_only_in folder is one line and exit 2 (and no output folder), with it the run succeeds
    and the dictionaries it used are the ones folded with X."""
    from test_cli import ROWS, write_data, write_tokenizer
    from minicirc.cli import main
    write_tokenizer(tiny_model_dir, 61)
    model = minicirc.load_model(tiny_model_dir)
    tiny_saes_for(model, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], tmp_path / "saes",
                  normalize_activations="expected_average_only_in")
    write_data(tmp_path / "data.jsonl", ROWS)
    common = ["--model", str(tiny_model_dir), "--saes", str(tmp_path / "saes"), "--data", str(tmp_path / "data.jsonl")]
    runs = {"circuit": ["circuit", *common, "--method", "attrib", "--out", str(tmp_path / "c")],
            "evaluate": ["evaluate", *common, "--circuit", str(tmp_path / "c"), "--out", str(tmp_path / "e")],
            "explain": ["explain", "--model", str(tiny_model_dir), "--saes", str(tmp_path / "saes"), "--site", "resid_1",
                        "--feature", "3", "--data", str(tmp_path / "data.jsonl"), "--k", "2"]}
    for name, args in runs.items():
        if name != "evaluate":  # evaluate needs the circuit made below
            capsys.readouterr()
            assert main(args) == 2, name
            err = capsys.readouterr().err.strip()
            assert "expected_average_only_in, and its scaling factor is not in the folder" in err, err
            assert "--norm-scaling-factor X" in err and len(err.splitlines()) == 1, err
            assert name != "circuit" or not (tmp_path / "c").exists()
        capsys.readouterr()
        assert main(args + ["--norm-scaling-factor", "2.5"]) == 0, (name, capsys.readouterr().err)
    data = json.load(open(tmp_path / "c" / "circuit.json"))
    assert data["sites"] == ["resid_0", "resid_1"] and data["nodes"]
    folded = minicirc.load_saes(tmp_path / "saes", model, norm_scaling_factor=2.5)
    assert data["settings"]["saes"] == saes_hash(folded) != saes_hash(minicirc.load_saes(tmp_path / "saes", model, norm_scaling_factor=1.0))
    assert json.load(open(tmp_path / "e" / "evaluation.json"))["n_nodes"] == len(data["nodes"])
    capsys.readouterr()
    assert main(runs["circuit"][:-1] + [str(tmp_path / "c2"), "--norm-scaling-factor", "-1"]) == 2
    assert "norm_scaling_factor must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists()


@pytest.mark.parametrize("arch", ["standard", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_layer_norm_in_and_out(tmp_path, arch, apply_b_dec):
    """SAELens layer_norm: x_n = (x - mean) / (unbiased std + 1e-5) in, (f @ W_dec + b_dec) * std + mean out.
    minicirc's f is std * f_lib and decode(f) = f @ W_dec: std * b_dec + mean join the error term."""
    w, (gate_b, mag_b, r_mag) = draw(), (torch.randn(F, dtype=torch.float64) * 0.5 for _ in range(3))
    tensors = std_tensors(w) if arch == "standard" else {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
                                                         "b_gate": gate_b, "b_mag": mag_b, "r_mag": r_mag}
    write_saelens(tmp_path, cfg6(arch, normalize_activations="layer_norm", apply_b_dec_to_input=apply_b_dec), tensors)
    sae = load_sae(tmp_path)
    x = w["x"]
    mean = x.mean(-1, keepdim=True)
    std = torch.tensor(np.std(x.numpy(), axis=-1, ddof=1, keepdims=True))
    s = (x - mean) / (std + 1e-5) - (w["b_dec"] if apply_b_dec else 0)
    if arch == "standard":
        pre = s @ w["W_enc"] + w["b_enc"]
        f_lib, keep = relu_np(pre), pre.abs() > MARGIN
    else:
        gate, mag = s @ w["W_enc"] + gate_b, s @ (w["W_enc"] * r_mag.exp()) + mag_b
        f_lib, keep = (gate > 0) * relu_np(mag), (gate.abs() > MARGIN) & (mag.abs() > MARGIN)
    close_where(sae.encode(x.float()), std * f_lib, keep)
    x_hat_lib = (f_lib @ w["W_dec"] + w["b_dec"]) * std + mean
    torch.testing.assert_close(sae.decode((std * f_lib).float()).double() + std * w["b_dec"] + mean, x_hat_lib,
                               rtol=1e-4, atol=1e-4)
    f, err = sae(x.float())
    torch.testing.assert_close(sae.decode(f) + err, x.float(), rtol=1e-5, atol=1e-5)
    assert "layer_norm" in sae.edge_form_error


def test_constant_norm_rescale_in_and_out(tmp_path):
    w = draw()
    write_saelens(tmp_path, cfg6("topk", k=6, normalize_activations="constant_norm_rescale"), std_tensors(w))
    sae = load_sae(tmp_path)
    x = w["x"]
    c = D ** 0.5 / x.norm(dim=-1, keepdim=True)
    h = (x * c - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    srt = h.sort(dim=-1, descending=True).values
    f_lib = relu_np(h) * (h >= srt[..., 5:6])
    keep = ((srt[..., 5] - srt[..., 6]) > MARGIN)[..., None].expand_as(h)
    close_where(sae.encode(x.float()), f_lib / c, keep)
    x_hat_lib = (f_lib @ w["W_dec"] + w["b_dec"]) / c
    torch.testing.assert_close(sae.decode((f_lib / c).float()).double() + w["b_dec"] / c, x_hat_lib, rtol=1e-4, atol=1e-4)
    assert "constant_norm_rescale" in sae.edge_form_error
    f0, err0 = sae(torch.zeros(2, D))     # an all-zero token: no NaN, no features, nothing left over
    assert torch.isfinite(f0).all() and f0.abs().max() < 1e-30 and err0.abs().max() < 1e-30


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "gated"])
@pytest.mark.parametrize("layout", ["6.x", "pre-6"])
def test_center_writing_weights_centres_the_input(tmp_path, arch, layout):
    """Trained on TransformerLens-centred activations: the SAE sees x - mean(x) (its encode is written out here
    on the centred input); the mean joins the error term."""
    w = draw()
    gate_b, mag_b, r_mag = (torch.randn(F, dtype=torch.float64) * 0.5 for _ in range(3))
    tensors = {**std_tensors(w), "threshold": w["threshold"]} if arch != "gated" else \
        {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"], "b_gate": gate_b, "b_mag": mag_b, "r_mag": r_mag}
    kwargs = {"center_writing_weights": True, "fold_ln": True}
    if layout == "6.x":
        cfg = cfg6(arch, k=5, metadata={"model_from_pretrained_kwargs": kwargs})
    else:
        cfg = {"architecture": arch, "d_in": D, "d_sae": F, "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True,
               "hook_name": "blocks.1.hook_resid_pre", "normalize_activations": "none", "sae_lens_version": "5.11.0",
               "model_from_pretrained_kwargs": kwargs}
    write_saelens(tmp_path, cfg, tensors)
    sae = load_sae(tmp_path)
    x = w["x"]
    s = x - x.mean(-1, keepdim=True) - w["b_dec"]
    pre = s @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        want, keep = relu_np(pre), pre.abs() > MARGIN
    elif arch == "jumprelu":
        want, keep = relu_np(pre) * (pre > w["threshold"]), (pre - w["threshold"]).abs() > MARGIN
    elif arch == "topk":
        srt = pre.sort(dim=-1, descending=True).values
        want, keep = relu_np(pre) * (pre >= srt[..., 4:5]), ((srt[..., 4] - srt[..., 5]) > MARGIN)[..., None].expand_as(pre)
    else:
        gate, mag = s @ w["W_enc"] + gate_b, s @ (w["W_enc"] * r_mag.exp()) + mag_b
        want, keep = (gate > 0) * relu_np(mag), (gate.abs() > MARGIN) & (mag.abs() > MARGIN)
    close_where(sae.encode(x.float()), want, keep)
    # Not the uncentred reading (the test can tell them apart).
    pre_raw = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert (pre_raw - pre).abs().max() > 0.1
    assert sae.edge_form_error is None


def test_centring_leaves_z_alone_and_refuses_constant_norm(tmp_path):
    w = draw()
    kw = {"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    write_saelens(tmp_path / "z", cfg6(hook="blocks.0.attn.hook_z", metadata=kw), std_tensors(w))
    pre = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]     # z is read before W_O: centring does not reach it
    close_where(load_sae(tmp_path / "z").encode(w["x"].float()), relu_np(pre), pre.abs() > MARGIN)
    write_saelens(tmp_path / "c", cfg6(normalize_activations="constant_norm_rescale", metadata=kw), std_tensors(w))
    with pytest.raises(MinicircError, match="center_writing_weights with constant_norm_rescale .* not supported"):
        load_sae(tmp_path / "c")
    # SAELens' default (no model_from_pretrained_kwargs, or center_writing_weights false): not centred.
    write_saelens(tmp_path / "n", cfg6(metadata={"model_from_pretrained_kwargs": {"center_writing_weights": False}}),
                  std_tensors(w))
    close_where(load_sae(tmp_path / "n").encode(w["x"].float()), relu_np(pre), pre.abs() > MARGIN)


def test_finetuning_scaling_factor(tmp_path):
    w = draw()
    write_saelens(tmp_path / "ones", cfg6(), {**std_tensors(w), "scaling_factor": torch.ones(F)})
    pre = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    close_where(load_sae(tmp_path / "ones").encode(w["x"].float()), relu_np(pre), pre.abs() > MARGIN)
    write_saelens(tmp_path / "other", cfg6(), {**std_tensors(w), "scaling_factor": torch.rand(F) + 0.5})
    with pytest.raises(MinicircError, match="finetuning scaling_factor that is not all ones; not supported"):
        load_sae(tmp_path / "other")


def test_unknown_normalisation_is_refused(tmp_path):
    write_saelens(tmp_path, cfg6(normalize_activations="covariance_whitening"), std_tensors(draw()))
    with pytest.raises(MinicircError, match="normalize_activations='covariance_whitening' is not supported"):
        load_sae(tmp_path)


# --- gated and Matryoshka -----------------------------------------------------------------------------

def test_saelens_gated(tmp_path):
    w = draw()
    b_gate, b_mag, r_mag = (torch.randn(F, dtype=torch.float64) * 0.5 for _ in range(3))
    write_saelens(tmp_path, cfg6("gated"), {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
                                            "b_gate": b_gate, "b_mag": b_mag, "r_mag": r_mag})
    sae = load_sae(tmp_path)
    s = w["x"] - w["b_dec"]
    gate, mag = s @ w["W_enc"] + b_gate, s @ (w["W_enc"] * r_mag.exp()) + b_mag
    want = (gate > 0) * relu_np(mag)
    assert ((gate > 0) & (mag < 0)).any() and ((gate < 0) & (mag > 0)).any()   # gate and magnitude disagree somewhere
    close_where(sae.encode(w["x"].float()), want, (gate.abs() > MARGIN) & (mag.abs() > MARGIN))
    torch.testing.assert_close(sae.decode(want.float()).double(), want @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_config", [True, False])
def test_dictionary_learning_gated(tmp_path, with_config):
    w = draw()
    gate_bias, mag_bias, r_mag = (torch.randn(F, dtype=torch.float64) * 0.5 for _ in range(3))
    # nn.Linear layout, no encoder bias: encoder.weight (F, D), decoder.weight (D, F).
    state = {"encoder.weight": w["W_enc"].T.float().contiguous(), "decoder.weight": w["W_dec"].T.float().contiguous(),
             "decoder_bias": w["b_dec"].float(), "r_mag": r_mag.float(), "gate_bias": gate_bias.float(),
             "mag_bias": mag_bias.float()}
    write_dl(tmp_path, state, "GatedAutoEncoder" if with_config else None)
    sae = load_sae(tmp_path)
    e = (w["x"] - w["b_dec"]) @ w["W_enc"]
    gate, mag = e + gate_bias, r_mag.exp() * e + mag_bias
    want = (gate > 0) * relu_np(mag)
    close_where(sae.encode(w["x"].float()), want, (gate.abs() > MARGIN) & (mag.abs() > MARGIN))
    torch.testing.assert_close(sae.decode(want.float()).double(), want @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threshold", [0.7, -1.0])    # -1: the value a run leaves when the threshold was never set
@pytest.mark.parametrize("with_config", [True, False])
def test_dictionary_learning_matryoshka(tmp_path, threshold, with_config):
    w = draw()
    state = {"W_enc": w["W_enc"].float(), "b_enc": w["b_enc"].float(), "W_dec": w["W_dec"].float(),
             "b_dec": w["b_dec"].float(), "k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(threshold),
             "group_sizes": torch.tensor([8, 12, 20])}
    write_dl(tmp_path, state, "MatryoshkaBatchTopKSAE" if with_config else None, k=6, group_sizes=[8, 12, 20])
    sae = load_sae(tmp_path)
    pre = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    post = relu_np(pre)
    want = post * (post > threshold)
    close_where(sae.encode(w["x"].float()), want, (pre - max(threshold, 0)).abs() > MARGIN)


def test_matryoshka_without_threshold(tmp_path):
    state = {"W_enc": torch.randn(D, F), "b_enc": torch.randn(F), "W_dec": torch.randn(F, D), "b_dec": torch.randn(D),
             "k": torch.tensor(4), "group_sizes": torch.tensor([F // 2, F // 2])}
    write_dl(tmp_path, state, "MatryoshkaBatchTopKSAE")
    with pytest.raises(MinicircError, match="MatryoshkaBatchTopKSAE file lacks its threshold"):
        load_sae(tmp_path)


# --- derivatives: what edges assume, by finite differences ---------------------------------------------

def fd_jacobian(sae, x, eps=1e-4):
    """(F, D) central differences of encode at one token x (float64), and whether no jump lies within eps
    (the active set is the same at x and at x +- eps on every axis: then the differences are exact slopes)."""
    cols, active, stable = [], sae.encode(x) != 0, True
    for r in range(x.shape[0]):
        e = torch.zeros_like(x)
        e[r] = eps
        up, down = sae.encode(x + e), sae.encode(x - e)
        stable = stable and torch.equal(up != 0, active) and torch.equal(down != 0, active)
        cols.append((up - down) / (2 * eps))
    return torch.stack(cols, dim=1), stable


def loaded_kinds(tmp_path):
    """One loaded dictionary of each kind, in float64."""
    w = draw()
    b_gate, b_mag, r_mag = (torch.randn(F, dtype=torch.float64) * 0.5 for _ in range(3))
    gated = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"], "b_gate": b_gate, "b_mag": b_mag, "r_mag": r_mag}
    centred = {"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    cases = {"relu": (cfg6(), std_tensors(w)), "jumprelu": (cfg6("jumprelu"), {**std_tensors(w), "threshold": w["threshold"]}),
             "topk": (cfg6("topk", k=5), std_tensors(w)), "gated": (cfg6("gated"), gated),
             "centred gated": (cfg6("gated", metadata=centred), gated),
             "scaled": (cfg6(normalize_activations="expected_average_only_in", norm_scaling_factor=2.5), std_tensors(w)),
             "layer_norm": (cfg6(normalize_activations="layer_norm"), std_tensors(w)),
             "constant_norm_rescale": (cfg6(normalize_activations="constant_norm_rescale"), std_tensors(w))}
    out = {}
    for name, (cfg, tensors) in cases.items():
        write_saelens(tmp_path / name, cfg, tensors)
        out[name] = load_sae(tmp_path / name).double()
    return out, w["x"].reshape(-1, D)


def test_edge_form_holds_where_claimed_and_fails_where_refused(tmp_path):
    """df_i/dx = 1[f_i != 0] W_enc[:, i] (what attribution.edges.downstream_rows uses) for every kind without a
    per-token normalisation; the two per-token normalisations break it, and say so in edge_form_error."""
    saes, xs = loaded_kinds(tmp_path)
    for name, sae in saes.items():
        checked = 0
        for x in xs:
            J, stable = fd_jacobian(sae, x)
            claimed = (sae.encode(x) != 0).double()[:, None] * sae.W_enc.T
            if not stable:
                continue
            checked += 1
            if sae.edge_form_error is None:
                torch.testing.assert_close(J, claimed, rtol=1e-5, atol=1e-5, msg=name)
            else:
                assert (J - claimed).abs().max() > 1e-3, name
        assert checked >= len(xs) // 2, name
    assert [n for n, s in saes.items() if s.edge_form_error] == ["layer_norm", "constant_norm_rescale"]


def test_edges_refuse_a_per_token_normalised_dictionary(tiny_model_dir, tmp_path):
    """Node effects only need the splice decode(f) + err (affine in f): they run. Edges into a layer_norm
    dictionary would use the wrong derivative: refused, naming the dictionary and the way out."""
    from minicirc.data import load_examples, tokenize
    from test_cli import ROWS, write_data, write_tokenizer
    write_tokenizer(tiny_model_dir, 61)
    model = minicirc.load_model(tiny_model_dir)
    tiny_saes_for(model, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], tmp_path / "saes")
    cfg_path = tmp_path / "saes" / "blocks_1_hook_resid_post" / "cfg.json"
    cfg = json.load(open(cfg_path))
    cfg["normalize_activations"] = "layer_norm"
    json.dump(cfg, open(cfg_path, "w"))
    saes = minicirc.load_saes(tmp_path / "saes", model)
    write_data(tmp_path / "data.jsonl", ROWS)
    batch = tokenize(load_examples(tmp_path / "data.jsonl"), minicirc.load_tokenizer(tiny_model_dir))
    c = minicirc.find_circuit(model, saes, batch, method="attrib", nodes_only=True, progress=False)
    assert sorted(c.sites) == ["resid_0", "resid_1"]
    with pytest.raises(MinicircError, match="blocks_1_hook_resid_post: its input normalisation layer_norm .* edge "
                                            r"effects into this dictionary would be wrong; compute nodes only \(--nodes-only\)"):
        minicirc.find_circuit(model, saes, batch, method="attrib", progress=False)
    # Upstream only, it is fine: edges from it use dx/df_j = W_dec[j] of the affine splice.
    up = {"resid_0": saes["resid_1"], "resid_1": saes["resid_0"]}
    assert minicirc.find_circuit(model, up, batch, method="attrib", progress=False).sites == ["resid_0", "resid_1"]


# --- hashes --------------------------------------------------------------------------------------------

def hash_before_this_change(saes):
    """saes_hash as circuit.json files written so far carry it, written out: site, kind, the five tensors as
    float32 bytes, k, and a mark where b_dec is nonzero and not subtracted."""
    h = hashlib.sha256()
    for site in sorted(saes):
        sae = saes[site]
        h.update(site.encode() + sae.kind.encode())
        for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold):
            h.update(t.detach().cpu().float().numpy().tobytes())
        h.update(str(sae.k).encode())
        if not sae.subtract_b_dec and bool(sae.b_dec.any()):
            h.update(b"|b_dec not subtracted")
    return h.hexdigest()


def test_hashes_of_the_kinds_that_loaded_before_are_unchanged(tmp_path):
    saes, _ = loaded_kinds(tmp_path)
    old = {n: s.float() for n, s in saes.items() if n in ("relu", "jumprelu", "topk")}
    w = draw()
    write_dl(tmp_path / "ae", {"encoder.weight": w["W_enc"].T.float(), "encoder.bias": w["b_enc"].float(),
                               "decoder.weight": w["W_dec"].T.float(), "bias": w["b_dec"].float()}, "AutoEncoder")
    old["dl"] = load_sae(tmp_path / "ae")
    np.savez(tmp_path / "params.npz", **{k: w[k].numpy() for k in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]})
    old["gemma"] = load_sae(tmp_path / "params.npz")
    old["identity"] = minicirc.IdentityDictionary(D)
    for name, sae in old.items():
        assert saes_hash({"resid_0": sae}) == hash_before_this_change({"resid_0": sae}), name
    assert saes_hash(old) == hash_before_this_change(old)


def test_hash_sees_the_gate_and_the_normalisation(tmp_path):
    saes, _ = loaded_kinds(tmp_path)
    g = saes["gated"].float()
    other_gate = Dictionary(g.W_enc, g.b_enc, g.W_dec, g.b_dec, "gated", W_gate=g.W_gate, b_gate=g.b_gate + 0.5)
    same = Dictionary(g.W_enc, g.b_enc, g.W_dec, g.b_dec, "gated", W_gate=g.W_gate.clone(), b_gate=g.b_gate.clone())
    assert saes_hash({"a": same}) == saes_hash({"a": g})
    assert saes_hash({"a": other_gate}) != saes_hash({"a": g})
    r = saes["relu"].float()
    normed = Dictionary(r.W_enc, r.b_enc, r.W_dec, r.b_dec, "relu", input_norm="layer_norm")
    assert saes_hash({"a": normed}) != saes_hash({"a": r})


def test_constructor_checks_shapes_only():
    """Finite values are the loaders' job (sae.checked): building a Dictionary makes no pass over its weights."""
    w = draw()
    W = w["W_enc"].clone()
    W[0, 0] = float("nan")
    sae = Dictionary(W, w["b_enc"], w["W_dec"], w["b_dec"], "relu")
    with pytest.raises(MinicircError, match="W_enc contains NaN or inf"):
        minicirc.sae.checked(sae)


# --- z dictionaries trained through TransformerLens: z - b_V ------------------------------------------

class ZModel:
    """The little of a model that load_saes reads, with one z site and its value biases."""

    def __init__(self, b_V=None):
        from types import SimpleNamespace
        self.sites = ["embed", "attn_0"]
        self.all_sites = ["embed", "z_0", "attn_0"]
        self.cfg = SimpleNamespace(d_model=D, n_layers=1, n_heads=3, head_dim=D // 3)
        self.b_V = b_V

    def site_width(self, name):
        return self.cfg.n_heads * self.cfg.head_dim if name.startswith("z_") else self.cfg.d_model

    def value_bias(self, layer):
        assert layer == 0
        return self.b_V


@pytest.mark.parametrize("arch, apply_b_dec", [("standard", True), ("gated", False), ("jumprelu", False)])
def test_z_dictionary_reads_z_minus_value_bias(tmp_path, arch, apply_b_dec):
    """TransformerLens folds b_V into b_O by default, so its hook_z is z - b_V: placed on a model, the
    dictionary is shifted to read minicirc's z (which keeps b_V) and to reconstruct it."""
    w = draw()
    b_gate, b_mag, r_mag = (torch.randn(F, dtype=torch.float64) * 0.5 for _ in range(3))
    tensors = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"], "b_gate": b_gate, "b_mag": b_mag,
               "r_mag": r_mag} if arch == "gated" else {**std_tensors(w), "threshold": w["threshold"]}
    write_saelens(tmp_path / "t" / "z", cfg6(arch, hook="blocks.0.attn.hook_z", apply_b_dec_to_input=apply_b_dec), tensors)
    b_V = torch.randn(D, dtype=torch.float64) + 1.0
    sae = minicirc.load_saes(tmp_path / "t", ZModel(b_V.float()))["z_0"]
    z = w["x"]
    s = z - b_V - (w["b_dec"] if apply_b_dec else 0)
    pre = s @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        want, keep = relu_np(pre), pre.abs() > MARGIN
    elif arch == "jumprelu":
        want, keep = relu_np(pre) * (pre > w["threshold"]), (pre - w["threshold"]).abs() > MARGIN
    else:
        gate, mag = s @ w["W_enc"] + b_gate, s @ (w["W_enc"] * r_mag.exp()) + b_mag
        want, keep = (gate > 0) * relu_np(mag), (gate.abs() > MARGIN) & (mag.abs() > MARGIN)
    close_where(sae.encode(z.float()), want, keep)
    torch.testing.assert_close(sae.decode(want.float()).double(), want @ w["W_dec"] + w["b_dec"] + b_V, rtol=1e-4, atol=1e-4)
    assert sae.edge_form_error is None
    # Loaded alone, without a model, it is the file's own dictionary (reading z - b_V), and says so.
    alone = load_sae(tmp_path / "t" / "z")
    assert alone.reads_z_minus_value_bias and not sae.reads_z_minus_value_bias


def test_z_dictionary_value_bias_cases(tmp_path):
    w = draw()
    write_saelens(tmp_path / "t" / "z", cfg6(hook="blocks.0.attn.hook_z"), std_tensors(w))

    class NoValueBias(ZModel):
        value_bias = None

    with pytest.raises(MinicircError, match=r"this z dictionary reads z - b_V, and this model does not give its value "
                                            r"biases \(model.value_bias\(layer\)\)"):
        minicirc.load_saes(tmp_path / "t", NoValueBias())
    # A model without value biases (None): nothing to shift.
    pre = (w["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    close_where(minicirc.load_saes(tmp_path / "t", ZModel(None))["z_0"].encode(w["x"].float()), relu_np(pre), pre.abs() > MARGIN)
    # Trained with fold_value_biases false: read as it is, on any model.
    write_saelens(tmp_path / "u" / "z", cfg6(hook="blocks.0.attn.hook_z",
                                             metadata={"model_from_pretrained_kwargs": {"fold_value_biases": False}}),
                  std_tensors(w))
    sae = minicirc.load_saes(tmp_path / "u", ZModel(torch.randn(D) + 1))["z_0"]
    close_where(sae.encode(w["x"].float()), relu_np(pre), pre.abs() > MARGIN)
    # Shifted and per-token normalised: refused.
    write_saelens(tmp_path / "v" / "z", cfg6(hook="blocks.0.attn.hook_z", normalize_activations="layer_norm"), std_tensors(w))
    with pytest.raises(MinicircError, match=r"its input is shifted \(z - b_V\) and normalised \(layer_norm\)"):
        minicirc.load_saes(tmp_path / "v", ZModel(torch.randn(D) + 1))


def test_edges_into_gated_dictionaries_equal_one_at_a_time():
    """The library's edges (which use dd_i/dy = 1[d_i != 0] W_enc[:, i], W_enc being the magnitude path)
    against test_attribution's one-backward-per-node reference, with gated dictionaries at half the sites."""
    import minicirc.attribution.edges
    import test_attribution as TA

    def gated_saes(model):
        gen = torch.Generator().manual_seed(619)
        out = {}
        for i, s in enumerate(model.sites):
            base = TA.make_sae(gen, "relu")
            if i % 2 == 0:
                W_gate = base.W_enc + 0.5 * torch.randn(base.W_enc.shape, generator=gen) / TA.D_MODEL ** 0.5
                base = Dictionary(base.W_enc, base.b_enc, base.W_dec, base.b_dec, "gated", W_gate=W_gate,
                                  b_gate=0.3 * torch.randn(base.n_features, generator=gen), subtract_b_dec=base.subtract_b_dec)
            out[s] = base.to(torch.float64)
        return out

    model, saes, batch, metric, st, L, ref_eff, node = TA.edge_setup(617, False, saes=gated_saes)
    states, effects, grads = node.states, TA.dense_effects(node), node.grads
    TA.assert_effects_equal(effects, ref_eff)
    gated = [s for s in saes if saes[s].kind == "gated"]
    # The gate closes some features the magnitude path would open, and the reverse.
    assert any(((saes[s].encode(states[s].x_c) == 0) & (saes[s].pre_activation(states[s].x_c) > 0)).any() for s in gated)
    tau = TA.threshold_for(ref_eff)
    ref = TA.as_dict(minicirc.attribution.edge_effects(model, saes, batch, st, TA.site_grads(L), ref_eff, tau, "sum",
                                                       TA.design_pairs(2, False)))
    assert any(d in gated for _, d in ref)
    fast = minicirc.attribution.edges.edge_effects(model, saes, batch, states, grads, node.effects, tau, "sum")
    TA.assert_edges_equal(TA.as_dict(fast), ref)
