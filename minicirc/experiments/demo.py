"""`minicirc demo`: are circuits over SAE features more discoverable and easier to understand than circuits
over neurons? Answered on the embedded default (a tiny model trained on a synthetic language whose latent
variables are known), for the four agreement templates of the original work.

For each template: find the feature circuit and the neuron circuit (Identity dictionaries, same code) on
discovery examples and measure them on held-out examples under three protocols:

    positions  the original's sweeps: nodes-only circuits with positions kept (aggregation none), only the
               sites from the first evaluated layer up (the original skips layers < 2 of Pythia-70M's 6;
               here round(2 / 6 * layers), `--first-layer`), embed never evaluated
    summed     the same sites, node effects summed over positions (aggregation sum)
    all sites  every site from embed up, summed (this demo's only protocol before)

For each: faithfulness and completeness of the top-n nodes by |effect| on a log grid of n, nodes needed for
0.8 and 0.9 faithfulness (bisected to the node between grid sizes), and the area under faithfulness against
log(nodes). Every unit of every site is scored by metrics.best_latent_share against the grammar's token
latents. report.md and the plots are written by demo_report.py from the results computed here.
"""
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import attribution, evaluation, explain, viz

from . import real_lm
from .demo_report import demo_report, describe_nounpp, plot_protocols
from ..attribution.find import find_circuit
from ..data import tokenize
from .default import get_default
from ..errors import MinicircError
from ..files import prepare_out_dir, staged_folder, write_atomic
from ..hashing import sha256_of
from ..metrics import best_latent_share
from ..model.sites import site_kind, sites_from_layer
from ..sae import identity_saes
from .tasks import agreement

SETTINGS = {
    "full": dict(n_discovery=200, n_eval=100, steps=10, node_threshold=0.1, edge_threshold=0.02, top_k=10,
                 grid_points=32, n_interp=200),
    "quick": dict(n_discovery=8, n_eval=8, steps=3, node_threshold=0.05, edge_threshold=0.01, top_k=5,
                  grid_points=6, n_interp=16),
}
PROTOCOLS = ("positions", "summed", "all sites")
TARGETS = (0.8, 0.9)
BREAK = 0.2     # completeness left after removing a circuit's top nodes, below which the behaviour is gone


# --- the protocols --------------------------------------------------------------------------------

def paper_first_layer(n_layers):
    """The original evaluates Pythia-70M from layer 2 of 6: the same share of the depth, rounded."""
    return round(2 * n_layers / 6)


def evaluated_sites(model, saes, first_layer):
    """Sites from `first_layer` up, embed left out; first_layer None: every site, embed included."""
    order = attribution.site_order(model, saes)
    if first_layer is None:
        return order
    return sites_from_layer(order, first_layer)


def node_counts(total, cap, points):
    """Circuit sizes to measure: `points` log-spaced from 1 to total, plus cap (the common end of the area)."""
    grid = {int(round(x)) for x in np.logspace(0, math.log10(max(total, 1)), points)} | {cap}
    return sorted(n for n in grid if 1 <= n <= total)


