"""`minicirc shift`: SHIFT (shift.py) on the embedded default or on a pretrained model, over SAE features and
over neurons (Identity dictionaries, same code), against random ablation, with sweeps of the candidate rule.

    results = run_shift("minicirc-shift", quick=True)     # shift_report.md, shift.png, results.json, circuits
    results = run_shift("shift-smol", model="smollm2")    # SmolLM2-135M, SAEs trained and cached (real_lm.py)

On a pretrained model (`--model smollm2` or a path; real_lm.load_real_lm with the "bios" recipe: SAEs of the
demo's shape trained on agreement sentences and English bios, at the residual streams up to the probe's)
the bios are tasks/english_bios.py's ("Bio: Mary lives in the city. She works at the hospital. ..."): the
same generator, labels and splits, with a header whose positions every step leaves out (shift.header_kept),
and the top contexts read from the header on (shift.start_contexts). The probe reads the middle layer.

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
import shutil
import time

from tqdm.auto import tqdm

from .. import explain, viz
from ..errors import MinicircError
from ..files import prepare_out_dir, write_atomic
from ..hashing import sha256_of
from ..sae import identity_saes
from . import real_lm
from .compare import cached
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
    start_contexts,
    top_features,
    top_positions,
    train_probe,
)
from .shift_report import candidates_report, plot_shift, shift_report
from .tasks import bios, english_bios

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
REAL_SETTINGS = {
    # SmolLM2-135M on 2 cores: a forward pass of 200 bios to the middle layer takes 5-10 s, IG 0.2-0.5 s per
    # bio, step and site (forward and backward from the site to the probe, in groups of at most 512 tokens),
    # and every ablation (each sweep point, each random seed) runs the 800 train and test bios again. So the
    # circuit reads 32 bios with 5 IG steps (it only ranks candidates; the judge reads 200 other bios), the
    # main rows average 3 random draws and each sweep point one (sweep_seeds), with fewer points than the
    # default's. A token-level feature: at least token_share of its top contexts at a name or pronoun.
    "full": dict(SETTINGS["full"], n_circuit=32, steps=5, random_seeds=3, k_contexts=8, sweep=[0.5, 0.8, 0.9, 0.95, 1.0],
                 sweep_k=[10, 100, 1000], sweep_seeds=1, token_share=0.8),
    "quick": dict(SETTINGS["quick"], sweep_seeds=2, token_share=0.8),
}


def random_control(model, probe, dicts, like, data, cfg, seeds=None, memo=None):
    """Random ablation of as many features as `like` at each of its sites, one draw per seed (`seeds`,
    default cfg["random_seeds"]): ([scores without retraining], [scores after retraining])."""
    runs = [ablated(model, probe, dicts, random_ablation(dicts, like, seed), data, cfg, memo)[:2]
            for seed in range(seeds or cfg["random_seeds"])]
    return [r[0] for r in runs], [r[1] for r in runs]


def ablated(model, probe, dicts, ablation, data, cfg, memo=None):
    """ablate_and_retrain on the train and test splits, remembered in `memo` by the ablation: the sweeps
    and random draws meet the same ablation more than once (a share and a top k choosing the same
    features), and each costs a forward pass over both splits."""
    key = tuple((s, tuple(sorted(v))) for s, v in ablation.items() if v)
    if memo is None or key not in memo:
        got = ablate_and_retrain(model, probe, dicts, ablation, data["train"], data["test"], cfg["l2"])
        if memo is None:
            return got
        memo[key] = got
    return memo[key]


def shift_pipeline(model, dicts, tokenizer, probe, data, cfg, sites, ablate=None, progress=True, desc="features"):
    """Circuit, candidates (select_candidates: the coverage rule, or cfg["top_k"]), explanations, judge,
    ablation, retrain, random control over `dicts` (SAE features or neurons), and sweeps of the rule's share
    and of a fixed top k. `ablate` ({site: [feature]}: a person's judgement) replaces the automatic judge's
    verdicts for the main rows."""
    circuit = probe_circuit(model, dicts, probe, data["circuit"], steps=cfg["steps"], top_k=cfg["circuit_nodes"],
                            batch_size=cfg["batch_size"], progress=progress)
    ranked = top_features(circuit, k=10**9)                     # every feature with a non-zero effect
    verdicts = judge(model, dicts, data["val"], ranked, cfg["margin"], probe.start)
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
                                                           cfg["margin"], probe.start)[0])
    wanted = [(v["site"], v["feature"]) for v in cand]
    contexts = (start_contexts(model, dicts, tokenizer, data["explain_texts"], wanted, cfg["k_contexts"], probe.start)
                if probe.start else
                explain.feature_contexts(model, dicts, tokenizer, data["explain_texts"], wanted, cfg["k_contexts"]))
    gendered = english_bios.gender_words()
    for v in cand:
        v["contexts"] = contexts[(v["site"], v["feature"])]
        v["top_tokens"] = explain.top_tokens(v["contexts"])
        v["ablated"] = (v["feature"] in ablate.get(v["site"], [])) if ablate else v["spurious"]
        # Token-level (a name or pronoun detector) or phrase-level, by where its top contexts fire.
        fired = [c for c in v["contexts"] if c["value"] > 0]
        v["gender_token_share"] = sum(c["token"].lower() in gendered for c in fired) / len(fired) if fired else 0.0
        v["level"] = "token" if fired and v["gender_token_share"] >= cfg.get("token_share", 0.8) else "phrase"
    ablation = ablate or as_ablation([(v["site"], v["feature"]) for v in cand if v["spurious"]], sites)
    memo = {}
    shifted, retrained, retrained_probe = ablated(model, probe, dicts, ablation, data, cfg, memo)
    rand, rand_re = random_control(model, probe, dicts, ablation, data, cfg, memo=memo)
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
        shifted, retrained, _ = ablated(model, probe, dicts, abl, data, cfg, memo)
        _, rand_re = random_control(model, probe, dicts, abl, data, cfg, cfg.get("sweep_seeds"), memo)
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


def make_data(tokenizer, cfg, device="cpu", source=bios):
    """The splits: ambiguous train (probe, retraining; its first n_circuit bios find the circuit), balanced
    train (oracle), balanced validation (judge), balanced test (every accuracy), held-out explain sample.
    `source`: tasks.bios (the embedded default's language) or tasks.english_bios (the same bios in English)."""
    train = bios_batch(source.ambiguous_split(cfg["n_train"], seed=0, split="train"), tokenizer).to(device)
    return {"train": train, "circuit": train[:cfg["n_circuit"]],
            "oracle_train": bios_batch(source.balanced_split(cfg["n_train"], seed=0, split="train"), tokenizer).to(device),
            "val": bios_batch(source.balanced_split(cfg["n_val"], seed=1, split="train"), tokenizer).to(device),
            "test": bios_batch(source.balanced_split(cfg["n_test"], seed=0, split="test"), tokenizer).to(device),
            "explain_texts": [b.text for b in source.balanced_split(cfg["n_explain"], seed=2, split="test")]}


def _mean(rows):
    return {k: sum(r[k] for r in rows) / len(rows)
            for k in ("profession", "gender", "worst_group", "profession_auroc", "gender_auroc")}


def load_subject(name, quick, progress):
    """(model, saes, tokenizer, subject): the embedded default ("default") or a pretrained model ("smollm2" or a
    path) with its "bios" SAEs (real_lm.py); subject says which, for the report and the data."""
    if name == "default":
        model, saes, tokenizer, stats, folder = get_default("quick" if quick else "full", progress=progress)
        return model, saes, tokenizer, {"kind": "default", "default": folder, "recipe": stats["recipe"], "start": 0,
                                        "source": bios}
    model, saes, tokenizer, info = real_lm.load_real_lm(name, "bios-quick" if quick else "bios", progress)
    stats = info["sae_stats"]
    return model, saes, tokenizer, {
        "kind": "real", "title": info["title"], "path": info["path"], "default": info["folder"],
        "recipe": info["recipe"], "sae_settings": info["settings"], "load_seconds": info["seconds"],
        "bio_sites": stats.get("bio_sites"), "n_held_out_bio_tokens": stats.get("n_held_out_bio_tokens"),
        "sae_sites": {s: {k: v[k] for k in ("variance_explained", "l0")} for s, v in stats["sites"].items()},
        "header": english_bios.HEADER, "start": english_bios.header_length(tokenizer),
        "token_counts": english_bios.token_counts(tokenizer), "source": english_bios}


def run_shift(out="minicirc-shift", quick=False, overwrite=False, device="cpu", progress=True, probe_layer=None,
              ablate=None, coverage=None, top_k=None, margin=None, random_seeds=None, threshold=0.0, model="default"):
    """The whole SHIFT experiment on the embedded default (model="default") or a pretrained model ("smollm2",
    or the path of a Hugging Face folder or GGUF file). Writes into `out`: shift_report.md, candidates.md
    (every candidate; the report shows the strongest), shift.png, results.json, bios_sample.txt (the
    explanation sample, one bio a line, for `minicirc explain`), and the probe's circuits over features and
    neurons (circuit_features/, circuit_neurons/).

    coverage: the candidate rule's share (default 0.9); top_k: the strongest k instead (not both).
    ablate: "site/feature,..." (a person's judgement) instead of the automatic judge, for the SAE features."""
    t0 = time.time()
    cfg = dict((SETTINGS if model == "default" else REAL_SETTINGS)["quick" if quick else "full"], threshold=threshold,
               top_k=top_k)
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
    name = model
    model, saes, tokenizer, subject = load_subject(name, quick, progress)
    source = subject.pop("source")
    layer = model.cfg.n_layers // 2 if probe_layer is None else probe_layer
    sites = [s for s in probe_sites(model, layer) if s in saes]
    if not sites:
        raise MinicircError(f"no dictionary at or below resid_{layer} (dictionaries at {', '.join(saes)})")
    model = model.to(device)
    saes = {s: saes[s].to(device) for s in sites}
    neurons = {s: d.to(device) for s, d in identity_saes(model).items() if s in sites}
    user = parse_ablation(ablate, saes, sites) if ablate else None
    cfg["probe_layer"] = layer
    data = make_data(tokenizer, cfg, device, source)

    def compute():
        return shift_results(model, saes, neurons, tokenizer, data, cfg, sites, user, subject, out, progress), out

    results, files = cached(shift_cache(subject, cfg, ablate, device), compute, progress, "SHIFT's results")
    if files is not None:
        shutil.copytree(files, out, dirs_exist_ok=True)
    results["seconds"], results["from_cache"] = time.time() - t0, files is not None
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1, default=float).encode())
    write_atomic(os.path.join(out, "shift_report.md"), shift_report(results, out).encode())
    write_atomic(os.path.join(out, "candidates.md"), candidates_report(results).encode())
    if progress:
        print(f"minicirc shift: wrote {out}/shift_report.md in {results['seconds']:.0f} s")
    return results


