"""`minicirc shift`: SHIFT (shift.py) on the embedded default, over SAE features and over neurons (Identity
dictionaries, same code), against random ablation, with sweeps of the candidate rule.

    results = run_shift("minicirc-shift", quick=True)     # shift_report.md, shift.png, results.json, circuits

The splits (make_data, from tasks/bios.py): the probe is trained and retrained on ambiguous bios (profession
== gender) and its circuit found on the first n_circuit of them; the judge reads a balanced validation split;
every accuracy is on a balanced held-out split; an oracle probe trained on balanced bios is the ceiling; the
top contexts come from a held-out sample of bios (bios_sample.txt, for `minicirc explain`).

The pipeline (shift_pipeline), once over SAE features and once over neurons: circuit, candidates, judge (or a
person's `--ablate` list for the features), top contexts, ablation, ablation + retraining, the random control
(as many features at the same sites, one draw per seed, retrained), and the sweeps (other shares of the
coverage rule, and a fixed top k). shift_report.py writes shift_report.md and shift.png from the results.
"""
import json
import os
import time

from tqdm.auto import tqdm

from .. import explain, viz
from ..errors import MinicircError
from ..files import prepare_out_dir, write_atomic
from ..sae import identity_saes
from .default import get_default
from .shift import (
    ablate_and_retrain,
    as_ablation,
    bios_batch,
    concept_left,
    count,
    evaluate,
    judge,
    parse_ablation,
    probe_circuit,
    probe_sites,
    random_ablation,
    select_candidates,
    top_features,
    train_probe,
)
from .shift_report import plot_shift, shift_report
from .tasks.bios import ambiguous_split, balanced_split

SETTINGS = {
    # A few hundred bios per split; the whole run takes about 40-120 s on 2 cores (BENCHMARKS.md; most
    # of it the sweeps, each point with its random control).
    # coverage: the candidate rule's share; circuit_nodes: how many nodes circuit.json/png show (display only).
    # sweep: the shares the report also runs; sweep_k: the fixed top k it compares with.
    "full": dict(n_train=400, n_val=200, n_test=400, n_explain=200, n_circuit=200, steps=10, coverage=0.9,
                 circuit_nodes=100, margin=0.2, random_seeds=5, k_contexts=5, l2=1e-3, batch_size=100,
                 sweep=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0], sweep_k=[10, 30, 100, 300, 1000]),
    "quick": dict(n_train=48, n_val=40, n_test=48, n_explain=24, n_circuit=16, steps=3, coverage=0.9,
                  circuit_nodes=8, margin=0.2, random_seeds=5, k_contexts=3, l2=1e-3, batch_size=16,
                  sweep=[0.5, 0.9, 1.0], sweep_k=[2, 8, 32]),
}


def random_control(model, probe, dicts, like, data, cfg):
    """Random ablation of as many features as `like` at each of its sites, one draw per seed: ([scores
    without retraining], [scores after retraining])."""
    runs = [ablate_and_retrain(model, probe, dicts, random_ablation(dicts, like, seed), data["train"], data["test"],
                               cfg["l2"])[:2] for seed in range(cfg["random_seeds"])]
    return [r[0] for r in runs], [r[1] for r in runs]