def faithfulness_curve(model, dicts, batch, circuit, sites, counts, targets=(), progress=False, desc="faithfulness"):
    """Faithfulness and completeness of the top-n nodes by |effect| of `sites` (all other sites untouched),
    for each n in counts -> (curve, crossings): lists of {n_nodes, faithfulness, completeness, ...}.

    crossings: for each target, the sizes bisected between the last grid size below it and the first grid
    size reaching it (down to one node), so the nodes needed are known to the node, not to the grid's step."""
    sub = {s: dicts[s] for s in sites}
    ranked = sorted((nd for nd in circuit.all_nodes() if nd.site in sub), key=lambda nd: -abs(nd.effect))
    values = evaluation.ablation_values(model, sub, attribution.logit_diff, batch, sites)
    reference = None

    def point(n):
        nonlocal reference
        r = evaluation.faithfulness(model, sub, batch, ranked[:n], positional=circuit.positional, values=values,
                                    reference=reference)
        reference = (r["m_full"], r["m_empty"])
        return {"n_nodes": n, **r}

    curve = [point(n) for n in tqdm(counts, desc=desc, unit="size", leave=False, disable=not progress)]
    crossings = []
    for target in targets:
        hit = next((i for i, p in enumerate(curve) if p["faithfulness"] >= target), None)
        if not hit:           # never reached, or reached by the smallest size
            continue
        lo, hi = curve[hit - 1]["n_nodes"], curve[hit]["n_nodes"]
        while hi - lo > 1:
            p = point((lo + hi) // 2)
            crossings.append(p)
            lo, hi = (lo, p["n_nodes"]) if p["faithfulness"] >= target else (p["n_nodes"], hi)
    return curve, crossings


def area_under(points, cap):
    """Mean faithfulness over log(nodes) from 1 to cap: the trapezoid area under faithfulness against
    ln(n) divided by ln(cap) (1 for a circuit that is faithful from its first node on)."""
    pts = [(math.log(p["n_nodes"]), p["faithfulness"]) for p in points if p["n_nodes"] <= cap]
    if len(pts) < 2 or cap <= 1:
        return float("nan")
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:])) / math.log(cap)


def n_nodes_at(dicts, sites, T=None):
    """How many nodes (features and error, per position when T is given) the sites hold."""
    return sum(dicts[s].n_features + 1 for s in sites) * (T or 1)


# --- interpretability: how well the best single latent explains a unit ------------------------------

@torch.no_grad()
def unit_scores(model, dict_sets, batches):
    """{kind: {site: (share (U,), best latent name per unit, live (U,) bool)}}: metrics.best_latent_share of
    every unit over every token of the clean prefixes of `batches` (all templates pooled, so position does
    not fix the template), within positions. live: the unit varies at all on these tokens."""
    latents = [agreement.token_latents(ex) for b in batches for ex in b.examples]
    names = sorted({k for lat in latents for k in lat})
    rows, positions = [], []
    for lat in latents:
        T = len(next(iter(lat.values())))
        rows += [[lat[k][t] if k in lat else 0 for k in names] for t in range(T)]
        positions += range(T)
    L, pos = torch.tensor(rows, dtype=torch.float64, device="cpu"), torch.tensor(positions, device="cpu")
    caches = []
    for b in batches:
        cache = {}
        model(b.clean, cache=cache)
        caches.append((cache, b.last))
    out = {}
    for kind, dicts in dict_sets.items():
        out[kind] = {}
        for site, d in dicts.items():
            acts = torch.cat([d.encode(cache[site])[b, :last + 1] for cache, lasts in caches
                              for b, last in enumerate(lasts.tolist())]).double().cpu()
            share, best = best_latent_share(acts, L, pos)
            live = acts.std(0) > 0
            out[kind][site] = (share.tolist(), [names[k] if k >= 0 else None for k in best.tolist()], live.tolist())
    return out


def score_table(scores):
    """{kind: {site kind: {"mean": mean share over live units, "units": live units, "share>=0.5": fraction}}}."""
    table = {}
    for kind, by_site in scores.items():
        table[kind] = {}
        for site, (share, _, live) in by_site.items():
            cell = table[kind].setdefault(site_kind(site), [])
            cell += [s for s, ok in zip(share, live) if ok]
        table[kind] = {sk: {"mean": float(np.mean(v)) if v else float("nan"), "units": len(v),
                            "share>=0.5": float(np.mean([x >= 0.5 for x in v])) if v else float("nan")}
                       for sk, v in table[kind].items()}
    return table


# --- the job --------------------------------------------------------------------------------------

REAL_LM_SETTINGS = {
    # simple's held-out split has about 80 distinct prompts with these verbs, so n_eval stays below it.
    "full": dict(n_discovery=32, n_eval=64, steps=10, node_threshold=0.1, edge_threshold=0.02, top_k=10,
                 grid_points=12, n_interp=48, n_accuracy=64, min_accuracy=0.9),
    # Smoke tests on tiny random models: nothing is excluded (a random model is never accurate).
    "quick": dict(n_discovery=4, n_eval=4, steps=2, node_threshold=0.05, edge_threshold=0.01, top_k=3,
                  grid_points=4, n_interp=4, n_accuracy=8, min_accuracy=0.0),
}


