"""The report and plots of `minicirc demo` and `minicirc compare` (compare.py): report.md,
faithfulness_vs_nodes.png and completeness_vs_nodes.png. They only format and draw the results compare.py
computed: no number in the report is computed here. The kinds compared are results["_meta"]["kinds"]
(features first, then each neuron basis); the interpretability columns appear only where the prompts had
ground-truth latents (unit scores)."""
import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402

from ..model.sites import site_layer  # noqa: E402
from .tasks import agreement  # noqa: E402

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


def _compare(results, protocol, key, other="neurons"):
    """(templates where features need clearly fewer nodes for `key` than the `other` kind, clearly more,
    compared): clearly = at most 0.9 times the other kind's count; a kind that never reaches the target needs
    more than any that does."""
    inf = float("inf")
    ahead = behind = 0
    templates = compared_templates(results)
    for t in templates:
        f, n = (results[t][kind]["protocols"][protocol][key] for kind in ("features", other))
        f, n = (inf if f is None else f), (inf if n is None else n)
        ahead += f <= 0.9 * n and f < n
        behind += n <= 0.9 * f and n < f
    return ahead, behind, len(templates)


def kinds_of(results):
    """The kinds compared: features, then each neuron basis (results before kinds were recorded: neurons)."""
    return results["_meta"].get("kinds", ["features", "neurons"])


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
    others = kinds_of(results)[1:]
    for other in others:
        against = "" if len(others) == 1 else f", against {other}"
        for protocol in ("positions", "summed", "all sites"):
            a9, b9, n = _compare(results, protocol, "nodes_for_0.9", other)
            a8, b8, _ = _compare(results, protocol, "nodes_for_0.8", other)
            area = sum(results[t]["features"]["protocols"][protocol]["area"]
                       > results[t][other]["protocols"][protocol]["area"] for t in templates)
            need = lambda kind: ", ".join(fmt(results[t][kind]["protocols"][protocol]["nodes_for_0.9"], "d")  # noqa: E731
                                          for t in templates)
            lines.append(f"- **Are feature circuits smaller at equal faithfulness** ({protocol}{against})? "
                         f"**{_verdict(a9, b9, n)}**: for 0.9 faithfulness features need clearly fewer nodes in {a9} "
                         f"of {n} templates and clearly more in {b9} (nodes, {'/'.join(templates)}: features "
                         f"{need('features')}; {other} {need(other)}); for 0.8, fewer in {a8} and more in {b8}; the "
                         f"larger area in {area} of {n}.")
    table = results["_meta"].get("unit_scores")
    if table is None:           # no ground-truth latents: nothing to say about interpretability
        return lines + [""]
    n = len(templates)
    top = lambda t, kind: results[t][kind]["protocols"]["summed"]["interpretability_top_k"]  # noqa: E731
    ahead = sum(top(t, "features") > top(t, "neurons") for t in templates)
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


