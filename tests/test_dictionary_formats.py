"""sparsify and circuit-tracer dictionaries against the numbers each library computes on files it wrote
(tests/data/, written by tests/data/make_dictionary_fixtures.py with eai-sparsify 1.3.3 and circuit-tracer
0.5.0): features, decode and skip term; the site each file names on tiny Llama, GPT-2 and Gemma-2 models;
a sparsify folder never read as SAELens' or the other way round; and bad input, each a one-line error that
names the file and the problem."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicirc
from minicirc.attribution import site_order
from minicirc.errors import MinicircError
from minicirc.explain import top_activations
from minicirc.sae import Dictionary, load_sae, load_saes, load_transcoder_set, saes_hash
from test_families import write_hf

DATA = os.path.join(os.path.dirname(__file__), "data")
REFS = load_file(os.path.join(DATA, "dictionary_refs.safetensors"))
KEYS = sorted({k.rsplit(".", 1)[0] for k in REFS if "/" in k})     # the per-layer dictionaries
CLTS = sorted({k.rsplit(".", 1)[0] for k in REFS if "/" not in k})  # the cross-layer transcoders
TOL = dict(rtol=1e-6, atol=1e-6)

# What each fixture is: (kind, site, reads, has a skip term, number of features)
EXPECTED = {
    "sparsify_llama/layers.1": ("topk", "resid_1", None, False, 16),   # num_latents 0: d_in * expansion_factor
    "sparsify_llama/layers.0.self_attn": ("groupmax", "attn_0", None, True, 16),
    "sparsify_llama/layers.1.mlp": ("topk", "mlp_1", "mlp_in", True, 16),   # stored in bfloat16
    "sparsify_gpt2/h.0": ("topk", "resid_0", None, False, 16),
    "sparsify_gpt2/h.1.mlp": ("groupmax", "mlp_1", "mlp_in", False, 16),
    "ct_jumprelu_skip/layer_0": ("jumprelu", "mlp_0", "mlp_in", True, 16),
    "ct_jumprelu_skip/layer_1": ("jumprelu", "mlp_1", "mlp_in", True, 16),
    "ct_relu_bf16/layer_0": ("relu", "mlp_0", "resid_mid", False, 16),
    "ct_relu_bf16/layer_1": ("relu", "mlp_1", "resid_mid", False, 16),
}


def fixture_path(key):
    run, name = key.split("/")
    return os.path.join(DATA, run, name + (".safetensors" if run.startswith("ct_") else ""))


def check_against_library(sae, key):
    x = REFS[f"{key}.x"]
    f = sae.encode(x)
    torch.testing.assert_close(f, REFS[f"{key}.features"], **TOL)
    assert bool((f != 0).any(dim=-1).all())          # every row has active features: the comparison bites
    torch.testing.assert_close(sae.decode(f) + sae.skip(x), REFS[f"{key}.out"], **TOL)
    if f"{key}.decode" in REFS:                      # sparsify's decode: f @ W_dec + b_dec, the skip apart
        torch.testing.assert_close(sae.decode(f), REFS[f"{key}.decode"], **TOL)
    if f"{key}.skip" in REFS:
        torch.testing.assert_close(sae.skip(x), REFS[f"{key}.skip"], **TOL)
        assert sae.skip(x).abs().max() > 0.1


def test_every_fixture_is_covered():
    assert KEYS == sorted(EXPECTED)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_load_sae_computes_what_the_library_computes(key):
    sae = load_sae(fixture_path(key))
    kind, site, reads, skip, n = EXPECTED[key]
    assert (sae.kind, sae.site, sae.reads, sae.has_skip, sae.n_features) == (kind, site, reads, skip, n)
    assert sae.W_enc.dtype == torch.float32
    check_against_library(sae, key)


def test_decoder_is_not_renormalised():
    sae = load_sae(fixture_path("sparsify_llama/layers.1"))
    stored = load_file(os.path.join(DATA, "sparsify_llama", "layers.1", "sae.safetensors"))
    assert torch.equal(sae.W_dec, stored["W_dec"]) and not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny 2-layer models of width 8 (the fixtures' d_in), and one of width 16."""
    root = tmp_path_factory.mktemp("models")
    small = dict(num_attention_heads=2, num_key_value_heads=2, intermediate_size=12)
    specs = {"llama": ("llama", dict(hidden_size=8, **small)), "gpt2": ("gpt2", dict(n_embd=8, n_head=2)),
             "gemma2": ("gemma2", dict(hidden_size=8, head_dim=4, **small)),
             "llama16": ("llama", dict(hidden_size=16, **small)), "llama1": ("llama", dict(hidden_size=8, num_hidden_layers=1, **small))}
    out = {}
    for name, (kind, kw) in specs.items():
        write_hf(root / name, kind, **kw)
        out[name] = minicirc.load_model(root / name)
    return out


