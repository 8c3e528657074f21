"""`minicirc circuit` / `evaluate` / `view` end to end on files in the external formats, and bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import minicirc
from minicirc.cli import main
from minicirc.sae import site_folder
from conftest import write_hf_model

WORDS = ["<pad>", "<unk>", "the", "cat", "cats", "dog", "dogs", "near", "is", "are", "big", "small", "and"]


def write_tokenizer(folder, vocab):
    words = WORDS + [f"w{i}" for i in range(vocab - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))


def write_tree(folder, model, seed):
    """Dictionaries in both external layouts: SAELens for attn/mlp, dictionary_learning for the rest."""
    g = torch.Generator().manual_seed(seed)
    d, F = model.cfg.d_model, 24
    for s in model.sites:
        W_enc, b_enc = torch.randn(d, F, generator=g), torch.randn(F, generator=g) * 0.3
        W_dec, b_dec = torch.randn(F, d, generator=g) / 4, torch.randn(d, generator=g) * 0.1
        sub = os.path.join(folder, site_folder(s))
        os.makedirs(sub, exist_ok=True)
        if s.startswith(("attn", "mlp")):
            save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
                      os.path.join(sub, "sae_weights.safetensors"))
            json.dump({"architecture": "standard", "d_in": d, "d_sae": F, "apply_b_dec_to_input": True,
                       "normalize_activations": "none", "metadata": {"sae_lens_version": "6.18.0"}},
                      open(os.path.join(sub, "cfg.json"), "w"))
        else:
            torch.save({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc,
                        "decoder.weight": W_dec.T.contiguous(), "bias": b_dec}, os.path.join(sub, "ae.pt"))


def write_data(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


ROWS = [{"clean_prefix": "the cat near the dogs", "patch_prefix": "the cats near the dogs", "clean_answer": " is", "patch_answer": " are"},
        {"clean_prefix": "the dog", "patch_prefix": "the dogs", "clean_answer": " is", "patch_answer": " are"},
        {"clean_prefix": "the cats near the dog", "patch_prefix": "the cat near the dog", "clean_answer": " are", "patch_answer": " is"}]


@pytest.fixture
def setup(tmp_path):
    write_hf_model(tmp_path / "model", seed=int(torch.randint(0, 1000, ()).item()), vocab=40)
    write_tokenizer(tmp_path / "model", 40)
    model = minicirc.load_model(tmp_path / "model")
    write_tree(tmp_path / "saes", model, seed=7)
    write_data(tmp_path / "data.jsonl", ROWS)
    return tmp_path


def run(*args):
    return main([str(a) for a in args])


def test_circuit_evaluate_view_on_external_formats(setup, capsys):
    t = setup
    assert run("circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl", "--out", t / "out",
               "--steps", 4, "--node-threshold", 0.01, "--edge-threshold", 0.001, "--batch-size", 2) == 0
    data = json.loads((t / "out" / "circuit.json").read_text())
    for name in ["circuit.json", "effects.safetensors", "circuit.dot", "circuit.png"]:
        assert (t / "out" / name).stat().st_size > 0
    assert data["version"] == 1 and data["settings"]["n_examples"] == 3 and data["nodes"]
    # Node effects in the file equal the Python API's.
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    from minicirc.data import load_examples, tokenize
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    c = minicirc.find_circuit(model, saes, batch, steps=4, node_threshold=0.01, edge_threshold=0.001, progress=False)
    api = {n[0]: n[4] for n in c.kept_nodes()}
    assert {n["id"]: n["effect"] for n in data["nodes"]} == pytest.approx(api, abs=1e-5)
    assert run("evaluate", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl",
               "--circuit", t / "out" / "circuit.json", "--out", t / "ev") == 0
    ev = json.loads((t / "ev" / "evaluation.json").read_text())
    assert all(map(lambda v: v == v, [ev["faithfulness"], ev["completeness"]]))  # finite, not NaN
    os.remove(t / "out" / "circuit.html") if (t / "out" / "circuit.html").exists() else None
    assert run("view", t / "out" / "circuit.json") == 0
    assert (t / "out" / "circuit.html").exists()


def test_neurons_and_refusal_to_overwrite(setup, capsys):
    t = setup
    args = ["circuit", "--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl", "--out", t / "n",
            "--method", "attrib", "--nodes-only"]
    assert run(*args) == 0
    assert run(*args) == 2
    assert "earlier run" in capsys.readouterr().err
    assert run(*args, "--overwrite") == 0


def test_mlp_neurons_circuit_evaluate_and_explain(setup, capsys):
    """--saes mlp_neurons: identity dictionaries at every mlp_hidden_L (d_mlp neurons each) through circuit,
    evaluate and explain; a neuron's logit effects are its down-projection column through the unembedding."""
    t = setup
    common = ["--model", t / "model", "--saes", "mlp_neurons", "--data", t / "data.jsonl"]
    assert run("circuit", *common, "--out", t / "m", "--steps", 3, "--node-threshold", 0.001, "--edge-threshold", 0) == 0
    data = json.loads((t / "m" / "circuit.json").read_text())
    assert data["sites"] == ["mlp_hidden_0", "mlp_hidden_1"] and data["nodes"]
    assert {(e["source"].split("/")[0], e["target"].split("/")[0]) for e in data["edges"] if e["target"] != "y"} == \
        {("mlp_hidden_0", "mlp_hidden_1")}
    assert run("evaluate", *common, "--circuit", t / "m", "--out", t / "ev") == 0
    ev = json.loads((t / "ev" / "evaluation.json").read_text())
    assert ev["m_full"] == pytest.approx(data["metric"]["clean"], abs=1e-5) and abs(ev["m_full"] - ev["m_empty"]) > 1e-4
    model = minicirc.load_model(t / "model")
    k = model.cfg.d_mlp - 1       # beyond d_model (32): a d_mlp-wide basis
    assert run("explain", *common[:4], "--site", "mlp_hidden_1", "--feature", k, "--data", t / "data.jsonl") == 0
    assert f"mlp_hidden_1/{k}: top" in capsys.readouterr().out
    from minicirc.explain import logit_effects
    got = logit_effects(model, minicirc.IdentityDictionary(model.cfg.d_mlp), k, n=3, site="mlp_hidden_1")
    want = model.layers[1].mlp.dense_4h_to_h.weight[:, k] @ model.unembedding.T
    assert [v for _, v in got["promoted"]] == pytest.approx(want.sort(descending=True).values[:3].tolist(), abs=1e-6)


