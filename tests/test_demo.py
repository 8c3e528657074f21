"""`minicirc demo` (minicirc/experiments/demo.py, compare.py and demo_report.py): the three evaluation protocols
against the ablation written out in float64 (test_evaluation's reference), the protocol's sites, sizes and
area by their definitions, and a reduced-budget run whose report, files and scores are checked against
independent recomputations."""
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from minicirc.experiments import compare, demo, default
from minicirc.circuit import Circuit
from minicirc.errors import MinicircError
from test_attribution import make_batch, make_model, make_saes, neuron_saes
from test_evaluation import ref_metric, ref_values
from test_interpretability import _reference


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICIRC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_paper_first_layer_and_evaluated_sites():
    """Layer 2 of Pythia-70M's 6 scaled to the depth; embed and lower layers never among the evaluated sites;
    None: every site."""
    assert [compare.paper_first_layer(n) for n in (1, 2, 3, 4, 6, 12)] == [0, 1, 1, 1, 2, 4]
    seed = int(torch.randint(0, 10**6, ()).item())
    model = make_model(seed, parallel=True, n_layers=3)
    saes = make_saes(model, seed)
    for L in range(3):
        got = compare.evaluated_sites(model, saes, L)
        assert got == [s for s in model.sites if s != "embed" and int(s[-1]) >= L]
    assert compare.evaluated_sites(model, saes, None) == list(model.sites)


def test_node_counts_and_area_by_their_definitions():
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    total = rng.randrange(50, 5000)
    cap = rng.randrange(2, total)
    counts = compare.node_counts(total, cap, 12)
    assert counts[0] == 1 and counts[-1] == total and cap in counts and counts == sorted(set(counts))
    ratios = [b / a for a, b in zip(counts, counts[1:])]
    assert max(ratios) <= (total ** (1 / 11)) * 1.5 + 1      # a log grid, refined only by cap
    # The area: mean faithfulness over ln n on [0, ln cap], trapezoids, points above cap ignored.
    f = [rng.uniform(-0.5, 1.2) for _ in counts]
    points = [{"n_nodes": n, "faithfulness": y} for n, y in zip(counts, f)]
    xs = [math.log(n) for n in counts if n <= cap]
    want = np.trapezoid(f[:len(xs)], xs) / math.log(cap)
    assert compare.area_under(points, cap) == pytest.approx(want, rel=1e-12)
    assert compare.area_under([{"n_nodes": n, "faithfulness": 1.0} for n in counts], cap) == pytest.approx(1.0)
    assert math.isnan(compare.area_under(points[:1], cap))


def _random_circuit(model, saes, positional, T, rng):
    """A Circuit with random node effects (some exactly zero) at every site."""
    nodes = {}
    for s, d in saes.items():
        shape = (T, d.n_features + 1) if positional else (d.n_features + 1,)
        eff = torch.randn(shape, dtype=torch.float64) * torch.rand(shape, dtype=torch.float64) ** 3
        eff[torch.rand(shape) < 0.1] = 0
        nodes[s] = eff
    settings = {"aggregation": "none" if positional else "sum", "node_threshold": 0.1, "edge_threshold": 0.01}
    return Circuit(list(saes), nodes, {}, settings, {"clean": 0.0, "patch": 0.0}, nodes_only=True)


