"""SHIFT (concept disambiguation): probe, metric, ablation, retraining, judge, and a reduced-budget run."""
import copy
import json
import math

import pytest
import torch

from minicirc.experiments import default, shift, shift_report, shift_run

from minicirc import identity_saes
from minicirc.cli import main
from minicirc.errors import MinicircError
from minicirc.experiments.tasks.bios import ambiguous_split, balanced_split


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick-recipe default, trained once into a temporary cache for this module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MINICIRC_CACHE", str(tmp_path_factory.mktemp("cache")))
    model, saes, tok, _, _ = default.get_default("quick", progress=False)
    yield model, saes, tok
    mp.undo()


def test_probe_reaches_high_accuracy_on_the_ambiguous_split(quick):
    model, _, tok = quick
    train = shift.bios_batch(ambiguous_split(64, seed=0), tok)
    probe = shift.train_probe(model, train, layer=1)
    assert shift.evaluate(model, probe, train)["profession"] >= 0.95
    held = shift.bios_batch(ambiguous_split(64, seed=0, split="test"), tok)
    assert shift.evaluate(model, probe, held)["profession"] >= 0.9


def _logistic_grad(X, y, w, b, l2):
    """The gradient of mean(BCE(X w + b, y)) + l2 |w|^2 at (w, b), by autograd (the documented objective)."""
    theta = torch.cat([w.reshape(-1), b.reshape(1)]).double().requires_grad_(True)
    z = X.double() @ theta[:-1] + theta[-1]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y.double()) + l2 * (theta[:-1] ** 2).sum()
    return torch.autograd.grad(loss, theta)[0]


def test_fit_logistic_reaches_the_optimum():
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    X = torch.randn(80, 6, generator=g)
    y = ((X[:, 0] + 0.5 * torch.randn(80, generator=g)) > 0).long()
    w, b = shift.fit_logistic(X, y, l2=1e-2)
    assert _logistic_grad(X, y, w, b, 1e-2).abs().max() < 1e-6


def test_pooling_ignores_padding(quick):
    model, _, tok = quick
    bios = balanced_split(8, seed=3)
    batch = shift.bios_batch(bios, tok)
    together = shift.pooled_batched(model, batch, 1)
    alone = torch.cat([shift.pooled_batched(model, shift.bios_batch([b], tok), 1) for b in bios])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_metric_is_the_wrong_class_logit(quick):
    model, _, tok = quick
    batch = shift.bios_batch(ambiguous_split(16, seed=1), tok)
    probe = shift.train_probe(model, batch, layer=1)
    z = probe.logits(model, batch)
    with torch.no_grad():
        m = shift.probe_metric(probe)(model, batch, batch.clean, {})
    torch.testing.assert_close(m, torch.where(batch.clean_answer == 1, -z, z))
    assert (m < 0).all()   # the probe is right on its training bios: the wrong class has the lower logit


def test_circuit_covers_exactly_the_sites_up_to_the_probe(quick):
    model, saes, tok = quick
    batch = shift.bios_batch(ambiguous_split(8, seed=2), tok)
    probe = shift.train_probe(model, batch, layer=0)
    circuit = shift.probe_circuit(model, saes, probe, batch, steps=2, top_k=5, progress=False)
    assert circuit.sites == ["embed", "attn_0", "mlp_0", "resid_0"]
    top = shift.top_features(circuit, k=5)
    assert len(top) == 5 and all(f != "err" for _, f, _ in top)
    assert [abs(e) for *_, e in top] == sorted((abs(e) for *_, e in top), reverse=True)


def _capture(model, tokens, edit):
    """Run with `edit`; return (the value each edited site received, the value it passed on)."""
    seen, cache = {}, {}
    wrapped = {s: (lambda x, s=s, fn=fn: (seen.__setitem__(s, x), fn(x))[1]) for s, fn in edit.items()}
    with torch.no_grad():
        model(tokens, edit=wrapped, cache=cache)
    return seen, cache


@pytest.mark.parametrize("kind", ["features", "neurons"])
def test_ablation_changes_exactly_those_features(quick, kind):
    model, saes, tok = quick
    dicts = saes if kind == "features" else identity_saes(model)
    batch = shift.bios_batch(balanced_split(8, seed=5), tok)
    ablation = {"embed": [0, 3, 7], "resid_0": [1, 2], "resid_1": [5]}
    seen, cache = _capture(model, batch.clean, shift.ablation_edit(dicts, ablation))
    for site, feats in ablation.items():
        sae, x, out = dicts[site], seen[site], cache[site]
        f = sae.encode(x)
        kept = torch.ones(f.shape[-1], dtype=torch.bool)
        kept[feats] = False
        f_abl = f * kept
        # The site's value is decode(f') + err with f' = f outside `feats`, 0 at `feats`, and err unchanged.
        torch.testing.assert_close(out, sae.decode(f_abl) + (x - sae.decode(f)), rtol=1e-5, atol=1e-5)
        if kind == "neurons":   # features are coordinates: exactly those become 0, the rest are untouched
            assert (out[..., feats] == 0).all()
            assert torch.equal(out[..., kept], x[..., kept])
        else:   # only the ablated features' decoder directions leave the site
            torch.testing.assert_close(out - x, -(f[..., feats] @ sae.W_dec[feats]), rtol=1e-5, atol=1e-5)
            assert (f[..., feats] != 0).any(), "the test should ablate features that are active"
    # Downstream sites re-encode the already-edited value: resid_0 received what embed's ablation produced.
    _, only_embed = _capture(model, batch.clean, shift.ablation_edit(dicts, {"embed": [0, 3, 7]}))
    torch.testing.assert_close(seen["resid_0"], only_embed["resid_0"], rtol=1e-5, atol=1e-5)
    # Nothing to ablate, nothing changes.
    assert shift.ablation_edit(dicts, {"embed": []}) == {}


def test_ablation_rejects_bad_features(quick):
    model, saes, _ = quick
    with pytest.raises(MinicircError, match="out of range"):
        shift.ablation_edit(saes, {"embed": [saes["embed"].n_features]})
    sites = shift.probe_sites(model, 0)
    with pytest.raises(MinicircError, match="not one of the probe's sites"):
        shift.parse_ablation("resid_1/3", saes, sites)
    with pytest.raises(MinicircError, match="SITE/FEATURE"):
        shift.parse_ablation("embed/x", saes, sites)
    assert shift.parse_ablation("embed/3, resid_0/1,embed/3", saes, sites) == {"embed": [3], "resid_0": [1]}


