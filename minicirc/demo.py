"""`minicirc demo`: are circuits over SAE features more discoverable and easier to understand than circuits
over neurons? Answered on the embedded default (a tiny model trained on a synthetic language whose latent
variables are known), for the four agreement templates of the original work.

For each template: find the feature circuit and the neuron circuit (Identity dictionaries, same code) on
discovery examples, sweep node thresholds and measure faithfulness/completeness on held-out examples,
and score how well each node's activation predicts a known latent variable (AUROC). report.md and
faithfulness_vs_nodes.png are written by minicirc/report.py from the results computed here.
"""
import json
import os
import time

import numpy as np
import torch

from . import evaluation, explain, report, viz
from .circuit import find_circuit
from .files import prepare_out_dir, write_atomic
from .data import tokenize
from .default import get_default
from .metrics import auroc
from .sae import identity_saes
from .tasks import agreement

SETTINGS = {
    "full": dict(n_discovery=200, n_eval=100, steps=10, node_threshold=0.1, edge_threshold=0.02, top_k=10,
                 sweep=list(np.logspace(-3, 1, 13)), n_interp=200),
    "quick": dict(n_discovery=8, n_eval=8, steps=3, node_threshold=0.05, edge_threshold=0.01, top_k=5,
                  sweep=list(np.logspace(-3, 0, 4)), n_interp=16),
}


# --- interpretability: how well a node's activation predicts a known latent variable ---------------

def token_variables(example):
    """{variable: [0/1 or None per token]}: the grammar's number variables, where they are defined.

    Only number variables: roles (determiner, subject, ...) are fixed by position in templated data, so any
    position-sensitive unit would "predict" them and the score would not separate anything."""
    lat = example.latents
    roles = lat["role"]
    T = len(roles)
    subj_at = roles.index("subj")
    out = {"subject is plural": [lat["subject_plural"] if t >= subj_at else None for t in range(T)],
           "token is plural": list(lat["number"]),
           "next verb must be plural": [lat["answer_plural"] if t == T - 1 else None for t in range(T)]}
    if "distractor" in roles:
        d_at = roles.index("distractor")
        out["second noun is plural"] = [lat["distractor_plural"] if t >= d_at else None for t in range(T)]
    return out


@torch.no_grad()
def node_interpretability(model, saes, batch, nodes):
    """For each feature node: (best variable, score = max(AUROC, 1 - AUROC)) over held-out tokens."""
    cache = {}
    model(batch.clean, cache=cache)
    variables = [token_variables(ex) for ex in batch.examples]
    names = sorted({k for v in variables for k in v})
    where = {}  # variable -> (example index, position, label) over the tokens where it is defined
    for name in names:
        cells = [(b, t, v) for b, var in enumerate(variables) for t, v in enumerate(var.get(name, [])) if v is not None]
        if len({c[2] for c in cells}) == 2:
            b, t, y = (torch.tensor(c, device="cpu") for c in zip(*cells))
            where[name] = (b, t, y)
    out, encoded = {}, {}
    for n in nodes:
        site, feat = n["site"], n["feature"]
        if feat == "err":
            continue
        if site not in encoded:
            encoded[site] = saes[site].encode(cache[site])
        acts = encoded[site][..., feat]
        best = (None, 0.5)
        for name, (b, t, y) in where.items():
            a = auroc(acts[b, t], y)
            if max(a, 1 - a) > best[1]:
                best = (name, max(a, 1 - a))
        out[n["id"]] = best
    return out


# --- the job --------------------------------------------------------------------------------------

def run_demo(out="minicirc-demo", quick=False, overwrite=False, device="cpu", progress=True):
    t0 = time.time()
    cfg = SETTINGS["quick" if quick else "full"]
    prepare_out_dir(out, overwrite, "report.md")
    model, saes, tokenizer, stats, folder = get_default("quick" if quick else "full", progress=progress)
    model, saes = model.to(device), {s: d.to(device) for s, d in saes.items()}
    neurons = {s: d.to(device) for s, d in identity_saes(model).items()}
    results, curves, full_model = {}, {}, {}
    for template in agreement.TEMPLATES:
        disc = tokenize(agreement.make_examples(template, cfg["n_discovery"], seed=0, split="train"), tokenizer)
        held = tokenize(agreement.make_examples(template, cfg["n_eval"], seed=2, split="test"), tokenizer).to(device)
        interp_batch = tokenize(agreement.make_examples(template, cfg["n_interp"], seed=3, split="test"), tokenizer).to(device)
        texts = [t for ex in interp_batch.examples for t in (ex.clean_prefix, ex.patch_prefix)]
        # Sanity check reported beside the circuits: every node kept must give faithfulness 1.
        full_model[template] = evaluation.faithfulness(model, saes, held, list(all_nodes(saes)))["faithfulness"]
        results[template] = {}
        for kind, dicts in [("features", saes), ("neurons", neurons)]:
            circuit = find_circuit(model, dicts, disc, steps=cfg["steps"], node_threshold=cfg["node_threshold"],
                                   edge_threshold=cfg["edge_threshold"], progress=progress)
            kept = circuit.kept_nodes()
            found = circuit.to_json()
            top = sorted(found["nodes"], key=lambda n: -abs(n["effect"]))
            interp = node_interpretability(model, dicts, interp_batch, top)
            for nid, (name, score) in interp.items():
                # numpy's rounding (score * 1e4 rounded half to even), as circuit.json has always held it:
                # Python's round() rounds the exact binary value and differs in the last digit now and then.
                circuit.annotations[nid] = {"best_variable": name, "interpretability": float(np.round(score, 4))}
            contexts = explain.circuit_contexts(model, dicts, tokenizer, found, texts, k=5)
            data = viz.save_circuit(circuit, os.path.join(out, template, kind), contexts=contexts)
            faith = evaluation.faithfulness(model, dicts, held, kept)
            points = evaluation.sweep(model, dicts, held, circuit, thresholds=cfg["sweep"], progress=False)
            curves[f"{template} {kind}"] = [(p["n_nodes"], p["faithfulness"]) for p in points]
            feat_scores = [interp[n["id"]][1] for n in top if n["id"] in interp][:cfg["top_k"]]
            results[template][kind] = {
                "nodes": len(data["nodes"]), "edges": len(data["edges"]),
                "faithfulness": faith["faithfulness"], "completeness": faith["completeness"],
                "nodes_for_0.9": evaluation.nodes_for_faithfulness(points, 0.9),
                "interpretability_top_k": float(np.mean(feat_scores)) if feat_scores else float("nan"),
                "sweep": points, "metric": data["metric"],
            }
            if template == "nounpp" and kind == "features":
                results[template]["description"] = report.describe_nounpp(data, interp)
    report.plot_faithfulness(curves, os.path.join(out, "faithfulness_vs_nodes.png"),
                          "Faithfulness vs nodes, held-out examples (features solid, neurons dashed)")
    results["_meta"] = {"seconds": time.time() - t0, "default": folder, "stats": stats, "settings": cfg,
                        "full_model_faithfulness": full_model}
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1, default=float).encode())
    write_atomic(os.path.join(out, "report.md"), report.demo_report(results, cfg).encode())
    print(f"minicirc demo: wrote {out}/report.md in {time.time() - t0:.0f} s")
    return results


def all_nodes(saes):
    """Every node of every site: the full model as a circuit (its faithfulness must be 1)."""
    for s, d in saes.items():
        for i in range(d.n_features):
            yield {"site": s, "feature": i}
        yield {"site": s, "feature": "err"}
