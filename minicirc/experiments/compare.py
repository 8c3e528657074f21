"""The comparison behind `minicirc demo` and `minicirc compare`: are circuits over dictionary features smaller
at equal faithfulness, and easier to understand, than circuits over neurons?

For each template: find the feature circuit and each neuron basis's circuit (Identity dictionaries, same code)
on discovery examples and measure them on held-out examples under three protocols:

    positions  the original's sweeps: nodes-only circuits with positions kept (aggregation none), only the
               sites from the first evaluated layer up (the original skips layers < 2 of Pythia-70M's 6;
               here round(2 / 6 * layers), `--first-layer`), embed never evaluated
    summed     the same sites, node effects summed over positions (aggregation sum)
    all sites  every site from embed up, summed

A circuit is the nodes whose |effect| on the discovery examples passes a threshold, as the original's: a
node with effect 0 never enters one. For each protocol: faithfulness and completeness of the top-n nodes by
|effect| on a log grid of n up to every node with an effect, nodes needed for 0.8 and 0.9 faithfulness
(bisected to the node between grid sizes; "not reached", with the best faithfulness and its size, where the
nodes with an effect never reach it), how many of those nodes are active on the held-out prompts, the area
under faithfulness against log(nodes), and the original's sweep (the nodes above each threshold of
logspace(-4, 0, 15), or the settings' thresholds). The subject's evaluation sets (in-sample, held-out split
by words seen in discovery, novel words, ...) get the positions protocol's counts too. Where the prompts
carry ground-truth latents (the demo's synthetic grammar), every unit of every site is scored by
metrics.best_latent_share against them. report.md and the plots are written by demo_report.py from the
results computed here. The subject's meta may add discovery's coverage of the test nouns and the SAEs'
token specificity and recipes tried; the report prints them where present.

What is compared comes from a *subject* (a dict): the model, its dictionaries, tokenizer, settings, the
templates, the examples of each template by role, and what the report says about them. demo.py makes the
embedded default's and a pretrained model's; `compare_subject` below makes one from files on disk: a model,
dictionaries and a folder of the original's JSONL data (task_files.py).
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
from ..attribution.common import inputs_from, transcoder_inputs
from ..attribution.find import find_circuit
from ..data import tokenize
from ..errors import MinicircError
from ..files import prepare_out_dir, staged_folder, write_atomic
from ..hashing import sha256_of
from ..metrics import best_latent_share
from ..model import load_model, load_tokenizer
from ..model.sites import site_kind, sites_from_layer
from ..sae import identity_saes, load_saes
from . import task_files
from .demo_report import demo_report, describe_nounpp, plot_protocols
from .tasks import agreement

PROTOCOLS = ("positions", "summed", "all sites")
TARGETS = (0.8, 0.9)
LEVEL_KEYS = tuple(f"{k}_{t}" for t in TARGETS for k in ("nodes_for", "active_for")) + ("best",)
# The original's node thresholds, swept beside the top-n grid.
THRESHOLDS = [float(t) for t in np.logspace(-4, 0, 15)]
# The evaluation sets' counts are bisected to 10% of the nodes (the held-out ones to the node): a set then
# costs about two thirds of the held-out curve of one protocol.
SET_PRECISION = 0.1
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


def top_n_faithfulness(model, dicts, batch, circuit, sites):
    """(point, ranked): ranked: the nodes of `sites` whose effect is not 0, by decreasing |effect|; point(n) =
    faithfulness and completeness of the top n of them (all other sites untouched) as {n_nodes, faithfulness,
    completeness, ...}, each size evaluated once. The ablation values and m(M), m(empty) are computed once.

    Why only non-zero effects: a circuit is the nodes whose |effect| passes a threshold (the original's
    circuits), so a node no discovery example moves never enters one. Ranked after every other node, such
    nodes would tie and enter in site, then position order, and mean ablation still moves many of them on
    other prompts: a top-n count reaching into them measures that order, not the circuit."""
    sub = {s: dicts[s] for s in sites}
    ranked = sorted((nd for nd in circuit.all_nodes() if nd.site in sub and nd.effect != 0),
                    key=lambda nd: -abs(nd.effect))
    values = evaluation.ablation_values(model, sub, attribution.logit_diff, batch, sites)
    reference, seen = None, {}

    def point(n):
        nonlocal reference
        if n not in seen:
            r = evaluation.faithfulness(model, sub, batch, ranked[:n], positional=circuit.positional, values=values,
                                        reference=reference)
            reference = (r["m_full"], r["m_empty"])
            seen[n] = {"n_nodes": n, **r}
        return seen[n]
    return point, ranked


def faithfulness_curve(model, dicts, batch, circuit, sites, counts, targets=(), progress=False, desc="faithfulness",
                       evaluator=None, precision=0.0):
    """Faithfulness and completeness of the top-n nodes by |effect| of `sites` (all other sites untouched;
    nodes with effect 0 never counted), for each n in counts -> (curve, crossings): lists of {n_nodes,
    faithfulness, completeness, ...}.

    crossings: for each target, the sizes bisected between the last grid size below it and the first grid
    size reaching it, until they are max(1, precision * upper size) apart (precision 0: to the node), so the
    nodes needed are known to the node (or to that share), not to the grid's step.
    evaluator: top_n_faithfulness's (point, ranked) for these arguments, when the caller shares it."""
    point, _ = evaluator or top_n_faithfulness(model, dicts, batch, circuit, sites)
    curve = [point(n) for n in tqdm(counts, desc=desc, unit="size", leave=False, disable=not progress)]
    crossings = []
    for target in targets:
        hit = next((i for i, p in enumerate(curve) if p["faithfulness"] >= target), None)
        if not hit:           # never reached, or reached by the smallest size
            continue
        lo, hi = curve[hit - 1]["n_nodes"], curve[hit]["n_nodes"]
        while hi - lo > max(1, int(precision * hi)):
            p = point((lo + hi) // 2)
            crossings.append(p)
            lo, hi = (lo, p["n_nodes"]) if p["faithfulness"] >= target else (p["n_nodes"], hi)
    return curve, crossings


def active_prefix(ranked, active):
    """(n + 1,) ints: how many of the top n nodes of `ranked` are active on the evaluation prompts
    (evaluation.active_units' masks): a node with a position at that position, a summed node at any."""
    masks = {s: m.numpy() for s, m in active.items()}
    anywhere = {s: m.any(0) for s, m in masks.items()}
    flags = [masks[nd.site][nd.pos, nd.column] if nd.pos is not None else anywhere[nd.site][nd.column]
             for nd in ranked]
    return np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])


