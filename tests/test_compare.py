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
    return write_compare_files(tmp_path, int(torch.randint(0, 10**6, ()).item()), int(torch.randint(0, 10**6, ()).item()))


def write_compare_files(tmp_path, model_seed, sae_seed, edit_saes=None):
    """A tiny model, ReLU dictionaries at every site (edit_saes(folder, model) may replace some) and the
    templates' data files under tmp_path: what `minicirc compare` reads."""
    write_hf_model(tmp_path / "model", seed=model_seed, vocab=40, d=D, layers=N_LAYERS)
    write_tokenizer(tmp_path / "model", 40)
    model = minicirc.load_model(tmp_path / "model")
    save_saes(relu_dictionaries(model, sae_seed), tmp_path / "saes")
    if edit_saes is not None:
        edit_saes(tmp_path / "saes", model)
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
                # The grid ends at every node with an effect, never at a zero-effect one.
                assert p["curve"][-1]["n_nodes"] == p["with_effect"] <= p["all_nodes"]
                row = re.search(rf"^\| {protocol} \| {kind} \|(.*)\|$", section, re.M).group(1).split("|")
                assert len(row) == 5 and row[3].strip().endswith(f"({p['cap']})")   # no interpretability column
                assert row[2].strip() == f"{p['with_effect']} ({p['active_with_effect']}) of {p['all_nodes']}"
                assert [pt["threshold"] for pt in p["thresholds"]] == cfg["thresholds"]
                if protocol == "summed":
                    # The sweep's sizes are the saved effects' counts above each threshold at the protocol's sites,
                    # and one point's faithfulness is those nodes' own.
                    at = [nd for nd in saved.all_nodes() if nd.site in p["sites"]]
                    assert p["with_effect"] == sum(nd.effect != 0 for nd in at) and p["all_nodes"] == len(at)
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
            assert p["curve"][-1]["n_nodes"] == p["with_effect"]
            assert all(math.isfinite(pt["faithfulness"]) for pt in p["curve"] + p["thresholds"])
            assert len(p["thresholds"]) == 15
        # positions protocol: the MLP neurons of the evaluated layers only
        assert all(int(s.rsplit("_", 1)[1]) >= meta["first_layer"] for s in r["protocols"]["positions"]["sites"])


# --- counting as the original: a zero-effect node never enters a circuit ---------------------------------

def detector_setup(seed):
    """A tiny model whose embedding puts tokens 2..8 on the coordinate axes (token v at 2 e_(v-2)), and at embed a
    dictionary of token detectors: feature j fires (value 1) only on token DETECTED[j] and decodes to its
    embedding exactly, so the error is 0 on those tokens and x elsewhere. Discovery prompts differ in a noun of
    A (tokens 4, 5, 6), held-out prompts in a noun of B (7, 8): B's features never fire on a discovery prompt
    (effect exactly 0), and A's never fire on a held-out one. So keeping every node with an effect (A's
    features) does nothing on the held-out prompts (faithfulness 0), while keeping every node gives 1: only a
    ranking that lets zero-effect nodes in reaches 0.8."""
    from test_attribution import make_model
    model = make_model(seed, parallel=bool(seed % 2), n_layers=2)
    d = model.cfg.d_model
    with torch.no_grad():
        for v in range(2, 9):
            model.embed_in.weight[v] = 2.0 * torch.eye(d, dtype=torch.float64)[v - 2]
    W_enc = torch.zeros(d, len(DETECTED), dtype=torch.float64)
    for j, v in enumerate(DETECTED):
        W_enc[v - 2, j] = 1.0
    W_dec = 2.0 * W_enc.T.clone()
    sae = Dictionary(W_enc, -torch.ones(len(DETECTED), dtype=torch.float64), W_dec,
                     torch.zeros(d, dtype=torch.float64), "relu").to(torch.float64)
    return model, {"embed": sae}


DETECTED = (4, 5, 6, 7, 8)      # features 0-2: the discovery nouns (A), 3-4: the held-out nouns (B)