@pytest.mark.parametrize("protocol", compare.PROTOCOLS)
@pytest.mark.parametrize("dicts", ["saes", "neurons"])
def test_each_protocol_equals_the_written_out_ablation(protocol, dicts):
    """Every point of a protocol's curve: the top-n nodes by |effect| of the protocol's sites kept, everything
    else at those sites mean-ablated, other sites untouched, against test_evaluation's float64 reference."""
    seed = int(torch.randint(0, 10**6, ()).item())
    rng = random.Random(seed)
    model = make_model(seed, parallel=bool(seed % 2), n_layers=3)
    saes = make_saes(model, seed + 1, ("relu", "jumprelu", "topk")) if dicts == "saes" else neuron_saes(model)
    batch = make_batch(seed + 2, B=4)
    T = batch.clean.shape[1]
    positional = protocol == "positions"
    first = None if protocol == "all sites" else rng.choice([1, 2])
    sites = compare.evaluated_sites(model, saes, first)
    assert ("embed" in sites) == (protocol == "all sites")
    circuit = _random_circuit(model, saes, positional, T, rng)
    total = sum(nd.effect != 0 for nd in circuit.all_nodes() if nd.site in sites)
    counts = sorted(rng.sample(range(1, total + 1), 4))
    targets = (0.3, 0.6, 0.9)
    curve, crossings = compare.faithfulness_curve(model, saes, batch, circuit, sites, counts, targets)
    assert [p["n_nodes"] for p in curve] == counts
    # Bisection: each target's crossing sizes lie between the last grid size below it and the first reaching it.
    sizes = {p["n_nodes"] for p in crossings}
    for target in targets:
        hit = next((i for i, p in enumerate(curve) if p["faithfulness"] >= target), None)
        if hit:
            lo, hi = counts[hit - 1], counts[hit]
            inside = sorted(n for n in sizes if lo < n < hi)
            assert len(inside) >= min(1, hi - lo - 1)
            reach = [p["n_nodes"] for p in curve + crossings if p["faithfulness"] >= target]
            best = min(reach)
            below = [p for p in curve + crossings if p["n_nodes"] == best - 1]
            assert best == hi or below and below[0]["faithfulness"] < target
    got = curve + crossings
    sub = {s: saes[s] for s in sites}
    values = ref_values(model, sub, batch, "mean")
    nodes = [(n.site, "err" if n.error else n.column, n.pos, n.effect) for n in circuit.all_nodes() if n.site in sub]
    # Only the nodes with an effect are ranked: a zero-effect node never enters a circuit.
    ranked = sorted((r for r in nodes if r[3] != 0), key=lambda r: -abs(r[3]))
    assert len(ranked) == total < len(nodes)
    full = ref_metric(model, sub, batch, None, values, "default", -1)
    empty = ref_metric(model, sub, batch, set(), values, "default", -1)
    every = {r[:3] for r in nodes}
    for point in got:
        n = point["n_nodes"]
        keep = {r[:3] for r in ranked[:n]}
        m_c = ref_metric(model, sub, batch, keep, values, "default", -1)
        m_mc = ref_metric(model, sub, batch, every - keep, values, "default", -1)
        assert point["faithfulness"] == pytest.approx((m_c - empty) / (full - empty), rel=1e-7, abs=1e-9)
        assert point["completeness"] == pytest.approx((m_mc - empty) / (full - empty), rel=1e-7, abs=1e-9)


