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
    """v formatted by spec; "—" for None and NaN; a value that rounds to 0 without its sign ("0.00", not "-0.00")."""
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    out = format(v, spec)
    return out[1:] if out.startswith("-") and not any(c in "123456789" for c in out) else out


def level(p, target):
    """A count for a faithfulness level as the report writes it: "N (A active)", or "not reached (best F at
    N nodes)" where the nodes with an effect never reach it (compare.levels' record p)."""
    n = p[f"nodes_for_{target}"]
    if n is not None:
        return f"{n} ({p[f'active_for_{target}']} active)"
    best = p.get("best")
    return ("not reached (no node has an effect)" if best is None else
            f"not reached (best {fmt(best['faithfulness'])} at {best['n_nodes']} nodes)")


def protocol_of(results, t, kind, protocol):
    """A kind's record for one protocol on the held-out prompts, or (protocol "set:<role>") the positions
    protocol on an evaluation set (None where the set has no prompts or was skipped)."""
    if not protocol.startswith("set:"):
        return results[t][kind]["protocols"][protocol]
    role = protocol[4:]
    if role == "held_out" and role not in results[t].get("evaluation_sets", {}):
        return results[t][kind]["protocols"]["positions"]
    return results[t].get("evaluation_sets", {}).get(role, {}).get(kind)


def _compare(results, protocol, key, other="neurons"):
    """(templates where features need clearly fewer nodes for `key` than the `other` kind, clearly more,
    compared): clearly = at most 0.9 times the other kind's count; a kind that never reaches the target needs
    more than any that does; a template without the record (an empty evaluation set) is not compared."""
    inf = float("inf")
    ahead = behind = compared = 0
    for t in compared_templates(results):
        records = [protocol_of(results, t, kind, protocol) for kind in ("features", other)]
        if None in records:
            continue
        compared += 1
        f, n = (r[key] for r in records)
        f, n = (inf if f is None else f), (inf if n is None else n)
        ahead += f <= 0.9 * n and f < n
        behind += n <= 0.9 * f and n < f
    return ahead, behind, compared


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
            need = lambda kind: ", ".join(level(results[t][kind]["protocols"][protocol], 0.9)  # noqa: E731
                                          for t in templates)
            lines.append(f"- **Are feature circuits smaller at equal faithfulness** ({protocol}{against})? "
                         f"**{_verdict(a9, b9, n)}**: for 0.9 faithfulness features need clearly fewer nodes in {a9} "
                         f"of {n} templates and clearly more in {b9} (nodes, {'/'.join(templates)}: features "
                         f"{need('features')}; {other} {need(other)}); for 0.8, fewer in {a8} and more in {b8}; the "
                         f"larger area in {area} of {n}.")
        lines += set_answers(results, other, against)
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


SET_NAMES = {"in_sample": "in-sample (the discovery prompts)", "held_out": "held-out",
             "held_out_seen": "held-out, words seen in discovery", "held_out_unseen": "held-out, words never seen in "
             "discovery", "novel": "novel words (prompts with nouns and verbs the templates never use)"}


def set_name(role):
    return SET_NAMES.get(role, role.replace("_", " "))


def set_roles(results):
    """The evaluation sets in the report's order: the subject's, the held-out prompts after in-sample when the
    subject does not list them (nothing when it lists no set)."""
    roles = list(results["_meta"].get("evaluation_sets") or ())
    if roles and "held_out" not in roles:
        roles.insert(1 if roles[0] == "in_sample" else 0, "held_out")
    return roles


def set_answers(results, other, against):
    """The answer's lines per evaluation set (positions protocol): features smaller at 0.9, and whether the
    top-n circuit that reaches 0.9 on the held-out prompts keeps at least 0.8 on the set."""
    lines, templates = [], compared_templates(results)
    for role in set_roles(results):
        a9, b9, n = _compare(results, f"set:{role}", "nodes_for_0.9", other)
        if n == 0:
            lines.append(f"- {set_name(role)}{against}: no prompts in any template.")
            continue
        rec = {(t, k): protocol_of(results, t, k, f"set:{role}") for t in templates for k in ("features", other)}
        need = lambda kind: ", ".join("no prompts" if rec[t, kind] is None else level(rec[t, kind], 0.9)  # noqa: E731
                                      for t in templates)
        lines.append(f"- **Smaller at equal faithfulness on {set_name(role)}** (positions{against})? "
                     f"**{_verdict(a9, b9, n)}**: clearly fewer nodes for 0.9 in {a9} of {n} templates, clearly more "
                     f"in {b9} (features {need('features')}; {other} {need(other)}).")
        if role == "held_out":
            continue
        stay = []
        for kind in ("features", other):
            at = [rec[t, kind]["at_held_out_0.9"] for t in templates
                  if rec[t, kind] is not None and rec[t, kind].get("at_held_out_0.9")]
            if not at:
                continue
            kept = sum(a["faithfulness"] >= 0.8 for a in at)
            verdict = "yes" if kept == len(at) else "no" if kept == 0 else "mixed"
            values = ", ".join(f"{fmt(a['faithfulness'])} at {a['n_nodes']}" for a in at)
            stay.append(f"{kind} **{verdict}** ({values})")
        if stay:
            lines.append(f"- **Do the circuits that reach 0.9 on the held-out prompts stay faithful (>= 0.8) on "
                         f"{set_name(role)}?** " + "; ".join(stay) + ".")
    return lines


