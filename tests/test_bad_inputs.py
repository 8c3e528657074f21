"""Bad input, through the CLI and the Python API: every case ends in a MinicircError (CLI: exit code 2 and one
`minicirc: error: ...` line) whose message names the problem, and leaves no output files behind."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicirc
from minicirc import MinicircError
from minicirc.cli import main
from minicirc.data import load_examples, tokenize
from conftest import write_hf_model
from test_cli import ROWS, write_data, write_tokenizer, write_tree


@pytest.fixture
def t(tmp_path):
    seed = int(torch.randint(0, 10**6, ()).item())
    write_hf_model(tmp_path / "model", seed=seed, vocab=40)
    write_tokenizer(tmp_path / "model", 40)
    model = minicirc.load_model(tmp_path / "model")
    write_tree(tmp_path / "saes", model, seed=seed + 1)
    write_data(tmp_path / "data.jsonl", ROWS)
    return tmp_path


def files_under(path):
    if not os.path.exists(path):
        return []
    if os.path.isfile(path):
        return [str(path)]
    return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]


def cli(t, *extra, data=None, saes=None, model=None, out=None, command="circuit", fast=True):
    """Run `minicirc circuit` (cheap settings) -> exit code; fast runs skip edges."""
    args = [command, "--model", model or t / "model", "--saes", saes or t / "saes", "--data", data or t / "data.jsonl",
            "--out", out or t / "out"]
    if command == "circuit" and fast:
        args += ["--method", "attrib", "--nodes-only"]
    try:
        return main([str(a) for a in [*args, *extra]])
    except SystemExit as e:     # argparse's own refusals
        return e.code


def expect_cli_error(t, capsys, needle, *extra, out=None, **kw):
    out = out or t / "out"
    before = set(files_under(out))
    code = cli(t, *extra, out=out, **kw)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err
    assert set(files_under(out)) == before, "output files were left behind"
    return err


class RunsCode:
    """A pickle that runs code when loaded: creates a folder (harmless, and visible)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# --- model and dictionary files ------------------------------------------------------------------