def levels(points, active):
    """{nodes_for_t, active_for_t for t in TARGETS, best}: the fewest top nodes reaching each target among
    `points` (None: the nodes with an effect never reach it), how many of them are active (active:
    active_prefix), and best = the point of highest faithfulness {n_nodes, faithfulness, active} (None
    without points), which the report gives where a target is not reached."""
    out = {}
    for t in TARGETS:
        n = evaluation.nodes_for_faithfulness(points, t)
        out[f"nodes_for_{t}"], out[f"active_for_{t}"] = n, None if n is None else int(active[n])
    best = evaluation.best_point(points)
    out["best"] = None if best is None else {"n_nodes": best["n_nodes"], "faithfulness": best["faithfulness"],
                                             "active": int(active[best["n_nodes"]])}
    return out


def threshold_sweep(evaluator, thresholds):
    """The original's sweep: for each node threshold, the nodes whose |effect| exceeds it (Circuit.kept_nodes'
    rule), which are the top n of the ranking -> [{threshold, n_nodes, faithfulness, completeness, ...}]."""
    point, ranked = evaluator
    magnitudes = [abs(nd.effect) for nd in ranked]
    return [{"threshold": float(t), **point(sum(m > t for m in magnitudes))} for t in thresholds]


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
    # A transcoder encodes its MLP's input, computed from a site that may be optional (resid_mid_l).
    sources = sorted({src for d in dict_sets.values() for src, _ in transcoder_inputs(model, d, list(d)).values()})
    for b in batches:
        cache = {}
        model(b.clean, cache=cache, extra=sources)
        caches.append((cache, b.last))
    out = {}
    for kind, dicts in dict_sets.items():
        out[kind] = {}
        for site, d in dicts.items():
            encoded = [(d.encode(inputs_from(model, dicts, [site], cache).get(site, cache[site])), lasts)
                       for cache, lasts in caches]   # once per batch, then each example's real tokens
            acts = torch.cat([f[b, :last + 1] for f, lasts in encoded
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


CACHE_VERSION = 2   # bump when the demo's computation changes: cached template results are then recomputed


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
                                 "device": str(device), "part": part,
                                 **({"sets": subject["evaluation_sets"]} if subject.get("evaluation_sets") else {})},
                                sort_keys=True)])[:16]
    return os.path.join(subject["cache"], "demo", f"{part}-{key}")