CACHE_VERSION = 1   # bump when SHIFT's computation changes: cached results of a pretrained model are recomputed


def shift_cache(subject, cfg, ablate, device):
    """The cache folder of a pretrained model's results, beside its SAEs (whose folder's key covers the model
    and the SAE settings); None for the embedded default, whose run takes seconds. A cold run takes most of
    an hour on 2 cores, and only these settings can change its results."""
    if subject["kind"] == "default":
        return None
    key = sha256_of([json.dumps({"version": CACHE_VERSION, "cfg": cfg, "ablate": ablate, "device": str(device)},
                                sort_keys=True)])[:16]
    return os.path.join(subject["default"], "shift", f"results-{key}")


def shift_results(model, saes, neurons, tokenizer, data, cfg, sites, user, subject, out, progress):
    """Every number of the report, and the files beside it (circuits, shift.png, bios_sample.txt) written
    into `out`. Pretrained models' results go through a json round trip, as the cache returns them."""
    t0, layer, start = time.time(), cfg["probe_layer"], subject["start"]
    stages = tqdm(total=4, desc="shift", disable=not progress, unit="stage")
    probe = train_probe(model, data["train"], layer, l2=cfg["l2"], start=start)
    train_acc = evaluate(model, probe, data["train"])["profession"]
    stages.update()
    # IG's site gradients are not shared between the two circuits (find_circuit's site_gradients): with no
    # patch input the IG path ends at decode(0) = b_dec, which differs by dictionary (0 for neurons).
    feat = shift_pipeline(model, saes, tokenizer, probe, data, cfg, sites, user, progress, "features")
    stages.update()
    neur = shift_pipeline(model, neurons, tokenizer, probe, data, cfg, sites, None, progress, "neurons")
    stages.update()
    oracle = train_probe(model, data["oracle_train"], layer, l2=cfg["l2"], start=start)
    where = {"before": concept_left(model, saes, data["oracle_train"], data["test"], sites, l2=cfg["l2"], start=start),
             "after": concept_left(model, saes, data["oracle_train"], data["test"], sites, feat["ablation"], cfg["l2"],
                                   start)}
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
        ctx = (circuit_contexts_from(model, dicts, tokenizer, c.to_json(), data["explain_texts"], cfg["k_contexts"], start)
               if start else
               explain.circuit_contexts(model, dicts, tokenizer, c.to_json(), data["explain_texts"], k=cfg["k_contexts"]))
        viz.save_circuit(c, os.path.join(out, f"circuit_{kind}"), contexts=ctx)
    stages.update()
    stages.close()
    results = {"rows": rows, "n_ablated": n_ablated, "random_runs": feat["random_runs"],
               "random_retrain_runs": feat["random_retrain_runs"], "probe_train_accuracy": train_acc,
               "settings": cfg, "judge": "user" if user else "automatic", "concept_left": where,
               "features": summary(feat), "neurons": summary(neur), "default": subject["default"],
               "recipe": subject["recipe"], "subject": subject, "seconds": None, "compute_seconds": None}
    plot_shift(results, os.path.join(out, "shift.png"))
    results["compute_seconds"] = time.time() - t0
    return results if subject["kind"] == "default" else json.loads(json.dumps(results, default=float))


