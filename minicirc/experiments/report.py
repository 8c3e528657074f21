"""The reports and plots of the two experiments: `minicirc demo` (report.md, faithfulness_vs_nodes.png) and
`minicirc shift` (shift_report.md, shift.png). They only format and draw the results the experiments computed:
no number in a report is computed here."""
import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402

from ..model.sites import site_layer  # noqa: E402
from .tasks import agreement  # noqa: E402


# --- minicirc demo --------------------------------------------------------------------------------

NUMBER_LATENTS = ("subject is plural", "subject is singular", "token is plural", "token is singular",
                  "next verb must be plural", "next verb must be singular")


def describe_nounpp(data, interp, min_share=0.5):
    """A plain-language account of which features carry number past the distractor: feature nodes whose best
    latent is a number of the subject, the token or the next verb and explains at least `min_share` of the
    unit's variance (interp: {node id: (latent, share)})."""
    by_site = {}
    for n in data["nodes"]:
        name, score = interp.get(n["id"], (None, 0))
        if n["feature"] != "err" and name in NUMBER_LATENTS and score >= min_share:
            by_site.setdefault(n["site"], []).append((n["feature"], name, score, n["effect"]))
    if not by_site:
        return (f"No feature node of this circuit has a number latent of the subject, the token or the next verb "
                f"explaining {min_share:.0%} of its variance on held-out sentences; the circuit does not show a "
                f"clean number-carrying path.")
    parts = []
    for site in data["sites"]:
        if site in by_site:
            ranked = sorted(by_site[site], key=lambda r: -abs(r[3]))
            feats = ", ".join(f"{f} ({nm}, share {s:.2f}, effect {e:+.2f})" for f, nm, s, e in ranked[:3])
            more = f" and {len(ranked) - 3} more" if len(ranked) > 3 else ""
            parts.append(f"at {site}: features {feats}{more}")
    return ("Number is carried past the distractor by features whose activation a number latent explains on "
            "held-out sentences — " + "; ".join(parts) + ". Ablating everything else keeps the behaviour to the "
            "faithfulness reported above.")


def draw_curves(ax, curves):
    """curves: {label: [(n_nodes, value), ...]} on one axis; features solid, neurons dashed, one colour per
    template (the label's first word); log x axis."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = sorted({label.split(" ")[0] for label in curves})
    for label, pts in curves.items():
        pts = sorted(p for p in pts if p[0] > 0)
        if not pts:
            continue
        c = colours[groups.index(label.split(" ")[0]) % len(colours)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if "neuron" in label else "-", marker=".",
                color=c, label=label)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("nodes in circuit")


def plot_faithfulness(curves, path, title="Faithfulness vs circuit size"):
    """curves: {label: [(n_nodes, faithfulness), ...]}; features solid, neurons dashed when labels say so."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    draw_curves(ax, curves)
    ax.set_ylabel("faithfulness")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROTOCOL_TITLES = {"positions": "paper protocol: positions kept", "summed": "paper protocol: summed over positions",
                   "all sites": "all sites from embed (summed)"}