def test_demo_reduced_budget(cache, tmp_path):
    from minicirc import evaluation
    from minicirc.data import tokenize
    from minicirc.sae import identity_saes
    from minicirc.experiments.demo_report import level
    from minicirc.experiments.tasks import agreement
    results = demo.run_demo(str(tmp_path / "demo"), quick=True, progress=False)
    report = (tmp_path / "demo" / "report.md").read_text()
    with pytest.raises(MinicircError, match="overwrite"):
        demo.run_demo(str(tmp_path / "demo"), quick=True, progress=False)
    assert (tmp_path / "demo" / "report.md").read_text() == report
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    meta = results["_meta"]
    cfg, stats = meta["settings"], meta["stats"]
    model, saes, tok, _, _ = default.get_default("quick", progress=False)
    kinds = {"features": saes, "neurons": identity_saes(model)}
    assert meta["first_layer"] == compare.paper_first_layer(model.cfg.n_layers)
    for bad in (-1, model.cfg.n_layers):
        with pytest.raises(MinicircError, match="first layer must be in"):
            demo.run_demo(str(tmp_path / "bad"), quick=True, progress=False, first_layer=bad)
    # The report's numbers are the results' numbers.
    acc = dict(re.findall(r"(\w+) ([\d.]+)%", re.search(r"Agreement accuracy on held-out sentences: (.*)", report).group(1)))
    assert {t: float(v) for t, v in acc.items()} == pytest.approx({t: 100 * a for t, a in stats["agreement_accuracy"].items()}, abs=0.051)
    for site, v in stats["saes"].items():
        assert f"| {site} | {v['variance_explained']:.3f} | {v['l0']:.1f} |" in report
    number = lambda cell, want, tol: (cell == "—" if want is None or want != want  # noqa: E731
                                      else abs(float(cell) - want) <= tol)
    for t in agreement.TEMPLATES:
        section = report.split(f"## {t}\n")[1].split("\n## ")[0]
        full = float(re.search(r"full-model faithfulness (-?\d+\.\d+)", section).group(1))
        assert full == pytest.approx(meta["full_model_faithfulness"][t], abs=5e-4)
        held = tokenize(agreement.make_examples(t, cfg["n_eval"], seed=2, split="test"), tok)
        T = held.clean.shape[1]
        for kind, dicts in kinds.items():
            r = results[t][kind]
            cells = [c.strip() for c in re.search(rf"^\| {kind} \|(.*)\|$", section, re.M).group(1).split("|")]
            assert [int(cells[0]), int(cells[1])] == [r["nodes"], r["edges"]]
            for cell, key in zip(cells[2:], ("faithfulness", "completeness")):
                assert number(cell, r[key], 0.0051), (t, kind, key, cell, r[key])
            assert saved[t][kind]["nodes"] == r["nodes"]
            data = json.loads((tmp_path / "demo" / t / kind / "circuit.json").read_text())
            assert (r["nodes"], r["edges"]) == (len(data["nodes"]), len(data["edges"]))
            features = {f"{n['site']}/{n['feature']}" for n in data["nodes"] if n["feature"] != "err"}
            ctx_file = tmp_path / "demo" / t / kind / "contexts.json"
            assert (set(json.loads(ctx_file.read_text())) if ctx_file.exists() else set()) == features
            summed = Circuit.load(tmp_path / "demo" / t / kind)
            for protocol in compare.PROTOCOLS:
                p = r["protocols"][protocol]
                row = re.search(rf"^\| {protocol} \| {kind} \|(.*)\|$", section, re.M).group(1).split("|")
                row = [c.strip() for c in row]
                for cell, target in zip(row, (0.8, 0.9)):
                    assert cell == level(p, target), (t, kind, protocol, target)
                assert row[2] == f"{p['with_effect']} ({p['active_with_effect']}) of {p['all_nodes']}"
                assert number(row[3].split(" ")[0], p["area"], 0.0051) and row[3].endswith(f"({p['cap']})")
                assert number(row[4], p["nodes_to_break"], 0)
                assert number(row[5], p["interpretability_top_k"], 0.0051)
                broken = [q["n_nodes"] for q in p["curve"] if q["completeness"] <= 0.2]
                assert p["nodes_to_break"] == (min(broken) if broken else None)
                # The protocol's sites and sizes; the targets and the area from the curve.
                first = None if protocol == "all sites" else meta["first_layer"]
                assert p["sites"] == compare.evaluated_sites(model, dicts, first)
                per_pos = T if protocol == "positions" else None
                assert p["all_nodes"] == compare.n_nodes_at(dicts, p["sites"], per_pos)
                if protocol != "positions":   # the saved circuit holds the summed effects: its non-zero nodes
                    assert p["with_effect"] == sum(nd.effect != 0 for nd in summed.all_nodes() if nd.site in p["sites"])
                assert p["cap"] == min(results[t][k]["protocols"][protocol]["with_effect"] for k in kinds)
                ns = [q["n_nodes"] for q in p["curve"]]
                assert ns == compare.node_counts(p["with_effect"], p["cap"], cfg["grid_points"])
                for target in (0.8, 0.9):
                    reach = [q["n_nodes"] for q in p["curve"] + p["crossings"] if q["faithfulness"] >= target]
                    assert p[f"nodes_for_{target}"] == (min(reach) if reach else None)
                assert p["area"] == pytest.approx(compare.area_under(p["curve"], p["cap"]), nan_ok=True)
            # The saved circuit's faithfulness recomputed.
            faith = evaluation.faithfulness(model, dicts, held, data["nodes"])
            assert r["faithfulness"] == pytest.approx(faith["faithfulness"], abs=1e-6, nan_ok=True)
    assert results["nounpp"]["description"] in report
    # Unit scores: every feature node's annotation against the least-squares reference over the pooled
    # held-out tokens of all templates, within positions.
    batches = [tokenize(agreement.make_examples(t, cfg["n_interp"], seed=3, split="test"), tok)
               for t in agreement.TEMPLATES]
    lat = [agreement.token_latents(ex) for b in batches for ex in b.examples]
    names = list(lat[0])
    L = torch.tensor([[x[k][p] for k in names] for x in lat for p in range(len(x[names[0]]))], dtype=torch.float64)
    pos = torch.tensor([p for x in lat for p in range(len(x[names[0]]))])
    caches = []
    for b in batches:
        c = {}
        with torch.no_grad():
            model(b.clean, cache=c)
        caches.append(c)
    checked = 0
    for t in agreement.TEMPLATES:
        for kind, dicts in kinds.items():
            data = json.loads((tmp_path / "demo" / t / kind / "circuit.json").read_text())
            top = sorted((n for n in data["nodes"] if n["feature"] != "err"), key=lambda n: -abs(n["effect"]))[:3]
            for n in top:
                with torch.no_grad():
                    a = torch.cat([dicts[n["site"]].encode(c[n["site"]])[..., n["feature"]].flatten() for c in caches])
                want, k = _reference(a.double(), L, pos)
                assert n["interpretability"] == pytest.approx(want, abs=1e-4), n["id"]
                checked += 1
    assert checked > 0
    # The per-site-kind table: every unit of every site, live ones averaged.
    table = meta["unit_scores"]
    for kind, dicts in kinds.items():
        for sk in ("embed", "attn", "mlp", "resid"):
            cell = table[kind][sk]
            units_section = report.split("## Interpretability of every unit")[1]
            row = re.search(rf"^\| {sk} \|(.*)\|$", units_section, re.M).group(1).split("|")
            mean_cell = row[0 if kind == "features" else 2].strip()
            assert mean_cell == f"{cell['mean']:.2f} ({cell['units']})"
    for t in agreement.TEMPLATES:
        assert meta["full_model_faithfulness"][t] == pytest.approx(1.0, abs=1e-4)
    for name in ("faithfulness_vs_nodes.png", "completeness_vs_nodes.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0


def test_describe_nounpp_names_the_strongest_number_features():
    """Feature nodes whose best latent is a number of the subject, the token or the next verb, with share
    >= 0.5, listed per site in site order, the 3 of largest |effect| by name and the rest counted."""
    from minicirc.experiments.demo_report import NUMBER_LATENTS, describe_nounpp
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    sites = ["embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1"]
    good = NUMBER_LATENTS
    rich, empty = rng.sample(sites, 2)   # one site with many qualifying nodes, one with none at all
    nodes, interp = [], {}
    for site in sites:
        if site == empty:
            continue
        feats = rng.sample(range(500), rng.randrange(6, 12) if site == rich else rng.randrange(0, 6))
        for j, f in enumerate(feats):
            effect = rng.choice((-1, 1)) * rng.uniform(0.01, 2)
            if site == rich and j < 5:   # qualifying, one exactly at 0.5, the strongest negative
                name, score = good[j % len(good)], (0.5 if j == 0 else rng.uniform(0.5, 1))
                effect = -3.0 if j == 1 else effect
            else:                        # near misses as well as random ones
                name = rng.choice(good + ("second noun is plural", "word is the", None))
                score = rng.choice((0.49, 0.5, rng.uniform(0, 1)))
            nodes.append({"id": f"{site}/{f}", "site": site, "feature": f, "effect": effect})
            interp[f"{site}/{f}"] = (name, score)
        if rng.random() < 0.5:           # strongest node of the site, but not a number latent's
            f = 500 + sites.index(site)
            nodes.append({"id": f"{site}/{f}", "site": site, "feature": f, "effect": -5.0})
            interp[f"{site}/{f}"] = ("second noun is plural", 1.0)
        nodes.append({"id": f"{site}/err", "site": site, "feature": "err", "effect": rng.uniform(-9, 9)})
    rng.shuffle(nodes)
    qualifying = {}
    for n in nodes:
        name, score = interp.get(n["id"], (None, 0))
        if n["feature"] != "err" and name in good and score >= 0.5:
            qualifying.setdefault(n["site"], []).append((abs(n["effect"]), n["feature"]))
    text = describe_nounpp({"sites": sites, "nodes": nodes}, interp)
    parts = re.findall(r"at (\w+): features (.*?)(?=; at |\. Ablating)", text)
    assert [p[0] for p in parts] == [s for s in sites if s in qualifying]
    for site, body in parts:
        ranked = [f for _, f in sorted(qualifying[site], reverse=True)]
        assert [int(f) for f in re.findall(r"(?:^|\), )(\d+) \(", body)] == ranked[:3]
        more = re.search(r" and (\d+) more$", body)
        assert (int(more.group(1)) if more else 0) == max(0, len(ranked) - 3)
        for f in ranked[:3]:
            name, score = interp[f"{site}/{f}"]
            effect = next(n["effect"] for n in nodes if n["id"] == f"{site}/{f}")
            assert f"{f} ({name}, share {score:.2f}, effect {effect:+.2f})" in body
    none = {nid: (name, min(score, 0.49)) for nid, (name, score) in interp.items()}
    assert describe_nounpp({"sites": sites, "nodes": nodes}, none).startswith("No feature node")


def test_report_fmt_marks_missing_numbers():
    from minicirc.experiments.demo_report import fmt
    x = float(torch.randn(()).item())
    assert fmt(None) == fmt(float("nan")) == "—"
    assert fmt(x) == format(x, ".2f") and fmt(x, ".3f") == format(x, ".3f")
    n = int(torch.randint(0, 999, ()).item())
    assert fmt(n, "d") == str(n)


def test_answers_follow_their_rules():
    """The verdicts of report.answers on hand-made results: features ahead (<= 0.9x the neurons' nodes) in
    all templates but one -> yes; in at most one -> no; a kind that never reaches 0.9 needs more nodes."""
    from minicirc.experiments.demo_report import _compare, _verdict, answers
    from minicirc.experiments.tasks import agreement
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))

    def results(pairs):
        out = {"_meta": {"unit_scores": {k: {"mlp": {"mean": rng.random(), "units": 3, "share>=0.5": 0.5}}
                                         for k in ("features", "neurons")}}}
        for t, (f, n) in zip(agreement.TEMPLATES, pairs):
            out[t] = {kind: {"protocols": {p: {"nodes_for_0.9": v, "nodes_for_0.8": v, "area": rng.random(),
                                               "active_for_0.9": v, "active_for_0.8": v,
                                               "best": {"n_nodes": 7, "faithfulness": 0.5, "active": 3},
                                               "interpretability_top_k": rng.random()} for p in compare.PROTOCOLS}}
                      for kind, v in (("features", f), ("neurons", n))}
        return out

    assert _compare(results([(90, 100), (10, 50), (None, 3), (100, 95)]), "summed", "nodes_for_0.9") == (2, 1, 4)
    assert _compare(results([(91, 100), (50, 10), (3, None), (None, None)]), "summed", "nodes_for_0.9") == (1, 1, 4)
    assert [_verdict(*x) for x in [(4, 0, 4), (3, 0, 4), (3, 1, 4), (2, 0, 4), (1, 0, 4), (0, 3, 4)]] == \
        ["yes", "yes", "mixed", "mixed", "no", "no"]
    lines = [ln for ln in answers(results([(50, 100)] * 3 + [(100, 100)])) if "smaller at equal" in ln]
    assert len(lines) == 3 and all("**yes**" in ln for ln in lines)
    # A count never reached reads "not reached (best F at N nodes)" and needs more than any reached one.
    lines = [ln for ln in answers(results([(None, 100)] * 4)) if "smaller at equal" in ln]
    assert all("**no**" in ln and "not reached (best 0.50 at 7 nodes)" in ln for ln in lines)