def output_neurons(model, saes):
    """The sublayer outputs' own coordinates at the dictionaries' sites (Identity dictionaries: the original's
    IdentityDict)."""
    return {s: d for s, d in identity_saes(model).items() if s in saes}


def mlp_neurons(model, saes):
    """The MLP's own neurons: its hidden activations before the down projection (d_mlp per layer), Identity
    dictionaries at every mlp_hidden_l, whatever sites the feature dictionaries sit at."""
    return identity_saes(model, "mlp")


# Neuron bases set beside the dictionaries' features: --neurons name -> (kind: the report's name and the output
# folder, the Identity dictionaries it takes for a model and its feature dictionaries).
NEURON_BASES = {"output": ("neurons", output_neurons), "mlp": ("mlp_neurons", mlp_neurons)}


def neuron_kinds(names):
    """[(kind, builder)] for --neurons' names, in the order given; a one-line error for any other name."""
    out = []
    for name in names:
        if name not in NEURON_BASES:
            raise MinicircError(f"--neurons {name}: not a neuron basis ({', '.join(NEURON_BASES)})")
        out.append(NEURON_BASES[name])
    if not out:
        raise MinicircError("--neurons: name at least one neuron basis")
    return out


def run_comparison(load_subject, out, overwrite=False, device="cpu", progress=True, first_layer=None,
                   command="demo"):
    """Compare the subject's circuits of every kind, write `out` (report.md, results.json, the plots, every
    circuit's files) -> results. load_subject() makes the subject once `out` is known to be writable."""
    t0 = time.time()
    created = not os.path.exists(out)
    prepare_out_dir(out, overwrite, "report.md")
    try:
        subject = load_subject()
    except BaseException:   # bad input: leave no empty folder behind
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise
    model, saes, tokenizer, cfg = subject["model"], subject["saes"], subject["tokenizer"], subject["cfg"]
    examples, sets = subject["examples"], list(subject.get("evaluation_sets") or ())
    n_layers = model.cfg.n_layers
    first_layer = paper_first_layer(n_layers) if first_layer is None else first_layer
    if not 0 <= first_layer < n_layers:
        raise MinicircError(f"first layer must be in 0..{n_layers - 1} (the model has {n_layers} layers), "
                            f"got {first_layer}")
    model, saes = model.to(device), {s: d.to(device) for s, d in saes.items()}
    kinds = {"features": saes}
    for kind, build in subject["neurons"]:
        kinds[kind] = {s: d.to(device) for s, d in build(model, saes).items()}
    sites = {kind: (evaluated_sites(model, d, first_layer), evaluated_sites(model, d, None))
             for kind, d in kinds.items()}
    interp_batches = {t: tokenize(examples(t, "interp"), tokenizer).to(device) for t in subject["interp_templates"]}
    scores = None
    if subject["latents"]:
        scores, _ = cached(cache_key(subject, cfg, first_layer, device, "unit-scores"),
                           lambda: (unit_scores(model, kinds, list(interp_batches.values())), None), progress,
                           "unit scores")
    results, curves, full_model = {}, {}, {}
    for template in subject["templates"]:
        value, files = cached(cache_key(subject, cfg, first_layer, device, template),
                              lambda: template_results(model, kinds, tokenizer, examples, cfg, template, out,
                                                       interp_batches[template], scores, sites, device, progress,
                                                       sets),
                              progress, f"{template}'s circuits")
        if files is not None:
            shutil.copytree(files, os.path.join(out, template), dirs_exist_ok=True)
        results[template], full_model[template] = value["results"], value["full_model"]
        curves.update({(name, label): points for name, label, points in value["curves"]})
    plot_protocols(curves, "faithfulness", os.path.join(out, "faithfulness_vs_nodes.png"))
    plot_protocols(curves, "completeness", os.path.join(out, "completeness_vs_nodes.png"))
    results["_meta"] = {"seconds": time.time() - t0, **subject["meta"], "settings": cfg,
                        "first_layer": first_layer, "n_layers": n_layers, "accuracy": subject["accuracy"],
                        "templates": subject["templates"], "kinds": list(kinds), "evaluation_sets": sets,
                        "set_precision": SET_PRECISION,
                        "thresholds": cfg.get("thresholds") or THRESHOLDS,
                        "full_model_faithfulness": full_model,
                        "unit_scores": None if scores is None else score_table(scores)}
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1, default=float).encode())
    write_atomic(os.path.join(out, "report.md"), demo_report(results, cfg).encode())
    print(f"minicirc {command}: wrote {out}/report.md in {time.time() - t0:.0f} s")
    return results