def files_header(meta):
    """`minicirc compare`: the model, the dictionaries and the data read, and the pairs the filter set aside
    (task_files.py)."""
    c, dicts = meta["config"], meta["dictionaries"]
    widths = sorted(set(dicts.values()))
    lines = [f"Model: `{meta['model']}`: {c['n_layers']} layers, d_model {c['d_model']}, vocab {c['vocab_size']}.", "",
             f"Dictionaries: `{meta['saes']}`: {len(dicts)} sites ({site_list(list(dicts))}), "
             f"{'/'.join(map(str, widths))} features.", "",
             f"Data: `{meta['data']}`: each template's `_train.json` (discovery) and `_test.json` (held out), "
             "shuffled as the original (seed 12). Pairs set aside: clean and patch prefixes of different token "
             "lengths, answers that are not one token, and prompts of another length than the template's most "
             "common one (positions are kept, so a template's prompts share one length).", "",
             "| template | file | pairs | prefix lengths differ | answer not one token | other prompt length "
             "| kept | used | prompt length | agreement accuracy (used test pairs, clean and patch) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t, n in meta["pairs"].items():
        for split in ("train", "test"):
            v = n[split]
            acc = f"{100 * meta['accuracy'][t]:.1f}%" if split == "test" else ""
            lines.append(f"| {t} | {split} | {v['pairs']} | {v['prefix lengths differ']} | {v['answer not one token']} "
                         f"| {v['other prompt length']} | {v['kept']} | {v['used']} | {n['length']} | {acc} |")
    return lines


HEADERS = {"default": default_header, "real": real_lm_header, "files": files_header}


def threshold_lines(r, kinds):
    """The original's sweep: per node threshold, the nodes above it and their faithfulness, per protocol and
    kind."""
    cols = [(p, k) for p in ("positions", "summed", "all sites") for k in kinds]
    rows = {k: r[k]["protocols"] for k in kinds}
    lines = ["Node-threshold sweep (the original's: the nodes whose |effect| exceeds the threshold; nodes: "
             "faithfulness):", "",
             "| threshold | " + " | ".join(f"{p}: {k}" for p, k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, point in enumerate(rows[kinds[0]]["positions"]["thresholds"]):
        cells = [rows[k][p]["thresholds"][i] for p, k in cols]
        lines.append(f"| {point['threshold']:.3g} | " + " | ".join(f"{c['n_nodes']}: {fmt(c['faithfulness'])}"
                                                                    for c in cells) + " |")
    return lines + [""]


def demo_report(results, cfg):
    meta = results["_meta"]
    L, n_layers = meta["first_layer"], meta["n_layers"]
    kind = meta.get("kind", "default")
    real = kind == "real"
    kinds = kinds_of(results)
    scored = meta.get("unit_scores") is not None
    lines = [f"# minicirc {'compare' if kind == 'files' else 'demo'}: feature circuits vs neuron circuits", ""]
    lines += HEADERS[kind](meta)
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
              "sizes) whose ablation, everything else kept, leaves at most 0.2 of the behaviour." + (
                  " Interpretability: metrics.best_latent_share, the share of a "
                  "unit's variance over every token of held-out sentences (all templates pooled) that the best "
                  "single latent of the grammar explains, within positions (0 = only noise or the position, 1/2 = "
                  "an even mixture of two latents, 1 = one latent); the mean over the top "
                  f"{cfg['top_k']} units by |effect| of each circuit." if scored else
                  " No interpretability score: the prompts carry no ground-truth latents."), ""]
    for t in compared_templates(results):
        r = results[t]
        lines += [f"## {t}", "", f"Model accuracy on held-out `{t}`: {100 * meta['accuracy'][t]:.1f}%; "
                  f"full-model faithfulness {fmt(meta['full_model_faithfulness'][t], '.3f')}.", "",
                  "| protocol | kind | nodes for 0.8 | nodes for 0.9 | area (1..n) | removed for completeness <= 0.2 "
                  + ("| interpretability (top-k) |" if scored else "|"), "|---|---|---|---|---|---" + "|---" * scored + "|"]
        for protocol in ("positions", "summed", "all sites"):
            for kind in kinds:
                p = r[kind]["protocols"][protocol]
                lines.append(f"| {protocol} | {kind} | {fmt(p['nodes_for_0.8'], 'd')} | {fmt(p['nodes_for_0.9'], 'd')} | "
                             f"{fmt(p['area'])} ({p['cap']}) | {fmt(p['nodes_to_break'], 'd')} |"
                             + (f" {fmt(p['interpretability_top_k'])} |" if scored else ""))
        if "thresholds" in r[kinds[0]]["protocols"]["positions"]:
            lines += [""] + threshold_lines(r, kinds)[:-1]
        lines += ["", f"Saved circuits (all sites, node threshold {cfg['node_threshold']}, edge threshold "
                  f"{cfg['edge_threshold']}):", "",
                  "| | nodes | edges | faithfulness | completeness |", "|---|---|---|---|---|"]
        for kind in kinds:
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
        lines += ["", f"Pictures: {', '.join(f'`{t}/{k}/circuit.png`' for k in kinds)} (and `circuit.html`).", ""]
    lines += unit_score_lines(meta["unit_scores"]) if scored else []
    lines += answers(results)
    lines += ["![faithfulness vs nodes](faithfulness_vs_nodes.png)", "",
              "![completeness vs nodes](completeness_vs_nodes.png)", "", f"Run time: {meta['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def unit_score_lines(table):
    """Interpretability of every unit, by site kind (unit scores exist only where prompts carry latents)."""
    site_kinds = list(dict.fromkeys(sk for kind in table.values() for sk in kind))
    lines = ["## Interpretability of every unit, by site kind", "",
              "Mean best_latent_share over every unit that varies on the held-out tokens (units counted), and "
              "the fraction of units scoring at least 0.5 (one latent explains most of the variance left after "
              "the position).", "",
              "| site kind | features: mean | features: >= 0.5 | neurons: mean | neurons: >= 0.5 |",
              "|---|---|---|---|---|"]
    for sk in site_kinds:
        f, n = table["features"].get(sk), table["neurons"].get(sk)
        cell = lambda c: (f"{fmt(c['mean'])} ({c['units']})", fmt(c["share>=0.5"])) if c else ("—", "—")  # noqa: E731
        lines.append(f"| {sk} | {' | '.join(cell(f))} | {' | '.join(cell(n))} |")
    return lines + [""]
