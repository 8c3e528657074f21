"""`minicirc circuit`, `evaluate` and `compare` with sparsify and circuit-tracer dictionaries (transcoders, skip
terms, cross-layer transcoders), alone and mixed with SAELens SAEs at other sites: the files they write against
the Python API (find_circuit, faithfulness) and the definitions (minicirc.attribution.reference) on the same
inputs. Dictionaries: the files the libraries wrote (tests/data, width 8) or small files in their formats
written here; models: tiny Llama and GPT-NeoX written by transformers."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import minicirc
from minicirc import evaluation as E
from minicirc.attribution import reference as A
from minicirc.circuit import Circuit
from minicirc.data import load_examples, tokenize
from minicirc.experiments import compare
from minicirc.sae import site_folder, site_hook
from test_cli import ROWS, run, write_data, write_tokenizer
from test_compare import write_compare_files
from test_families import V, write_hf

DATA = os.path.join(os.path.dirname(__file__), "data")


def saelens(folder, hook, d, seed, F=12):
    """A SAELens folder (standard, b_dec subtracted) for `hook`."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder)
    save_file({"W_enc": torch.randn(d, F, generator=g) / d ** 0.5 * 1.5, "b_enc": 0.3 * torch.randn(F, generator=g),
               "W_dec": 0.5 * torch.randn(F, d, generator=g), "b_dec": 0.2 * torch.randn(d, generator=g)},
              os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump({"architecture": "standard", "d_in": d, "d_sae": F, "hook_name": hook, "apply_b_dec_to_input": True,
                   "normalize_activations": "none", "metadata": {"sae_lens_version": "6.18.0"}}, f)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    """A 2-layer Llama of width 8 (the library fixtures' width), its tokenizer, data, and dictionary folders:
    clt+saes (circuit-tracer's CLT beside SAELens SAEs at attn_0, resid_0, resid_1), skip+saes (circuit-tracer's
    skip transcoders, a sparsify SAE with skip at attn_0, SAELens at resid_1)."""
    t = tmp_path_factory.mktemp("llama8")
    write_hf(t / "model", "llama", hidden_size=8, num_attention_heads=2, num_key_value_heads=2, intermediate_size=12)
    write_tokenizer(t / "model", V)
    write_data(t / "data.jsonl", ROWS)
    shutil.copytree(os.path.join(DATA, "ct_clt_jumprelu"), t / "clt+saes" / "clt")
    for hook, name in [("blocks.0.hook_attn_out", "a0"), ("blocks.0.hook_resid_post", "r0"),
                       ("blocks.1.hook_resid_post", "r1")]:
        saelens(t / "clt+saes" / name, hook, 8, len(name) + ord(name[1]))
    shutil.copytree(os.path.join(DATA, "ct_jumprelu_skip"), t / "skip+saes" / "transcoders")
    shutil.copytree(os.path.join(DATA, "sparsify_llama", "layers.0.self_attn"), t / "skip+saes" / "layers.0.self_attn")
    saelens(t / "skip+saes" / "r1", "blocks.1.hook_resid_post", 8, 5)
    return t


def api(t, saes_dir):
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / saes_dir, model)
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    return model, saes, batch


def nodes_of(path):
    return {n["id"]: n["effect"] for n in json.loads((path / "circuit.json").read_text())["nodes"]}