@pytest.mark.parametrize("case,expect", [
    ("missing_field", "lacks"), ("multi_token", "exactly one"), ("empty", "empty"), ("oov", "out of the tokenizer"),
    ("length", "same length"), ("malformed", "not JSON"),
])
def test_bad_data(setup, capsys, case, expect):
    t = setup
    rows = [dict(r) for r in ROWS]
    if case == "missing_field":
        del rows[1]["clean_answer"]
    elif case == "multi_token":
        rows[0]["clean_answer"] = " is big"
    elif case == "empty":
        rows = []
    elif case == "oov":
        rows[2]["clean_prefix"] = "the zebra near the dog"
    elif case == "length":
        rows[1]["patch_prefix"] = "the big dogs"
    write_data(t / "bad.jsonl", rows)
    if case == "malformed":
        (t / "bad.jsonl").write_text('{"clean_prefix": "the cat",\n')
    assert run("circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "bad.jsonl", "--out", t / "o") == 2
    assert expect in capsys.readouterr().err
    assert not (t / "o" / "circuit.json").exists()


@pytest.mark.parametrize("flags,expect", [
    (["--method", "magic"], "invalid choice"), (["--node-threshold", "-1"], "node threshold"),
    (["--edge-threshold", "nan"], "edge threshold"), (["--method", "exact"], "node effects only"),
])
def test_bad_settings(setup, capsys, flags, expect):
    t = setup
    base = ["circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl", "--out", t / "o"]
    try:
        code = run(*base, *flags)
    except SystemExit as e:  # argparse rejects unknown choices itself
        code = e.code
    assert code == 2
    assert expect in capsys.readouterr().err


def test_mismatched_tree_and_foreign_circuit(setup, capsys, tmp_path):
    t = setup
    # A tree written for a deeper model does not belong to this one.
    os.makedirs(t / "saes" / "resid_out_layer7")
    assert run("circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl", "--out", t / "o") == 2
    assert "do not belong together" in capsys.readouterr().err
    os.rmdir(t / "saes" / "resid_out_layer7")
    # A circuit found on another model is refused by evaluate.
    assert run("circuit", "--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl", "--out", t / "c",
               "--method", "attrib", "--nodes-only") == 0
    write_hf_model(tmp_path / "other", seed=12345, vocab=40)
    write_tokenizer(tmp_path / "other", 40)
    assert run("evaluate", "--model", tmp_path / "other", "--saes", "neurons", "--data", t / "data.jsonl",
               "--circuit", t / "c" / "circuit.json", "--out", t / "e") == 2
    assert "different model" in capsys.readouterr().err


def test_bfloat16_end_to_end_close_to_float32(setup):
    # bfloat16 weights through the whole pipeline: the float32 run is the reference (docs/method.md §11: float32 is
    # the default and the one tests compare); bf16 keeps ~3 significant digits, so effects agree to a few %.
    from safetensors.torch import load_file
    t = setup
    base = ["circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl", "--steps", 4,
            "--node-threshold", 0.01, "--edge-threshold", 0.001]
    assert run(*base, "--out", t / "f32") == 0
    assert run(*base, "--out", t / "bf16", "--dtype", "bfloat16") == 0
    a, b = load_file(t / "f32" / "effects.safetensors"), load_file(t / "bf16" / "effects.safetensors")
    keys = [k for k in a if k.startswith("nodes.")]
    # Relative to the largest effect of the run: an SAE error is a difference (x - decode(f)), so its own
    # relative rounding in bf16 is larger than the features'.
    scale = max(a[k].abs().max().item() for k in keys)
    for key in keys:
        assert torch.isfinite(b[key]).all(), key
        assert (a[key] - b[key].float()).abs().max().item() <= 0.1 * scale, key
    assert any((a[k] != b[k].float()).any() for k in keys), "the bfloat16 run gave float32's exact numbers"


def test_view_redraws_with_the_saved_contexts(setup):
    """Circuit.save keeps the contexts it drew (contexts.json); `minicirc view` on the folder or the file
    redraws the same page, contexts included, beside the circuit."""
    import random
    from minicirc.viewer import render_html
    from test_viewer import random_contexts
    t = setup
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    from minicirc.data import load_examples, tokenize
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    c = minicirc.find_circuit(model, saes, batch, steps=2, node_threshold=0.01, progress=False)
    data = c.to_json()
    contexts = random_contexts(random.Random(int(torch.randint(0, 1000, ()).item())), data)
    assert contexts
    from minicirc.viz import save_circuit
    save_circuit(c, t / "out", contexts=contexts)
    page = (t / "out" / "circuit.html").read_text(encoding="utf-8")
    assert page == render_html(json.loads((t / "out" / "circuit.json").read_text()), contexts)
    for target in (t / "out", t / "out" / "circuit.json"):
        os.remove(t / "out" / "circuit.html")
        assert run("view", target) == 0
        assert (t / "out" / "circuit.html").read_text(encoding="utf-8") == page
    assert not (t / "circuit.html").exists()


def test_find_circuit_takes_what_the_loaders_return(setup):
    """A list of Example records plus tokenizer= gives the circuit of the tokenized Batch."""
    from minicirc.data import load_examples, tokenize
    t = setup
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    tok = minicirc.load_tokenizer(t / "model")
    examples = load_examples(t / "data.jsonl")
    kw = dict(steps=2, node_threshold=0.01, progress=False)
    from_list = minicirc.find_circuit(model, saes, examples, tokenizer=tok, **kw)
    from_batch = minicirc.find_circuit(model, saes, tokenize(examples, tok), **kw)
    assert json.dumps(from_list.to_json()) == json.dumps(from_batch.to_json())
    assert from_list.to_json()["nodes"]


# --- every flag reaches the function it names ------------------------------------------------------------

SAME_LENGTH_ROWS = [
    {"clean_prefix": f"the {a} near the {b}", "patch_prefix": f"the {pa} near the {b}", "clean_answer": ca,
     "patch_answer": pa_ans}
    for a, pa, ca, pa_ans in [("cat", "cats", " is", " are"), ("dogs", "dog", " are", " is")]
    for b in ("dog", "cats", "big")][:4]     # unbalanced answers: a constant logit difference does not cancel


def test_circuit_flags_reach_find_circuit(setup):
    from minicirc.data import load_examples, tokenize
    t = setup
    write_data(t / "more.jsonl", ROWS + ROWS[::-1])
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    batch = tokenize(load_examples(t / "more.jsonl", limit=4), minicirc.load_tokenizer(t / "model"))
    base = ["circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "more.jsonl", "--limit", 4,
            "--method", "attrib"]
    for flags, kw in [(["--top-k-nodes", 5, "--top-k-edges", 3], dict(top_k_nodes=5, top_k_edges=3)),
                      (["--nodes-only", "--node-threshold", 0.02], dict(nodes_only=True, node_threshold=0.02)),
                      (["--node-threshold", 0.05, "--edge-threshold", 0.02], dict(node_threshold=0.05,
                                                                                edge_threshold=0.02))]:
        out = t / ("o" + str(len(os.listdir(t))))
        assert run(*base, *flags, "--out", out) == 0
        got = json.loads((out / "circuit.json").read_text())
        want = minicirc.find_circuit(model, saes, batch, method="attrib", progress=False, **kw).to_json()
        assert got["settings"]["n_examples"] == 4
        assert [n["id"] for n in got["nodes"]] == [n["id"] for n in want["nodes"]], flags
        assert [(e["source"], e["target"]) for e in got["edges"]] == \
            [(e["source"], e["target"]) for e in want["edges"]], flags
        assert got["nodes"] and (got["edges"] or kw.get("nodes_only")), flags


@pytest.mark.parametrize("flags,kw", [
    (["--ablation", "zero"], dict(ablation="zero")), (["--errors", "remove"], dict(errors="remove")),
    (["--errors", "keep", "--first-layer", "1"], dict(errors="keep", first_layer=1)),
    (["--ablation", "resample", "--seed", "SEED"], dict(ablation="resample", seed="SEED")),
])
def test_evaluate_flags_reach_faithfulness(setup, flags, kw):
    """evaluation.json equals evaluation.faithfulness with the same settings, on a positional circuit."""
    from minicirc import evaluation
    from minicirc.circuit import load_circuit_json
    from minicirc.data import load_examples, tokenize
    t = setup
    seed = int(torch.randint(1, 1000, ()).item())
    flags = [seed if f == "SEED" else f for f in flags]
    kw = {k: seed if v == "SEED" else v for k, v in kw.items()}
    write_data(t / "same.jsonl", SAME_LENGTH_ROWS)
    common_args = ["--model", t / "model", "--saes", t / "saes", "--data", t / "same.jsonl"]
    assert run("circuit", *common_args, "--out", t / "c", "--aggregation", "none", "--method", "attrib",
               "--nodes-only", "--top-k-nodes", 30) == 0
    assert run("evaluate", *common_args, "--circuit", t / "c" / "circuit.json", "--out", t / "e", *flags) == 0
    got = json.loads((t / "e" / "evaluation.json").read_text())
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    batch = tokenize(load_examples(t / "same.jsonl"), minicirc.load_tokenizer(t / "model"))
    nodes = load_circuit_json(t / "c" / "circuit.json", model, saes)["nodes"]
    want = evaluation.faithfulness(model, saes, batch, nodes, positional=True, **kw)
    assert got["n_nodes"] == 30
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_shift_demo_explain_flags_reach_their_functions(setup, monkeypatch, capsys):
    from minicirc.experiments import demo, shift_run
    from minicirc import explain
    seen = {}
    monkeypatch.setattr(shift_run, "run_shift", lambda *a, **kw: seen.setdefault("shift", (a, kw)))
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: seen.setdefault("demo", (a, kw)))
    assert run("shift", "--out", "o1", "--quick", "--overwrite", "--probe-layer", 1, "--top-k", 7, "--threshold", 0.25,
               "--margin", 0.5, "--random-seeds", 3, "--ablate", "embed/1,resid_0/2") == 0
    assert seen["shift"] == (("o1",), dict(quick=True, overwrite=True, device="cpu", probe_layer=1,
                                           ablate="embed/1,resid_0/2", coverage=None, top_k=7, margin=0.5,
                                           random_seeds=3, threshold=0.25, model="default"))
    seen.clear()
    assert run("shift", "--coverage", 0.75) == 0
    assert seen["shift"][1]["coverage"] == 0.75 and seen["shift"][1]["top_k"] is None
    seen.clear()
    assert run("shift", "--model", "smollm2", "--quick", "--threads", 1) == 0   # (the default would be every core)
    assert seen["shift"][1]["model"] == "smollm2" and seen["shift"][1]["quick"]
    assert run("demo", "--out", "o2", "--overwrite", "--threads", 1, "--first-layer", 2) == 0
    assert seen["demo"] == (("o2",), dict(quick=False, overwrite=True, device="cpu", first_layer=2, model="default"))
    seen.clear()
    assert run("demo", "--model", "smollm2", "--quick", "--threads", 1) == 0   # (the default would be every core)
    assert seen["demo"][1]["model"] == "smollm2" and seen["demo"][1]["quick"]
    from minicirc.experiments import compare
    monkeypatch.setattr(compare, "run_compare", lambda *a, **kw: seen.setdefault("compare", (a, kw)))
    assert run("compare", "--model", "m", "--saes", "s", "--data", "d", "--out", "o3", "--neurons", "output,mlp",
               "--first-layer", 1, "--norm-scaling-factor", 2.5, "--overwrite", "--threads", 1) == 0
    assert seen["compare"] == (("m", "s", "d", "o3"), dict(neurons=["output", "mlp"], overwrite=True, device="cpu",
                                                          first_layer=1, norm_scaling_factor=2.5))
    for cmd in ("demo", "shift"):
        assert run(cmd, "--threads", 0) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    # explain: --k and --n-logits reach top_contexts and logit_effects.
    t = setup
    real_top, real_logits = explain.top_contexts, explain.logit_effects
    monkeypatch.setattr(explain, "top_contexts", lambda *a, **kw: seen.setdefault("k", kw["k"]) and real_top(*a, **kw))
    monkeypatch.setattr(explain, "logit_effects",
                        lambda *a, **kw: seen.setdefault("n", kw["n"]) and real_logits(*a, **kw))
    (t / "texts.txt").write_text("the cat near the dogs\nthe dogs is big\n")
    assert run("explain", "--model", t / "model", "--saes", t / "saes", "--site", "resid_0", "--feature", 2,
               "--data", t / "texts.txt", "--k", 3, "--n-logits", 2) == 0
    assert (seen["k"], seen["n"]) == (3, 2)
    for flags, needle in [(["--k", 0], "--k must be at least 1")]:
        assert run("explain", "--model", t / "model", "--saes", t / "saes", "--site", "resid_0", "--feature", 2,
                   "--data", t / "texts.txt", *flags) == 2
        assert needle in capsys.readouterr().err
    assert run("evaluate", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl",
               "--circuit", t / "none.json", "--out", t / "e0", "--batch-size", 0) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