def test_corrupt_model_safetensors(t, capsys):
    (t / "model" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    expect_cli_error(t, capsys, "model.safetensors: cannot read safetensors file")


def test_truncated_model_safetensors(t, capsys):
    p = t / "model" / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    expect_cli_error(t, capsys, "model.safetensors: cannot read safetensors file")


def test_truncated_sae_safetensors_api(t):
    p = t / "saes" / "attn_out_layer0" / "sae_weights.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(MinicircError, match="sae_weights.safetensors: cannot read safetensors file"):
        minicirc.load_sae(t / "saes" / "attn_out_layer0")


def test_corrupt_safetensors_header(t, capsys):
    p = t / "saes" / "mlp_out_layer1" / "sae_weights.safetensors"
    b = bytearray(p.read_bytes())
    b[8] = ord("X")                 # the JSON header starts at byte 8
    p.write_bytes(bytes(b))
    expect_cli_error(t, capsys, "sae_weights.safetensors: cannot read safetensors file")


def test_truncated_ae_pt(t, capsys):
    p = t / "saes" / "embed" / "ae.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    expect_cli_error(t, capsys, "ae.pt: cannot load with weights_only=True")


def test_empty_ae_pt_api(t):
    (t / "saes" / "resid_out_layer0" / "ae.pt").write_bytes(b"")
    with pytest.raises(MinicircError, match="corrupt, truncated"):
        minicirc.load_sae(t / "saes" / "resid_out_layer0" / "ae.pt")


def test_pickle_that_runs_code_is_refused_ae_pt(t, capsys):
    marker = t / "code_ran"
    with open(t / "saes" / "embed" / "ae.pt", "wb") as f:
        pickle.dump({"encoder.weight": RunsCode(marker)}, f)
    expect_cli_error(t, capsys, "refuses to run")
    assert not marker.exists(), "the pickle's code ran"


def test_pickle_that_runs_code_is_refused_model_api(t):
    marker = t / "code_ran"
    os.remove(t / "model" / "model.safetensors")
    torch.save({"x": RunsCode(marker)}, t / "model" / "pytorch_model.bin")   # torch's own zip format
    with pytest.raises(MinicircError, match="refusing to unpickle arbitrary code"):
        minicirc.load_model(t / "model")
    assert not marker.exists(), "the pickle's code ran"


def test_training_checkpoint_instead_of_ae_pt(t, capsys):
    p = t / "saes" / "embed" / "ae.pt"
    torch.save({"ae": torch.load(p), "step": 10, "optimizer": {}}, p)
    expect_cli_error(t, capsys, "training checkpoint")


def test_wrong_sae_width_in_tree(t, capsys):
    d = 16   # the model's d_model is 32
    torch.save({"encoder.weight": torch.randn(24, d), "encoder.bias": torch.randn(24),
                "decoder.weight": torch.randn(d, 24), "bias": torch.randn(d)}, t / "saes" / "embed" / "ae.pt")
    expect_cli_error(t, capsys, "dictionary width 16 does not match the model's d_model 32")


def test_wrong_sae_width_api(t):
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    saes["mlp_0"] = minicirc.IdentityDictionary(model.cfg.d_model + 3)
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    with pytest.raises(MinicircError, match="dictionary for mlp_0 has width 35"):
        minicirc.find_circuit(model, saes, batch, progress=False)


def test_inconsistent_sae_shapes(t, capsys):
    p = t / "saes" / "attn_out_layer1" / "sae_weights.safetensors"
    w = load_file(p)
    w["W_dec"] = w["W_dec"][:, :5].contiguous()
    save_file(w, p)
    expect_cli_error(t, capsys, "inconsistent shapes")


def _edit_saelens_cfg(t, folder, **fields):
    p = t / "saes" / folder / "cfg.json"
    cfg = json.load(open(p))
    cfg.update(fields)
    json.dump(cfg, open(p, "w"))


def test_sae_hook_that_does_not_match_its_folder(t, capsys):
    _edit_saelens_cfg(t, "attn_out_layer1", hook_name="blocks.1.hook_mlp_out")
    expect_cli_error(t, capsys, "its hook_name reads site mlp_1, but it sits in folder attn_out_layer1 for site attn_1")


def test_z_dictionary_in_an_attn_folder(t, capsys):
    _edit_saelens_cfg(t, "attn_out_layer0", hook_name="blocks.0.attn.hook_z")
    expect_cli_error(t, capsys, "reads site z_0, but it sits in folder attn_out_layer0 for site attn_0 (z is")


def test_sae_scaling_factor_missing(t, capsys):
    _edit_saelens_cfg(t, "mlp_out_layer0", normalize_activations="expected_average_only_in")
    expect_cli_error(t, capsys, "expected_average_only_in, and its scaling factor is not in the folder")


def test_edges_into_a_layer_norm_dictionary(t, capsys):
    _edit_saelens_cfg(t, "mlp_out_layer1", normalize_activations="layer_norm")
    expect_cli_error(t, capsys, "edge effects into this dictionary would be wrong; compute nodes only", fast=False)
    assert cli(t, out=t / "nodes") == 0     # nodes only: fine


def test_unknown_site_api(t):
    model = minicirc.load_model(t / "model")
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    with pytest.raises(MinicircError, match="unknown site 'resid_9'"):
        minicirc.find_circuit(model, {"resid_9": minicirc.IdentityDictionary(model.cfg.d_model)}, batch,
                              progress=False)


def test_unknown_site_explain_cli(t, capsys):
    code = main(["explain", "--model", str(t / "model"), "--saes", str(t / "saes"), "--site", "mlp_7",
                 "--feature", "0", "--data", str(t / "data.jsonl")])
    assert code == 2
    assert "unknown site 'mlp_7'" in capsys.readouterr().err


def test_tree_of_a_deeper_model(t, capsys):
    shutil.copytree(t / "saes" / "resid_out_layer1", t / "saes" / "resid_out_layer5")
    expect_cli_error(t, capsys, "do not belong together")


def test_tree_of_a_shallower_model(t, capsys):
    for s in ("attn_out_layer1", "mlp_out_layer1", "resid_out_layer1"):
        shutil.rmtree(t / "saes" / s)
    expect_cli_error(t, capsys, "no dictionary for ['attn_out_layer1', 'mlp_out_layer1', 'resid_out_layer1']")


def test_two_dictionaries_for_one_site(t, capsys):
    os.makedirs(t / "saes" / "embed" / "10_24")
    shutil.copy(t / "saes" / "embed" / "ae.pt", t / "saes" / "embed" / "10_24" / "ae.pt")
    expect_cli_error(t, capsys, "ambiguous, several dictionaries")


def test_nan_in_model_weights(t, capsys):
    p = t / "model" / "model.safetensors"
    w = load_file(p)
    w["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][3, 4] = float("nan")
    save_file(w, p)
    expect_cli_error(t, capsys, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight contains NaN or inf")


def test_inf_in_sae_weights(t, capsys):
    p = t / "saes" / "resid_out_layer1" / "ae.pt"
    state = torch.load(p)
    state["encoder.bias"][0] = float("inf")
    torch.save(state, p)
    expect_cli_error(t, capsys, "contains NaN or inf")


def test_activations_that_overflow_to_inf(t, capsys):
    """Finite weights whose activations overflow: the site that holds inf is named."""
    p = t / "model" / "model.safetensors"
    w = load_file(p)
    w["gpt_neox.embed_in.weight"] *= 1e38
    save_file(w, p)
    expect_cli_error(t, capsys, "holds NaN or inf on the clean input")


# --- data files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case,content,needle", [
    ("empty", "", "the dataset is empty"),
    ("blank_lines", "\n   \n\n", "the dataset is empty"),
    ("malformed", '{"clean_prefix": "the cat",\n', "not JSON lines or a JSON list"),
    ("not_objects", "[1, 2, 3]", "record 0 is not an object"),
    ("missing_fields", '{"clean_prefix": "the cat"}\n', "lacks ['clean_answer']"),
    ("nan_field", '{"clean_prefix": NaN, "patch_prefix": "the cats", "clean_answer": " is", "patch_answer": " are"}\n',
     "field clean_prefix must be a string, got nan"),
    ("number_answer", '{"clean_prefix": "the cat", "patch_prefix": "the cats", "clean_answer": 1, "patch_answer": " are"}\n',
     "field clean_answer must be a string"),
])
def test_bad_data_file(t, capsys, case, content, needle):
    (t / "bad.jsonl").write_text(content)
    expect_cli_error(t, capsys, needle, data=t / "bad.jsonl")


def test_data_file_not_utf8(t, capsys):
    (t / "bad.jsonl").write_bytes(b"\xff\xfe\x00\x81 not text")
    expect_cli_error(t, capsys, "not UTF-8 text", data=t / "bad.jsonl")


def test_data_path_is_a_folder(t, capsys):
    expect_cli_error(t, capsys, "is not a file", data=t / "saes")


@pytest.mark.parametrize("field,value,needle", [
    ("patch_answer", " are big", "is 2 tokens; answers must be exactly one"),
    ("clean_answer", "", "is 0 tokens; answers must be exactly one"),
    ("clean_prefix", "the zebra near the dog", "'zebra' is out of the tokenizer's vocabulary"),
    ("patch_prefix", "the cats near", "they must be the same length"),
    ("clean_prefix", " ".join(["the"] * 70), "exceeds max_position_embeddings"),
])
def test_bad_example(t, capsys, field, value, needle):
    rows = [dict(r) for r in ROWS]
    rows[0][field] = value
    if field == "clean_prefix" and value.startswith("the the"):
        rows[0]["patch_prefix"] = " ".join(["cat"] * 70)
    write_data(t / "bad.jsonl", rows)
    expect_cli_error(t, capsys, needle, data=t / "bad.jsonl")


def test_some_examples_without_patch(t, capsys):
    rows = [dict(r) for r in ROWS]
    del rows[1]["patch_prefix"], rows[1]["patch_answer"]
    write_data(t / "bad.jsonl", rows)
    expect_cli_error(t, capsys, "either every example has a patch prefix or none does", data=t / "bad.jsonl")


def test_token_id_outside_the_model_vocabulary_api(t):
    """A tokenizer larger than the model's embedding: ids it produces do not exist in the model."""
    model = minicirc.load_model(t / "model")
    write_tokenizer(t, 60)                      # ids up to 59, the model has 40
    rows = [dict(r) for r in ROWS]
    rows[0]["clean_prefix"] = rows[0]["patch_prefix"] = "the w45"
    write_data(t / "bad.jsonl", rows)
    with pytest.raises(MinicircError, match="out of the model's vocabulary"):
        tokenize(load_examples(t / "bad.jsonl"), minicirc.load_tokenizer(t), vocab_size=model.cfg.vocab_size)


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,needle", [
    (["--node-threshold", "-0.1"], "node threshold must be a finite number >= 0"),
    (["--node-threshold", "inf"], "node threshold must be a finite number >= 0"),
    (["--edge-threshold", "nan"], "edge threshold must be a finite number >= 0"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--batch-size", "0"], "batch size must be a positive integer"),
    (["--top-k-nodes", "0"], "top_k_nodes must be a positive integer"),
    (["--top-k-edges", "-3"], "top_k_edges must be a positive integer"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--node-threshold", "abc"], "invalid float value"),
])
def test_settings_out_of_range(t, capsys, flags, needle):
    expect_cli_error(t, capsys, needle, *flags)


@pytest.mark.parametrize("kw,needle", [
    (dict(node_threshold=-1.0), "node threshold"), (dict(edge_threshold=float("inf")), "edge threshold"),
    (dict(node_threshold="0.1"), "node threshold"), (dict(steps=2.5), "steps"),
    (dict(method="exact"), "node effects only"), (dict(aggregation="mean"), "unknown aggregation"),
    (dict(top_k_nodes=True), "top_k_nodes"),
])
def test_settings_out_of_range_api(t, kw, needle):
    model = minicirc.load_model(t / "model")
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    with pytest.raises(MinicircError, match=needle):
        minicirc.find_circuit(model, minicirc.identity_saes(model), batch, progress=False, **kw)


def test_positions_kept_needs_one_length(t, capsys):
    expect_cli_error(t, capsys, "all examples must have the same length", "--aggregation", "none")


# --- output folder --------------------------------------------------------------------------------

def test_unwritable_output_directory(t, capsys):
    (t / "a_file").write_text("x")
    expect_cli_error(t, capsys, "cannot create output directory", out=t / "a_file" / "out")
    assert (t / "a_file").read_text() == "x"


def test_output_path_is_a_file(t, capsys):
    (t / "out.txt").write_text("x")
    expect_cli_error(t, capsys, "cannot create output directory", out=t / "out.txt")
    assert (t / "out.txt").read_text() == "x"


def test_earlier_run_is_never_overwritten_silently(t, capsys):
    assert cli(t) == 0
    before = {p: open(p, "rb").read() for p in files_under(t / "out")}
    assert len(before) >= 4
    expect_cli_error(t, capsys, "already holds circuit.json from an earlier run; pass --overwrite")
    assert {p: open(p, "rb").read() for p in files_under(t / "out")} == before


def test_failure_while_saving_leaves_no_files(t, capsys, monkeypatch):
    from minicirc import viz

    def disk_full(data, path, title=None, contexts=None):
        with open(path, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(viz, "draw_circuit", disk_full)
    expect_cli_error(t, capsys, "cannot write results to")
    assert not (t / "out").exists()


def test_failure_while_saving_keeps_the_earlier_run(t, capsys, monkeypatch):
    assert cli(t) == 0
    before = {p: open(p, "rb").read() for p in files_under(t / "out")}
    from minicirc import viz

    def broken(*a, **k):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(viz, "write_html", broken)     # save_circuit fails while staging circuit.html
    expect_cli_error(t, capsys, "Permission denied", "--overwrite", "--node-threshold", "0.5")
    assert {p: open(p, "rb").read() for p in files_under(t / "out")} == before


# --- circuit files for evaluate / view -------------------------------------------------------------

def test_circuit_from_a_different_model(t, capsys, tmp_path_factory):
    assert cli(t, saes="neurons", out=t / "c") == 0
    other = tmp_path_factory.mktemp("other")
    write_hf_model(other / "model", seed=int(torch.randint(0, 10**6, ()).item()) + 1, vocab=40)
    write_tokenizer(other / "model", 40)
    expect_cli_error(t, capsys, "this circuit was found on a different model", "--circuit", t / "c" / "circuit.json",
                     command="evaluate", model=other / "model", saes="neurons", out=t / "ev")


def test_circuit_from_different_dictionaries(t, capsys):
    assert cli(t, saes="neurons", out=t / "c") == 0
    expect_cli_error(t, capsys, "found with different dictionaries", "--circuit", t / "c" / "circuit.json",
                     command="evaluate", out=t / "ev")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", ["circuit", "evaluate", "explain", "demo", "shift"])
def test_device_cuda_without_a_gpu(t, capsys, command):
    args = {"circuit": ["circuit", "--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl",
                        "--out", t / "out"],
            "evaluate": ["evaluate", "--model", t / "model", "--saes", "neurons", "--data", t / "data.jsonl",
                         "--circuit", t / "c.json", "--out", t / "out"],
            "explain": ["explain", "--model", t / "model", "--saes", "neurons", "--site", "resid_0", "--feature", 0,
                        "--data", t / "data.jsonl"],
            "demo": ["demo", "--out", t / "out"], "shift": ["shift", "--out", t / "out"]}[command]
    assert main([str(a) for a in [*args, "--device", "cuda"]]) == 2
    assert "--device cuda but torch sees no CUDA device" in capsys.readouterr().err
    assert files_under(t / "out") == []


@pytest.mark.parametrize("extra,needle", [(("--ablation", "resample"), "same length"),
                                          (("--batch-size", "0"), "--batch-size must be at least 1")])
def test_evaluate_settings(t, capsys, extra, needle):
    assert cli(t, out=t / "c") == 0       # the data's examples have different lengths
    expect_cli_error(t, capsys, needle, "--circuit", t / "c" / "circuit.json", *extra, command="evaluate",
                     out=t / "ev")


@pytest.mark.parametrize("case,needle", [
    ("truncated", "not valid JSON"), ("a_list", "not a minicirc circuit.json"),
    ("node_without_site", "needs site (string)"), ("no_aggregation", "settings.aggregation"),
    ("feature_out_of_range", "feature index out of range"),
])
def test_malformed_circuit_json(t, capsys, case, needle):
    assert cli(t, out=t / "c") == 0
    p = t / "c" / "circuit.json"
    data = json.loads(p.read_text())
    if case == "truncated":
        p.write_text(p.read_text()[:200])
    else:
        if case == "a_list":
            data = [data]
        elif case == "node_without_site":
            del data["nodes"][0]["site"]
        elif case == "no_aggregation":
            del data["settings"]["aggregation"]
        else:
            data["nodes"][0]["feature"] = 10**6
        p.write_text(json.dumps(data))
    expect_cli_error(t, capsys, needle, "--circuit", p, command="evaluate", out=t / "ev")
    if case != "feature_out_of_range":       # view checks the file itself, not against a model
        html = (t / "c" / "circuit.html").read_bytes()
        assert main(["view", str(p)]) == 2
        assert needle in capsys.readouterr().err
        assert (t / "c" / "circuit.html").read_bytes() == html


@pytest.mark.parametrize("command", ["demo", "shift"])
def test_threads_below_one(t, capsys, command):
    assert main([command, "--out", str(t / "out"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert files_under(t / "out") == []


def test_find_circuit_needs_a_tokenizer_for_example_records(t):
    model = minicirc.load_model(t / "model")
    saes = minicirc.identity_saes(model)
    with pytest.raises(MinicircError, match="untokenized Example records: pass tokenizer="):
        minicirc.find_circuit(model, saes, load_examples(t / "data.jsonl"), progress=False)
    with pytest.raises(MinicircError, match="must be a minicirc Batch"):
        minicirc.find_circuit(model, saes, ["the cat", "the dog"], progress=False)
    with pytest.raises(MinicircError, match="empty"):
        minicirc.find_circuit(model, saes, [], tokenizer=minicirc.load_tokenizer(t / "model"), progress=False)