def test_clt_alone_circuit_is_the_definitions_mean(llama8, capsys):
    """circuit-tracer's CLT folder alone: --nodes-only node effects equal the definitions' per-example effects
    summed over positions, averaged over examples; without --nodes-only, one line saying why."""
    t = llama8
    out = t / "clt-alone"
    assert run("circuit", "--model", t / "model", "--saes", os.path.join(DATA, "ct_clt_jumprelu"), "--data",
               t / "data.jsonl", "--out", out, "--method", "attrib", "--nodes-only", "--node-threshold", 0) == 0
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(os.path.join(DATA, "ct_clt_jumprelu"), model)
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    states = A.site_states(model, saes, A.logit_diff, batch, A.site_order(model, saes))[2]
    ref = A.attrib_effects(model, saes, A.logit_diff, batch, states)
    # the definitions sum over real positions only where the pads hold 0 effect: padding is on the right and
    # a position past an example's last token cannot move its metric
    saved = Circuit.load(out)
    for s in ("mlp_0", "mlp_1"):
        torch.testing.assert_close(saved.nodes[s], ref[s].sum(1).mean(0).float(), rtol=1e-4, atol=1e-6)
        assert saved.nodes[s].abs().max() > 1e-3
    capsys.readouterr()
    assert run("circuit", "--model", t / "model", "--saes", os.path.join(DATA, "ct_clt_jumprelu"), "--data",
               t / "data.jsonl", "--out", t / "clt-edges") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cross-layer" in err and "--nodes-only" in err
    assert not (t / "clt-edges").exists()


@pytest.mark.parametrize("folder, nodes_only", [("clt+saes", True), ("skip+saes", False)])
def test_circuit_and_evaluate_mixed_with_saes_equal_the_api(llama8, folder, nodes_only):
    t = llama8
    out, ev = t / f"out-{folder}", t / f"ev-{folder}"
    flags = ["--nodes-only"] if nodes_only else ["--edge-threshold", 0.001]
    assert run("circuit", "--model", t / "model", "--saes", t / folder, "--data", t / "data.jsonl", "--out", out,
               "--steps", 3, "--node-threshold", 0.01, "--batch-size", 2, *flags) == 0
    model, saes, batch = api(t, folder)
    want = ({"mlp_0", "mlp_1", "attn_0", "resid_0", "resid_1"} if folder == "clt+saes"
            else {"mlp_0", "mlp_1", "attn_0", "resid_1"})
    assert set(saes) == want
    c = minicirc.find_circuit(model, saes, batch, steps=3, node_threshold=0.01, edge_threshold=0.001,
                              nodes_only=nodes_only, progress=False)
    got = nodes_of(out)
    assert got == pytest.approx({n[0]: n[4] for n in c.kept_nodes()}, abs=1e-5)
    assert {i.split("/")[0] for i in got} >= {"mlp_0", "mlp_1"}
    data = json.loads((out / "circuit.json").read_text())
    if not nodes_only:
        assert len(data["edges"]) == len(c.to_json()["edges"]) > 0
        assert {(e["source"], e["target"]): e["effect"] for e in data["edges"]} == pytest.approx(
            {(e["source"], e["target"]): e["effect"] for e in c.to_json()["edges"]}, abs=1e-5)
    assert run("evaluate", "--model", t / "model", "--saes", t / folder, "--data", t / "data.jsonl",
               "--circuit", out / "circuit.json", "--out", ev) == 0
    got = json.loads((ev / "evaluation.json").read_text())
    ref = E.faithfulness(model, saes, batch, data["nodes"])
    assert got["faithfulness"] == pytest.approx(ref["faithfulness"], abs=1e-5)
    assert got["m_empty"] == pytest.approx(ref["m_empty"], abs=1e-5) and abs(ref["m_full"] - ref["m_empty"]) > 1e-3


# --- compare -------------------------------------------------------------------------------------------------------