@pytest.mark.parametrize("run, model_name", [("sparsify_llama", "llama"), ("sparsify_gpt2", "gpt2"),
                                             ("ct_jumprelu_skip", "llama"), ("ct_relu_bf16", "llama"),
                                             ("ct_jumprelu_skip", "gpt2")])
def test_a_run_folder_loads_as_a_tree(models, run, model_name):
    saes = load_saes(os.path.join(DATA, run), models[model_name])
    keys = [k for k in EXPECTED if k.startswith(run + "/")]
    assert sorted(saes) == sorted(EXPECTED[k][1] for k in keys)
    for key in keys:
        check_against_library(saes[EXPECTED[key][1]], key)


def test_transcoder_set_loads_layer_by_layer():
    saes = load_transcoder_set(os.path.join(DATA, "ct_jumprelu_skip"))
    assert sorted(saes) == ["mlp_0", "mlp_1"]
    check_against_library(saes["mlp_1"], "ct_jumprelu_skip/layer_1")


def test_skip_terms_and_transcoders_are_hashed():
    a = load_sae(fixture_path("sparsify_llama/layers.0.self_attn"))
    plain = Dictionary(a.W_enc, a.b_enc, a.W_dec, a.b_dec, a.kind, k=a.k)
    assert saes_hash({"attn_0": a}) != saes_hash({"attn_0": plain})


def test_the_method_splices_skip_saes_and_transcoders(models):
    """An SAE with a skip term is spliced with the skip in its error node (tests/test_skip_sae.py); a skip
    transcoder as tests/test_transcoders.py checks, and explain encodes its input, the MLP's input: its top
    activation is encode(u) of the scan's run."""
    model = models["llama"]
    saes = load_saes(os.path.join(DATA, "sparsify_llama"), model)
    assert site_order(model, {"attn_0": saes["attn_0"]}) == ["attn_0"]      # an SAE with a skip term
    assert site_order(model, {"resid_1": saes["resid_1"]}) == ["resid_1"]
    assert site_order(model, {"mlp_1": saes["mlp_1"]}) == ["mlp_1"]           # a skip transcoder
    tokens = [1, 2, 3]
    cache = {}
    with torch.no_grad():
        model(torch.tensor([tokens]), cache=cache, extra=["resid_mid_1"])
        f = saes["mlp_1"].encode(model.layers[1].post_attention_layernorm(cache["resid_mid_1"]))[0]
    j = int(f.max(0).values.argmax())
    top = top_activations(model, {"mlp_1": saes["mlp_1"]}, {"mlp_1": [j]}, [tokens], k=1)["mlp_1"][j]
    assert top[0][1] == int(f[:, j].argmax()) and top[0][2] == pytest.approx(f[:, j].max().item(), rel=1e-5)


# --- a sparsify folder is never taken for SAELens, nor the other way round -----------------------------------

def copy_fixture(tmp_path, key):
    dst = tmp_path / os.path.basename(fixture_path(key))
    shutil.copytree(fixture_path(key), dst)
    return dst


def test_sparsify_folder_is_read_as_sparsify_not_saelens(tmp_path):
    folder = copy_fixture(tmp_path, "sparsify_llama/layers.1")
    sae = load_sae(folder)
    assert sae.kind == "topk" and sae.subtract_b_dec and sae.source == str(folder)
    os.rename(folder / "sae.safetensors", folder / "sae_weights.safetensors")     # SAELens' file name
    with pytest.raises(MinicircError, match="sparsify cfg.json beside SAELens' sae_weights.safetensors"):
        load_sae(folder)


def test_saelens_cfg_beside_sparsify_weights_is_refused(tmp_path):
    folder = copy_fixture(tmp_path, "sparsify_llama/layers.1")
    with open(folder / "cfg.json", "w") as f:
        json.dump({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 3, "hook_name": "blocks.1.hook_resid_post"}, f)
    with pytest.raises(MinicircError, match="not sparsify's"):
        load_sae(folder)