def shift_pipeline(model, dicts, tokenizer, probe, data, cfg, sites, ablate=None, progress=True, desc="features"):
    """Circuit, candidates (select_candidates: the coverage rule, or cfg["top_k"]), explanations, judge,
    ablation, retrain, random control over `dicts` (SAE features or neurons), and sweeps of the rule's share
    and of a fixed top k. `ablate` ({site: [feature]}: a person's judgement) replaces the automatic judge's
    verdicts for the main rows."""
    circuit = probe_circuit(model, dicts, probe, data["circuit"], steps=cfg["steps"], top_k=cfg["circuit_nodes"],
                            batch_size=cfg["batch_size"], progress=progress)
    ranked = top_features(circuit, k=10**9)                     # every feature with a non-zero effect
    verdicts = judge(model, dicts, data["val"], ranked, cfg["margin"])
    pick = lambda **kw: select_candidates(verdicts_as_rows(verdicts), threshold=cfg["threshold"], **kw)
    cand = [verdicts[j] for *_, j in pick(coverage=cfg["coverage"], top_k=cfg.get("top_k"))]
    if ablate:   # a person's list: still scored and explained for the report
        have = {(v["site"], v["feature"]) for v in cand}
        by_id = {(v["site"], v["feature"]): v for v in verdicts}
        effects = {(n.site, n.column): n.effect for n in circuit.all_nodes() if not n.error}
        for s, fs in ablate.items():
            for i in fs:
                if (s, i) not in have:
                    cand.append(by_id.get((s, i)) or judge(model, dicts, data["val"], [(s, i, effects[(s, i)])],
                                                           cfg["margin"])[0])
    contexts = explain.feature_contexts(model, dicts, tokenizer, data["explain_texts"],
                                        [(v["site"], v["feature"]) for v in cand], cfg["k_contexts"])
    for v in cand:
        v["contexts"] = contexts[(v["site"], v["feature"])]
        v["top_tokens"] = explain.top_tokens(v["contexts"])
        v["ablated"] = (v["feature"] in ablate.get(v["site"], [])) if ablate else v["spurious"]
    ablation = ablate or as_ablation([(v["site"], v["feature"]) for v in cand if v["spurious"]], sites)
    shifted, retrained, retrained_probe = ablate_and_retrain(model, probe, dicts, ablation, data["train"],
                                                             data["test"], cfg["l2"])
    rand, rand_re = random_control(model, probe, dicts, ablation, data, cfg)
    out = {"circuit": circuit, "candidates": cand, "ablation": ablation, "n_ablated": count(ablation),
           "shift": shifted, "retrain": retrained, "retrained_probe": retrained_probe, "random_runs": rand,
           "random_retrain_runs": rand_re, "sites": site_shares(circuit, verdicts, cand, ablation, sites),
           "sweep": [], "sweep_k": []}
    points = [("sweep", "coverage", share, dict(coverage=share)) for share in cfg["sweep"]]
    ks = sorted({k for k in cfg["sweep_k"] if k < len(ranked)} | {len(ranked)})
    points += [("sweep_k", "candidates", k, dict(top_k=k)) for k in ks]
    for table, key, value, rule in tqdm(points, desc=f"sweeps ({desc})", disable=not progress, leave=False):
        chosen = [verdicts[j] for *_, j in pick(**rule)]
        abl = as_ablation([(v["site"], v["feature"]) for v in chosen if v["spurious"]], sites)
        shifted, retrained, _ = ablate_and_retrain(model, probe, dicts, abl, data["train"], data["test"], cfg["l2"])
        _, rand_re = random_control(model, probe, dicts, abl, data, cfg)
        out[table].append({key: value, "candidates": len(chosen), "n_ablated": count(abl), "shift": shifted,
                           "retrain": retrained, "random_retrain": _mean(rand_re)})
    return out


def verdicts_as_rows(verdicts):
    """[(site, feature, effect, index into verdicts)] for select_candidates."""
    return [(v["site"], v["feature"], v["effect"], j) for j, v in enumerate(verdicts)]


def site_shares(circuit, verdicts, cand, ablation, sites):
    """Where the probe's evidence lives, per site: summed |effect| of all features, of the candidates, of
    the ablated features, and the SAE error node's effect (never ablated), so a report can say how much of
    a site the ablation could reach at all."""
    out = {}
    for s in sites:
        ablated = set(ablation.get(s, []))
        out[s] = {"features": sum(abs(v["effect"]) for v in verdicts if v["site"] == s),
                  "candidates": sum(abs(v["effect"]) for v in cand if v["site"] == s),
                  "ablated": sum(abs(v["effect"]) for v in verdicts if v["site"] == s and v["feature"] in ablated),
                  "n_candidates": sum(v["site"] == s for v in cand), "n_ablated": len(ablated),
                  "error": float(circuit.nodes[s][-1])}
    return out


def make_data(tokenizer, cfg, device="cpu"):
    """The splits: ambiguous train (probe, retraining; its first n_circuit bios find the circuit), balanced
    train (oracle), balanced validation (judge), balanced test (every accuracy), held-out explain sample."""
    train = bios_batch(ambiguous_split(cfg["n_train"], seed=0, split="train"), tokenizer).to(device)
    return {"train": train, "circuit": train[:cfg["n_circuit"]],
            "oracle_train": bios_batch(balanced_split(cfg["n_train"], seed=0, split="train"), tokenizer).to(device),
            "val": bios_batch(balanced_split(cfg["n_val"], seed=1, split="train"), tokenizer).to(device),
            "test": bios_batch(balanced_split(cfg["n_test"], seed=0, split="test"), tokenizer).to(device),
            "explain_texts": [b.text for b in balanced_split(cfg["n_explain"], seed=2, split="test")]}


def _mean(rows):
    return {k: sum(r[k] for r in rows) / len(rows)
            for k in ("profession", "gender", "worst_group", "profession_auroc", "gender_auroc")}


