"""`minicirc compare` (minicirc/experiments/compare.py, task_files.py): the demo's comparison on a tiny random
GPT-NeoX written by transformers, dictionaries in the original's folder layout (minicirc.save_saes) and data in
the original's JSONL layout; the original's filter and sample; bad input as one-line errors."""
import itertools
import json
import math
import os
import random
import re

import pytest
import torch

import minicirc
from minicirc.circuit import Circuit
from minicirc.data import load_examples, tokenize
from minicirc.errors import MinicircError
from minicirc.experiments import compare, task_files
from minicirc.sae import Dictionary, save_saes, site_folder
from conftest import write_hf_model
from test_cli import run, write_data as write_jsonl, write_tokenizer

N_LAYERS, D = 3, 16


def pair(clean, patch, plural):
    a, b = (" are", " is") if plural else (" is", " are")
    return {"clean_prefix": clean, "patch_prefix": patch, "clean_answer": a, "patch_answer": b}


def simple_pairs():
    """the ADJ NOUN: 8 pairs of 3 tokens (clean and patch differ in the noun's number)."""
    return [pair(f"the {adj} {noun}{'s' * pl}", f"the {adj} {noun}{'s' * (not pl)}", pl)
            for adj, noun, pl in itertools.product(("big", "small"), ("cat", "dog"), (0, 1))]


def nounpp_pairs():
    """the NOUN near the NOUN: 16 pairs of 5 tokens."""
    return [pair(f"the {n1}{'s' * p1} near the {n2}{'s' * p2}", f"the {n1}{'s' * (not p1)} near the {n2}{'s' * p2}", p1)
            for n1, p1, n2, p2 in itertools.product(("cat", "dog"), (0, 1), ("cat", "dog"), (0, 1))]


# What the filter sets aside, by reason; the counts each file must report.
ODD = {"lengths": pair("the cat", "the big cats", 0),
       "answer": {**pair("the small cat", "the small cats", 0), "clean_answer": " is big"},
       "length": pair("the cat", "the cats", 0)}
FILES = {
    "simple_train": (simple_pairs() + [ODD["lengths"], ODD["answer"], ODD["length"], ODD["length"]],
                     {"pairs": 12, "prefix lengths differ": 1, "answer not one token": 1, "other prompt length": 2,
                      "kept": 8, "used": 8}),
    "simple_test": (simple_pairs()[:6] + [ODD["length"]],
                    {"pairs": 7, "prefix lengths differ": 0, "answer not one token": 0, "other prompt length": 1,
                     "kept": 6, "used": 6}),
    "nounpp_train": (nounpp_pairs()[:10] + [ODD["lengths"]],
                     {"pairs": 11, "prefix lengths differ": 1, "answer not one token": 0, "other prompt length": 0,
                      "kept": 10, "used": 10}),
    "nounpp_test": (nounpp_pairs()[10:] + [ODD["answer"]],
                    {"pairs": 7, "prefix lengths differ": 0, "answer not one token": 1, "other prompt length": 0,
                     "kept": 6, "used": 6}),
}