# --- defaults, exit codes and refusals the tests above leave open ----------------------------------------

def _parser_defaults(command, *required):
    from minicirc.cli import build_parser
    return vars(build_parser().parse_args([command, *required]))


def test_defaults_are_the_functions_defaults():
    """Every option's default is the default of the Python function it reaches (find_circuit, faithfulness,
    load_model, load_examples, top_contexts, logit_effects, run_demo, run_shift), so the command line and the API
    never disagree. The few that reach no function's default are named with their value; an option in neither
    list fails the test."""
    import inspect
    from minicirc import data, evaluation, explain, model as model_mod, sae
    from minicirc.attribution import find
    from minicirc.experiments import compare, demo, shift_run
    from minicirc.cli import build_parser
    req = ["--model", "m", "--saes", "s", "--data", "d", "--out", "o"]
    parsed = {"circuit": _parser_defaults("circuit", *req), "evaluate": _parser_defaults("evaluate", *req, "--circuit", "c"),
              "demo": _parser_defaults("demo"), "shift": _parser_defaults("shift"),
              "compare": _parser_defaults("compare", "--model", "m", "--saes", "s", "--data", "d"),
              "explain": _parser_defaults("explain", "--model", "m", "--saes", "s", "--site", "embed", "--feature", "0")}
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}          # --dtype as cli.load_inputs maps it
    api = [("circuit", find.find_circuit, ["method", "steps", "node_threshold", "edge_threshold", "aggregation",
                                           "nodes_only", "batch_size", "top_k_nodes", "top_k_edges", "distributed"]),
           ("circuit", model_mod.load_model, ["device", "dtype"]), ("circuit", data.load_examples, ["limit"]),
           ("evaluate", evaluation.faithfulness, ["ablation", "errors", "first_layer", "seed"]),
           ("evaluate", model_mod.load_model, ["device", "dtype"]),
           ("demo", demo.run_demo, ["out", "quick", "overwrite", "device", "first_layer", "model"]),
           ("compare", compare.run_compare, ["out", "overwrite", "device", "first_layer", "norm_scaling_factor"]),
           ("shift", shift_run.run_shift, ["out", "quick", "overwrite", "device", "probe_layer", "ablate", "coverage",
                                           "top_k", "margin", "random_seeds", "threshold", "model"]),
           ("explain", explain.top_contexts, ["k"]), ("explain", explain.logit_effects, ["n"]),
           ("explain", model_mod.load_model, ["device"]),
           *((command, sae.load_saes, ["norm_scaling_factor"]) for command in ("circuit", "evaluate", "explain"))]
    # Options whose default reaches no function's default: the circuit's torch seed, evaluate's batch size
    # (the CLI's 32, not faithfulness's 64), the thread count (one: the embedded model is too small to gain from
    # more; demo's and shift's None is one on the default and every core on --model), explain's text sample (None: the
    # embedded corpus), --overwrite (off), and compare's --neurons (the text "output": run_compare's ("output",)).
    fixed = {("compare", "threads"): None, ("compare", "neurons"): "output", ("circuit", "seed"): 0, ("evaluate", "batch_size"): 32, ("demo", "threads"): None, ("shift", "threads"): None,
             ("explain", "data"): None, ("circuit", "overwrite"): False, ("evaluate", "overwrite"): False}
    covered = set()
    for command, fn, names in api:
        sig = inspect.signature(fn).parameters
        for name in names:
            option = "n_logits" if name == "n" else name
            got = parsed[command][option]
            assert (dtypes[got] if option == "dtype" else got) == sig[name].default, (command, name)
            covered.add((command, option))
    for (command, option), value in fixed.items():
        assert parsed[command][option] == value, (command, option)
        covered.add((command, option))
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    options = {(command, a.dest) for command in parsed for a in sub[command]._actions
               if a.dest != "help" and not a.required}
    assert options == covered
    assert len(covered) >= 12