def noun_batch(pairs):
    """Prompts [2, noun, 3] -> answer 0 (clean) or 1 (patch), clean and patch differing in the noun."""
    from minicirc.data import Batch
    clean = torch.tensor([[2, a, 3] for a, _ in pairs])
    patch = torch.tensor([[2, b, 3] for _, b in pairs])
    n = len(pairs)
    return Batch(clean, patch, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long),
                 torch.full((n,), 2), [None] * n)


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_zero_effect_nodes_never_enter_and_the_level_is_not_reached(aggregation):
    from minicirc import evaluation
    from minicirc.attribution.find import find_circuit
    from minicirc.experiments.demo_report import level
    from test_evaluation import ref_metric, ref_values
    seed = int(torch.randint(0, 10**6, ()).item())
    model, saes = detector_setup(seed)
    disc = noun_batch([(4, 5), (5, 6), (6, 4), (5, 4)])
    held = noun_batch([(7, 8), (8, 7), (7, 8)])
    circuit = find_circuit(model, saes, disc, steps=4, node_threshold=0.0, aggregation=aggregation, nodes_only=True)
    effects = circuit.nodes["embed"]
    features = effects[..., :len(DETECTED)]
    # What the construction promises: A's features move, B's (never active in discovery) have effect exactly 0.
    assert (features[..., 3:] == 0).all() and (features[..., :3] != 0).any()
    positional = aggregation == "none"
    evaluator = compare.top_n_faithfulness(model, saes, held, circuit, ["embed"])
    point, ranked = evaluator
    want = [nd for nd in circuit.all_nodes() if nd.effect != 0]
    assert sorted(nd.id for nd in ranked) == sorted(nd.id for nd in want) and len(ranked) > 0
    assert all(nd.effect != 0 and not nd.error and nd.column < 3 for nd in ranked)
    # Against the written-out ablation: every node with an effect kept gives 0, every node kept gives 1.
    values = ref_values(model, saes, held, "mean")
    full = ref_metric(model, saes, held, None, values, "default", -1)
    empty = ref_metric(model, saes, held, set(), values, "default", -1)
    assert abs(full - empty) > 1e-6
    kept = {(nd.site, nd.column, nd.pos) for nd in ranked}
    every = {(nd.site, "err" if nd.error else nd.column, nd.pos) for nd in circuit.all_nodes()}
    assert (ref_metric(model, saes, held, kept, values, "default", -1) - empty) / (full - empty) == \
        pytest.approx(0, abs=1e-9)
    assert (ref_metric(model, saes, held, every, values, "default", -1) - empty) / (full - empty) == \
        pytest.approx(1, abs=1e-9)
    counts = compare.node_counts(len(ranked), len(ranked), 4)
    curve, crossings = compare.faithfulness_curve(model, saes, held, circuit, ["embed"], counts, compare.TARGETS,
                                                  evaluator=evaluator)
    assert counts[-1] == len(ranked) and curve[-1]["faithfulness"] == pytest.approx(0, abs=1e-9)
    active = evaluation.active_units(model, saes, held, ["embed"])
    # B's features are active at the noun on the held-out prompts, A's nowhere; the error wherever the token
    # has no detector (positions 0 and 2).
    assert active["embed"].tolist() == [[False] * 5 + [True], [False] * 3 + [True, True, False],
                                        [False] * 5 + [True]]
    got = compare.levels(curve + crossings, compare.active_prefix(ranked, active))
    best = max(curve, key=lambda p: p["faithfulness"])
    assert got["nodes_for_0.8"] is None and got["nodes_for_0.9"] is None and got["active_for_0.9"] is None
    assert got["best"]["faithfulness"] == pytest.approx(0, abs=1e-9) and got["best"]["active"] == 0
    assert got["best"]["faithfulness"] == best["faithfulness"]
    assert level(got, 0.8) == f"not reached (best 0.00 at {got['best']['n_nodes']} nodes)"
    # The threshold sweep keeps the same nodes: none above 0, no zero-effect one at any threshold.
    sweep = compare.threshold_sweep(evaluator, [0.0, 1e-4])
    assert sweep[0]["n_nodes"] == len(ranked)
    assert len(ranked) == int((features != 0).sum()) and ((effects[..., -1] == 0).all())
    assert all((nd.pos is not None) == positional for nd in ranked)