def summary(res):
    """The JSON-able part of a pipeline result."""
    return {"candidates": res["candidates"], "ablation": res["ablation"], "n_ablated": res["n_ablated"],
            "circuit_metric": res["circuit"].metric_values, "sweep": res["sweep"], "sweep_k": res["sweep_k"],
            "sites": res["sites"], "random_runs": res["random_runs"], "random_retrain_runs": res["random_retrain_runs"],
            "error_effects": {s: float(v[-1]) for s, v in res["circuit"].nodes.items()}}


def circuit_contexts_from(model, saes, tokenizer, circuit, texts, k, start):
    """explain.circuit_contexts' {"site/feature": {"contexts", "logits", "label"}} for the circuit's feature
    nodes, the contexts from `start` on (shift.top_positions)."""
    pairs = [(n["id"].split("/")[0], int(n["id"].split("/")[1])) for n in circuit.get("nodes", [])
             if "/" in n["id"] and n["id"].split("/")[1].isdigit()]
    sample, found = top_positions(model, saes, tokenizer, texts, pairs, k, start)
    out = {}
    for (site, f), rows in found.items():
        entry = {"contexts": [{"tokens": list(sample[t][1]), "index": p, "value": v} for t, p, v in rows],
                 "logits": explain.logit_effects(model, saes[site], f, tokenizer=tokenizer, site=site)}
        label = explain.context_label(entry)
        out[f"{site}/{f}"] = entry | ({"label": label} if label else {})
    return out