def default_subject(quick, progress):
    """The embedded default as the demo sees it: model, dictionaries, tokenizer, prompts, accuracy."""
    model, saes, tokenizer, stats, folder = get_default("quick" if quick else "full", progress=progress)
    return dict(model=model, saes=saes, tokenizer=tokenizer, cfg=SETTINGS["quick" if quick else "full"],
                examples=lambda t, n, seed, split: agreement.make_examples(t, n, seed=seed, split=split),
                accuracy=stats["agreement_accuracy"], compared=list(agreement.TEMPLATES),
                meta={"kind": "default", "default": folder, "stats": stats})


def real_lm_subject(name, quick, progress):
    """A pretrained model (--model smollm2 or a path) with SAEs minicirc trains on it (real_lm.py); templates
    the model gets right less often than min_accuracy are reported and left out of the comparison."""
    recipe = "quick" if quick else "full"
    cfg = REAL_LM_SETTINGS[recipe]
    model, saes, tokenizer, info = real_lm.load_real_lm(name, recipe, progress)
    lex = real_lm.lexicon_for(tokenizer)
    accuracy = real_lm.clean_and_patch_agreement_accuracy(model, tokenizer, cfg["n_accuracy"], lex=lex)
    compared = [t for t in agreement.TEMPLATES if accuracy[t] >= cfg["min_accuracy"]]
    if not compared:
        raise MinicircError(f"{info['title']}: no template reaches {cfg['min_accuracy']:.0%} agreement accuracy "
                            f"({', '.join(f'{t} {a:.0%}' for t, a in accuracy.items())}); nothing to compare")
    return dict(model=model, saes=saes, tokenizer=tokenizer, cfg=cfg,
                examples=lambda t, n, seed, split: real_lm.agreement_examples(tokenizer, t, n, seed, split, lex),
                accuracy=accuracy, compared=compared,
                cache=info["folder"], meta={"kind": "real", "load_seconds": info["seconds"],
                                            **{k: v for k, v in info.items() if k not in ("settings", "seconds")},
                      "sae_settings": info["settings"], "lexicon": {k: len(v) for k, v in lex._asdict().items()},
                      "config": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                                 "vocab_size": model.cfg.vocab_size}})


CACHE_VERSION = 1   # bump when the demo's computation changes: cached template results are then recomputed


def cached(folder, compute, progress, what):
    """(value, folder of files or None) through the cache `folder` (None: no cache). compute() returns a
    json-able value and the folder it wrote its files into (or None). Results for a real model take most of
    an hour on 2 cores and only their key (the settings, the SAEs, CACHE_VERSION) can change them, so a
    second run reads the value back and returns the cached copy of the files, which the caller copies to
    where compute() wrote them; a computed value returns None for the files (they are already in place)."""
    if folder is not None and os.path.exists(os.path.join(folder, "value.json")):
        with open(os.path.join(folder, "value.json")) as f:
            value = json.load(f)
        if progress:
            print(f"minicirc: {what} from the cache ({folder})")
        return value, os.path.join(folder, "files")
    value, files = compute()
    if folder is not None:
        with staged_folder(folder) as tmp:
            with open(os.path.join(tmp, "value.json"), "w") as f:
                json.dump(value, f, default=float)
            if files:
                shutil.copytree(files, os.path.join(tmp, "files"))
    return value, None


def cache_key(subject, cfg, first_layer, device, part):
    """The folder holding one part of a run's results (None for the embedded default, whose run is quick)."""
    if subject.get("cache") is None:
        return None
    key = sha256_of([json.dumps({"version": CACHE_VERSION, "cfg": cfg, "first_layer": first_layer,
                                 "device": str(device), "part": part}, sort_keys=True)])[:16]
    return os.path.join(subject["cache"], "demo", f"{part}-{key}")