def template_results(model, kinds, tokenizer, examples, cfg, template, out, interp_batch, scores, sites, device,
                     progress, sets=()):
    """One template's circuits (files under out/template) and measurements ->
    ({"results", "full_model", "curves": [[protocol, label, points]]}, out/template).
    sites: {kind: (the paper protocol's sites, every site)}; scores: unit_scores' or None (no latents);
    sets: the evaluation sets' roles (evaluation_sets)."""
    saes = kinds["features"]
    results, curves, found = {}, [], {}
    disc = tokenize(examples(template, "discovery"), tokenizer)
    held = tokenize(examples(template, "held_out"), tokenizer).to(device)
    gradients = {}   # IG's site gradients on `disc`, shared by this template's circuits of every kind
    texts = [t for ex in interp_batch.examples for t in (ex.clean_prefix, ex.patch_prefix)]
    T = held.clean.shape[1]
    # Sanity check reported beside the circuits: every node kept must give faithfulness 1.
    full_model = evaluation.faithfulness(model, saes, held, list(all_nodes(saes)))["faithfulness"]
    for kind, dicts in kinds.items():
        paper_sites, all_sites = sites[kind]
        circuit = find_circuit(model, dicts, disc, steps=cfg["steps"], node_threshold=cfg["node_threshold"],
                               edge_threshold=cfg["edge_threshold"], progress=progress, site_gradients=gradients)
        # Nodes only, positions kept, only the evaluated sites (IG patches each site on its own, so the
        # other sites' dictionaries do not change these effects).
        positional = find_circuit(model, {s: dicts[s] for s in paper_sites}, disc, steps=cfg["steps"],
                                  node_threshold=cfg["node_threshold"], aggregation="none", nodes_only=True,
                                  progress=progress, site_gradients=gradients)
        kept = circuit.kept_nodes()
        data = circuit.to_json()
        for n in data["nodes"]:
            if n["feature"] != "err" and scores is not None:
                share, best, _ = scores[kind][n["site"]]
                # numpy's rounding (score * 1e4 rounded half to even), as circuit.json has always held it.
                circuit.annotations[n["id"]] = {"best_variable": best[n["feature"]],
                                                "interpretability": float(np.round(share[n["feature"]], 4))}
        contexts = explain.circuit_contexts(model, dicts, tokenizer, data, texts, k=5)
        data = viz.save_circuit(circuit, os.path.join(out, template, kind), contexts=contexts)
        faith = evaluation.faithfulness(model, dicts, held, kept)
        results[kind] = {"nodes": len(data["nodes"]), "edges": len(data["edges"]), "faithfulness": faith["faithfulness"],
                         "completeness": faith["completeness"], "metric": data["metric"]}
        found[kind] = {"positions": (positional, paper_sites, T), "summed": (circuit, paper_sites, None),
                       "all sites": (circuit, all_sites, None)}
        if template == "nounpp" and kind == "features" and scores is not None:
            results["description"] = describe_nounpp(
                data, {nid: (a["best_variable"], a["interpretability"]) for nid, a in circuit.annotations.items()})
    evaluators = {(kind, name): top_n_faithfulness(model, kinds[kind], held, circ, at)
                  for kind, protocols in found.items() for name, (circ, at, _) in protocols.items()}
    # The common end of the area: the fewest nodes with an effect among the kinds, so every kind shares one axis.
    caps = {name: min(len(evaluators[kind, name][1]) for kind in kinds) for name in PROTOCOLS}
    # The original's sweep: on every protocol where the settings name thresholds (compare), else on the paper
    # protocol only (each threshold may cost a point: about 1.5 s on SmolLM2 with 64 prompts).
    thresholds = cfg.get("thresholds") or THRESHOLDS
    swept = PROTOCOLS if cfg.get("thresholds") else ("positions",)
    for kind, dicts in kinds.items():
        active = evaluation.active_units(model, dicts, held, sites[kind][1])
        protocols = {}
        for name, (circ, at, per_pos) in found[kind].items():
            evaluator = evaluators[kind, name]
            ranked = evaluator[1]
            counts = node_counts(len(ranked), caps[name], cfg["grid_points"])
            points, crossings = faithfulness_curve(model, dicts, held, circ, at, counts, TARGETS, progress,
                                                   f"{template} {kind}: faithfulness, {name}", evaluator)
            curves.append([name, f"{template} {kind}", points])
            top = [nd for nd in ranked if not nd.error]
            # The top-k distinct units (a positional circuit may hold one unit at several positions).
            units = list(dict.fromkeys((nd.site, nd.column) for nd in top))[:cfg["top_k"]]
            keys = ("n_nodes", "faithfulness", "completeness")
            on = active_prefix(ranked, active)
            protocols[name] = {
                **levels(points + crossings, on),
                # nodes whose effect on the discovery examples is not 0 (the only ones ranked), how many of
                # them are active on the held-out prompts, and every node of the protocol's sites
                "with_effect": len(ranked), "active_with_effect": int(on[-1]),
                "all_nodes": n_nodes_at(dicts, at, per_pos),
                "area": area_under(points, caps[name]), "cap": caps[name], "sites": at,
                # The fewest top nodes whose removal (everything else kept) leaves completeness <= 0.2.
                "nodes_to_break": min((p["n_nodes"] for p in points if p["completeness"] <= BREAK),
                                      default=None),
                "interpretability_top_k": float(np.mean([scores[kind][s][0][f] for s, f in units]))
                if units and scores is not None else float("nan"),
                "curve": [{k: p[k] for k in keys} for p in points],
                "crossings": [{k: p[k] for k in keys} for p in crossings]}
            if name in swept:
                protocols[name]["thresholds"] = [{**{k: p[k] for k in ("threshold",) + keys},
                                                  "active": int(on[p["n_nodes"]])}
                                                 for p in threshold_sweep(evaluator, thresholds)]
        results[kind]["protocols"] = protocols
    results["held_out_prompts"] = len(held)
    if sets:
        results["evaluation_sets"] = evaluation_sets(model, kinds, tokenizer, examples, template, sets, found, results,
                                                     cfg, device, progress)
    return {"results": results, "full_model": full_model, "curves": curves}, os.path.join(out, template)