def run_shift(out="minicirc-shift", quick=False, overwrite=False, device="cpu", progress=True, probe_layer=None,
              ablate=None, coverage=None, top_k=None, margin=None, random_seeds=None, threshold=0.0):
    """The whole SHIFT experiment on the embedded default. Writes into `out`: shift_report.md, shift.png,
    results.json, bios_sample.txt (the explanation sample, one bio a line, for `minicirc explain`), and the
    probe's circuits over features and neurons (circuit_features/, circuit_neurons/).

    coverage: the candidate rule's share (default 0.9); top_k: the strongest k instead (not both).
    ablate: "site/feature,..." (a person's judgement) instead of the automatic judge, for the SAE features."""
    t0 = time.time()
    cfg = dict(SETTINGS["quick" if quick else "full"], threshold=threshold, top_k=top_k)
    for key, v in (("coverage", coverage), ("margin", margin), ("random_seeds", random_seeds)):
        if v is not None:
            cfg[key] = v
    if coverage is not None and top_k is not None:
        raise MinicircError("--coverage and --top-k are two candidate rules: give one of them")
    if not 0 < cfg["coverage"] <= 1:
        raise MinicircError(f"--coverage must be in (0, 1], got {cfg['coverage']}")
    if (top_k is not None and top_k < 1) or cfg["random_seeds"] < 1:
        raise MinicircError("--top-k and --random-seeds must be at least 1")
    if not threshold >= 0:
        raise MinicircError(f"--threshold must be at least 0, got {threshold}")
    prepare_out_dir(out, overwrite, "shift_report.md")
    model, saes, tokenizer, stats, folder = get_default("quick" if quick else "full", progress=progress)
    layer = model.cfg.n_layers // 2 if probe_layer is None else probe_layer
    sites = probe_sites(model, layer)
    model = model.to(device)
    saes = {s: saes[s].to(device) for s in sites}
    neurons = {s: d.to(device) for s, d in identity_saes(model).items() if s in sites}
    user = parse_ablation(ablate, saes, sites) if ablate else None
    cfg["probe_layer"] = layer
    data = make_data(tokenizer, cfg, device)

    stages = tqdm(total=4, desc="shift", disable=not progress, unit="stage")
    probe = train_probe(model, data["train"], layer, l2=cfg["l2"])
    train_acc = evaluate(model, probe, data["train"])["profession"]
    stages.update()
    feat = shift_pipeline(model, saes, tokenizer, probe, data, cfg, sites, user, progress, "features")
    stages.update()
    neur = shift_pipeline(model, neurons, tokenizer, probe, data, cfg, sites, None, progress, "neurons")
    stages.update()
    oracle = train_probe(model, data["oracle_train"], layer, l2=cfg["l2"])
    where = {"before": concept_left(model, saes, data["oracle_train"], data["test"], sites, l2=cfg["l2"]),
             "after": concept_left(model, saes, data["oracle_train"], data["test"], sites, feat["ablation"], cfg["l2"])}
    rows = {"original": evaluate(model, probe, data["test"]), "random": _mean(feat["random_runs"]),
            "random_retrain": _mean(feat["random_retrain_runs"]), "shift": feat["shift"],
            "shift_retrain": feat["retrain"], "neurons_random": _mean(neur["random_runs"]),
            "neurons_random_retrain": _mean(neur["random_retrain_runs"]), "neurons_shift": neur["shift"],
            "neurons_shift_retrain": neur["retrain"], "oracle": evaluate(model, oracle, data["test"])}
    n_ablated = {k: 0 for k in ("original", "oracle")}
    n_ablated.update({k: feat["n_ablated"] for k in ("random", "random_retrain", "shift", "shift_retrain")})
    n_ablated.update({k: neur["n_ablated"] for k in ("neurons_random", "neurons_random_retrain", "neurons_shift",
                                                     "neurons_shift_retrain")})
    write_atomic(os.path.join(out, "bios_sample.txt"), ("\n".join(data["explain_texts"]) + "\n").encode())
    for kind, res, dicts in (("features", feat, saes), ("neurons", neur, neurons)):
        c = res["circuit"]
        for v in res["candidates"]:
            c.annotations[f"{v['site']}/{v['feature']}"] = {
                "gender_d": round(v["gender_d"], 4), "profession_d": round(v["profession_d"], 4),
                "spurious": v["spurious"], "ablated": v["ablated"]}
        ctx = explain.circuit_contexts(model, dicts, tokenizer, c.to_json(), data["explain_texts"], k=cfg["k_contexts"])
        viz.save_circuit(c, os.path.join(out, f"circuit_{kind}"), contexts=ctx)
    stages.update()
    stages.close()
    results = {"rows": rows, "n_ablated": n_ablated, "random_runs": feat["random_runs"],
               "random_retrain_runs": feat["random_retrain_runs"], "probe_train_accuracy": train_acc,
               "settings": cfg, "judge": "user" if user else "automatic", "concept_left": where,
               "features": summary(feat), "neurons": summary(neur), "default": folder, "recipe": stats["recipe"],
               "seconds": None}
    plot_shift(results, os.path.join(out, "shift.png"))
    results["seconds"] = time.time() - t0
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1, default=float).encode())
    write_atomic(os.path.join(out, "shift_report.md"), shift_report(results, out).encode())
    if progress:
        print(f"minicirc shift: wrote {out}/shift_report.md in {results['seconds']:.0f} s")
    return results


def summary(res):
    """The JSON-able part of a pipeline result."""
    return {"candidates": res["candidates"], "ablation": res["ablation"], "n_ablated": res["n_ablated"],
            "circuit_metric": res["circuit"].metric_values, "sweep": res["sweep"], "sweep_k": res["sweep_k"],
            "sites": res["sites"], "random_runs": res["random_runs"], "random_retrain_runs": res["random_retrain_runs"],
            "error_effects": {s: float(v[-1]) for s, v in res["circuit"].nodes.items()}}