def test_retraining_keeps_the_ablated_features_removed(quick):
    model, saes, tok = quick
    neurons = identity_saes(model)
    train = shift.bios_batch(ambiguous_split(48, seed=0), tok)
    test = shift.bios_batch(balanced_split(24, seed=0, split="test"), tok)
    ablation = {"embed": [0, 5, 9, 11], "resid_0": [2]}
    retrained = shift.train_probe(model, train, 1, saes=neurons, ablation=ablation)
    assert retrained.ablation == ablation
    # A model whose ablated embedding coordinates are scrambled is the same model once they are removed:
    # the retrained probe must give the same logits and retraining there the same weights.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.embed_in.weight[:, [0, 5, 9, 11]] = 10 * torch.randn(other.embed_in.weight.shape[0], 4)
    torch.testing.assert_close(retrained.logits(other, test), retrained.logits(model, test), rtol=1e-5, atol=1e-5)
    again = shift.train_probe(other, train, 1, saes=neurons, ablation=ablation)
    torch.testing.assert_close(again.weight, retrained.weight, rtol=1e-4, atol=1e-4)
    # Without the ablation the scrambled coordinates do matter (so the check above can fail).
    plain = shift.train_probe(model, train, 1)
    assert not torch.allclose(plain.logits(other, test), plain.logits(model, test), atol=1e-3)
    # SAE features: the retrained probe is fit on the ablated activations and evaluated with them.
    sae_ablation = {"embed": [1, 2], "resid_1": [4]}
    r = shift.train_probe(model, train, 1, saes=saes, ablation=sae_ablation)
    X = shift.pooled_batched(model, train, 1, shift.ablation_edit(saes, sae_ablation))
    w, b = shift.fit_logistic(X, train.clean_answer)
    torch.testing.assert_close((r.weight, r.bias), (w, b))
    torch.testing.assert_close(r.logits(model, test),
                               shift.pooled_batched(model, test, 1, shift.ablation_edit(saes, sae_ablation)) @ w + b)


def test_judge_effect_sizes():
    prof = torch.tensor([0, 0, 1, 1] * 16)
    gen = torch.tensor([0, 1, 0, 1] * 16)
    g = torch.Generator().manual_seed(0)
    i = torch.arange(64)
    name = (((i % 16) == 1) | ((i % 16) == 3)).float() * 3     # one female name: in 1/4 of female bios, both jobs
    job = prof.float() * 2 + 0.1 * torch.randn(64, generator=g)           # profession
    const = torch.ones(64)
    dg, dp = shift.effect_sizes(torch.stack([name, job, const], 1), prof, gen)
    assert dg[0] > dp[0] + 0.2            # the name is gendered, though active in few bios
    assert dp[1] > dg[1] + 1              # the job feature is not
    assert dg[2] == 0 and dp[2] == 0      # a constant feature is neither