def test_both_weight_files_in_one_folder_are_refused(tmp_path):
    folder = copy_fixture(tmp_path, "sparsify_llama/layers.1")
    shutil.copy(folder / "sae.safetensors", folder / "sae_weights.safetensors")
    with pytest.raises(MinicircError, match="both sae.safetensors"):
        load_sae(folder)


def test_saelens_folder_is_read_as_saelens(tmp_path):
    from test_sae_files import cfg6, write_saelens
    w = {"W_enc": torch.randn(8, 16), "b_enc": torch.randn(16), "W_dec": torch.randn(16, 8), "b_dec": torch.randn(8)}
    write_saelens(tmp_path / "s", cfg6(d_in=8, d_sae=16), w)
    sae = load_sae(tmp_path / "s")
    assert sae.kind == "relu" and sae.site == "resid_0" and sae.reads is None and not sae.has_skip


# --- bad input: one line, naming the file and the problem ----------------------------------------------------

def one_line_error(fn, *needles):
    with pytest.raises(MinicircError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_hookpoint_naming_no_module(tmp_path, models):
    run = tmp_path / "run"
    shutil.copytree(fixture_path("sparsify_llama/layers.1"), run / "layers.1.mlp.down_proj")
    one_line_error(lambda: load_saes(run, models["llama"]), str(run / "layers.1.mlp.down_proj"), "names no module")
    # A GPT-2 run offered to a Llama model: h.0 is no module of it.
    one_line_error(lambda: load_saes(os.path.join(DATA, "sparsify_gpt2"), models["llama"]),
                   "h.0", "names no module of this Llama model")
    # A hookpoint past the model's layers.
    one_line_error(lambda: load_saes(os.path.join(DATA, "sparsify_llama"), models["llama1"]), "layers.1", "1 layers")


def test_transcoder_outside_an_mlp(tmp_path):
    folder = copy_fixture(tmp_path, "sparsify_llama/layers.1.mlp")
    os.rename(folder, tmp_path / "layers.1")
    one_line_error(lambda: load_sae(tmp_path / "layers.1"), str(tmp_path / "layers.1"), "only at an MLP")


def test_module_outputs_gemma2_normalises_again(models):
    one_line_error(lambda: load_saes(os.path.join(DATA, "sparsify_llama"), models["gemma2"]), "Gemma-2",
                   "layers.0.self_attn")
    one_line_error(lambda: load_saes(os.path.join(DATA, "ct_jumprelu_skip"), models["gemma2"]), "mlp.hook_out",
                   "layer_0.safetensors")


def test_transcoder_widths_that_do_not_match_the_mlp(tmp_path, models):
    run = tmp_path / "run"
    shutil.copytree(fixture_path("sparsify_llama/layers.1.mlp"), run / "layers.1.mlp")
    for folder in (os.path.join(DATA, "ct_jumprelu_skip"), str(run)):
        one_line_error(lambda: load_saes(folder, models["llama16"]), "transcoder width 8", "MLP of layer",
                       "d_model 16", folder)


def test_config_yaml_naming_hooks_minicirc_cannot_place(tmp_path, models):
    folder = tmp_path / "ct"
    shutil.copytree(os.path.join(DATA, "ct_relu_bf16"), folder)
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("hook_resid_mid", "ln2.hook_normalized"))
    one_line_error(lambda: load_saes(folder, models["llama"]), str(folder / "config.yaml"), "ln2.hook_normalized")
    (folder / "config.yaml").write_text(text.replace("hook_mlp_out", "hook_resid_post"))
    one_line_error(lambda: load_sae(folder / "layer_0.safetensors"), str(folder / "config.yaml"), "hook_resid_post")


def test_transcoder_set_with_more_layers_than_the_model(tmp_path, models):
    folder = tmp_path / "ct"
    shutil.copytree(os.path.join(DATA, "ct_relu_bf16"), folder)
    one_line_error(lambda: load_saes(folder, models["llama1"]), str(folder / "layer_1.safetensors"), "1 layers")