def set_table(results, t, kinds):
    """One template's evaluation sets: per set and kind, the positions protocol's counts."""
    rows = set_roles(results)
    if not rows:
        return []
    lines = ["Evaluation sets (positions protocol; the same circuits, found on the discovery prompts, measured on "
             "each set's prompts with mean ablation over that set; the counts are bisected to "
             f"{results['_meta'].get('set_precision', 0):.0%} of the nodes, the held-out ones to the node; \"held-out 0.9 circuit\": the top-n nodes that reach 0.9 on the held-out "
             "prompts):", "",
             "| set | prompts | kind | nodes for 0.8 | nodes for 0.9 | best faithfulness (nodes) | nodes with an effect "
             "active on the set | faithfulness of the held-out 0.9 circuit |", "|---|---|---|---|---|---|---|---|"]
    sets = results[t].get("evaluation_sets", {})
    for role in rows:
        if role == "held_out" and role not in sets:
            entry = {"prompts": results[t].get("held_out_prompts")}
        else:
            entry = sets.get(role, {"prompts": 0})
        if entry["prompts"] == 0 or "skipped" in entry:
            lines.append(f"| {set_name(role)} | {entry['prompts']} | | {entry.get('skipped', 'no prompts')} | | | | |")
            continue
        for kind in kinds:
            p = protocol_of(results, t, kind, f"set:{role}")
            best, at = p.get("best"), p.get("at_held_out_0.9")
            if role == "held_out" and at is None and p["nodes_for_0.9"] is not None:
                at = next({"n_nodes": q["n_nodes"], "faithfulness": q["faithfulness"]}
                          for q in p["curve"] + p["crossings"] if q["n_nodes"] == p["nodes_for_0.9"])
            lines.append(f"| {set_name(role)} | {'' if entry['prompts'] is None else entry['prompts']} | {kind} | "
                         f"{level(p, 0.8)} | {level(p, 0.9)} | "
                         f"{'—' if best is None else fmt(best['faithfulness']) + ' (' + str(best['n_nodes']) + ')'} | "
                         f"{p['active_with_effect']} of {p['with_effect']} | "
                         f"{'—' if not at else fmt(at['faithfulness']) + ' at ' + str(at['n_nodes'])} |")
    return lines + [""]


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def why_lines(results):
    """"Why features win or lose": for each template, what the numbers say about the features' counts (the
    nodes with an effect and how many are active on the held-out prompts, in-sample against held-out, words
    seen against never seen) and, where recorded, discovery's coverage of the test nouns and the SAEs' token
    specificity. Every sentence is computed from the results; none is written in advance."""
    meta, kinds = results["_meta"], kinds_of(results)
    if len(kinds) < 2:
        return []
    other = kinds[1]
    lines = ["## Why features win or lose", "",
             f"From the numbers above (positions protocol, features against {other}):", ""]
    coverage = meta.get("coverage") or {}
    for t in compared_templates(results):
        f, n = (results[t][k]["protocols"]["positions"] for k in ("features", other))
        share = lambda p: p["active_with_effect"] / p["with_effect"] if p["with_effect"] else float("nan")  # noqa: E731
        parts = [f"{f['with_effect']} of {f['all_nodes']} feature nodes have an effect on the discovery prompts "
                 f"({fmt(100 * share(f), '.0f')}% of them active on the held-out prompts), against {n['with_effect']} "
                 f"of {n['all_nodes']} {other} ({fmt(100 * share(n), '.0f')}%)"]
        r = ratio(f["nodes_for_0.9"], n["nodes_for_0.9"])
        parts.append(f"for 0.9 held-out, features {level(f, 0.9)} and {other} {level(n, 0.9)}" +
                     ("" if r is None else f": {r:.2f}x"))
        rec = lambda role, k: protocol_of(results, t, k, f"set:{role}")  # noqa: E731
        if rec("in_sample", "features") and rec("in_sample", other):
            r_in = ratio(rec("in_sample", "features")["nodes_for_0.9"], rec("in_sample", other)["nodes_for_0.9"])
            if r_in is not None and r is not None:
                grow = r / r_in
                parts.append(f"in-sample the ratio is {r_in:.2f}x, so leaving the discovery prompts multiplies it by "
                             f"{grow:.2f}")
            elif r_in is not None:
                parts.append(f"in-sample the ratio is {r_in:.2f}x")
        seen, unseen = rec("held_out_seen", "features"), rec("held_out_unseen", "features")
        if seen and unseen and seen.get("at_held_out_0.9") and unseen.get("at_held_out_0.9"):
            fs, fu = seen["at_held_out_0.9"]["faithfulness"], unseen["at_held_out_0.9"]["faithfulness"]
            ns, nu = (rec(role, other) for role in ("held_out_seen", "held_out_unseen"))
            gap = ("" if not (ns and nu and ns.get("at_held_out_0.9") and nu.get("at_held_out_0.9")) else
                   f"; {other} {fmt(ns['at_held_out_0.9']['faithfulness'])} and "
                   f"{fmt(nu['at_held_out_0.9']['faithfulness'])}")
            parts.append(f"the features' held-out 0.9 circuit keeps {fmt(fs)} on prompts whose words discovery saw "
                         f"and {fmt(fu)} on the others{gap}")
        cov = coverage.get(t)
        if cov:
            parts.append(f"discovery ({cov['discovery_prompts']} prompts) covers {cov['covered']} of the "
                         f"{cov['test_nouns']} nouns of the {cov['test_prompts']} test prompts")
        lines.append(f"- {t}: " + "; ".join(parts) + ".")
    spec = [v["token_specificity"] for v in ((meta.get("sae_stats") or {}).get("sites") or {}).values()
            if v.get("token_specificity")]
    if spec:
        mean = lambda k: sum(x[k] for x in spec) / len(spec)  # noqa: E731
        lines.append(f"- SAEs: over {len(spec)} sites, {fmt(100 * mean('narrow_share'), '.0f')}% of the live features "
                     f"fire on at most 2 nouns on average, carrying {fmt(100 * mean('narrow_activation_share'), '.0f')}% "
                     f"of the activation; {fmt(mean('number_features'), '.1f')} features and "
                     f"{fmt(mean('number_neurons'), '.1f')} neurons per site track the subject's number."
                     + (" Most live features are then narrow: a feature inactive on every discovery prompt has effect "
                        "0 there (its change between clean and patch is 0), so the features of nouns discovery "
                        "never uses cannot enter a circuit." if mean("narrow_share") > 0.5 else ""))
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
    return lines + coverage_lines(meta.get("coverage")) + specificity_lines(st, sites) + recipe_lines(
        st.get("recipes_tried"))