def test_console_entry_exit_codes(setup, capsys, monkeypatch):
    """A user mistake is exit code 2 through `python -m minicirc.cli` as through main(); so is a missing command
    and --device cuda on a machine torch sees no GPU on."""
    import runpy
    import sys
    t = setup
    monkeypatch.setattr(sys, "argv", ["minicirc", "explain", "--model", str(t / "model"), "--saes", "neurons", "--site",
                                      "resid_9", "--feature", "0"])
    import warnings
    with pytest.raises(SystemExit) as e, warnings.catch_warnings():      # what `python -m minicirc.cli` runs
        warnings.simplefilter("ignore", RuntimeWarning)     # "found in sys.modules": this test imported it already
        runpy.run_module("minicirc.cli", run_name="__main__")
    assert e.value.code == 2
    assert "unknown site 'resid_9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run("circuit", "--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl", "--out", t / "g",
               "--device", "cuda") == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (t / "g").exists()


def test_python_m_minicirc_runs_the_cli(setup):
    """`python -m minicirc` (minicirc/__main__.py) in a fresh interpreter: the same circuit files as main() writes,
    exit code 2 and the one-line message for a user mistake, 2 for a missing command."""
    import subprocess
    import sys
    t = setup
    root = os.path.dirname(os.path.dirname(os.path.abspath(minicirc.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS=str(torch.get_num_threads()))   # the same threads as this process: the same sums

    def python_m(*args):
        return subprocess.run([sys.executable, "-m", "minicirc", *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=300)
    common_args = ["--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl", "--method", "attrib",
                   "--nodes-only"]
    done = python_m("circuit", *common_args, "--out", t / "sub")
    assert done.returncode == 0, done.stderr
    assert "nodes" in done.stdout and "circuit.json" in done.stdout
    assert run("circuit", *common_args, "--out", t / "inproc") == 0
    for name in ("circuit.json", "effects.safetensors"):
        assert (t / "sub" / name).read_bytes() == (t / "inproc" / name).read_bytes(), name
    bad = python_m("explain", "--model", t / "model", "--saes", "neurons", "--site", "resid_9", "--feature", 0)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("minicirc: error: unknown site 'resid_9'")
    assert "Traceback" not in bad.stderr
    assert python_m().returncode == 2


def test_explain_refuses_bad_site_and_feature_and_takes_neurons(setup, capsys):
    t = setup
    base = ["explain", "--model", t / "model", "--data", t / "data.jsonl"]
    assert run(*base, "--saes", t / "saes", "--site", "mlp_7", "--feature", 0) == 2
    assert "unknown site 'mlp_7'" in capsys.readouterr().err
    assert run(*base, "--saes", t / "saes", "--site", "mlp_0", "--feature", 24) == 2      # the tree has 24 features
    assert "out of range" in capsys.readouterr().err
    d = minicirc.load_model(t / "model").cfg.d_model
    assert run(*base, "--saes", "neurons", "--site", "mlp_0", "--feature", d) == 2
    assert f"{d} features" in capsys.readouterr().err
    feature = int(torch.randint(0, d, ()).item())
    assert run(*base, "--saes", "neurons", "--site", "mlp_0", "--feature", feature) == 0
    assert f"mlp_0/{feature}: top" in capsys.readouterr().out


def test_failed_runs_leave_no_folder_and_evaluate_refuses_to_overwrite(setup, capsys):
    t = setup
    assert run("circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl", "--out", t / "o",
               "--limit", 0) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    write_data(t / "empty.jsonl", [])
    assert run("circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "empty.jsonl", "--out", t / "o") == 2
    assert not (t / "o").exists()                      # the run made the folder, so it removes it again
    os.makedirs(t / "kept")
    assert run("circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "empty.jsonl", "--out", t / "kept") == 2
    assert (t / "kept").is_dir()                       # a folder that was there before stays
    common_args = ["--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl"]
    assert run("circuit", *common_args, "--out", t / "c", "--method", "attrib", "--nodes-only") == 0
    ev = ["evaluate", *common_args, "--circuit", t / "c" / "circuit.json", "--out", t / "e"]
    assert run(*ev) == 0
    before = (t / "e" / "evaluation.json").read_text()
    capsys.readouterr()
    assert run(*ev) == 2
    assert "evaluation.json from an earlier run" in capsys.readouterr().err
    assert (t / "e" / "evaluation.json").read_text() == before
    assert run(*ev, "--overwrite") == 0


def test_view_refuses_a_contexts_file_that_is_not_an_object(setup, capsys):
    t = setup
    assert run("circuit", "--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl", "--out", t / "c",
               "--method", "attrib", "--nodes-only") == 0
    (t / "c" / "contexts.json").write_text("[1, 2]")
    assert run("view", t / "c") == 2
    assert "not a contexts file" in capsys.readouterr().err


def test_batch_size_and_threads_reach_their_functions(setup, monkeypatch):
    """--batch-size changes no number (means are accumulated in float64), so it is checked where it goes."""
    from minicirc import cli, evaluation
    from minicirc.experiments import demo
    t = setup
    seen = {}
    real_find, real_faith = cli.find_circuit, evaluation.faithfulness
    monkeypatch.setattr(cli, "find_circuit", lambda *a, **kw: seen.setdefault("find", kw) and real_find(*a, **kw))
    monkeypatch.setattr(evaluation, "faithfulness", lambda *a, **kw: seen.setdefault("faith", kw) and real_faith(*a, **kw))
    b1, b2 = (int(v) for v in torch.randint(1, 5, (2,)))
    common_args = ["--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl"]
    assert run("circuit", *common_args, "--out", t / "c", "--method", "attrib", "--nodes-only", "--batch-size", b1) == 0
    assert run("evaluate", *common_args, "--circuit", t / "c" / "circuit.json", "--out", t / "e", "--batch-size", b2) == 0
    assert (seen["find"]["batch_size"], seen["faith"]["batch_size"]) == (b1, b2)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: seen.setdefault("threads", torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        assert run("demo", "--threads", 2) == 0
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == 2