@pytest.mark.parametrize("name, n_layers, kind, reads", [("ct_clt_jumprelu", 2, "jumprelu", "mlp_in"),
                                                        ("ct_clt_relu_bf16", 3, "relu", "resid_mid")])
def test_cross_layer_transcoder_computes_what_the_library_computes(name, n_layers, kind, reads):
    """circuit-tracer's encode (every layer's features) and decode (every layer's MLP output: the writes of all
    earlier layers' features plus b_dec_t) on x (n_layers, positions, d): layer l's dictionary encodes x[l], and
    mlp_t's reconstruction is decode_t(f_t) + incoming_t, incoming from the earlier layers' W_dec_l[:, t - l]."""
    from minicirc.sae.clt import incoming
    from minicirc.rows import dense_to_rows
    saes = load_transcoder_set(os.path.join(DATA, name))
    assert sorted(saes) == [f"mlp_{l}" for l in range(n_layers)] and name in CLTS
    x, ref_f, ref_out = REFS[f"{name}.x"], REFS[f"{name}.features"], REFS[f"{name}.out"]
    rows = {}
    for t in range(n_layers):
        sae = saes[f"mlp_{t}"]
        assert (sae.kind, sae.reads, sae.layer, sae.n_layers, sae.W_enc.dtype) == (kind, reads, t, n_layers, torch.float32)
        f = sae.encode(x[t])
        torch.testing.assert_close(f, ref_f[t], **TOL)
        assert bool((f != 0).any(dim=-1).all())
        rows[f"mlp_{t}"] = dense_to_rows(f)
        inc = incoming(saes, f"mlp_{t}", rows, len(f))
        out = sae.decode(f) + (0 if inc is None else inc)
        torch.testing.assert_close(out, ref_out[t], **TOL)
        if t:   # the earlier layers' writes matter
            assert inc.abs().max() > 0.1
        by_hand = sum(saes[f"mlp_{l}"].write(saes[f"mlp_{l}"].encode(x[l]), t) for l in range(t + 1)) + sae.b_dec
        torch.testing.assert_close(by_hand, ref_out[t], **TOL)


def test_cross_layer_transcoder_loads_for_a_model_of_its_layer_count(tmp_path, models):
    folder = os.path.join(DATA, "ct_clt_jumprelu")
    saes = load_saes(folder, models["llama"])
    assert sorted(saes) == ["mlp_0", "mlp_1"] and saes["mlp_1"].W_out.shape == (16, 1, 8)
    assert saes_hash(saes) != saes_hash(load_saes(os.path.join(DATA, "ct_jumprelu_skip"), models["llama"]))
    # the layer count: 3 layers for a 2-layer model, 2 for a 1-layer one
    three = os.path.join(DATA, "ct_clt_relu_bf16")
    one_line_error(lambda: load_saes(three, models["llama"]), three, "cross-layer transcoder of 3 layers",
                   "this model has 2 layers")
    one_line_error(lambda: load_saes(folder, models["llama1"]), folder, "of 2 layers", "has 1 layers")
    # one layer of it alone is no dictionary
    one_line_error(lambda: load_sae(folder), str(os.path.join(folder, "config.yaml")), "load_saes")
    # a decoder file missing, or shaped for another layer count
    broken = tmp_path / "clt"
    shutil.copytree(folder, broken)
    os.remove(broken / "W_dec_1.safetensors")
    one_line_error(lambda: load_saes(broken, models["llama"]), str(broken / "W_dec_1.safetensors"), "missing")
    save_file({"W_dec_1": torch.zeros(16, 2, 8)}, str(broken / "W_dec_1.safetensors"))
    one_line_error(lambda: load_saes(broken, models["llama"]), str(broken / "W_dec_1.safetensors"), "(16, 1, 8)")


def test_flat_yaml_reader_skips_blocks_and_strips_quotes(tmp_path):
    from minicirc.sae.circuit_tracer import read_flat_yaml
    (tmp_path / "c.yaml").write_text('model_name: "meta-llama/Llama-3.2-1B"  \nfeature_input_hook: \'mlp.hook_in\'\n'
                                     "feature_output_hook: mlp.hook_out # the MLP\ntranscoders:\n"
                                     "  - hf://x/layer_0.safetensors\n  nested: 3\n")
    assert read_flat_yaml(tmp_path / "c.yaml") == {"model_name": "meta-llama/Llama-3.2-1B",
                                                   "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}