def plot_protocols(curves, key, path):
    """One panel per protocol: curves {(protocol, "template kind"): [{n_nodes, faithfulness, completeness}]},
    `key` the value drawn (faithfulness or completeness)."""
    protocols = list(dict.fromkeys(p for p, _ in curves))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 4.6), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        draw_curves(ax, {label: [(p["n_nodes"], p[key]) for p in pts] for (pr, label), pts in curves.items()
                         if pr == protocol})
        ax.set_title(PROTOCOL_TITLES.get(protocol, protocol), fontsize=10)
        ax.set_ylabel(key)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{key.capitalize()} vs nodes on held-out examples (features solid, neurons dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(v, spec=".2f"):
    return "—" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def _compare(results, protocol, key):
    """(templates where features need clearly fewer nodes for `key`, clearly more, compared): clearly = at
    most 0.9 times the other kind's count; a kind that never reaches the target needs more than any that does."""
    inf = float("inf")
    ahead = behind = 0
    templates = compared_templates(results)
    for t in templates:
        f, n = (results[t][kind]["protocols"][protocol][key] for kind in ("features", "neurons"))
        f, n = (inf if f is None else f), (inf if n is None else n)
        ahead += f <= 0.9 * n and f < n
        behind += n <= 0.9 * f and n < f
    return ahead, behind, len(templates)


def compared_templates(results):
    """The templates the demo compared (a real model's less accurate ones are left out)."""
    return results["_meta"].get("templates", list(agreement.TEMPLATES))


def _verdict(ahead, behind, n):
    """"yes" when features are ahead in all templates but at most one and behind in none, "no" when they are
    ahead in at most one, "mixed" otherwise."""
    return "yes" if ahead >= n - 1 and behind == 0 else "no" if ahead <= 1 else "mixed"


def answers(results):
    """The questions answered in plain words from the results' own numbers (rules in _compare, _verdict)."""
    lines = ["## Answers", "",
             "Features count as smaller when they need at most 0.9 times the neurons' nodes; \"yes\" = ahead in "
             "all templates but at most one and behind in none, \"no\" = ahead in at most one.", ""]
    templates = compared_templates(results)
    for protocol in ("positions", "summed", "all sites"):
        a9, b9, n = _compare(results, protocol, "nodes_for_0.9")
        a8, b8, _ = _compare(results, protocol, "nodes_for_0.8")
        area = sum(results[t]["features"]["protocols"][protocol]["area"]
                   > results[t]["neurons"]["protocols"][protocol]["area"] for t in templates)
        need = lambda kind: ", ".join(fmt(results[t][kind]["protocols"][protocol]["nodes_for_0.9"], "d")  # noqa: E731
                                      for t in templates)
        lines.append(f"- **Are feature circuits smaller at equal faithfulness** ({protocol})? **{_verdict(a9, b9, n)}**: "
                     f"for 0.9 faithfulness features need clearly fewer nodes in {a9} of {n} templates and clearly "
                     f"more in {b9} (nodes, {'/'.join(templates)}: features {need('features')}; neurons "
                     f"{need('neurons')}); for 0.8, fewer in {a8} and more in {b8}; the larger area in {area} of {n}.")
    n = len(templates)
    top = lambda t, kind: results[t][kind]["protocols"]["summed"]["interpretability_top_k"]  # noqa: E731
    ahead = sum(top(t, "features") > top(t, "neurons") for t in templates)
    table = results["_meta"]["unit_scores"]
    kinds = [sk for sk in table["features"] if sk in table["neurons"]]
    better = [sk for sk in kinds if table["features"][sk]["mean"] > table["neurons"][sk]["mean"]]
    verdict = "yes" if ahead >= n - 1 else "no" if ahead <= 1 else "mixed"
    lines.append(f"- **Are their nodes easier to interpret?** **{verdict}** for the circuits' top units: the best "
                 f"single latent explains more of a feature's variance than of a neuron's in {ahead} of {n} "
                 f"templates (top units of the summed paper-protocol circuits: features "
                 f"{', '.join(fmt(top(t, 'features')) for t in templates)}; neurons "
                 f"{', '.join(fmt(top(t, 'neurons')) for t in templates)}). Over every unit, features score "
                 f"higher at {len(better)} of {len(kinds)} site kinds ({', '.join(better) or 'none'}).")
    return lines + [""]


def superposition_lines(stats):
    """report.md's table of monosemantic units per site (default.monosemantic_shares, recorded in the
    default's stats.json when it was trained); nothing for a default trained before it was recorded."""
    mono = stats.get("monosemantic")
    if not mono:
        return []
    n_latents = mono["n_latents"]
    d_model = stats["config"]["hidden_size"]
    lines = ["", f"Superposition: the grammar has {n_latents} binary latents seen on held-out tokens "
             f"({n_latents / d_model:.1f}x d_model {d_model}). A unit counts as monosemantic when "
             f"{mono['criterion']} ({mono['n_tokens']} held-out tokens; dead units count as not monosemantic). "
             "Shares of units, and how many distinct latents those units cover:", "",
             "| site | neurons monosemantic | latents covered | SAE features monosemantic | latents covered |",
             "|---|---|---|---|---|"]
    for s, v in mono["sites"].items():
        lines.append(f"| {s} | {100 * v['neurons']:.0f}% | {v['neurons_latents']} | {100 * v['features']:.0f}% "
                     f"| {v['features_latents']} |")
    return lines


def default_header(meta):
    st = meta["stats"]
    lines = [f"Embedded default ({st['recipe']} recipe, seed {st['seed']}): {st['config']['num_hidden_layers']} layers, "
             f"d_model {st['config']['hidden_size']}, vocab {st['config']['vocab_size']}; "
             f"LM loss {st['lm_loss_first']:.2f} -> {st['lm_loss_last']:.2f}. Files: `{meta['default']}`.", "",
             "Agreement accuracy on held-out sentences: " + ", ".join(
                 f"{t} {100 * a:.1f}%" for t, a in st["agreement_accuracy"].items()) + ".", "",
             "| site | variance explained | mean L0 | dead features |", "|---|---|---|---|"]
    for s, v in st["saes"].items():
        lines.append(f"| {s} | {v['variance_explained']:.3f} | {v['l0']:.1f} | {100 * v['dead_fraction']:.0f}% |")
    return lines + superposition_lines(st)


def site_list(sites):
    return ", ".join(sites) if len(sites) <= 3 else f"{sites[0]}, {sites[1]}, ..., {sites[-1]}"


def real_lm_header(meta):
    """A pretrained model: what was loaded, the prompts' accuracy (templates below the bar left out), and the
    SAEs minicirc trained on it (real_lm.py)."""
    c, st, sae = meta["config"], meta["sae_stats"], meta["sae_settings"]
    sites = sorted(st["sites"], key=site_layer)    # stats.json keeps them sorted by name
    low = [t for t in meta["accuracy"] if t not in meta["templates"]]
    lex = meta["lexicon"]
    lines = [f"Model: {meta['title']} (`{meta['path']}`): {c['n_layers']} layers, d_model {c['d_model']}, "
             f"vocab {c['vocab_size']}.", "",
             f"Prompts: the agreement templates in English words that are one token each in its tokenizer "
             f"({lex['nouns']} nouns, {lex['animate']} of them animate, {lex['transitive']} transitive verbs, main "
             f"verbs is/are, was/were, has/have).", "",
             "| template | agreement accuracy (held-out prompts, clean and patch) | compared |", "|---|---|---|"]
    for t, a in meta["accuracy"].items():
        lines.append(f"| {t} | {100 * a:.1f}% | {'yes' if t in meta['templates'] else '**no: under ' + format(meta['settings']['min_accuracy'], '.0%') + '**'} |")
    if low:
        lines += ["", f"Left out of the comparison (accuracy under {meta['settings']['min_accuracy']:.0%}): "
                  f"{', '.join(low)}."]
    lines += ["", f"SAEs trained by minicirc (real_lm.py, cached in `{meta['folder']}`): top-k (k = {sae['k']}), "
              f"{sae['expansion']}x d_model = {sae['expansion'] * c['d_model']} features, at {len(st['sites'])} sites "
              f"({site_list(sites)}: the residual stream every {sae['site_stride']} layers and after the "
              f"last), on {st['n_train_tokens']} tokens of "
              f"the corpus's agreement sentences in English ({sae['n_sentences']} sentences, first positions left "
              f"out), {sae['epochs']} epochs. Measured on {st['n_held_out_tokens']} tokens of held-out sentences. "
              f"Training took {st['train_seconds']:.0f} s.", "",
              "| site | variance explained | mean L0 | dead features |", "|---|---|---|---|"]
    for s in sites:
        v = st["sites"][s]
        lines.append(f"| {s} | {v['variance_explained']:.3f} | {v['l0']:.1f} | {100 * v['dead_fraction']:.0f}% |")
    return lines


def demo_report(results, cfg):
    meta = results["_meta"]
    L, n_layers = meta["first_layer"], meta["n_layers"]
    real = meta.get("kind") == "real"
    lines = ["# minicirc demo: feature circuits vs neuron circuits", ""]
    lines += real_lm_header(meta) if real else default_header(meta)
    lines += ["", f"Circuits: IG ({cfg['steps']} steps) on {cfg['n_discovery']} discovery examples (train split); "
              f"faithfulness and completeness by mean ablation on {cfg['n_eval']} held-out examples.", "",
              "Three evaluation protocols, each measured on the top-n nodes by |effect| for n on a log grid "
              f"({cfg['grid_points']} sizes from 1 to every node of the evaluated sites; the nodes needed for 0.8 "
              "and 0.9 are bisected to the node between the grid's sizes):", "",
              f"- **positions** (the original's): nodes-only circuits with positions kept (aggregation none), "
              f"only the sites of layers {L}..{n_layers - 1}; embed and lower layers are neither counted nor "
              f"ablated. The original evaluates Pythia-70M from layer 2 of 6; here round(2/6 x {n_layers}) = "
              f"{L} (`--first-layer`).",
              "- **summed**: the same sites, node effects summed over positions.",
              "- **all sites**: every site with a dictionary (from embed up on the default), summed.", "",
              "Area: mean faithfulness over log(nodes) from 1 to the smaller kind's node count (the trapezoid area "
              "under faithfulness against ln n, divided by ln of that count; 1 = faithful from the first node), so "
              "features and neurons share one axis. Removed for completeness <= 0.2: the fewest top nodes (grid "
              "sizes) whose ablation, everything else kept, leaves at most 0.2 of the behaviour. Interpretability: metrics.best_latent_share, the share of a "
              "unit's variance over every token of held-out sentences (all templates pooled) that the best "
              "single latent of the grammar explains, within positions (0 = only noise or the position, 1/2 = "
              "an even mixture of two latents, 1 = one latent); the mean over the top "
              f"{cfg['top_k']} units by |effect| of each circuit.", ""]
    for t in compared_templates(results):
        r = results[t]
        lines += [f"## {t}", "", f"Model accuracy on held-out `{t}`: {100 * meta['accuracy'][t]:.1f}%; "
                  f"full-model faithfulness {fmt(meta['full_model_faithfulness'][t], '.3f')}.", "",
                  "| protocol | kind | nodes for 0.8 | nodes for 0.9 | area (1..n) | removed for completeness <= 0.2 "
                  "| interpretability (top-k) |", "|---|---|---|---|---|---|---|"]
        for protocol in ("positions", "summed", "all sites"):
            for kind in ("features", "neurons"):
                p = r[kind]["protocols"][protocol]
                lines.append(f"| {protocol} | {kind} | {fmt(p['nodes_for_0.8'], 'd')} | {fmt(p['nodes_for_0.9'], 'd')} | "
                             f"{fmt(p['area'])} ({p['cap']}) | {fmt(p['nodes_to_break'], 'd')} | "
                             f"{fmt(p['interpretability_top_k'])} |")
        lines += ["", f"Saved circuits (all sites, node threshold {cfg['node_threshold']}, edge threshold "
                  f"{cfg['edge_threshold']}):", "",
                  "| | nodes | edges | faithfulness | completeness |", "|---|---|---|---|---|"]
        for kind in ("features", "neurons"):
            k = r[kind]
            lines.append(f"| {kind} | {k['nodes']} | {k['edges']} | {fmt(k['faithfulness'])} | {fmt(k['completeness'])} |")
        if real:
            f, n = r["features"]["with_effect"], r["neurons"]["with_effect"]
            lines += ["", f"Nodes with a non-zero effect on the discovery examples (all sites): features "
                      f"{f[0]} of {f[1]}, neurons {n[0]} of {n[1]}. A unit that no discovery example moves has "
                      "effect 0 and ranks last, but mean ablation still moves it on held-out prompts that use it: "
                      "a sparse dictionary has many such units, a dense neuron basis none, so the curves of "
                      "features need most of the zero-effect units too before they reach 0.9."]
        if "description" in r:
            lines += ["", r["description"]]
        lines += ["", f"Pictures: `{t}/features/circuit.png`, `{t}/neurons/circuit.png` (and `circuit.html`).", ""]
    table = meta["unit_scores"]
    site_kinds = list(dict.fromkeys(sk for kind in table.values() for sk in kind))
    lines += ["## Interpretability of every unit, by site kind", "",
              "Mean best_latent_share over every unit that varies on the held-out tokens (units counted), and "
              "the fraction of units scoring at least 0.5 (one latent explains most of the variance left after "
              "the position).", "",
              "| site kind | features: mean | features: >= 0.5 | neurons: mean | neurons: >= 0.5 |",
              "|---|---|---|---|---|"]
    for sk in site_kinds:
        f, n = table["features"].get(sk), table["neurons"].get(sk)
        cell = lambda c: (f"{fmt(c['mean'])} ({c['units']})", fmt(c["share>=0.5"])) if c else ("—", "—")  # noqa: E731
        lines.append(f"| {sk} | {' | '.join(cell(f))} | {' | '.join(cell(n))} |")
    lines += [""] + answers(results)
    lines += ["![faithfulness vs nodes](faithfulness_vs_nodes.png)", "",
              "![completeness vs nodes](completeness_vs_nodes.png)", "", f"Run time: {meta['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --- minicirc shift -------------------------------------------------------------------------------

ROWS = [("original", "original probe"), ("random", "random ablation (same sites and count; mean of {n} seeds)"),
        ("random_retrain", "random ablation + retrain (mean of {n} seeds)"), ("shift", "SHIFT (features)"),
        ("shift_retrain", "SHIFT + retrain (features)"),
        ("neurons_random", "random ablation of neurons (same sites and count; mean of {n} seeds)"),
        ("neurons_random_retrain", "random ablation of neurons + retrain (mean of {n} seeds)"),
        ("neurons_shift", "SHIFT over neurons"),
        ("neurons_shift_retrain", "SHIFT over neurons + retrain"), ("oracle", "oracle (trained on balanced data)")]
SHORT = {"original": "original", "random": "random", "random_retrain": "random\n+ retrain", "shift": "SHIFT",
         "shift_retrain": "SHIFT\n+ retrain", "neurons_random": "neurons\nrandom",
         "neurons_random_retrain": "neurons random\n+ retrain", "neurons_shift": "neurons\nSHIFT", "neurons_shift_retrain":
         "neurons SHIFT\n+ retrain", "oracle": "oracle"}


def plot_shift(results, path):
    """shift.png: the accuracies of every row (left) and worst-group accuracy after retraining against the
    number of candidates the judge sees (right)."""
    keys = [key for key, _ in ROWS]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.27
    for j, (metric, colour) in enumerate([("profession", "#1f77b4"), ("gender", "#d62728"),
                                          ("worst_group", "#2ca02c")]):
        vals = [100 * results["rows"][k][metric] for k in keys]
        ax.bar([i + (j - 1) * width for i in range(len(keys))], vals, width, color=colour,
               label=metric.replace("_", "-") + " accuracy")
    ax.axhline(50, color="grey", lw=0.6, ls="--")
    ax.set_xticks(range(len(keys)), [f"{SHORT[k]}\n({results['n_ablated'][k]} abl.)" for k in keys], fontsize=7.5)
    ax.set_ylabel("% on held-out balanced bios")
    ax.set_ylim(0, 119)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"SHIFT on the embedded default ({results['recipe']}): probe on resid_"
                 f"{results['settings']['probe_layer']}, {results['judge']} judge", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    for kind, style in (("features", "ko-"), ("neurons", "ms--")):
        pts = results[kind]["sweep"]
        x = [p["coverage"] for p in pts]
        ax2.plot(x, [100 * p["retrain"]["worst_group"] for p in pts], style, label=f"{kind}: SHIFT + retrain")
        ax2.plot(x, [100 * p["random_retrain"]["worst_group"] for p in pts], style, alpha=0.35,
                 label=f"{kind}: random + retrain")
    ax2.axhline(100 * results["rows"]["oracle"]["worst_group"], color="grey", lw=0.8, ls=":", label="oracle")
    ax2.axhline(100 * results["rows"]["original"]["worst_group"], color="black", lw=0.8, ls=":", label="original")
    if results["settings"].get("top_k") is None:
        ax2.axvline(results["settings"]["coverage"], color="grey", lw=0.5)
    ax2.set_xlabel("candidate rule: share of summed |effect| covered")
    ax2.set_ylabel("worst-group accuracy (%)")
    ax2.set_ylim(-3, 103)
    ax2.set_title("the rule's one parameter", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v):
    return f"{100 * v:.1f}"


def verdict_text(results):
    r = results["rows"]
    o, s, sr, rr = (r[k]["worst_group"] for k in ("original", "shift", "shift_retrain", "random_retrain"))
    n = results["n_ablated"]["shift"]
    if n == 0:
        return ("The judge marked none of the candidates as spurious, so SHIFT ablated nothing and its rows equal "
                "the original probe's.")
    if max(s, sr) > o + 0.05 and sr > rr + 0.05:
        text = (f"SHIFT raised worst-group accuracy from {_pct(o)}% to {_pct(sr)}% (ablation of {n} features, then "
                f"retraining), against {_pct(rr)}% for random ablation of as many features with retraining; by "
                f"ablation alone, without retraining, it {'rose to' if s > o + 0.05 else 'stayed at'} {_pct(s)}%.")
    else:
        text = (f"SHIFT did not clearly raise worst-group accuracy: {_pct(o)}% originally, {_pct(s)}% after "
                f"ablating {n} features, {_pct(sr)}% after retraining (random ablation + retraining: {_pct(rr)}%).")
    oracle = r["oracle"]["worst_group"]
    if oracle > 0:
        text += (f" After retraining that is {100 * sr / oracle:.0f}% of the oracle's worst-group accuracy "
                 f"({_pct(oracle)}%); the same rule over neurons reaches "
                 f"{_pct(r['neurons_shift_retrain']['worst_group'])}% "
                 f"({results['n_ablated']['neurons_shift']} neurons ablated; random neurons + retrain: "
                 f"{_pct(r['neurons_random_retrain']['worst_group'])}%).")
    sh = r["shift"]
    if abs(sh["profession"] - 0.5) < 0.03 and abs(sh["gender"] - 0.5) < 0.03:
        text += (f" Ablation alone leaves the original probe predicting nearly one class for every bio (its bias "
                 f"dominates once the gender directions it relied on are gone): threshold-free, its logit ranks "
                 f"profession with AUROC {sh['profession_auroc']:.2f} and gender with AUROC {sh['gender_auroc']:.2f}"
                 f" (original probe: {r['original']['profession_auroc']:.2f} and {r['original']['gender_auroc']:.2f}).")
    return text


def shift_report(results, out):
    cfg, r = results["settings"], results["rows"]
    n = cfg["random_seeds"]
    L = cfg["probe_layer"]
    lines = ["# SHIFT: concept disambiguation on the embedded default", "",
             f"Model: `{results['default']}` ({results['recipe']} recipe). Task: synthetic biographies "
             f"(`minicirc.experiments.tasks.bios`); intended concept **profession** (professor / nurse), spurious concept "
             f"**gender**. The probe is a logistic regression on resid_{L} mean-pooled over real tokens, trained "
             f"on {cfg['n_train']} ambiguous bios (male professors and female nurses only; train accuracy "
             f"{_pct(results['probe_train_accuracy'])}%). All accuracies are on {cfg['n_test']} held-out balanced "
             f"bios (all four groups equally often); gender accuracy = how often the prediction equals the gender "
             f"label; worst-group accuracy = the lowest profession accuracy over the four (profession, gender) "
             f"groups.", "",
             "| | profession acc. (%) | gender acc. (%) | worst-group acc. (%) | ablated |", "|---|---|---|---|---|"]
    for key, label in ROWS:
        v = r[key]
        lines.append(f"| {label.format(n=n)} | {_pct(v['profession'])} | {_pct(v['gender'])} | "
                     f"{_pct(v['worst_group'])} | {results['n_ablated'][key]} |")
    lines += ["", verdict_text(results), "", "![accuracies](shift.png)", "",
              f"**Candidates**: {rule_text(cfg)}", "",
              "The rule's one parameter: worst-group accuracy (%) for other shares (random = as many features "
              f"ablated at random at the same sites, then retrained, mean of {n} seeds):", "",
              "| share | feature candidates | features ablated | SHIFT | SHIFT + retrain | random + retrain | "
              "neuron candidates | neurons ablated | neurons SHIFT | neurons SHIFT + retrain | "
              "neurons random + retrain |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda p: (str(p["candidates"]), str(p["n_ablated"]), _pct(p["shift"]["worst_group"]),
                      _pct(p["retrain"]["worst_group"]), _pct(p["random_retrain"]["worst_group"])) \
        if p else ("—",) * 5
    fs, ns = results["features"]["sweep"], results["neurons"]["sweep"]
    for share in sorted({p["coverage"] for p in fs + ns}):
        f = next((p for p in fs if p["coverage"] == share), None)
        nn_ = next((p for p in ns if p["coverage"] == share), None)
        lines.append(f"| {share:g} | " + " | ".join(cell(f) + cell(nn_)) + " |")
    if fs:
        wg = [100 * p["retrain"]["worst_group"] for p in fs]
        rnd = [100 * p["random_retrain"]["worst_group"] for p in fs]
        lines += ["", f"Over these shares SHIFT + retrain (features) ranges from {min(wg):.1f}% to {max(wg):.1f}% "
                  f"worst-group accuracy, random + retrain from {min(rnd):.1f}% to {max(rnd):.1f}%."]
    lines += ["", "For comparison, a fixed number k of candidates (the strongest k by |effect|; the last row is every "
              "feature with a non-zero effect):", "",
              "| k | features ablated | SHIFT | SHIFT + retrain | random + retrain | neurons ablated | neurons SHIFT | "
              "neurons SHIFT + retrain | neurons random + retrain |", "|---|---|---|---|---|---|---|---|---|"]
    fs, ns = results["features"]["sweep_k"], results["neurons"]["sweep_k"]
    for k in sorted({p["candidates"] for p in fs + ns}):
        f = next((p for p in fs if p["candidates"] == k), None)
        nn_ = next((p for p in ns if p["candidates"] == k), None)
        lines.append(f"| {k} | " + " | ".join(cell(f)[1:] + cell(nn_)[1:]) + " |")
    lines += ["", "## Where the probe's evidence lives", "",
              "Per site, the summed |effect| of every SAE feature, of the candidates and of the ablated features, "
              "and the SAE error node's effect (the error is never ablated, so its share is out of SHIFT's reach):",
              "", "| site | features Σ\\|effect\\| | candidates (n) | ablated (n) | ablated share of the features | "
              "SAE error effect |", "|---|---|---|---|---|---|"]
    for site, v in results["features"]["sites"].items():
        share = v["ablated"] / v["features"] if v["features"] > 0 else float("nan")
        lines.append(f"| {site} | {v['features']:.3f} | {v['candidates']:.3f} ({v['n_candidates']}) | "
                     f"{v['ablated']:.3f} ({v['n_ablated']}) | {fmt(share)} | {v['error']:+.3f} |")
    if "concept_left" in results:
        before, after = results["concept_left"]["before"], results["concept_left"]["after"]
        lines += ["", "How readable each concept is at each site, before and after SHIFT's ablation: held-out "
                  "accuracy (%) of a linear probe fit on balanced bios (50 = not linearly readable) on the site's "
                  "mean-pooled value, on the part its SAE features carry, and on its SAE error (of the value that "
                  "arrives at the site, which the ablation keeps):", "",
                  "| site | gender: value | gender: features | gender: error | gender after: value | "
                  "gender after: features | gender after: error | profession after: value |",
                  "|---|---|---|---|---|---|---|---|"]
        for site in before:
            g0, g1 = before[site]["gender"], after[site]["gender"]
            lines.append(f"| {site} | {_pct(g0['value'])} | {_pct(g0['features'])} | {_pct(g0['error'])} | "
                         f"{_pct(g1['value'])} | {_pct(g1['features'])} | {_pct(g1['error'])} | "
                         f"{_pct(after[site]['profession']['value'])} |")
        top = list(before)[-1]
        g1 = after[top]["gender"]
        lines += ["", f"At {top}, the site the probe reads, gender after the ablation is readable at "
                  f"{_pct(g1['value'])}% from the value and {_pct(g1['error'])}% from the SAE error alone (before: "
                  f"{_pct(before[top]['gender']['value'])}%), profession at "
                  f"{_pct(after[top]['profession']['value'])}%. "
                  "The error is not a feature, so no candidate rule can ablate it: what is left of gender there is "
                  "out of SHIFT's reach. " + (
                      f"The retrained probe leaves it unused (its predictions match gender on "
                      f"{_pct(r['shift_retrain']['gender'])}% of the balanced bios): on the ambiguous training "
                      f"bios, profession now predicts the label better than what remains of gender."
                      if r["shift_retrain"]["gender"] < 0.6 else
                      f"The retrained probe still follows it (its predictions match gender on "
                      f"{_pct(r['shift_retrain']['gender'])}% of the balanced bios).")]
    lines += ["", "## How the features were chosen", "",
              f"Circuit: IG node effects ({cfg['steps']} steps, patch = None so the counterfactual is zero) of every "
              f"feature and SAE error at the sites {', '.join(_probe_site_names(L))} on {cfg['n_circuit']} ambiguous "
              f"training bios, summed over positions and averaged over bios; metric = the probe's wrong-class logit "
              f"(`z` for label 0, `-z` for label 1). A positive effect: zeroing the feature pushes the probe towards "
              f"the wrong class (the feature supports the probe's decision). Candidates: {rule_text(cfg)} "
              f"Ablation is zero ablation with the SAE error kept (the error is not a feature and cannot be "
              f"judged).", ""]
    folder = results["default"]
    how = (f"To judge yourself, read the contexts below or run `minicirc explain --model {folder}/model --saes "
           f"{folder}/saes --site SITE --feature I --data {os.path.join(out, 'bios_sample.txt')}`, then "
           f"`minicirc shift --ablate SITE/I,SITE/J,...`.")
    if results["judge"] == "user":
        lines += ["**Judge for the features: a person** (the `--ablate` list); the automatic judge's verdicts are "
                  "shown for reference, and the neurons and the sweep use the automatic judge.", ""]
    else:
        lines += [f"**Judge: automatic** (not a person). On {cfg['n_val']} labelled balanced validation bios, each "
                  f"candidate's activation is mean-pooled over a bio's tokens; its gender effect size (difference of "
                  f"the mean activation of female and male bios, averaged over professions, in within-group standard "
                  f"deviations) and its profession effect size are compared; it is judged spurious when the gender "
                  f"effect exceeds the profession effect by more than {cfg['margin']}. " + how, ""]
    for kind in ("features", "neurons"):
        res = results[kind]
        cand = res["candidates"]
        lines += [f"### {kind}: {res['n_ablated']} ablated of {len(cand)} candidates", ""]
        if kind == "features":
            lines += ["SAE error node effects (never ablated): " + ", ".join(
                f"{s} {e:+.3f}" for s, e in res["error_effects"].items()) + ".", ""]
        lines += ["| node | effect | gender d | profession d | spurious (auto) | ablated | top-context tokens |",
                  "|---|---|---|---|---|---|---|"]
        for v in cand:
            lines.append(f"| {v['site']}/{v['feature']} | {v['effect']:+.3f} | {v['gender_d']:.2f} | "
                         f"{v['profession_d']:.2f} | {'yes' if v['spurious'] else 'no'} | "
                         f"{'**yes**' if v['ablated'] else 'no'} | {v['top_tokens']} |")
        shown = [v for v in cand if v["ablated"]] + [v for v in cand if not v["ablated"]][:10]
        lines += ["", f"Top-activating contexts (held-out bios, `bios_sample.txt`; the token is marked [[like this]]) "
                  f"of every ablated {kind[:-1]} and of the 10 strongest kept candidates:", ""]
        for v in shown:
            lines.append(f"- **{v['site']}/{v['feature']}** ({'ablated' if v['ablated'] else 'kept'}; "
                         f"effect {v['effect']:+.3f}):")
            for c in v["contexts"]:
                lines.append(f"  - `{c['value']:.3f}` {c['text']}")
        lines.append("")
    lines += ["Circuits: `circuit_features/` and `circuit_neurons/` (circuit.json with the judge's fields on each "
              "candidate, circuit.png, circuit.html).", "", f"Run time: {results['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def rule_text(cfg):
    """The candidate rule the main rows used, in words."""
    if cfg.get("top_k") is not None:
        text = f"the top {cfg['top_k']} features by |effect| (`--top-k`)"
    else:
        text = (f"the fewest strongest features whose summed |effect| reaches {cfg['coverage']:g} of the summed "
                f"|effect| of all features (`--coverage`; features tied with the last one are included), the same "
                f"rule for SAE features and for neurons")
    if cfg.get("threshold"):
        text += f", keeping only those with |effect| above {cfg['threshold']:g}"
    return text + "."


def _probe_site_names(layer):
    return ["embed"] + [f"{k}_{l}" for l in range(layer + 1) for k in ("attn", "mlp", "resid")]