def prompts_of(exs):
    return [(ex.clean_prefix, ex.patch_prefix, ex.clean_answer, ex.patch_answer) for ex in exs]


def evaluation_sets(model, kinds, tokenizer, examples, template, sets, found, results, cfg, device, progress):
    """{role: {"prompts": n, kind: {...}} or {"prompts": 0} or {"prompts": n, "skipped": why}}: the positions
    protocol of each kind's circuit (found on the discovery prompts) measured on each evaluation set's prompts
    (examples(template, role)): levels' counts, bisected to SET_PRECISION, on the held-out curve's grid
    sizes, the nodes with an effect active on the set, and the faithfulness of the top-n circuit that reaches
    0.9 on the held-out prompts. A set with the held-out prompts themselves takes the held-out results."""
    held = prompts_of(examples(template, "held_out"))
    out = {}
    for role in sets:
        exs = examples(template, role)
        if not exs:
            out[role] = {"prompts": 0}
            continue
        batch = tokenize(exs, tokenizer).to(device)
        lengths = set((batch.last + 1).tolist())
        T = found["features"]["positions"][2]
        if lengths != {T}:
            # positions are kept: the circuit's nodes sit at the discovery prompts' positions
            out[role] = {"prompts": len(exs), "skipped": f"prompts of {'/'.join(map(str, sorted(lengths)))} tokens, "
                                                         f"the circuits' positions are {T}"}
            continue
        out[role] = {"prompts": len(exs)}
        for kind, dicts in kinds.items():
            main = results[kind]["protocols"]["positions"]
            if prompts_of(exs) == held:
                out[role][kind] = {k: main[k] for k in (*LEVEL_KEYS, "with_effect", "active_with_effect", "curve",
                                                         "crossings")}
                out[role][kind]["at_held_out_0.9"] = (None if main["nodes_for_0.9"] is None else
                                                      {"n_nodes": main["nodes_for_0.9"], "faithfulness":
                                                       next(p["faithfulness"] for p in main["curve"] + main["crossings"]
                                                            if p["n_nodes"] == main["nodes_for_0.9"])})
                continue
            circ, at, _ = found[kind]["positions"]
            evaluator = top_n_faithfulness(model, dicts, batch, circ, at)
            point, ranked = evaluator
            points, crossings = faithfulness_curve(model, dicts, batch, circ, at, [p["n_nodes"] for p in main["curve"]],
                                                   TARGETS, progress, f"{template} {kind}: faithfulness, {role}",
                                                   evaluator, SET_PRECISION)
            on = active_prefix(ranked, evaluation.active_units(model, dicts, batch, at))
            n9 = main["nodes_for_0.9"]
            out[role][kind] = {**levels(points + crossings, on), "with_effect": len(ranked),
                               "active_with_effect": int(on[-1]),
                               "at_held_out_0.9": None if n9 is None else {"n_nodes": n9,
                                                                          "faithfulness": point(n9)["faithfulness"]},
                               **{name: [{k: p[k] for k in ("n_nodes", "faithfulness", "completeness")} for p in pts]
                                  for name, pts in (("curve", points), ("crossings", crossings))}}
    return out