def relu_dictionaries(model, seed, n=24):
    """A ReLU dictionary of n features at every site (the original's AutoEncoder: b_dec subtracted first)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in model.sites:
        d = model.site_width(s)
        out[s] = Dictionary(torch.randn(d, n, generator=g) / d ** 0.5 * 1.5, 0.3 * torch.randn(n, generator=g),
                            0.5 * torch.randn(n, d, generator=g), 0.3 * torch.randn(d, generator=g), "relu")
    return out


@pytest.fixture
def setup(tmp_path):
    write_hf_model(tmp_path / "model", seed=int(torch.randint(0, 10**6, ()).item()), vocab=40, d=D, layers=N_LAYERS)
    write_tokenizer(tmp_path / "model", 40)
    model = minicirc.load_model(tmp_path / "model")
    save_saes(relu_dictionaries(model, int(torch.randint(0, 10**6, ()).item())), tmp_path / "saes")
    os.makedirs(tmp_path / "data")
    for name, (rows, _) in FILES.items():
        write_jsonl(tmp_path / "data" / f"{name}.json", rows)
    return tmp_path


def test_compare_end_to_end(setup, capsys):
    t = setup
    assert run("compare", "--model", t / "model", "--saes", t / "saes", "--data", t / "data", "--out", t / "out",
               "--threads", 1) == 0
    assert "minicirc compare: wrote" in capsys.readouterr().out
    results = json.loads((t / "out" / "results.json").read_text())
    report = (t / "out" / "report.md").read_text()
    meta = results["_meta"]
    assert meta["templates"] == ["nounpp", "simple"] and meta["kinds"] == ["features", "neurons"]
    assert meta["first_layer"] == 1 and meta["unit_scores"] is None
    # The paper's settings.
    cfg = meta["settings"]
    assert (cfg["n_discovery"], cfg["n_eval"], cfg["steps"]) == (100, 40, 10)
    assert cfg["thresholds"] == pytest.approx([10 ** (-4 + 4 * i / 14) for i in range(15)], rel=1e-12)
    # The filter's counts, in results.json and in the report's table.
    for name, (_, want) in FILES.items():
        template, split = name.rsplit("_", 1)
        got = meta["pairs"][template][split]
        assert got == want, name
        row = re.search(rf"^\| {template} \| {split} \| (.*)\|$", report, re.M).group(1).split("|")
        assert [int(c) for c in row[:6]] == [want[k] for k in ("pairs", "prefix lengths differ", "answer not one token",
                                                               "other prompt length", "kept", "used")]
    assert meta["pairs"]["simple"]["length"] == 3 and meta["pairs"]["nounpp"]["length"] == 5
    model = minicirc.load_model(t / "model")
    tok = minicirc.load_tokenizer(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    for template in meta["templates"]:
        assert meta["full_model_faithfulness"][template] == pytest.approx(1.0, abs=1e-4)
        assert 0 <= meta["accuracy"][template] <= 1
        section = report.split(f"## {template}\n")[1].split("\n## ")[0]
        held = tokenize([ex for ex in load_examples(t / "data" / f"{template}_test.json")
                         if tok.encode(ex.clean_prefix).ids.__len__() == meta["pairs"][template]["length"]
                         and len(tok.encode(ex.clean_answer).ids) == 1], tok)
        for kind, dicts in (("features", saes), ("neurons", minicirc.identity_saes(model))):
            r = results[template][kind]
            assert math.isfinite(r["faithfulness"]) and math.isfinite(r["completeness"])
            for name in ("circuit.json", "effects.safetensors", "circuit.html", "circuit.png"):
                assert (t / "out" / template / kind / name).stat().st_size > 0
            saved = Circuit.load(t / "out" / template / kind)
            for protocol in compare.PROTOCOLS:
                p = r["protocols"][protocol]
                for point in p["curve"] + p["crossings"] + p["thresholds"]:
                    assert all(math.isfinite(point[k]) for k in ("faithfulness", "completeness")), (kind, protocol)
                assert p["curve"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
                row = re.search(rf"^\| {protocol} \| {kind} \|(.*)\|$", section, re.M).group(1).split("|")
                assert len(row) == 4 and row[2].strip().endswith(f"({p['cap']})")   # no interpretability column
                assert [pt["threshold"] for pt in p["thresholds"]] == cfg["thresholds"]
                if protocol == "summed":
                    # The sweep's sizes are the saved effects' counts above each threshold at the protocol's sites,
                    # and one point's faithfulness is those nodes' own.
                    at = [nd for nd in saved.all_nodes() if nd.site in p["sites"]]
                    for point in p["thresholds"]:
                        assert point["n_nodes"] == sum(abs(nd.effect) > point["threshold"] for nd in at)
                    point = p["thresholds"][7]
                    kept = [nd for nd in at if abs(nd.effect) > point["threshold"]]
                    want = minicirc.faithfulness(model, {s: dicts[s] for s in p["sites"]}, held, kept)
                    assert point["faithfulness"] == pytest.approx(want["faithfulness"], abs=1e-6, nan_ok=True)
        sweep = section.split("Node-threshold sweep")[1].split("\n\n")[1].splitlines()
        assert len(sweep) == 2 + 15 and all(re.fullmatch(r"\| [\d.e-]+ (\| \d+: -?[\d.]+ ){6}\|", ln) for ln in sweep[2:])
    assert "Interpretability of every unit" not in report and "easier to interpret" not in report
    for name in ("faithfulness_vs_nodes.png", "completeness_vs_nodes.png"):
        assert (t / "out" / name).stat().st_size > 0


def test_the_originals_sample(setup):
    """The pairs used are the first n of the file shuffled as the original's load_examples (seed 12) that pass
    the filter; held-out pairs of another length than the train file's most common one are set aside."""
    t = setup
    tok = minicirc.load_tokenizer(t / "model")
    pairs, counts = task_files.read_templates(t / "data", tok, 3, 2, 40)
    for template in ("simple", "nounpp"):
        for split, n in (("train", 3), ("test", 2)):
            rows = json.loads("[" + ",".join((t / "data" / f"{template}_{split}.json").read_text().split("\n")[:-1]) + "]")
            random.Random(12).shuffle(rows)
            good = [r for r in rows if all(len(tok.encode(r[k]).ids) == 1 for k in ("clean_answer", "patch_answer"))
                    and len(tok.encode(r["clean_prefix"]).ids) == len(tok.encode(r["patch_prefix"]).ids)
                    == counts[template]["length"]]
            assert [ex.clean_prefix for ex in pairs[template][split]] == [r["clean_prefix"] for r in good[:n]]
            assert counts[template][split]["used"] == n


