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
    ("blocks.5.hook_mlp_out", "mlp_5"), ("blocks.1.hook_resid_mid", "resid_mid_1"), ("blocks.4.attn.hook_z", "z_4")])
def test_hook_site(hook, site):
    assert hook_site(hook) == site


@pytest.mark.parametrize("hook", ["blocks.0.hook_mlp_in", "blocks.x.hook_resid_post", "hook_embed", "blocks.1.attn.hook_q"])
def test_unknown_hooks_are_refused(hook):
    with pytest.raises(MinicircError, match="is not a site minicirc knows"):
        hook_site(hook)


def tiny_saes_for(model, hooks, root, seed_shift=0.0):
    """One SAELens folder per hook, named after the hook; returns the weights written, by hook."""
    d = model.cfg.d_model
    written = {}
    for i, hook in enumerate(hooks):
        w = {"W_enc": torch.randn(d, 16), "b_enc": torch.randn(16) * 0.3 + seed_shift, "W_dec": torch.randn(16, d) / 4,
             "b_dec": torch.randn(d) * 0.1}
        write_saelens(os.path.join(root, hook.replace(".", "_")), cfg6(hook=hook, d_in=d, d_sae=16), w)
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
    tiny_saes_for(model, ["blocks.1.attn.hook_z"], tmp_path / "z")
    with pytest.raises(MinicircError, match="reads site z_1, and this model has no z sites"):
        minicirc.load_saes(tmp_path / "z", model)
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