def run_demo(out="minicirc-demo", quick=False, overwrite=False, device="cpu", progress=True, first_layer=None,
             model="default"):
    """`minicirc demo`: on the embedded default (model="default"), or on a pretrained model ("smollm2", or
    the path of a Hugging Face folder or GGUF file) with SAEs trained by minicirc and cached."""
    t0 = time.time()
    prepare_out_dir(out, overwrite, "report.md")
    subject = default_subject(quick, progress) if model == "default" else real_lm_subject(model, quick, progress)
    model, saes, tokenizer, cfg = subject["model"], subject["saes"], subject["tokenizer"], subject["cfg"]
    make_examples = subject["examples"]
    n_layers = model.cfg.n_layers
    first_layer = paper_first_layer(n_layers) if first_layer is None else first_layer
    if not 0 <= first_layer < n_layers:
        raise MinicircError(f"first layer must be in 0..{n_layers - 1} (the model has {n_layers} layers), "
                            f"got {first_layer}")
    model, saes = model.to(device), {s: d.to(device) for s, d in saes.items()}
    neurons = {s: d.to(device) for s, d in identity_saes(model).items() if s in saes}
    kinds = {"features": saes, "neurons": neurons}
    paper_sites = evaluated_sites(model, saes, first_layer)
    all_sites = evaluated_sites(model, saes, None)
    interp_batches = {t: tokenize(make_examples(t, cfg["n_interp"], 3, "test"), tokenizer).to(device)
                      for t in agreement.TEMPLATES}
    scores, _ = cached(cache_key(subject, cfg, first_layer, device, "unit-scores"),
                       lambda: (unit_scores(model, kinds, list(interp_batches.values())), None), progress, "unit scores")
    results, curves, full_model = {}, {}, {}
    for template in subject["compared"]:
        value, files = cached(cache_key(subject, cfg, first_layer, device, template),
                              lambda: template_results(model, kinds, tokenizer, make_examples, cfg, template, out,
                                                       interp_batches[template], scores, paper_sites, all_sites,
                                                       device, progress), progress, f"{template}'s circuits")
        if files is not None:
            shutil.copytree(files, os.path.join(out, template), dirs_exist_ok=True)
        results[template], full_model[template] = value["results"], value["full_model"]
        curves.update({(name, label): points for name, label, points in value["curves"]})
    plot_protocols(curves, "faithfulness", os.path.join(out, "faithfulness_vs_nodes.png"))
    plot_protocols(curves, "completeness", os.path.join(out, "completeness_vs_nodes.png"))
    results["_meta"] = {"seconds": time.time() - t0, **subject["meta"], "settings": cfg,
                        "first_layer": first_layer, "n_layers": n_layers, "accuracy": subject["accuracy"],
                        "templates": subject["compared"],
                        "full_model_faithfulness": full_model, "unit_scores": score_table(scores)}
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1, default=float).encode())
    write_atomic(os.path.join(out, "report.md"), demo_report(results, cfg).encode())
    print(f"minicirc demo: wrote {out}/report.md in {time.time() - t0:.0f} s")
    return results