def error_line(capsys, args):
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minicirc: error: ")
    return err


def test_bad_input_is_one_line_naming_the_file(setup, capsys):
    t = setup
    args = lambda out, saes=t / "saes", data=t / "data": ["compare", "--model", t / "model", "--saes", saes,  # noqa: E731
                                                          "--data", data, "--out", t / out]
    # A dictionary whose width does not match its site.
    model = minicirc.load_model(t / "model")
    bad = relu_dictionaries(model, 1)
    g = torch.Generator().manual_seed(2)
    bad["mlp_1"] = Dictionary(torch.randn(D + 3, 5, generator=g), torch.zeros(5), torch.randn(5, D + 3, generator=g),
                              torch.zeros(D + 3), "relu")
    save_saes(bad, t / "bad_saes")
    err = error_line(capsys, args("o1", saes=t / "bad_saes"))
    assert os.path.join("bad_saes", site_folder("mlp_1")) in err and "does not match" in err
    # JSONL records with missing keys: a clean field, or the patch pair a comparison needs.
    for i, drop in enumerate((["clean_answer"], ["patch_prefix", "patch_answer"])):
        os.makedirs(t / f"d{i}")
        for name, (rows, _) in FILES.items():
            if name == "nounpp_test":
                rows = [rows[0], {k: v for k, v in rows[1].items() if k not in drop}] + rows[2:]
            write_jsonl(t / f"d{i}" / f"{name}.json", rows)
        err = error_line(capsys, args(f"o2{i}", data=t / f"d{i}"))
        assert str(t / f"d{i}" / "nounpp_test.json") in err and "record 1 lacks" in err
    # A template left empty by the filter: every held-out answer two tokens.
    os.makedirs(t / "d3")
    for name, (rows, _) in FILES.items():
        if name == "simple_test":
            rows = [{**r, "patch_answer": " are big"} for r in rows]
        write_jsonl(t / "d3" / f"{name}.json", rows)
    err = error_line(capsys, args("o3", data=t / "d3"))
    assert str(t / "d3" / "simple_test.json") in err and "no pair left after the filter" in err
    assert "(7 pairs: 7 answer not one token)" in err
    # A train file without its test file; a neuron basis that does not exist.
    os.remove(t / "d3" / "simple_test.json")
    err = error_line(capsys, args("o4", data=t / "d3"))
    assert str(t / "d3" / "simple_test.json") in err and "missing" in err
    err = error_line(capsys, args("o5") + ["--neurons", "output,attn"])
    assert "--neurons attn" in err and "not a neuron basis (output, mlp)" in err
    for out in ("o1", "o20", "o21", "o3", "o4", "o5"):
        assert not (t / out).exists()
    with pytest.raises(MinicircError, match="not a neuron basis"):
        compare.neuron_kinds(["attn"])


def test_compare_with_mlp_neurons(setup):
    """--neurons output,mlp: the MLP's hidden neurons (Identity dictionaries at every mlp_hidden_l) compared beside
    the features and the output neurons, on the same prompts: their circuits found over those sites, full-model
    faithfulness 1, the sweep at the paper's thresholds, and the report's answers against each basis."""
    t = setup
    assert run("compare", "--model", t / "model", "--saes", t / "saes", "--data", t / "data", "--out", t / "out",
               "--threads", 1, "--neurons", "output,mlp") == 0
    results = json.loads((t / "out" / "results.json").read_text())
    meta = results["_meta"]
    assert meta["kinds"] == ["features", "neurons", "mlp_neurons"]
    report = (t / "out" / "report.md").read_text()
    assert "against mlp_neurons" in report and "against neurons" in report
    for template in meta["templates"]:
        r = results[template]["mlp_neurons"]
        saved = Circuit.load(t / "out" / template / "mlp_neurons")
        assert sorted(saved.sites) == sorted(f"mlp_hidden_{l}" for l in range(N_LAYERS))
        for protocol in compare.PROTOCOLS:
            p = r["protocols"][protocol]
            assert p["curve"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
            assert all(math.isfinite(pt["faithfulness"]) for pt in p["curve"] + p["thresholds"])
            assert len(p["thresholds"]) == 15
        # positions protocol: the MLP neurons of the evaluated layers only
        assert all(int(s.rsplit("_", 1)[1]) >= meta["first_layer"] for s in r["protocols"]["positions"]["sites"])
