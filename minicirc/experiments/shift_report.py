"""The report and plot of `minicirc shift` (shift_run.py): shift_report.md, candidates.md and shift.png. They
only format and draw the results shift_run.py computed: no number in the report is computed here."""
import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402

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
# Rows of each per-feature list shift_report.md shows (the strongest by |effect|); candidates.md has them all.
SHOWN = 40


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
    ax.set_title(f"SHIFT on {subject_name(results)} ({results['recipe']}): probe on resid_"
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


def subject_name(results):
    sub = results.get("subject") or {}
    return sub["title"] if sub.get("kind") == "real" else "the embedded default"


def subject_text(results):
    """Which model and bios, in words."""
    sub = results.get("subject") or {}
    if sub.get("kind") != "real":
        return (f"Model: `{results['default']}` ({results['recipe']} recipe). Task: synthetic biographies "
                f"(`minicirc.experiments.tasks.bios`)")
    return (f"Model: {sub['title']} (`{sub['path']}`), with top-k SAEs minicirc trained on it ({results['recipe']} "
            f"recipe: {sub['sae_settings']['expansion']} x d_model latents, k {sub['sae_settings']['k']}, on agreement "
            f"sentences and English bios; cache `{results['default']}`). Task: the synthetic biographies in English "
            f"(`minicirc.experiments.tasks.english_bios`, e.g. \"{sub['header']} Mary lives in the city. She works at "
            f"the hospital. She likes her garden.\"; the header's {sub['start']} positions, the same in every bio, "
            f"are left out of pooling, ablation and attribution)")


def shift_report(results, out):
    cfg, r = results["settings"], results["rows"]
    n = cfg["random_seeds"]
    L = cfg["probe_layer"]
    lines = [f"# SHIFT: concept disambiguation on {subject_name(results)}", "",
             f"{subject_text(results)}; intended concept **profession** (professor / nurse), spurious concept "
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
              f"ablated at random at the same sites, then retrained, mean of {cfg.get('sweep_seeds') or n} seeds):", "",
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
    lines += dictionary_lines(results)
    lines += ["", "## Where the probe's evidence lives", "",
              "Per site, the summed |effect| of every SAE feature, of the candidates and of the ablated features, "
              "and the SAE error node's effect (the error is never ablated, so its share is out of SHIFT's reach):",
              "", "| site | features Σ\\|effect\\| | candidates (n) | ablated (n) | ablated share of the features | "
              "SAE error effect |", "|---|---|---|---|---|---|"]
    for site, v in results["features"]["sites"].items():
        share = f"{v['ablated'] / v['features']:.2f}" if v["features"] > 0 else "—"
        lines.append(f"| {site} | {v['features']:.3f} | {v['candidates']:.3f} ({v['n_candidates']}) | "
                     f"{v['ablated']:.3f} ({v['n_ablated']}) | {share} | {v['error']:+.3f} |")
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
              f"feature and SAE error at the sites {', '.join(results['features']['sites'])} on {cfg['n_circuit']} ambiguous "
              f"training bios, summed over positions and averaged over bios; metric = the probe's wrong-class logit "
              f"(`z` for label 0, `-z` for label 1). A positive effect: zeroing the feature pushes the probe towards "
              f"the wrong class (the feature supports the probe's decision). Candidates: {rule_text(cfg)} "
              f"Ablation is zero ablation with the SAE error kept (the error is not a feature and cannot be "
              f"judged).", ""]
    folder, sub = results["default"], results.get("subject") or {}
    where = f"--model {sub['path']}" if sub.get("kind") == "real" else f"--model {folder}/model"
    how = (f"To judge yourself, read the contexts below or run `minicirc explain {where} --saes "
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
    lines += level_lines(results, cfg, SHOWN)
    lines += candidate_lines(results, SHOWN)
    lines += ["Circuits: `circuit_features/` and `circuit_neurons/` (circuit.json with the judge's fields on each "
              "candidate, circuit.png, circuit.html).", "", run_time(results)]
    return "\n".join(lines) + "\n"


def candidates_report(results):
    """candidates.md: every candidate of both kinds with its verdict, and the contexts of every ablated one
    (shift_report.md shows the strongest SHOWN of each list)."""
    lines = [f"# SHIFT's candidates on {subject_name(results)}", "",
             "Every candidate of the run whose report is shift_report.md, in order of |effect|.", ""]
    return "\n".join(lines + level_lines(results, results["settings"]) + candidate_lines(results)) + "\n"


def _head(rows, limit):
    return rows if limit is None else rows[:limit]


def _more(rows, limit, what):
    """The line saying how many rows a capped list leaves to candidates.md ([] when none)."""
    left = len(rows) - len(_head(rows, limit))
    return [f"({left} more {what} in [candidates.md](candidates.md), which the run writes beside this report.)",
            ""] if left else []


def candidate_lines(results, limit=None):
    """Per kind: the candidates (at most `limit` rows) and the top contexts of the ablated ones (at most
    `limit`) and of the 10 strongest kept ones."""
    lines = []
    for kind in ("features", "neurons"):
        res = results[kind]
        cand = res["candidates"]
        lines += [f"### {kind}: {res['n_ablated']} ablated of {len(cand)} candidates", ""]
        if kind == "features":
            lines += ["SAE error node effects (never ablated): " + ", ".join(
                f"{s} {e:+.3f}" for s, e in res["error_effects"].items()) + ".", ""]
        lines += ["| node | effect | gender d | profession d | spurious (auto) | ablated | top-context tokens |",
                  "|---|---|---|---|---|---|---|"]
        for v in _head(cand, limit):
            lines.append(f"| {v['site']}/{v['feature']} | {v['effect']:+.3f} | {v['gender_d']:.2f} | "
                         f"{v['profession_d']:.2f} | {'yes' if v['spurious'] else 'no'} | "
                         f"{'**yes**' if v['ablated'] else 'no'} | {v['top_tokens']} |")
        lines += [""] + _more(cand, limit, "candidates")
        gone = [v for v in cand if v["ablated"]]
        shown = _head(gone, limit) + [v for v in cand if not v["ablated"]][:10]
        which = (f"every ablated {kind[:-1]}" if limit is None or len(gone) <= limit
                 else f"the {limit} strongest ablated {kind}")
        lines += [f"Top-activating contexts (held-out bios, `bios_sample.txt`; the token is marked [[like this]]) "
                  f"of {which} and of the 10 strongest kept candidates:", ""]
        for v in shown:
            lines.append(f"- **{v['site']}/{v['feature']}** ({'ablated' if v['ablated'] else 'kept'}; "
                         f"effect {v['effect']:+.3f}):")
            for c in v["contexts"]:
                lines.append(f"  - `{c['value']:.3f}` {c['text']}")
        lines += [""] + _more(gone, limit, f"ablated {kind}' contexts")
    return lines


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


def dictionary_lines(results):
    """A real model's SAEs: variance explained and L0 per site on held-out bio tokens (and on held-out
    agreement sentences), and whether the gender words are one token each."""
    sub = results.get("subject") or {}
    if sub.get("kind") != "real" or not sub.get("bio_sites"):
        return []
    lines = ["", "## The dictionaries on biography text", "",
             f"Per site, on {sub['n_held_out_bio_tokens']} tokens of held-out English bios (test split, header left "
             "out) and on the held-out agreement sentences the SAEs were also trained for:", "",
             "| site | variance explained, bios | L0, bios | variance explained, sentences | L0, sentences |",
             "|---|---|---|---|---|"]
    for site, v in sub["bio_sites"].items():
        w = sub["sae_sites"].get(site, {})
        lines.append(f"| {site} | {v['variance_explained']:.3f} | {v['l0']:.1f} | "
                     f"{w.get('variance_explained', float('nan')):.3f} | {w.get('l0', float('nan')):.1f} |")
    several = [w for w, c in sub["token_counts"].items() if c != 1]
    lines += ["", "Gender words (names, pronouns, as bios write them): " + (
        "every one is one token in this tokenizer." if not several else
        f"{len(sub['token_counts']) - len(several)} of {len(sub['token_counts'])} are one token; several tokens: "
        + ", ".join(several) + ".")]
    return lines


def level_lines(results, cfg, limit=None):
    """Which ablated features are token-level (most top contexts at a name or pronoun) and which
    phrase-level, with their share of the ablated |effect| (the table: at most `limit` rows)."""
    ablated = [v for v in results["features"]["candidates"] if v["ablated"]]
    if not ablated or "level" not in ablated[0]:
        return []
    tok = [v for v in ablated if v["level"] == "token"]
    total = sum(abs(v["effect"]) for v in ablated) or 1.0
    lines = ["### Token-level or phrase-level", "",
             f"Of the {len(ablated)} ablated features, {len(tok)} are token-level (at least "
             f"{cfg.get('token_share', 0.8):.0%} of their top contexts with a positive activation sit on a first name or "
             f"a pronoun: they detect the word, not the bio's gender as such), carrying "
             f"{sum(abs(v['effect']) for v in tok) / total:.0%} of the ablated features' summed |effect|; "
             f"{len(ablated) - len(tok)} are phrase-level (they fire elsewhere in the bio).", "",
             "| feature | level | share at names / pronouns | effect | gender d | profession d | top-context tokens |",
             "|---|---|---|---|---|---|---|"]
    for v in _head(ablated, limit):
        lines.append(f"| {v['site']}/{v['feature']} | {v['level']} | {v['gender_token_share']:.2f} | "
                     f"{v['effect']:+.3f} | {v['gender_d']:.2f} | {v['profession_d']:.2f} | {v['top_tokens']} |")
    return lines + [""] + _more(ablated, limit, "ablated features")


def run_time(results):
    sub, t, c = results.get("subject") or {}, results["seconds"], results.get("compute_seconds")
    text = f"Run time: {t:.0f} s"
    if sub.get("kind") == "real" and c is not None:
        text += (f" (loading the model and SAEs {sub['load_seconds']:.0f} s, training them where they were not cached; "
                 f"SHIFT's own computation {c:.0f} s" + (", its results read from the cache this time"
                                                          if results.get("from_cache") else "") + ")")
    return text + "."