def test_superposition_table_shows_the_recorded_shares():
    """report.md's monosemantic-units table: one row per site of stats.json's record, the shares as percentages
    and the latents covered, and nothing for a default trained before the record existed."""
    import random
    from minicirc.experiments.demo_report import superposition_lines
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    sites = {s: {"neurons": rng.random(), "neurons_latents": rng.randrange(9), "features": rng.random(),
                 "features_latents": rng.randrange(300)} for s in ("embed", "attn_0", "mlp_0", "resid_0")}
    stats = {"config": {"hidden_size": 48}, "monosemantic": {"n_latents": 350, "n_tokens": 4500, "criterion": "c",
                                                             "sites": sites}}
    lines = superposition_lines(stats)
    assert "350 binary latents" in lines[1] and "7.3x d_model 48" in lines[1]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| site")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(sites)
    for r, (s, v) in zip(rows, sites.items()):
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells == [s, f"{100 * v['neurons']:.0f}%", str(v["neurons_latents"]), f"{100 * v['features']:.0f}%",
                         str(v["features_latents"])]
    assert superposition_lines({"config": {"hidden_size": 48}}) == []


def test_report_prints_coverage_specificity_recipes_and_why_when_recorded():
    """The real model's extra records (discovery's coverage, token specificity per site, recipes tried) appear
    with their numbers when present and nothing when absent; "why features win or lose" is computed from the
    results (the shares of nodes with an effect that are active, the ratios in-sample and held-out, the held-out
    0.9 circuit on words seen and never seen)."""
    from minicirc.experiments.demo_report import coverage_lines, recipe_lines, specificity_lines, why_lines
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    assert coverage_lines(None) == [] and recipe_lines(None) == [] and recipe_lines([]) == []
    assert specificity_lines({"sites": {"resid_1": {}}}, ["resid_1"]) == []
    cov = {"simple": {"test_nouns": rng.randrange(10, 70), "covered": rng.randrange(10), "discovery_prompts": 100,
                      "test_prompts": 40}}
    assert f"| simple | 100 | 40 | {cov['simple']['test_nouns']} | {cov['simple']['covered']} |" in coverage_lines(cov)
    spec = {"live": rng.randrange(100, 4000), "narrow_share": rng.random(), "narrow_activation_share": rng.random(),
            "number_features": rng.randrange(9), "number_neurons": rng.randrange(50)}
    st = {"sites": {"resid_3": {"token_specificity": spec}, "resid_1": {}}}
    rows = [ln for ln in specificity_lines(st, ["resid_1", "resid_3"]) if ln.startswith("| resid")]
    assert rows == [f"| resid_3 | {spec['live']} | {100 * spec['narrow_share']:.0f}% | "
                    f"{100 * spec['narrow_activation_share']:.0f}% | {spec['number_features']} | {spec['number_neurons']} |"]
    recipes = [{"name": "k64", "settings": {"k": 64, "latents": 1152}, "seconds": 14.5,
                "sites": {"resid_11": {"variance_explained": 0.95, "narrow_share": 0.37}}}]
    text = "\n".join(recipe_lines(recipes))
    assert "**k64** (k 64, latents 1152): seconds 14.500" in text
    assert "| resid_11 | 0.950 | 0.370 |" in text and "| site | variance_explained | narrow_share |" in text

    def protocol(n9, with_effect, active, at=None):
        return {"nodes_for_0.9": n9, "active_for_0.9": n9 and n9 // 2, "nodes_for_0.8": n9, "active_for_0.8": n9,
                "best": {"n_nodes": with_effect, "faithfulness": 0.7, "active": 1}, "with_effect": with_effect,
                "active_with_effect": active, "all_nodes": 5000,
                "at_held_out_0.9": None if at is None else {"n_nodes": n9, "faithfulness": at}}
    f_in, n_in, f_out, n_out = (rng.randrange(10, 1000) for _ in range(4))
    results = {"_meta": {"kinds": ["features", "neurons"], "templates": ["simple"], "coverage": cov,
                         "evaluation_sets": ["in_sample", "held_out_seen", "held_out_unseen"],
                         "sae_stats": st},
               "simple": {"features": {"protocols": {"positions": protocol(f_out, 800, 200)}},
                          "neurons": {"protocols": {"positions": protocol(n_out, 400, 400)}},
                          "evaluation_sets": {
                              "in_sample": {"prompts": 100, "features": protocol(f_in, 800, 700),
                                            "neurons": protocol(n_in, 400, 400)},
                              "held_out_seen": {"prompts": 20, "features": protocol(f_out, 800, 600, 0.93),
                                                "neurons": protocol(n_out, 400, 400, 0.91)},
                              "held_out_unseen": {"prompts": 20, "features": protocol(f_out, 800, 100, 0.41),
                                                  "neurons": protocol(n_out, 400, 400, 0.88)}}}}
    text = "\n".join(why_lines(results))
    r, r_in = f_out / n_out, f_in / n_in
    assert "800 of 5000 feature nodes have an effect on the discovery prompts (25% of them active" in text
    assert "against 400 of 5000 neurons (100%)" in text and f": {r:.2f}x" in text
    assert f"in-sample the ratio is {r_in:.2f}x, so leaving the discovery prompts multiplies it by {r / r_in:.2f}" in text
    assert "keeps 0.93 on prompts whose words discovery saw and 0.41 on the others; neurons 0.91 and 0.88" in text
    assert f"covers {cov['simple']['covered']} of the {cov['simple']['test_nouns']} nouns" in text
    assert f"{100 * spec['narrow_share']:.0f}% of the live features" in text
    del results["_meta"]["coverage"], results["_meta"]["sae_stats"], results["simple"]["evaluation_sets"]
    results["_meta"]["evaluation_sets"] = []
    text = "\n".join(why_lines(results))
    assert "in-sample" not in text and "covers" not in text and "nouns on average" not in text