def all_nodes(saes):
    """Every node of every site: the full model as a circuit (its faithfulness must be 1)."""
    for s, d in saes.items():
        for i in range(d.n_features):
            yield {"site": s, "feature": i}
        yield {"site": s, "feature": "err"}


# --- compare: a model, dictionaries and the original's data files from disk ---------------------------

# The paper's settings: 100 discovery and 40 test examples per template, IG with 10 steps, the original's
# threshold sweep logspace(-4, 0, 15) beside the top-n grid; the saved circuits at the CLI's thresholds.
PAPER_SETTINGS = dict(n_discovery=100, n_eval=40, steps=10, node_threshold=0.1, edge_threshold=0.01, top_k=10,
                      grid_points=32, thresholds=THRESHOLDS)


def compare_subject(model_path, saes_path, data_dir, neurons=("output",), settings=None, norm_scaling_factor=None):
    """The subject of `minicirc compare`: minicirc.load_model / load_saes / load_tokenizer on the paths, and
    each template's pairs from data_dir (task_files.read_templates: the original's filter and sample)."""
    cfg = {**PAPER_SETTINGS, **(settings or {})}
    bases = neuron_kinds(neurons)
    model = load_model(model_path)
    tokenizer = load_tokenizer(model_path)
    saes = load_saes(saes_path, model, norm_scaling_factor=norm_scaling_factor)
    pairs, counts = task_files.read_templates(data_dir, tokenizer, cfg["n_discovery"], cfg["n_eval"],
                                              model.cfg.vocab_size)
    roles = {"discovery": "train", "held_out": "test", "interp": "test"}
    accuracy = {t: evaluation.pair_accuracy(model, tokenize(p["test"], tokenizer)) for t, p in pairs.items()}
    return dict(model=model, saes=saes, tokenizer=tokenizer, cfg=cfg, neurons=bases, templates=list(pairs),
                examples=lambda t, role: pairs[t][roles[role]], interp_templates=list(pairs), latents=False,
                accuracy=accuracy,
                meta={"kind": "files", "model": os.fspath(model_path), "saes": os.fspath(saes_path),
                      "data": os.fspath(data_dir), "pairs": counts,
                      "dictionaries": {s: d.n_features for s, d in saes.items()},
                      "config": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                                 "vocab_size": model.cfg.vocab_size}})


def run_compare(model, saes, data, out="minicirc-compare", neurons=("output",), overwrite=False, device="cpu",
                progress=True, first_layer=None, settings=None, norm_scaling_factor=None):
    """`minicirc compare`: the demo's comparison on a model, dictionaries and data from disk."""
    neuron_kinds(neurons)   # a bad name fails before anything is written
    return run_comparison(lambda: compare_subject(model, saes, data, neurons, settings, norm_scaling_factor), out,
                          overwrite, device, progress, first_layer, command="compare")