def coverage_lines(coverage):
    """How much of the test prompts' words discovery saw, per template (nothing when not recorded)."""
    if not coverage:
        return []
    lines = ["", "Discovery's coverage of the test nouns:", "",
             "| template | discovery prompts | test prompts | nouns of the test prompts | of them in discovery |",
             "|---|---|---|---|---|"]
    for t, c in coverage.items():
        lines.append(f"| {t} | {c['discovery_prompts']} | {c['test_prompts']} | {c['test_nouns']} | {c['covered']} |")
    return lines


def specificity_lines(st, sites):
    """Token specificity per SAE site (nothing when not recorded): live features, the share of them firing on
    at most 2 nouns and the share of the activation they carry, and the features and neurons that track the
    subject's number."""
    rows = [(s, st["sites"][s]["token_specificity"]) for s in sites if st["sites"][s].get("token_specificity")]
    if not rows:
        return []
    lines = ["", "Token specificity (features firing on at most 2 nouns are narrow; number: units tracking the "
             "subject's number):", "",
             "| site | live features | narrow share | their share of the activation | number features | number neurons |",
             "|---|---|---|---|---|---|"]
    for s, v in rows:
        lines.append(f"| {s} | {v['live']} | {100 * v['narrow_share']:.0f}% | {100 * v['narrow_activation_share']:.0f}% "
                     f"| {v['number_features']} | {v['number_neurons']} |")
    return lines


def cell(v):
    return format(v, ".3f") if isinstance(v, float) else str(v)