def test_evaluation_sets_are_counted(setup):
    """subject["evaluation_sets"]: each set's positions-protocol counts for every kind, recomputed here from the
    positional circuit found again on the discovery prompts: the curve at the held-out curve's sizes, the
    levels reached (min over the evaluated sizes, bisected to SET_PRECISION), the nodes active on
    the set's prompts (dense activations), the faithfulness of the held-out 0.9 circuit; an empty set says "no
    prompts"; a set of the held-out prompts takes the held-out numbers."""
    from minicirc import evaluation
    from minicirc.attribution.find import find_circuit
    from minicirc.experiments.demo_report import level, set_name
    t = setup
    subject = compare.compare_subject(t / "model", t / "saes", t / "data", settings={"grid_points": 5})
    base = subject["examples"]
    sets = {"in_sample": lambda tpl: base(tpl, "discovery"), "empty": lambda tpl: [],
            "novel": lambda tpl: base(tpl, "held_out")[::-1][:4], "same": lambda tpl: base(tpl, "held_out")}
    subject["examples"] = lambda tpl, role: sets[role](tpl) if role in sets else base(tpl, role)
    subject["evaluation_sets"] = list(sets)
    results = compare.run_comparison(lambda: subject, str(t / "out"), progress=False, command="compare")
    report = (t / "out" / "report.md").read_text()
    model, saes, tok, cfg = subject["model"], subject["saes"], subject["tokenizer"], subject["cfg"]
    kinds = {"features": saes, "neurons": minicirc.identity_saes(model)}
    assert results["_meta"]["evaluation_sets"] == list(sets)
    checked = 0
    for template in results["_meta"]["templates"]:
        got = results[template]["evaluation_sets"]
        assert list(got) == list(sets) and got["empty"] == {"prompts": 0}
        section = report.split(f"## {template}\n")[1].split("\n## ")[0]
        assert re.search(rf"^\| {set_name('empty')} \| 0 \| \| no prompts \|", section, re.M)
        # held-out inserted after in-sample, from the held-out numbers
        rows = [r.split("|")[1].strip() for r in section.split("Evaluation sets")[1].split("\n\n")[1].splitlines()[2:]]
        assert list(dict.fromkeys(rows)) == [set_name(r) for r in ("in_sample", "held_out", "empty", "novel", "same")]
        disc = tokenize(base(template, "discovery"), tok)
        for kind, dicts in kinds.items():
            main = results[template][kind]["protocols"]["positions"]
            at = main["sites"]
            sub = {s: dicts[s] for s in at}
            circuit = find_circuit(model, sub, disc, steps=cfg["steps"], node_threshold=cfg["node_threshold"],
                                   aggregation="none", nodes_only=True, progress=False)
            ranked = sorted((nd for nd in circuit.all_nodes() if nd.effect != 0), key=lambda nd: -abs(nd.effect))
            same = got["same"][kind]
            for k in compare.LEVEL_KEYS + ("with_effect", "active_with_effect"):
                assert same[k] == main[k], (template, kind, k)
            for role in ("in_sample", "novel"):
                exs = sets[role](template)
                r = got[role][kind]
                assert got[role]["prompts"] == len(exs) and r["with_effect"] == len(ranked)
                batch = tokenize(exs, tok)
                faith = lambda n: evaluation.faithfulness(model, sub, batch, ranked[:n], positional=True)["faithfulness"]  # noqa: E731
                assert [p["n_nodes"] for p in r["curve"]] == [p["n_nodes"] for p in main["curve"]]
                for p in r["curve"] + r["crossings"]:
                    assert p["faithfulness"] == pytest.approx(faith(p["n_nodes"]), abs=1e-5)
                # active: non-zero on a clean or patch prompt of the set, at the node's position
                T = batch.clean.shape[1]
                on = {s: torch.zeros(T, dicts[s].n_features + 1, dtype=torch.bool) for s in at}
                for tokens in (batch.clean, batch.patch):
                    cache = {}
                    with torch.no_grad():
                        model(tokens, cache=cache)
                    for s in at:
                        f = dicts[s].encode(cache[s])
                        on[s][:, :-1] |= (f != 0).any(0)
                        on[s][:, -1] |= ((cache[s] - dicts[s].decode(f)).abs() > 1e-6).any(-1).any(0)
                n_on = lambda n: sum(bool(on[nd.site][nd.pos, nd.column]) for nd in ranked[:n])  # noqa: E731
                assert r["active_with_effect"] == n_on(len(ranked))
                points = r["curve"] + r["crossings"]
                for target in compare.TARGETS:
                    reach = [p["n_nodes"] for p in points if p["faithfulness"] >= target]
                    n = r[f"nodes_for_{target}"]
                    assert n == (min(reach) if reach else None)
                    if n is not None:
                        assert r[f"active_for_{target}"] == n_on(n)
                        # bisected until a size below it that misses the target is within SET_PRECISION (one node at least)
                        step = max(1, int(compare.SET_PRECISION * n))
                        below = [p for p in points if n - step <= p["n_nodes"] < n and p["faithfulness"] < target]
                        assert n == r["curve"][0]["n_nodes"] or below
                        checked += 1
                    else:
                        assert r["best"]["faithfulness"] == max(p["faithfulness"] for p in points)
                        assert r["best"]["active"] == n_on(r["best"]["n_nodes"])
                    row = re.search(rf"^\| {re.escape(set_name(role))} \| {len(exs)} \| {kind} \|(.*)\|$", section, re.M)
                    assert level(r, target) in row.group(1).split("|")[TARGETS_COLUMN[target]]
                n9 = main["nodes_for_0.9"]
                assert (r["at_held_out_0.9"] is None) == (n9 is None)
                if n9 is not None:
                    assert r["at_held_out_0.9"]["faithfulness"] == pytest.approx(faith(n9), abs=1e-5)
    assert checked > 0


TARGETS_COLUMN = {0.8: 0, 0.9: 1}