def ct_transcoder_file(folder, layer, d, seed, F=20):
    """One circuit-tracer per-layer skip transcoder (JumpReLU) with its config.yaml, in the library's keys."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    save_file({"W_enc": torch.randn(F, d, generator=g) / d ** 0.5 * 1.5, "b_enc": 0.3 * torch.randn(F, generator=g),
               "W_dec": 0.5 * torch.randn(F, d, generator=g), "b_dec": 0.2 * torch.randn(d, generator=g),
               "W_skip": 0.3 * torch.randn(d, d, generator=g),
               "activation_function.threshold": 0.2 * torch.rand(F, generator=g)},
              os.path.join(folder, f"layer_{layer}.safetensors"))
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write("model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: hook_mlp_out\n")


@pytest.fixture
def compare_setup(tmp_path):
    """test_compare's files, with circuit-tracer skip transcoders at every MLP of the original's folder tree."""
    def transcoders(folder, model):
        for l in range(3):
            shutil.rmtree(folder / site_folder(f"mlp_{l}"))
            ct_transcoder_file(folder / site_folder(f"mlp_{l}"), l, 16, 20 + l)
    return write_compare_files(tmp_path, 3, 11, transcoders)


def test_compare_with_transcoders_at_the_mlps(compare_setup, capsys):
    t = compare_setup
    assert run("compare", "--model", t / "model", "--saes", t / "saes", "--data", t / "data", "--out", t / "out",
               "--threads", 1) == 0
    results = json.loads((t / "out" / "results.json").read_text())
    meta = results["_meta"]
    model = minicirc.load_model(t / "model")
    tok = minicirc.load_tokenizer(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    assert all(saes[f"mlp_{l}"].reads == "mlp_in" and saes[f"mlp_{l}"].has_skip for l in range(3))
    for template in meta["templates"]:
        assert meta["full_model_faithfulness"][template] == pytest.approx(1.0, abs=1e-4)
        held = tokenize([ex for ex in load_examples(t / "data" / f"{template}_test.json")
                         if len(tok.encode(ex.clean_prefix).ids) == meta["pairs"][template]["length"]
                         and len(tok.encode(ex.clean_answer).ids) == 1], tok)
        r = results[template]["features"]
        saved = json.loads((t / "out" / template / "features" / "circuit.json").read_text())
        # the saved circuit's faithfulness recomputed through the Python API
        assert r["faithfulness"] == pytest.approx(E.faithfulness(model, saes, held, saved["nodes"])["faithfulness"],
                                                  abs=1e-6, nan_ok=True)
        assert math.isfinite(r["faithfulness"])
        assert any(n["site"].startswith("mlp") for n in saved["nodes"])


def test_compare_refuses_a_cross_layer_transcoder_in_one_line(compare_setup, capsys):
    """compare finds circuits with edges, which cross-layer transcoders do not have."""
    t = compare_setup
    model = minicirc.load_model(t / "model")
    g = torch.Generator().manual_seed(0)
    clt = t / "mixed" / "clt"
    os.makedirs(clt)
    for i in range(3):
        save_file({f"W_enc_{i}": torch.randn(8, 16, generator=g), f"b_enc_{i}": torch.randn(8, generator=g),
                   f"b_dec_{i}": torch.randn(16, generator=g)}, str(clt / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.randn(8, 3 - i, 16, generator=g)}, str(clt / f"W_dec_{i}.safetensors"))
    (clt / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n"
                                     "feature_output_hook: hook_mlp_out\n")
    for s in model.sites:
        if not s.startswith("mlp"):
            saelens(t / "mixed" / f"sae_{s}", site_hook(s), 16, 1)
    capsys.readouterr()
    assert run("compare", "--model", t / "model", "--saes", t / "mixed", "--data", t / "data", "--out", t / "out2",
               "--threads", 1) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minicirc: error")]
    assert len(err) == 1 and "cross-layer" in err[0] and str(clt) in err[0] and "--nodes-only" in err[0]


# --- the README's SmolLM2-135M command on a folder shaped like EleutherAI's skip transcoders ------------------------

def test_smollm2_skip_transcoder_layout(tmp_path, capsys):
    """EleutherAI/skip-transcoder-SmolLM2-135M-128x holds one folder per MLP, named `model.layers.<L>.mlp`, each a
    sparsify cfg.json + sae.safetensors (transcode, skip_connection). The README's command on a tiny Llama and a
    folder of that shape: the skip transcoders sit at every mlp_L, and the circuit's nodes are the API's."""
    write_hf(tmp_path / "model", "llama", hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=12)
    write_tokenizer(tmp_path / "model", V)
    write_data(tmp_path / "data.jsonl", ROWS)
    ref = os.path.join(DATA, "sparsify_llama", "layers.1.mlp")     # a sparsify skip transcoder of width 8
    for l in range(2):
        shutil.copytree(ref, tmp_path / "transcoders" / f"model.layers.{l}.mlp")
    os.makedirs(tmp_path / "transcoders" / ".cache" / "huggingface")   # what hf download --local-dir leaves
    # the README's command, with the local folders in place of the downloads
    assert run("circuit", "--model", tmp_path / "model", "--saes", tmp_path / "transcoders", "--data",
               tmp_path / "data.jsonl", "--out", tmp_path / "out", "--method", "ig", "--steps", 3,
               "--batch-size", 8, "--node-threshold", 0.01, "--edge-threshold", 0.001) == 0
    model, saes, batch = api(tmp_path, "transcoders")
    assert sorted(saes) == ["mlp_0", "mlp_1"] and all(d.reads == "mlp_in" and d.has_skip for d in saes.values())
    c = minicirc.find_circuit(model, saes, batch, steps=3, node_threshold=0.01, edge_threshold=0.001, progress=False)
    assert nodes_of(tmp_path / "out") == pytest.approx({n[0]: n[4] for n in c.kept_nodes()}, abs=1e-5)
    # a prefix of another family is refused in one line
    os.rename(tmp_path / "transcoders" / "model.layers.1.mlp", tmp_path / "transcoders" / "transformer.layers.1.mlp")
    capsys.readouterr()
    assert run("circuit", "--model", tmp_path / "model", "--saes", tmp_path / "transcoders", "--data",
               tmp_path / "data.jsonl", "--out", tmp_path / "out2") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "transformer.layers.1.mlp" in err


# --- compare's unit scores encode a transcoder's input -------------------------------------------------------------

def test_unit_scores_encode_a_transcoders_input():
    """On the embedded default and its task's latents: a transcoder at mlp_1 is scored on encode(u), u the MLP's
    input written out by hand (the layer's post_attention_layernorm of what its MLP reads), not on the MLP's
    output; an SAE at the same site is still scored on the site's value."""
    from minicirc.experiments import default
    from minicirc.experiments.tasks import agreement
    from minicirc.metrics import best_latent_share
    import test_transcoders as TT
    model, saes, tok, _, _ = default.get_default(progress=False)
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(2)
    tc = minicirc.sae.Dictionary(torch.randn(d, 16, generator=g) / d ** 0.5 * 2, 0.1 * torch.randn(16, generator=g),
                                 torch.randn(16, d, generator=g), torch.zeros(d), "relu", subtract_b_dec=False,
                                 reads="mlp_in")
    batches = [tokenize(agreement.make_examples(t, 6, seed=3, split="test"), tok) for t in agreement.TEMPLATES]
    with torch.no_grad():
        scores = compare.unit_scores(model, {"tc": {"mlp_1": tc}, "sae": {"mlp_1": saes["mlp_1"]}}, batches)
        # without a transcoder the same (no MLP input to compute)
        assert compare.unit_scores(model, {"sae": {"mlp_1": saes["mlp_1"]}}, batches)["sae"] == scores["sae"]
    lat = [agreement.token_latents(ex) for b in batches for ex in b.examples]
    names = sorted({k for x in lat for k in x})
    L = torch.tensor([[x[k][p] if k in x else 0 for k in names] for x in lat for p in range(len(next(iter(x.values()))))],
                     dtype=torch.float64)
    pos = torch.tensor([p for x in lat for p in range(len(next(iter(x.values()))))])
    for kind, d_, value in [("tc", tc, lambda c: TT.mlp_norm(model, 1)(c[TT.mlp_reads(model, 1)])),
                            ("sae", saes["mlp_1"], lambda c: c["mlp_1"])]:
        acts = []
        for b in batches:
            c = {}
            with torch.no_grad():
                model(b.clean, cache=c, extra=model.all_sites)
                f = d_.encode(value(c))
            acts += [f[i, :last + 1] for i, last in enumerate(b.last.tolist())]
        share, _ = best_latent_share(torch.cat(acts).double(), L, pos)
        assert scores[kind]["mlp_1"][0] == pytest.approx(share.tolist(), abs=1e-9)
        assert max(scores[kind]["mlp_1"][0]) > 0.05