def template_results(model, kinds, tokenizer, make_examples, cfg, template, out, interp_batch, scores,
                     paper_sites, all_sites, device, progress):
    """One template's circuits (files under out/template) and measurements ->
    ({"results", "full_model", "curves": [[protocol, label, points]]}, out/template)."""
    saes = kinds["features"]
    results, curves = {}, []
    disc = tokenize(make_examples(template, cfg["n_discovery"], 0, "train"), tokenizer)
    held = tokenize(make_examples(template, cfg["n_eval"], 2, "test"), tokenizer).to(device)
    gradients = {}   # IG's site gradients on `disc`, shared by this template's four circuits
    texts = [t for ex in interp_batch.examples for t in (ex.clean_prefix, ex.patch_prefix)]
    T = held.clean.shape[1]
    # Sanity check reported beside the circuits: every node kept must give faithfulness 1.
    full_model = evaluation.faithfulness(model, saes, held, list(all_nodes(saes)))["faithfulness"]
    # The common end of the area: the smaller kind's node count, so both kinds share one axis.
    caps = {"positions": min(n_nodes_at(d, paper_sites, T) for d in kinds.values()),
            "summed": min(n_nodes_at(d, paper_sites) for d in kinds.values()),
            "all sites": min(n_nodes_at(d, all_sites) for d in kinds.values())}
    for kind, dicts in kinds.items():
        circuit = find_circuit(model, dicts, disc, steps=cfg["steps"], node_threshold=cfg["node_threshold"],
                               edge_threshold=cfg["edge_threshold"], progress=progress, site_gradients=gradients)
        # Nodes only, positions kept, only the evaluated sites (IG patches each site on its own, so the
        # other sites' dictionaries do not change these effects).
        positional = find_circuit(model, {s: dicts[s] for s in paper_sites}, disc, steps=cfg["steps"],
                                  node_threshold=cfg["node_threshold"], aggregation="none", nodes_only=True,
                                  progress=progress, site_gradients=gradients)
        kept = circuit.kept_nodes()
        found = circuit.to_json()
        for n in found["nodes"]:
            if n["feature"] != "err":
                share, best, _ = scores[kind][n["site"]]
                # numpy's rounding (score * 1e4 rounded half to even), as circuit.json has always held it.
                circuit.annotations[n["id"]] = {"best_variable": best[n["feature"]],
                                                "interpretability": float(np.round(share[n["feature"]], 4))}
        contexts = explain.circuit_contexts(model, dicts, tokenizer, found, texts, k=5)
        data = viz.save_circuit(circuit, os.path.join(out, template, kind), contexts=contexts)
        faith = evaluation.faithfulness(model, dicts, held, kept)
        protocols = {}
        for name, circ, sites, per_pos in [("positions", positional, paper_sites, T),
                                           ("summed", circuit, paper_sites, None),
                                           ("all sites", circuit, all_sites, None)]:
            counts = node_counts(n_nodes_at(dicts, sites, per_pos), caps[name], cfg["grid_points"])
            points, crossings = faithfulness_curve(model, dicts, held, circ, sites, counts, TARGETS, progress,
                                                   f"{template} {kind}: faithfulness, {name}")
            curves.append([name, f"{template} {kind}", points])
            top = sorted((nd for nd in circ.all_nodes() if nd.site in sites and not nd.error),
                         key=lambda nd: -abs(nd.effect))
            # The top-k distinct units (a positional circuit may hold one unit at several positions).
            units = list(dict.fromkeys((nd.site, nd.column) for nd in top))[:cfg["top_k"]]
            protocols[name] = {
                **{f"nodes_for_{t}": evaluation.nodes_for_faithfulness(points + crossings, t) for t in TARGETS},
                "area": area_under(points, caps[name]), "cap": caps[name], "sites": sites,
                # The fewest top nodes whose removal (everything else kept) leaves completeness <= 0.2.
                "nodes_to_break": min((p["n_nodes"] for p in points if p["completeness"] <= BREAK),
                                      default=None),
                "interpretability_top_k": float(np.mean([scores[kind][s][0][f] for s, f in units]))
                if units else float("nan"),
                "curve": [{k: p[k] for k in ("n_nodes", "faithfulness", "completeness")} for p in points],
                "crossings": [{k: p[k] for k in ("n_nodes", "faithfulness", "completeness")} for p in crossings]}
        results[kind] = {
            "nodes": len(data["nodes"]), "edges": len(data["edges"]),
            # (nodes whose summed effect is not 0, all nodes): the others rank by a tie in every curve
            "with_effect": [int(sum((circuit.nodes[s] != 0).sum() for s in all_sites)), n_nodes_at(dicts, all_sites)],
            "faithfulness": faith["faithfulness"], "completeness": faith["completeness"],
            "protocols": protocols, "metric": data["metric"],
        }
        if template == "nounpp" and kind == "features":
            results["description"] = describe_nounpp(
                data, {nid: (a["best_variable"], a["interpretability"]) for nid, a in circuit.annotations.items()})
    return {"results": results, "full_model": full_model, "curves": curves}, os.path.join(out, template)


def all_nodes(saes):
    """Every node of every site: the full model as a circuit (its faithfulness must be 1)."""
    for s, d in saes.items():
        for i in range(d.n_features):
            yield {"site": s, "feature": i}
        yield {"site": s, "feature": "err"}