def recipe_lines(recipes):
    """The SAE recipes tried, each with its settings and per-site numbers (nothing when not recorded): a
    recipe is a dict with "name", "settings" and its numbers, per site under a dict of sites."""
    if not recipes:
        return []
    lines = ["", "SAE recipes tried:"]
    for r in recipes:
        settings = ", ".join(f"{k} {cell(v)}" for k, v in (r.get("settings") or {}).items())
        numbers = {k: v for k, v in r.items() if k not in ("name", "settings") and not isinstance(v, (dict, list))}
        per_site = next((v for k, v in r.items() if k != "settings" and isinstance(v, dict)
                         and v and all(isinstance(x, dict) for x in v.values())), {})
        lines += ["", f"- **{r.get('name', '?')}**" + (f" ({settings})" if settings else "") +
                  ("" if not numbers else ": " + ", ".join(f"{k} {cell(v)}" for k, v in numbers.items()))]
        keys = list(dict.fromkeys(k for v in per_site.values() for k, x in v.items()
                                  if isinstance(x, (int, float)) and not isinstance(x, bool)))
        if per_site and keys:
            lines += ["", "  | site | " + " | ".join(keys) + " |", "  |---" + "|---" * len(keys) + "|"]
            lines += [f"  | {site} | " + " | ".join(cell(v.get(k, "")) for k in keys) + " |"
                      for site, v in per_site.items()]
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
    cols = [(p, k) for p in ("positions", "summed", "all sites") for k in kinds if "thresholds" in r[k]["protocols"][p]]
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
    kinds = kinds_of(results)
    scored = meta.get("unit_scores") is not None
    lines = [f"# minicirc {'compare' if kind == 'files' else 'demo'}: feature circuits vs neuron circuits", ""]
    lines += HEADERS[kind](meta)
    lines += ["", f"Circuits: IG ({cfg['steps']} steps) on {cfg['n_discovery']} discovery examples (train split); "
              f"faithfulness and completeness by mean ablation on {cfg['n_eval']} held-out examples.", "",
              "A circuit is the nodes whose |effect| on the discovery examples passes a threshold, as the "
              "original's: a node with effect 0 never enters one (it would only come in by a tie, in site and "
              "position order). Three evaluation protocols, each measured on the top-n nodes by |effect| among "
              f"those with an effect, for n on a log grid ({cfg['grid_points']} sizes from 1 to every node with an "
              "effect at the evaluated sites), and on the original's sweep (the nodes whose |effect| exceeds each "
              f"of {len(meta['thresholds'])} thresholds from {meta['thresholds'][0]:.0e} to "
              f"{meta['thresholds'][-1]:.0e}; on the positions protocol, or on every protocol where the settings "
              "name thresholds). The nodes needed for 0.8 and 0.9 are bisected to the node between "
              "the grid's sizes; where every node with an effect does not reach the level, the report says \"not "
              "reached\" with the best faithfulness and its node count. Beside each count, how many of those nodes "
              "are active on the held-out prompts: a feature whose activation is non-zero on at least one of them, "
              "clean or patch (at its position when positions are kept, at any position when summed), an error "
              "node whose error is non-zero (a neuron basis's error is exactly 0).", "",
              f"- **positions** (the original's): nodes-only circuits with positions kept (aggregation none), "
              f"only the sites of layers {L}..{n_layers - 1}; embed and lower layers are neither counted nor "
              f"ablated. The original evaluates Pythia-70M from layer 2 of 6; here round(2/6 x {n_layers}) = "
              f"{L} (`--first-layer`).",
              "- **summed**: the same sites, node effects summed over positions.",
              "- **all sites**: every site with a dictionary (from embed up on the default), summed.", "",
              "Area: mean faithfulness over log(nodes) from 1 to the smaller kind's count of nodes with an effect (the trapezoid area "
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
                  "| protocol | kind | nodes for 0.8 | nodes for 0.9 | nodes with an effect (active) of all | "
                  "area (1..n) | removed for completeness <= 0.2 " + ("| interpretability (top-k) |" if scored else "|"),
                  "|---|---|---|---|---|---|---" + "|---" * scored + "|"]
        for protocol in ("positions", "summed", "all sites"):
            for kind in kinds:
                p = r[kind]["protocols"][protocol]
                lines.append(f"| {protocol} | {kind} | {level(p, 0.8)} | {level(p, 0.9)} | "
                             f"{p['with_effect']} ({p['active_with_effect']}) of {p['all_nodes']} | "
                             f"{fmt(p['area'])} ({p['cap']}) | {fmt(p['nodes_to_break'], 'd')} |"
                             + (f" {fmt(p['interpretability_top_k'])} |" if scored else ""))
        lines += [""] + set_table(results, t, kinds)
        if "thresholds" in r[kinds[0]]["protocols"]["positions"]:
            lines += threshold_lines(r, kinds)[:-1]
        lines += ["", f"Saved circuits (all sites, node threshold {cfg['node_threshold']}, edge threshold "
                  f"{cfg['edge_threshold']}):", "",
                  "| | nodes | edges | faithfulness | completeness |", "|---|---|---|---|---|"]
        for kind in kinds:
            k = r[kind]
            lines.append(f"| {kind} | {k['nodes']} | {k['edges']} | {fmt(k['faithfulness'])} | {fmt(k['completeness'])} |")
        if "description" in r:
            lines += ["", r["description"]]
        lines += ["", f"Pictures: {', '.join(f'`{t}/{k}/circuit.png`' for k in kinds)} (and `circuit.html`).", ""]
    lines += unit_score_lines(meta["unit_scores"]) if scored else []
    lines += why_lines(results)
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