def test_shift_reduced_budget(quick, tmp_path, monkeypatch):
    out = tmp_path / "shift"
    assert main(["shift", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {"original", "random", "random_retrain", "shift", "shift_retrain", "neurons_random",
                         "neurons_random_retrain", "neurons_shift", "neurons_shift_retrain", "oracle"}
    for name, r in rows.items():
        for k in ("profession", "gender", "worst_group"):
            assert math.isfinite(r[k]) and 0 <= r[k] <= 1, (name, k)
    assert rows["oracle"]["worst_group"] >= rows["original"]["worst_group"]
    assert len(results["random_runs"]) == len(results["neurons"]["random_runs"]) == 5
    assert results["judge"] == "automatic"
    for kind, pre in (("features", ""), ("neurons", "neurons_")):
        assert results["n_ablated"][pre + "shift"] == results["n_ablated"][pre + "random_retrain"] \
            == sum(c["ablated"] for c in results[kind]["candidates"]) > 0
    # The candidates are the coverage rule's choice among every feature with a non-zero effect (the circuit
    # recomputed here), the same rule for neurons; the sweeps run the rule's other shares and a fixed top k.
    cfg = results["settings"]
    assert cfg["coverage"] == 0.9 and cfg["top_k"] is None
    model, saes, tok = quick
    data = shift_run.make_data(tok, cfg)
    probe = shift.train_probe(model, data["train"], cfg["probe_layer"], l2=cfg["l2"])
    sites = shift.probe_sites(model, cfg["probe_layer"])
    for kind, dicts in (("features", saes), ("neurons", identity_saes(model))):
        res = results[kind]
        circuit = shift.probe_circuit(model, {s: dicts[s] for s in sites}, probe, data["circuit"], steps=cfg["steps"],
                                      top_k=cfg["circuit_nodes"], batch_size=cfg["batch_size"], progress=False)
        ranked = shift.top_features(circuit, k=10**9)
        want = _coverage_by_hand(ranked, 0.9)
        assert [(c["site"], c["feature"]) for c in res["candidates"]] == [(s, i) for s, i, _ in want], kind
        assert 0 < len(want) < len(ranked)
        assert [(p["coverage"], p["candidates"]) for p in res["sweep"]] == \
            [(share, len(_coverage_by_hand(ranked, share))) for share in cfg["sweep"]]
        assert [p["candidates"] for p in res["sweep_k"]] == sorted({k for k in cfg["sweep_k"] if k < len(ranked)}
                                                                   | {len(ranked)})
        # Where the evidence lives: each site's summed |effect| of its features, candidates and ablated features,
        # and its error node's effect, written out from the recomputed circuit.
        for site in sites:
            effects = {"err" if n.error else n.column: n.effect for n in circuit.all_nodes() if n.site == site}
            abl = res["ablation"].get(site, [])
            v = res["sites"][site]
            assert v["features"] == pytest.approx(sum(abs(e) for i, e in effects.items() if i != "err"), rel=1e-9)
            assert v["candidates"] == pytest.approx(sum(abs(c["effect"]) for c in res["candidates"]
                                                        if c["site"] == site), rel=1e-9)
            assert v["ablated"] == pytest.approx(sum(abs(effects[i]) for i in abl), rel=1e-9, abs=1e-12)
            assert v["n_ablated"] == len(abl) and v["error"] == pytest.approx(effects["err"], rel=1e-9)
        # The rows: SHIFT + retrain and the random control are ablate_and_retrain's, recomputed here.
        abl = {s: list(v) for s, v in res["ablation"].items()}
        shifted, retrained, _ = shift.ablate_and_retrain(model, probe, dicts, abl, data["train"], data["test"],
                                                         cfg["l2"])
        pre = "" if kind == "features" else "neurons_"
        assert (rows[pre + "shift"], rows[pre + "shift_retrain"]) == (shifted, retrained)
        assert len(res["random_retrain_runs"]) == cfg["random_seeds"] == 5
        for seed, run in enumerate(res["random_retrain_runs"]):
            other = shift.random_ablation(dicts, abl, seed)
            assert {s: len(v) for s, v in other.items()} == {s: len(v) for s, v in abl.items()}
            assert run == shift.ablate_and_retrain(model, probe, dicts, other, data["train"], data["test"],
                                                   cfg["l2"])[1]
        assert rows[pre + "random_retrain"]["worst_group"] == pytest.approx(
            sum(r["worst_group"] for r in res["random_retrain_runs"]) / 5, abs=1e-12)
    assert results["random_retrain_runs"] == results["features"]["random_retrain_runs"]
    # Where the concepts live: concept_left on the balanced bios, before and after the features' ablation.
    abl = {s: list(v) for s, v in results["features"]["ablation"].items()}
    for state, a in (("before", None), ("after", abl)):
        assert results["concept_left"][state] == shift.concept_left(model, saes, data["oracle_train"], data["test"],
                                                                     sites, a, cfg["l2"]), state
    report = (out / "shift_report.md").read_text()
    assert "Judge: automatic" in report and "worst-group" in report and "[[" in report
    assert "| 0.9 | " in report and "Where the probe's evidence lives" in report
    # candidates.md lists every candidate of both kinds; the report shows the strongest SHOWN of each list and
    # says how many more candidates.md holds.
    full = (out / "candidates.md").read_text()
    for kind in ("features", "neurons"):
        assert all(f"| {v['site']}/{v['feature']} | {v['effect']:+.3f} |" in full for v in results[kind]["candidates"])
    cand = results["features"]["candidates"]
    assert len(cand) > 3
    monkeypatch.setattr(shift_report, "SHOWN", 3)
    short = shift_report.shift_report(results, str(out))
    rows = [v for v in cand if f"| {v['site']}/{v['feature']} | {v['effect']:+.3f} |" in short]
    more = f"({len(cand) - 3} more candidates in [candidates.md](candidates.md), which the run writes beside this report.)"
    assert rows == cand[:3] and more in short
    # --top-k keeps the old rule (the strongest k), and --threshold then keeps those above it, in order.
    assert main(["shift", "--quick", "--out", str(tmp_path / "k"), "--top-k", "8"]) == 0
    before = json.loads((tmp_path / "k" / "results.json").read_text())["features"]["candidates"]
    before = [(c["site"], c["feature"], abs(c["effect"])) for c in before]
    assert len(before) == 8 and [e for *_, e in before] == sorted((e for *_, e in before), reverse=True)
    thr = sorted(e for *_, e in before)[len(before) // 2]
    assert main(["shift", "--quick", "--out", str(tmp_path / "thr"), "--top-k", "8", "--threshold", str(thr)]) == 0
    after = json.loads((tmp_path / "thr" / "results.json").read_text())["features"]["candidates"]
    assert [(c["site"], c["feature"]) for c in after] == [(s, i) for s, i, e in before if e > thr]
    assert 0 < len(after) < len(before)
    for f in ("shift.png", "bios_sample.txt", "circuit_features/circuit.json", "circuit_neurons/circuit.html"):
        assert (out / f).stat().st_size > 0, f
    # An earlier run is never overwritten silently; a person's list replaces the automatic judge.
    assert main(["shift", "--quick", "--out", str(out)]) == 2
    assert main(["shift", "--quick", "--out", str(out), "--overwrite", "--ablate", "nowhere/1"]) == 2
    assert main(["shift", "--quick", "--out", str(out), "--overwrite", "--ablate", "embed/3,resid_1/2",
                 "--random-seeds", "5"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == "user" and results["n_ablated"]["shift"] == 2
    assert results["features"]["ablation"] == {"embed": [3], "resid_1": [2]}


def _coverage_by_hand(ranked, share):
    """The candidate rule written out: sort by |effect|, take the shortest prefix whose sum reaches share of the
    total, then everything at least as strong as its last member, in `ranked`'s order."""
    mags = sorted((abs(r[2]) for r in ranked), reverse=True)
    k = next(k for k in range(1, len(mags) + 1) if sum(mags[:k]) >= share * sum(mags))
    return [r for r in ranked if abs(r[2]) >= mags[k - 1]]


def test_coverage_rule_on_hand_made_effects():
    rule = shift.coverage_candidates
    rows = [("embed", 0, 4.0), ("embed", 1, -3.0), ("resid_0", 5, 2.0), ("attn_0", 2, -1.0)]   # total 10
    ids = lambda got: [(s, i) for s, i, *_ in got]
    # The boundary: 0.7 of 10 is reached exactly by 4 + 3; a hair more needs the third.
    assert ids(rule(rows, 0.7)) == [("embed", 0), ("embed", 1)]
    assert ids(rule(rows, 0.7 + 1e-9)) == [("embed", 0), ("embed", 1), ("resid_0", 5)]
    assert ids(rule(rows, 1e-12)) == [("embed", 0)]
    assert ids(rule(rows, 1.0)) == ids(rows)
    # Signs do not matter, order does not matter: the same set whichever way the rows come.
    flipped = [(s, i, -e) for s, i, e in rows[::-1]]
    assert sorted(ids(rule(flipped, 0.75))) == sorted(ids(rule(rows, 0.75))) == [("embed", 0), ("embed", 1),
                                                                                 ("resid_0", 5)]
    # Ties at the boundary are all in: 2 of the total 8 reaches 0.25, but all three 2s are equally strong.
    tied = [("embed", 0, 2.0), ("embed", 1, 1.0), ("mlp_0", 3, -2.0), ("resid_0", 4, 2.0), ("resid_0", 7, 1.0)]
    assert ids(rule(tied, 0.25)) == [("embed", 0), ("mlp_0", 3), ("resid_0", 4)]
    assert ids(rule(tied, 0.75)) == ids(rule(tied, 0.25))                  # 6 of 8 reaches 0.75 exactly
    assert ids(rule(tied, 0.8)) == ids(tied)                               # 6.4 needs a 1: both 1s come in
    # Extra fields ride along (the pipeline passes an index).
    assert rule([("embed", 0, 1.0, "x")], 0.5) == [("embed", 0, 1.0, "x")]
    # Nothing to select, or a share that is not one: refused with a clear error.
    for bad in ([], [("embed", 0, 0.0), ("embed", 1, -0.0)], [("embed", 0, float("nan"))]):
        with pytest.raises(MinicircError, match="zero effect"):
            rule(bad, 0.9)
    for share in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(MinicircError, match=r"coverage must be in \(0, 1\]"):
            rule(rows, share)


def test_coverage_rule_against_a_written_out_selection_on_random_effects():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    for trial in range(50):
        n = int(torch.randint(1, 40, (), generator=g))
        # Multiples of 1/8 (exact sums in float, many ties), both signs, some exactly at a share's boundary.
        mags = (torch.randint(1, 12, (n,), generator=g).double() / 8).tolist()
        signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).tolist()
        rows = [(("embed", "attn_0", "resid_0")[j % 3], j, m * sg) for j, (m, sg) in enumerate(zip(mags, signs))]
        ordered = sorted(rows, key=lambda r: -abs(r[2]))
        cuts = [sum(sorted(mags, reverse=True)[:k]) / sum(mags) for k in range(1, n + 1)]
        for share in [float(torch.rand((), generator=g)) * 0.999 + 0.001, 1.0, cuts[len(cuts) // 2]]:
            want = _coverage_by_hand(rows, share)
            assert shift.coverage_candidates(rows, share) == want, (trial, share)
            assert shift.coverage_candidates(ordered, share) == _coverage_by_hand(ordered, share)
            covered = sum(abs(r[2]) for r in want)
            assert covered >= share * sum(mags)
            weakest = min(abs(r[2]) for r in want)                 # minimal: without the weakest tier, short
            assert sum(abs(r[2]) for r in want if abs(r[2]) > weakest) < share * sum(mags)
    # select_candidates: the coverage rule or the top k, then the threshold.
    rows = [("embed", 0, 4.0), ("embed", 1, -3.0), ("resid_0", 5, 2.0), ("attn_0", 2, -1.0)]
    assert shift.select_candidates(rows, coverage=0.9) == rows[:3]
    assert shift.select_candidates(rows, coverage=0.9, threshold=2.0) == rows[:2]
    assert shift.select_candidates(rows, top_k=1) == rows[:1]
    assert shift.select_candidates(rows, top_k=10, threshold=0.5) == rows


def test_pooled_parts_and_concept_left_against_a_written_out_split():
    """pooled_parts: the value that left each site, the SAE error of the value that arrived there (the site's
    own ablation not yet applied: the run with only the upstream sites ablated, written out here), and their
    difference, each averaged over a bio's real tokens; concept_left: probes fit on those."""
    from test_data import random_model_and_saes
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    model, saes = random_model_and_saes(g, 29)
    train, test = _random_bios(g, model, 16), _random_bios(g, model, 12)
    sites = shift.probe_sites(model, 1)
    ablation = {"embed": torch.randperm(10, generator=g)[:3].tolist(), "resid_0": [1, 4], "resid_1": [2]}
    got = shift.pooled_parts(model, saes, train, sites, shift.ablation_edit(saes, ablation), batch_size=5)
    for s in sites:
        upstream = {t: v for t, v in ablation.items() if model.sites.index(t) < model.sites.index(s)}
        want = {"value": [], "error": [], "arrived": []}
        for b in range(len(train)):
            T = int(train.last[b]) + 1
            arrived, left = {}, {}
            with torch.no_grad():
                model(train.clean[b:b + 1, :T], edit=shift.ablation_edit(saes, upstream), cache=arrived)
                model(train.clean[b:b + 1, :T], edit=shift.ablation_edit(saes, ablation), cache=left)
            x, sae = arrived[s][0], saes[s]
            f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
            want["error"].append((x - (f @ sae.W_dec + sae.b_dec)).mean(0))
            want["value"].append(left[s][0].mean(0))
            want["arrived"].append(x.mean(0))
        for part in ("value", "error"):
            torch.testing.assert_close(got[s][part], torch.stack(want[part]), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got[s]["features"], got[s]["value"] - got[s]["error"], rtol=1e-8, atol=1e-10)
        if s in ablation:   # the site's own ablation changed what left it (so arrived and left differ here)
            assert not torch.allclose(got[s]["value"], torch.stack(want["arrived"]), atol=1e-6)
    # With nothing edited the features' part is the reconstruction decode(encode(x)).
    plain = shift.pooled_parts(model, saes, train, sites)
    for s in sites:
        rec = []
        for b in range(len(train)):
            T = int(train.last[b]) + 1
            cache = {}
            with torch.no_grad():
                model(train.clean[b:b + 1, :T], cache=cache)
            rec.append(saes[s].decode(saes[s].encode(cache[s][0])).mean(0))
        torch.testing.assert_close(plain[s]["features"], torch.stack(rec), rtol=1e-8, atol=1e-10)
    # concept_left: each accuracy is a probe fit on the train bios' part, scored on the test bios'.
    left = shift.concept_left(model, saes, train, test, sites, ablation, l2=0.01)
    X_test = shift.pooled_parts(model, saes, test, sites, shift.ablation_edit(saes, ablation))
    for s in sites:
        for concept in ("gender", "profession"):
            for part in ("value", "features", "error"):
                w, b = shift.fit_logistic(got[s][part], shift.labels(train, concept), l2=0.01)
                acc = (((X_test[s][part] @ w + b) > 0).long() == shift.labels(test, concept)).double().mean()
                assert left[s][concept][part] == pytest.approx(float(acc), abs=1e-6), (s, concept, part)


def test_ablate_and_retrain_matches_its_parts(quick):
    """ablate_and_retrain = (evaluate(probe with the ablation), evaluate(train_probe with the ablation), that probe).
    The ablation is the most gendered features on held-out balanced bios: with a few arbitrary features the two
    score dicts were equal (both saturated: the probe reads gender from many other features), so swapping them
    or retraining without the ablation went unnoticed."""
    model, saes, tok = quick
    seed = int(torch.randint(0, 10**6, ()).item())
    train = shift.bios_batch(ambiguous_split(32, seed=seed), tok)
    test = shift.bios_batch(balanced_split(16, seed=seed, split="test"), tok)
    val = shift.bios_batch(balanced_split(32, seed=seed + 1), tok)
    probe = shift.train_probe(model, train, 1)
    sites = shift.probe_sites(model, 1)
    feats = [(s, i) for s in sites for i in range(saes[s].n_features)]
    g, p = shift.effect_sizes(shift.pooled_features(model, saes, val, feats), shift.labels(val, "profession"),
                              shift.labels(val, "gender"))
    top = sorted(range(len(feats)), key=lambda j: -float(g[j] - p[j]))[:20]
    ablation = {**shift.as_ablation([feats[j] for j in top], sites), "mlp_0": []}
    shifted, retrained, new = shift.ablate_and_retrain(model, probe, saes, ablation, train, test)
    want_shifted = shift.evaluate(model, probe.with_ablation(saes, ablation), test)
    reference = shift.train_probe(model, train, 1, saes=saes, ablation=ablation)
    want_retrained = shift.evaluate(model, reference, test)
    assert want_shifted != want_retrained, "the test needs an ablation after which retraining changes the scores"
    assert shifted == want_shifted
    assert retrained == want_retrained
    # The returned probe is train_probe's: fit on the ablated activations, and run with the ablation.
    assert new.ablation == {s: v for s, v in ablation.items() if v} and new.layer == 1
    torch.testing.assert_close((new.weight, new.bias), (reference.weight, reference.bias))
    plain = shift.train_probe(model, train, 1)
    assert not torch.allclose(plain.weight, reference.weight, atol=1e-3), "the ablation must change the fit"
    torch.testing.assert_close(new.logits(model, test), reference.logits(model, test))


# --- pooling, composition, the probe metric, scores and effect sizes against references written here ---------

def _random_model_and_sae(g, vocab=29):
    """A float64 random model and one relu dictionary (test_data's builder; resid_0's dictionary)."""
    from test_data import random_model_and_saes
    model, saes = random_model_and_saes(g, vocab)
    return model, saes["resid_0"]


def _padded_tokens(g, vocab, n):
    lengths = [int(v) + 1 for v in torch.randperm(9, generator=g)[:n]]       # distinct lengths 1..9
    T = max(lengths)
    rows = [torch.randint(0, vocab, (m,), generator=g).tolist() for m in lengths]
    tokens = torch.tensor([r + [int(torch.randint(0, vocab, (), generator=g))] * (T - len(r)) for r in rows])
    return rows, tokens, torch.tensor([m - 1 for m in lengths])


@pytest.mark.parametrize("layer", [0, 1])
def test_pooled_is_the_mean_over_every_real_token(layer):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    model, _ = _random_model_and_sae(g)
    rows, tokens, last = _padded_tokens(g, model.cfg.vocab_size, 4)   # padded with random (non-pad) ids
    with torch.no_grad():
        got = shift.pooled(model, tokens, last, layer)
    for i, r in enumerate(rows):
        cache = {}
        with torch.no_grad():
            model(torch.tensor([r]), cache=cache)                         # this example alone, unpadded
        x = cache[f"resid_{layer}"][0]
        assert x.shape[0] == int(last[i]) + 1
        want = [sum(float(x[t, j]) for t in range(x.shape[0])) / x.shape[0] for j in range(x.shape[1])]
        torch.testing.assert_close(got[i], torch.tensor(want, dtype=got.dtype), rtol=1e-9, atol=1e-9)


def test_compose_runs_first_then_second():
    x = torch.randn(3, 5)
    f, g = (lambda t: t * 2.0), (lambda t: t + 1.0)
    both = shift.compose({"embed": f, "mlp_0": f}, {"embed": g, "attn_0": g})
    assert set(both) == {"embed", "mlp_0", "attn_0"}
    torch.testing.assert_close(both["embed"](x), g(f(x)))
    assert not torch.allclose(f(g(x)), g(f(x)))                           # the order matters here
    torch.testing.assert_close(both["mlp_0"](x), f(x))
    torch.testing.assert_close(both["attn_0"](x), g(x))
    assert shift.compose(None, {"embed": g})["embed"] is g and shift.compose({"embed": f}, None)["embed"] is f


def test_probe_metric_with_an_ablated_probe_equals_a_hand_edited_forward():
    """probe_metric runs the probe's ablation first and attribution's edit on its output at the same site."""
    from minicirc.data import Batch
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    model, sae = _random_model_and_sae(g)
    site, feats = "resid_0", [1, 4, 7]
    rows, tokens, last = _padded_tokens(g, model.cfg.vocab_size, 4)
    y = torch.tensor([0, 1, 1, 0])
    batch = Batch(tokens, None, y, None, last, [None] * len(y))
    probe = shift.Probe(1, torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64),
                        torch.randn((), generator=g, dtype=torch.float64), {site: sae}, {site: feats})
    shift_ = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
    attrib = lambda x: 1.5 * x + shift_                                   # attribution's edit at the same site

    def ablate(x):   # the SAE formula written out: x - sum over ablated i of f_i W_dec[i], f = relu((x - b_dec) W_enc + b_enc)
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        return x - sum(f[..., i:i + 1] * sae.W_dec[i] for i in feats)

    def metric_with(edit_fn):
        out = []
        for i, r in enumerate(rows):
            cache = {}
            with torch.no_grad():
                model(torch.tensor([r]), edit={site: edit_fn}, cache=cache)
            z = float(cache["resid_1"][0].mean(0) @ probe.weight + probe.bias)
            out.append(z if int(y[i]) == 0 else -z)
        return torch.tensor(out, dtype=torch.float64)

    with torch.no_grad():
        got = shift.probe_metric(probe)(model, batch, tokens, {site: attrib})
    want = metric_with(lambda x: attrib(ablate(x)))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # Probe.logits composes the same way (its own ablation first), in batches of any size.
    sign = 1 - 2 * y.double()
    torch.testing.assert_close(probe.logits(model, batch, edit={site: attrib}, batch_size=3) * sign, want,
                               rtol=1e-7, atol=1e-9)
    assert not torch.allclose(want, metric_with(lambda x: ablate(attrib(x))), atol=1e-6), "order must matter"


def _bios_batch_from_labels(prof, gen):
    from minicirc.data import Batch
    from minicirc.experiments.tasks.bios import Bio
    n = len(prof)
    return Batch(torch.zeros(n, 1, dtype=torch.long), None, torch.tensor(prof), None, torch.zeros(n, dtype=torch.long),
                 [Bio("x", p, q) for p, q in zip(prof, gen)])


def test_score_against_python_counts():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    # Four groups of random sizes; the number of correct profession predictions differs between groups.
    sizes = [int(v) for v in torch.randint(4, 9, (4,), generator=g)]
    prof, gen, z = [], [], []
    for (p, q), size in zip([(0, 0), (0, 1), (1, 0), (1, 1)], sizes):
        correct = int(torch.randint(0, size + 1, (), generator=g))
        for j in range(size):
            right = j < correct
            sign = (1 if p == 1 else -1) * (1 if right else -1)           # class 1 when z > 0
            prof.append(p)
            gen.append(q)
            z.append(sign * (0.1 + float(torch.rand((), generator=g))))
    perm = torch.randperm(len(z), generator=g).tolist()
    prof, gen, z = [prof[i] for i in perm], [gen[i] for i in perm], [z[i] for i in perm]
    batch = _bios_batch_from_labels(prof, gen)
    got = shift.score(torch.tensor(z), batch)
    pred = [1 if v > 0 else 0 for v in z]
    groups = {}
    for p in (0, 1):
        for q in (0, 1):
            idx = [i for i in range(len(z)) if prof[i] == p and gen[i] == q]
            groups[f"{p}{q}"] = sum(pred[i] == p for i in idx) / len(idx)
    assert got["groups"] == pytest.approx(groups)
    assert got["worst_group"] == pytest.approx(min(groups.values()))
    assert got["profession"] == pytest.approx(sum(a == b for a, b in zip(pred, prof)) / len(z))
    assert got["gender"] == pytest.approx(sum(a == b for a, b in zip(pred, gen)) / len(z))
    # A group that is absent does not count: drop group "11".
    keep = [i for i in range(len(z)) if (prof[i], gen[i]) != (1, 1)]
    sub = shift.score(torch.tensor([z[i] for i in keep]), _bios_batch_from_labels([prof[i] for i in keep],
                                                                                 [gen[i] for i in keep]))
    assert set(sub["groups"]) == {"00", "01", "10"}
    assert sub["worst_group"] == pytest.approx(min(groups[k] for k in ("00", "01", "10")))


def test_score_worst_group_is_the_minimum_not_the_mean():
    prof, gen = [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]
    z = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]     # groups 00: 1, 01: 1/2, 10: 1, 11: 1
    got = shift.score(torch.tensor(z), _bios_batch_from_labels(prof, gen))
    assert got["worst_group"] == 0.5 and got["groups"] == {"00": 1.0, "01": 0.5, "10": 1.0, "11": 1.0}


def test_effect_sizes_against_numpy():
    import numpy as np
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    n, k = 60, 5
    prof = torch.tensor([i % 2 for i in range(n)])
    gen = torch.tensor([(i // 2) % 2 for i in range(n)])
    perm = torch.randperm(n, generator=g)
    prof, gen = prof[perm], gen[perm]
    X = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.rand(k, generator=g, dtype=torch.float64) * 3 \
        + 0.7 * gen[:, None] * torch.randn(k, generator=g, dtype=torch.float64) \
        + 0.5 * prof[:, None] * torch.randn(k, generator=g, dtype=torch.float64)
    Xn, P, G = X.numpy(), prof.numpy(), gen.numpy()
    mu = {(p, q): Xn[(P == p) & (G == q)].mean(0) for p in (0, 1) for q in (0, 1)}
    var = [Xn[(P == p) & (G == q)].var(0, ddof=1) for p in (0, 1) for q in (0, 1)]
    sd = np.sqrt(np.mean(var, axis=0))                                      # pooled over the four groups
    want_g = np.abs((mu[0, 1] + mu[1, 1] - mu[0, 0] - mu[1, 0]) / 2) / sd
    want_p = np.abs((mu[1, 0] + mu[1, 1] - mu[0, 0] - mu[0, 1]) / 2) / sd
    dg, dp = shift.effect_sizes(X, prof, gen)
    np.testing.assert_allclose(dg.numpy(), want_g, rtol=1e-10)
    np.testing.assert_allclose(dp.numpy(), want_p, rtol=1e-10)


# --- gaps found by mutation testing: validation bounds, repeated features, batching, labels, l2, ties -------

def _random_bios(g, model, n):
    """A Batch of n random token rows for `model` (lengths 2..9, right-padded with random ids) labelled as
    bios, every (profession, gender) group at least twice when n >= 8."""
    from minicirc.data import Batch
    from minicirc.experiments.tasks.bios import Bio
    lengths = [int(v) for v in torch.randint(2, 10, (n,), generator=g)]
    T = max(lengths)
    tokens = torch.randint(0, model.cfg.vocab_size, (n, T), generator=g)
    pairs = [(i % 2, (i // 2) % 2) for i in range(n)]
    pairs = [pairs[i] for i in torch.randperm(n, generator=g).tolist()]
    examples = [Bio("x", p, q) for p, q in pairs]
    return Batch(tokens, None, torch.tensor([p for p, _ in pairs]), None, torch.tensor([m - 1 for m in lengths]),
                 examples)


def test_ablation_validation_bounds_and_repeated_features():
    from test_data import random_model_and_saes
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    model, saes = random_model_and_saes(g, 29)
    n = saes["resid_0"].n_features
    # A feature id must be an int in 0..n-1: 1.5 would silently become feature 1.
    for bad in (1.5, n, -1):
        with pytest.raises(MinicircError, match="out of range"):
            shift.ablation_edit(saes, {"resid_0": [bad]})
    # A repeated feature is ablated once: x - sum over the distinct ids of f_i W_dec[i], written out here.
    sae = saes["resid_0"]
    x = 2 * torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    ids = torch.randperm(n, generator=g)[:2].tolist()
    assert (f[..., ids] > 0).any(), "the ablated features should be active somewhere"
    want = x - sum(f[..., i:i + 1] * sae.W_dec[i] for i in ids)
    got = shift.ablation_edit(saes, {"resid_0": ids + ids[::-1] + ids})["resid_0"](x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # parse_ablation: the last feature is accepted, one past it is not; an empty list is an error.
    sites = shift.probe_sites(model, 0)
    assert shift.parse_ablation(f"embed/{n - 1}", saes, sites) == {"embed": [n - 1]}
    with pytest.raises(MinicircError, match="out of range"):
        shift.parse_ablation(f"embed/{n}", saes, sites)
    with pytest.raises(MinicircError, match="SITE/FEATURE"):
        shift.parse_ablation("embed/3/4", saes, sites)
    for text in ("", " , ,"):
        with pytest.raises(MinicircError, match="no features given"):
            shift.parse_ablation(text, saes, sites)
    # probe_sites: layers 0..n_layers-1, each ending at its own resid.
    L = model.cfg.n_layers
    assert shift.probe_sites(model, L - 1) == model.sites[:model.sites.index(f"resid_{L - 1}") + 1]
    assert shift.probe_sites(model, 0)[-1] == "resid_0"
    for layer in (L, -1):
        with pytest.raises(MinicircError, match="out of range"):
            shift.probe_sites(model, layer)


def test_train_probe_labels_ablation_l2_and_small_batches_reach_their_optimum():
    """train_probe(y=...) and ablate_and_retrain(l2=...) fit the documented objective on the ablated pooled
    activations: its gradient vanishes there; pooled_batched in batches of 3 equals one pooled pass."""
    from test_data import random_model_and_saes
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    model, saes = random_model_and_saes(g, 29)
    train, test = _random_bios(g, model, 16), _random_bios(g, model, 12)
    ablation = {"embed": torch.randperm(10, generator=g)[:3].tolist(), "resid_0": [int(torch.randint(0, 10, (), generator=g))]}
    edit = shift.ablation_edit(saes, ablation)
    with torch.no_grad():
        X = shift.pooled(model, train.clean, train.last, 1, edit)
        X_test = shift.pooled(model, test.clean, test.last, 1, edit)
    torch.testing.assert_close(shift.pooled_batched(model, train, 1, edit, batch_size=3), X, rtol=1e-10, atol=1e-10)
    gender = shift.labels(train, "gender")
    assert not torch.equal(gender, train.clean_answer)
    probe = shift.train_probe(model, train, 1, y=gender, saes=saes, ablation=ablation, l2=0.05)
    assert _logistic_grad(X, gender, probe.weight, probe.bias, 0.05).abs().max() < 1e-6
    # ablate_and_retrain passes l2 on (retrained on train.clean_answer) and scores both probes on the ablated test.
    plain = shift.train_probe(model, train, 1)
    shifted, retrained, new = shift.ablate_and_retrain(model, plain, saes, ablation, train, test, l2=0.3)
    assert _logistic_grad(X, train.clean_answer, new.weight, new.bias, 0.3).abs().max() < 1e-6
    assert _logistic_grad(X, train.clean_answer, new.weight, new.bias, 1e-3).abs().max() > 1e-3
    assert shifted == shift.score(X_test @ plain.weight + plain.bias, test)
    assert retrained == shift.score(X_test @ new.weight + new.bias, test)


def test_score_zero_logit_is_class_0_and_aurocs_by_pairwise_counting():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    n = 24
    prof = [i % 2 for i in range(n)]
    gen = [(i // 2) % 2 for i in range(n)]
    perm = torch.randperm(n, generator=g).tolist()
    prof, gen = [prof[i] for i in perm], [gen[i] for i in perm]
    # Logits on a coarse grid (ties across classes), a few exactly on the decision boundary.
    z = [float(v) for v in torch.randint(-3, 4, (n,), generator=g)]
    z[int(torch.randint(0, n, (), generator=g))] = 0.0
    got = shift.score(torch.tensor(z), _bios_batch_from_labels(prof, gen))
    pred = [1 if v > 0 else 0 for v in z]                       # class 1 only when z > 0
    assert got["profession"] == pytest.approx(sum(a == b for a, b in zip(pred, prof)) / n)
    assert got["gender"] == pytest.approx(sum(a == b for a, b in zip(pred, gen)) / n)

    def pairwise(y):
        pos = [v for v, t in zip(z, y) if t == 1]
        neg = [v for v, t in zip(z, y) if t == 0]
        return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert got["profession_auroc"] == pytest.approx(pairwise(prof), abs=1e-12)
    assert got["gender_auroc"] == pytest.approx(pairwise(gen), abs=1e-12)
    assert pairwise(prof) != pairwise(gen) or pairwise(prof) != pairwise([1 - v for v in gen])
    with pytest.raises(MinicircError, match="both labels"):
        shift.auroc(torch.randn(4), torch.ones(4, dtype=torch.long))


from minicirc.circuit import Node  # noqa: E402


class _Nodes:
    def __init__(self, rows):
        self.rows = rows

    def all_nodes(self):
        return self.rows


def test_top_features_by_absolute_effect_strictly_above_the_threshold():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    rows = []
    for s in ("embed", "attn_0", "resid_0"):
        mags = (torch.randint(1, 6, (6,), generator=g).double() / 4).tolist()   # repeated magnitudes: ties
        signs = (torch.randint(0, 2, (6,), generator=g) * 2 - 1).tolist()
        rows += [Node(f"{s}/{i}", s, i, None, m * sg, False) for i, (m, sg) in enumerate(zip(mags, signs))]
        rows.append(Node(f"{s}/err", s, 6, None, 10.0, True))                   # error nodes are never candidates
    assert any(r.effect < 0 for r in rows) and any(0 < r.effect < 10 for r in rows)
    circuit = _Nodes(rows)
    feats = [r for r in rows if not r.error]
    for thr in [0.0] + sorted({abs(r[4]) for r in feats})[:2]:
        for k in (3, 100):
            left, want = [r for r in feats if abs(r[4]) > thr], []
            while left and len(want) < k:              # selection sort: the first of the largest |effect|
                best = max(range(len(left)), key=lambda j: (abs(left[j][4]), -j))
                r = left.pop(best)
                want.append((r[1], r[2], r[4]))
            assert shift.top_features(circuit, k=k, threshold=thr) == want, (thr, k)


def test_as_ablation_and_random_ablation():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    sites = ["embed", "attn_0", "mlp_0", "resid_0"]
    feats = [(sites[int(s)], int(i), 0.5) for s, i in zip(torch.randint(0, 4, (12,), generator=g),
                                                             torch.randperm(40, generator=g)[:12])]
    got = shift.as_ablation(feats, sites)
    want = {s: sorted(i for t, i, _ in feats if t == s) for s in sites if any(t == s for t, _, _ in feats)}
    assert got == want and list(got) == list(want)                      # site order, features ascending
    assert shift.as_ablation(feats, sites[1:]).keys() <= set(sites[1:])  # sites not listed are dropped

    class D:
        def __init__(self, n):
            self.n_features = n
    saes = {"embed": D(7), "resid_0": D(50)}
    like = {"embed": [1, 2, 3], "resid_0": list(range(int(torch.randint(1, 20, (), generator=g))))}
    seed = int(torch.randint(0, 10**6, ()).item())
    r = shift.random_ablation(saes, like, seed)
    assert r == shift.random_ablation(saes, like, seed)                 # a seed fixes the draw
    for s, v in like.items():
        assert len(r[s]) == len(set(r[s])) == len(v) and r[s] == sorted(r[s])
        assert all(0 <= f < saes[s].n_features for f in r[s])


def test_pooled_features_and_judge_against_a_written_out_scan():
    """pooled_features = each feature's relu-SAE activation (written out here) averaged over a bio's real
    tokens, each bio run alone; judge = effect sizes of those, spurious when gender d > profession d + margin."""
    import inspect
    from test_data import random_model_and_saes
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))
    model, saes = random_model_and_saes(g, 29)
    batch = _random_bios(g, model, 16)
    sites = ["resid_1", "embed", "mlp_0"]                                   # not in forward order
    feats = [(s, i, 0.1 * (i + 1)) for s in sites for i in range(saes[s].n_features)]
    feats = [feats[j] for j in torch.randperm(len(feats), generator=g).tolist()]
    got = shift.pooled_features(model, saes, batch, feats, batch_size=5)
    want = torch.zeros(len(batch), len(feats), dtype=torch.float64)
    for b in range(len(batch)):
        T = int(batch.last[b]) + 1
        cache = {}
        with torch.no_grad():
            model(batch.clean[b:b + 1, :T], cache=cache)
        for j, (s, i, _) in enumerate(feats):
            sae = saes[s]
            f = torch.relu((cache[s][0] - sae.b_dec) @ sae.W_enc[:, i] + sae.b_enc[i])    # (T,)
            want[b, j] = f.sum() / T
    assert want.abs().sum() > 0
    assert got.dtype == saes["embed"].W_enc.dtype   # float64 dictionaries give float64 activations
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    dg, dp = shift.effect_sizes(want, shift.labels(batch, "profession"), shift.labels(batch, "gender"))
    diff = sorted(abs(float(a - b)) for a, b in zip(dg, dp))
    margin = (diff[len(diff) // 2] + diff[len(diff) // 2 + 1]) / 2          # some features on each side
    verdicts = shift.judge(model, saes, batch, feats, margin=margin)
    assert [(v["site"], v["feature"], v["effect"]) for v in verdicts] == feats
    for v, a, b in zip(verdicts, dg.tolist(), dp.tolist()):
        assert v["gender_d"] == pytest.approx(a, rel=1e-4, abs=1e-6)
        assert v["profession_d"] == pytest.approx(b, rel=1e-4, abs=1e-6)
        assert v["spurious"] == (a > b + margin)
    assert inspect.signature(shift.judge).parameters["margin"].default == shift_run.SETTINGS["full"]["margin"]
    # Every (profession, gender) group needs two bios for a within-group standard deviation.
    prof, gen = torch.tensor([0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 0, 0, 1, 1])
    with pytest.raises(MinicircError, match="at least two"):
        shift.effect_sizes(torch.randn(7, 3), prof, gen)


def test_feature_contexts_mark_the_top_contexts(quick):
    from minicirc import explain
    model, saes, tok = quick
    texts = [b.text for b in balanced_split(12, seed=int(torch.randint(0, 10**6, ()).item()), split="test")]
    feats = [("resid_1", int(torch.randint(0, saes["resid_1"].n_features, ()))), ("embed", 3), ("resid_1", 0)]
    got = explain.feature_contexts(model, saes, tok, texts, feats + [("embed", 3, 0.5)], k=4)
    assert set(got) == {(s, f) for s, f in feats}
    sample = explain.tokenize_texts(texts, tok, model)
    for (s, f), ctx in got.items():
        want = explain.top_contexts(model, saes[s], s, sample, f, k=4)
        assert [c["value"] for c in ctx] == [c["value"] for c in want]
        for c, w in zip(ctx, want):
            toks, i = w["tokens"], w["index"]
            lead = toks[i][:len(toks[i]) - len(toks[i].lstrip())]
            assert c["text"] == "".join(toks[:i]) + lead + "[[" + toks[i].lstrip() + "]]" + "".join(toks[i + 1:])
            assert c["text"].replace("[[", "").replace("]]", "") in texts
            assert c["token"] == toks[i].strip()
    assert explain.feature_contexts(model, saes, tok, texts, []) == {}


def test_run_shift_rejects_bad_settings_before_any_work(tmp_path):
    for kw, msg in [(dict(top_k=0), "at least 1"), (dict(random_seeds=0), "at least 1"),
                    (dict(coverage=0.0), r"\(0, 1\]"), (dict(coverage=1.01), r"\(0, 1\]"),
                    (dict(coverage=float("nan")), r"\(0, 1\]"), (dict(coverage=0.5, top_k=3), "give one of them"),
                    (dict(threshold=-0.5), "at least 0"), (dict(threshold=float("nan")), "at least 0")]:
        with pytest.raises(MinicircError, match=msg):
            shift_run.run_shift(out=str(tmp_path / "never"), quick=True, progress=False, **kw)
    assert not (tmp_path / "never").exists()


def test_bios_batch_labels_padding_and_errors(quick):
    from minicirc.experiments.tasks.bios import Bio
    _, _, tok = quick
    bios = balanced_split(8, seed=int(torch.randint(0, 10**6, ()).item()))
    for label in ("profession", "gender"):
        batch = shift.bios_batch(bios, tok, label=label)
        assert batch.clean_answer.tolist() == [getattr(b, label) for b in bios]
    assert shift.labels(batch, "profession").tolist() == [b.profession for b in bios]
    lengths = [len(tok.encode(b.text, add_special_tokens=False).ids) for b in bios]
    assert batch.last.tolist() == [m - 1 for m in lengths] and batch.clean.shape == (8, max(lengths))
    for row, b, m in zip(batch.clean.tolist(), bios, lengths):
        assert row[:m] == tok.encode(b.text, add_special_tokens=False).ids
    with pytest.raises(MinicircError, match="no biographies"):
        shift.bios_batch([], tok)
    with pytest.raises(MinicircError, match="no tokens"):
        shift.bios_batch([bios[0], Bio("", 0, 1)], tok)
