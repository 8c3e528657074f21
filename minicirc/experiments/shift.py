"""Concept disambiguation (SHIFT, docs/method.md §9), the method: find what a classifier really uses, remove
the spurious concept's features, retrain, and measure worst-group accuracy. Here are the probe, its circuit,
the candidate rule, the judge, ablation and retraining; shift_run.py runs them on the embedded default
(`minicirc shift`) and shift_report.py writes its report.

    model, saes, tokenizer, stats, folder = minicirc.experiments.default.get_default("full")
    train = bios_batch(ambiguous_split(400), tokenizer)            # profession == gender
    probe = train_probe(model, train, layer=1)                      # linear probe on mean-pooled resid_1
    circuit = probe_circuit(model, saes, probe, train[:200])        # metric: the probe's wrong-class logit
    feats = coverage_candidates(top_features(circuit, k=10**9), 0.9)  # [(site, feature, effect)]
    verdicts = judge(model, saes, val, feats)                       # automatic: gender vs profession effect
    ablation = {s: [f ...]}                                         # the features judged spurious
    evaluate(model, probe.with_ablation(saes, ablation), test)      # zero ablation, SAE error kept
    evaluate(model, train_probe(model, train, 1, saes=saes, ablation=ablation), test)   # + retrain

Choices (the design leaves them open):
- Labels: class 1 = nurse (profession 1) = female (gender 1) on the ambiguous split. The probe is a logistic
  regression `z = w . mean_t resid_L[t] + b` over the real (unpadded) tokens, class 1 when z > 0, fit exactly
  (Newton's method) with a small L2 penalty, so a run is deterministic and fast.
- Metric for the circuit: the wrong-class logit, `-z` for examples labelled 1 and `z` for those labelled 0
  (label = the training label, profession, which equals gender on the ambiguous split), with patch = None,
  so each node's effect estimates how much setting it to zero moves the probe towards the wrong class.
- Ablation (zero, as docs/method.md §9 says): at each involved site in forward order, `f = encode(x)`, the chosen
  features set to 0 and `x' = decode(f') + (x - decode(f))`, i.e. the SAE error is kept and
  `x' = x - sum_i f_i W_dec[i]` over the ablated features i; each site re-encodes its current (already
  edited upstream) value. With Identity dictionaries (neurons) the chosen coordinates become exactly 0.
- Candidates (`coverage_candidates`): the fewest strongest features whose summed |effect| reaches a stated
  share (`coverage`, default 0.9) of the summed |effect| of all features, ties at the boundary all included.
  The rule has no scale of its own: it reads the effects as a distribution, so the same share means the same
  thing for SAE features and for neurons, and for another model. A fixed top k does not: on the first
  embedded default (default-v1) the top 100 covered 63% of the features' summed |effect| but 70% of the
  neurons', and SHIFT + retrain swung from 30% to 91% worst-group accuracy between k = 100 and k = 300.
  `top_k` (the strongest k) stays as an explicit alternative; `threshold` then drops candidates with
  |effect| at or below it. Error nodes are not
  candidates: they cannot be judged or ablated without removing everything the dictionary misses.
- Judge (automatic; the paper used people): on a labelled balanced validation split, each candidate's
  activation is mean-pooled over a bio's real tokens; its gender effect size (difference of the female and
  male means, averaged over professions, in within-group standard deviations) and its profession effect size
  are compared; spurious when gender effect > profession effect + margin. `minicirc explain` shows the same
  top-activating contexts so that a person can judge instead (`minicirc shift --ablate site/feature,...`).
- A header (pretrained models, tasks/english_bios.py): every bio starts with the same few tokens, and the
  positions before `start` are left out of pooling, ablation and attribution (`header_kept`); a real model
  writes a vector of very large norm at the first position that its SAEs never saw. `start` = 0 on the
  embedded default, where nothing changes.
- Evaluation on the held-out balanced split: profession accuracy, gender accuracy (how often the prediction
  equals the gender label) and worst-group accuracy (the lowest profession accuracy over the four
  (profession, gender) groups).
"""
from dataclasses import dataclass, field

import torch

from ..attribution.find import find_circuit
from ..data import Batch, pad_right
from ..errors import MinicircError
from ..explain import marked_text, tokenize_texts
from ..metrics import auroc
from ..sae.sparse import error_of, features_at

CONCEPT, SPURIOUS = "profession", "gender"


# --- bios as batches ------------------------------------------------------------------------------

def bios_batch(bios, tokenizer, label=CONCEPT):
    """Biographies -> Batch (right-padded tokens, no patch). `clean_answer` holds the class label the probe
    is trained on (profession by default); `examples` the Bio records (profession and gender)."""
    if not bios:
        raise MinicircError("no biographies given")
    rows = []
    for b in bios:
        ids = tokenizer.encode(b.text, add_special_tokens=False).ids
        if not ids:
            raise MinicircError(f"biography {b.text!r} has no tokens")
        rows.append(ids)
    ids = lambda values: torch.tensor(values, dtype=torch.long, device="cpu")   # moved by Batch.to(device)
    return Batch(pad_right(rows), None, ids([getattr(b, label) for b in bios]), None,
                 ids([len(r) - 1 for r in rows]), list(bios))


def labels(batch, name):
    """(n,) long tensor of a Bio field ("profession" or "gender") for the batch's examples."""
    return torch.tensor([getattr(b, name) for b in batch.examples], dtype=torch.long, device=batch.clean.device)


def mean_over_tokens(x, last, start=0):
    """x (n, pos, ...) averaged over each example's real tokens, positions start..last (right padding and
    a header before `start` left out)."""
    pos = torch.arange(x.shape[1], device=x.device)[None]
    m = ((pos <= last[:, None]) & (pos >= start)).to(torch.float32)
    return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)


def header_kept(fn, start):
    """The edit `fn` with positions before `start` (a header, the same in every bio) left as they arrived:
    x -> fn(x) at positions >= start, x before. A real model's first position holds a vector of very large
    norm that its SAEs never saw (tasks/english_bios.py); zeroing features there would wreck every later
    position, and the IG path through it would credit the header with effects no bio differs in."""
    if not start:
        return fn
    return lambda x: torch.cat([x[:, :start], fn(x)[:, start:]], 1)


# --- ablation -------------------------------------------------------------------------------------

def ablate_site(sae, x, features):
    """x with `features` of `sae` zeroed and the SAE error kept: decode(f') + (x - decode(f)), f = encode(x),
    f' = f with f'[..., features] = 0. Returns x' (same shape as x)."""
    if len(features) == 0:
        return x
    idx = torch.as_tensor(list(features), dtype=torch.long, device=x.device)
    if sae.kind == "identity":
        return x.index_fill(-1, idx, 0.0)
    # decode(f') + x - decode(f) = x - f[..., idx] @ W_dec[idx]: only the ablated features' share moves.
    return x - features_at(sae, x, idx) @ sae.W_dec.index_select(0, idx)


def ablation_edit(saes, ablation, start=0):
    """{site: fn} for model(..., edit=...): zero-ablate ablation[site] (feature ids) at every listed site, at
    positions from `start` on (header_kept)."""
    edit = {}
    for site, feats in (ablation or {}).items():
        if not feats:
            continue
        if site not in saes:
            raise MinicircError(f"ablation names site {site!r}, which has no dictionary")
        n = saes[site].n_features
        bad = [f for f in feats if not (isinstance(f, int) and 0 <= f < n)]
        if bad:
            raise MinicircError(f"ablation at {site}: feature {bad[0]!r} is out of range (0..{n - 1})")
        chosen = sorted(set(feats))
        edit[site] = header_kept(lambda x, sae=saes[site], fs=chosen: ablate_site(sae, x, fs), start)
    return edit


def compose(first, second):
    """Two edit dicts as one: at a site in both, `second` sees what `first` returned."""
    out = dict(first or {})
    for s, fn in (second or {}).items():
        out[s] = (lambda x, a=out[s], b=fn: b(a(x))) if s in out else fn
    return out


def count(ablation):
    return sum(len(v) for v in (ablation or {}).values())


def parse_ablation(text, saes, sites):
    """"resid_1/37,embed/5" -> {site: [feature]} (checked against the dictionaries and the probe's sites)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        site, _, feat = item.partition("/")
        if site not in sites:
            raise MinicircError(f"--ablate {item!r}: site {site!r} is not one of the probe's sites ({', '.join(sites)})")
        try:
            f = int(feat)
        except ValueError:
            raise MinicircError(f"--ablate {item!r}: expected SITE/FEATURE, e.g. resid_1/37") from None
        if not 0 <= f < saes[site].n_features:
            raise MinicircError(f"--ablate {item!r}: feature {f} is out of range (0..{saes[site].n_features - 1})")
        out.setdefault(site, [])
        if f not in out[site]:
            out[site].append(f)
    if not out:
        raise MinicircError("--ablate: no features given")
    return out


# --- the probe ------------------------------------------------------------------------------------

def probe_site(layer):
    return f"resid_{layer}"


def probe_sites(model, layer):
    """The sites up to and including the probe's: embed, attn_l, mlp_l, resid_l for l <= layer."""
    if not 0 <= layer < model.cfg.n_layers:
        raise MinicircError(f"probe layer {layer} is out of range (the model has layers 0..{model.cfg.n_layers - 1})")
    return model.sites[:model.sites.index(probe_site(layer)) + 1]


def pooled(model, tokens, last, layer, edit=None, start=0):
    """Mean of resid_layer over each example's real tokens from `start`: (n, d_model). Differentiable."""
    cache = {}
    site = probe_site(layer)
    model(tokens, edit=edit, cache=cache, stop_at=site)
    return mean_over_tokens(cache[site], last, start)


@torch.no_grad()
def pooled_batched(model, batch, layer, edit=None, batch_size=256, start=0):
    return torch.cat([pooled(model, b.clean, b.last, layer, edit, start)
                      for b in (batch[i:i + batch_size] for i in range(0, len(batch), batch_size))])


def fit_logistic(X, y, l2=1e-3, iters=100, tol=1e-10):
    """Logistic regression by Newton's method with backtracking: minimises
    mean(BCE(X w + b, y)) + l2 |w|^2. Deterministic; exact to `tol`. Returns (w (d,), b ())."""
    X64, y64 = X.detach().double(), y.detach().double()
    n, d = X64.shape
    A = torch.cat([X64, torch.ones(n, 1, dtype=X64.dtype, device=X64.device)], 1)
    theta = torch.zeros(d + 1, dtype=X64.dtype, device=X64.device)
    reg = torch.full((d + 1,), 2 * l2, dtype=X64.dtype, device=X64.device)
    reg[-1] = 0.0   # the bias is not penalised

    def loss(t):
        z = A @ t
        return torch.nn.functional.softplus(z).mean() - (y64 * z).mean() + l2 * (t[:-1] ** 2).sum()

    cur = loss(theta)
    for _ in range(iters):
        z = A @ theta
        p = torch.sigmoid(z)
        grad = A.T @ (p - y64) / n + reg * theta
        H = (A.T * (p * (1 - p))) @ A / n + torch.diag(reg) + 1e-10 * torch.eye(d + 1, dtype=A.dtype, device=A.device)
        step = torch.linalg.solve(H, grad)
        t = 1.0
        while True:
            new = theta - t * step
            val = loss(new)
            if val <= cur - 1e-4 * t * (grad @ step) or t < 1e-8:
                break
            t /= 2
        theta, done = new, (cur - val).abs() < tol
        cur = val
        if done:
            break
    return theta[:-1].to(X.dtype), theta[-1].to(X.dtype)


@dataclass
class Probe:
    """A linear probe on mean-pooled resid_{layer}, optionally run with features zero-ablated upstream.
    `start`: the first position pooled, ablated and attributed (positions before it are a header the same in
    every bio; 0 on the embedded default)."""
    layer: int
    weight: torch.Tensor                      # (d_model,)
    bias: torch.Tensor                        # ()
    saes: dict = None                         # the dictionaries `ablation` refers to
    ablation: dict = field(default_factory=dict)   # {site: [feature]}
    start: int = 0

    def edit(self):
        return ablation_edit(self.saes, self.ablation, self.start) if self.ablation else {}

    def with_ablation(self, saes, ablation):
        """The same weights, run with `ablation` in place (no retraining)."""
        return Probe(self.layer, self.weight, self.bias, saes, {s: list(v) for s, v in ablation.items() if v},
                     self.start)

    def logits(self, model, batch, edit=None, batch_size=256):
        """(n,) probe logits; `edit` (e.g. attribution's) runs after the probe's own ablation at a site."""
        X = pooled_batched(model, batch, self.layer, compose(self.edit(), edit), batch_size, self.start)
        return X @ self.weight + self.bias


def train_probe(model, batch, layer, y=None, saes=None, ablation=None, l2=1e-3, start=0):
    """Fit a probe on `batch` (labels `y`, default batch.clean_answer) with `ablation` in place."""
    probe = Probe(layer, None, None, saes, {s: list(v) for s, v in (ablation or {}).items() if v}, start)
    X = pooled_batched(model, batch, layer, probe.edit(), start=start)
    probe.weight, probe.bias = fit_logistic(X, batch.clean_answer if y is None else y, l2=l2)
    return probe


@torch.no_grad()
def evaluate(model, probe, batch):
    """Accuracies of the probe's predictions on labelled bios: see `score`."""
    return score(probe.logits(model, batch), batch)


def score(z, batch):
    """Accuracies of logits z (n,) (class 1 when z > 0) on labelled bios: profession, gender (how often the
    prediction equals the gender label), worst group (the lowest profession accuracy over the (profession,
    gender) groups present), per group, and threshold-free AUROCs of z for profession and for gender."""
    pred = (z > 0).long()
    prof, gen = labels(batch, CONCEPT).to(z.device), labels(batch, SPURIOUS).to(z.device)
    groups = {}
    for p in (0, 1):
        for g in (0, 1):
            sel = (prof == p) & (gen == g)
            if sel.any():
                groups[f"{p}{g}"] = (pred[sel] == p).float().mean().item()
    return {"profession": (pred == prof).float().mean().item(), "gender": (pred == gen).float().mean().item(),
            "worst_group": min(groups.values()), "groups": groups,
            "profession_auroc": auroc(z, prof), "gender_auroc": auroc(z, gen)}


@torch.no_grad()
def ablate_and_retrain(model, probe, dicts, ablation, train, test, l2=1e-3):
    """(the probe run with `ablation`, a probe retrained on `train` with `ablation` in place (the result of
    train_probe), their scores on `test`): one forward pass over each split."""
    abl = {s: list(v) for s, v in ablation.items() if v}
    edit = ablation_edit(dicts, abl, probe.start)
    X_test = pooled_batched(model, test, probe.layer, edit, start=probe.start)
    w, b = fit_logistic(pooled_batched(model, train, probe.layer, edit, start=probe.start), train.clean_answer, l2=l2)
    retrained = Probe(probe.layer, w, b, dicts, abl, probe.start)
    return score(X_test @ probe.weight + probe.bias, test), score(X_test @ w + b, test), retrained


# --- the probe's circuit and the candidates -------------------------------------------------------

def probe_metric(probe):
    """metric(model, batch, tokens, edit) -> (rows,): the probe's logit for the wrong class, `z` where the
    label (batch.clean_answer) is 0 and `-z` where it is 1. Positions before probe.start are left as they
    arrive at every site (header_kept), whatever the edit: no node there has an effect."""
    def metric(model, batch, tokens, edit):
        edits = {s: header_kept(fn, probe.start) for s, fn in compose(probe.edit(), edit).items()}
        X = pooled(model, tokens, batch.last, probe.layer, edits, probe.start)
        z = X @ probe.weight + probe.bias
        return z * (1 - 2 * batch.clean_answer.to(z.dtype))
    return metric


def probe_circuit(model, saes, probe, batch, steps=10, top_k=30, batch_size=100, progress=True):
    """IG node effects of every feature and error node at the sites up to the probe (patch = None: zero
    ablation as the counterfactual), summed over positions and averaged over examples; over the sites with a
    dictionary in `saes` (a real model's SAEs sit at every second residual stream)."""
    sites = probe_sites(model, probe.layer)
    dicts = {s: saes[s] for s in sites if s in saes}
    return find_circuit(model, dicts, batch, method="ig", steps=steps, node_threshold=0.0, aggregation="sum",
                        nodes_only=True, batch_size=batch_size, metric=probe_metric(probe), top_k_nodes=top_k,
                        progress=progress)


def top_features(circuit, k=30, threshold=0.0):
    """[(site, feature, effect)]: the k feature nodes (error nodes excluded) with the largest |effect| above
    `threshold`, largest first (ties in site order, then feature order)."""
    rows = [(n.site, n.column, n.effect) for n in circuit.all_nodes() if not n.error and abs(n.effect) > threshold]
    order = sorted(range(len(rows)), key=lambda j: -abs(rows[j][2]))
    return [rows[j] for j in order[:k]]


def coverage_candidates(ranked, share):
    """The candidate rule: of `ranked` [(site, feature, effect, ...)], every feature whose |effect| is at least
    t, for the largest t at which those features' summed |effect| reaches `share` of the summed |effect| of
    all of them. That is the shortest run of strongest features covering the share, plus any feature tied
    with the last one (so the choice never depends on the order of equal effects). Kept in `ranked`'s order."""
    if not 0 < share <= 1:
        raise MinicircError(f"coverage must be in (0, 1], got {share}")
    mags = sorted((abs(r[2]) for r in ranked), reverse=True)
    total = sum(mags)
    if not total > 0:   # also catches NaN effects
        raise MinicircError("every candidate feature has a zero effect on the probe: there is nothing to select "
                            "(is the probe constant, or were no examples given?)")
    need, reached = share * total, 0.0
    for t in mags:
        reached += t
        if reached >= need:
            break
    return [r for r in ranked if abs(r[2]) >= t]


def select_candidates(ranked, coverage=0.9, top_k=None, threshold=0.0):
    """Candidates for the judge from `ranked` (strongest first): the coverage rule, or the top k when `top_k`
    is given; then only those with |effect| > threshold."""
    chosen = ranked[:top_k] if top_k is not None else coverage_candidates(ranked, coverage)
    return [r for r in chosen if abs(r[2]) > threshold]


def as_ablation(features, sites):
    """[(site, feature, ...)] -> {site: [feature]} in site order."""
    out = {}
    for f in features:
        out.setdefault(f[0], []).append(f[1])
    return {s: sorted(out[s]) for s in sites if s in out}


def random_ablation(saes, like, seed):
    """As many features as `like` at each of its sites, drawn uniformly from the site's dictionary."""
    g = torch.Generator(device="cpu").manual_seed(seed)   # drawn on the CPU: the same features on every device
    return {s: sorted(torch.randperm(saes[s].n_features, generator=g, device="cpu")[:len(v)].tolist())
            for s, v in like.items()}


# --- the judge ------------------------------------------------------------------------------------

@torch.no_grad()
def pooled_features(model, saes, batch, features, batch_size=256, start=0):
    """(n, len(features)): each (site, feature, ...)'s activation mean-pooled over a bio's real tokens from
    `start`, from unedited forward passes (one per batch of bios for all features)."""
    if not features:
        return torch.zeros(len(batch), 0, device=batch.clean.device)
    by_site = {}
    for j, (site, feat, *_) in enumerate(features):
        by_site.setdefault(site, ([], []))
        by_site[site][0].append(j)
        by_site[site][1].append(feat)
    last_site = max(by_site, key=model.sites.index)
    order = torch.tensor([j for cols, _ in by_site.values() for j in cols], device=batch.clean.device).argsort()
    out = []
    for i in range(0, len(batch), batch_size):
        b = batch[i:i + batch_size]
        cache = {}
        model(b.clean, cache=cache, stop_at=last_site)
        parts = [mean_over_tokens(features_at(saes[site], cache[site], feats), b.last, start)
                 for site, (_, feats) in by_site.items()]
        # Site by site, then back to the order asked for; cat keeps the dictionaries' dtype (float64 stays).
        out.append(torch.cat(parts, 1)[:, order])
    return torch.cat(out)


def effect_sizes(X, profession, gender):
    """Two-way effect sizes of (n, k) activations over bios from all four (profession, gender) groups:
    (|gender effect|, |profession effect|), each the difference of the group means averaged over the other
    factor, divided by the within-group standard deviation (pooled over the four groups)."""
    mu, var = {}, []
    for p in (0, 1):
        for g in (0, 1):
            sel = (profession == p) & (gender == g)
            if sel.sum() < 2:
                raise MinicircError("the judge needs at least two labelled bios in each (profession, gender) group")
            mu[p, g] = X[sel].mean(0)
            var.append(X[sel].var(0))
    sd = (sum(var) / 4).sqrt()
    g_eff = ((mu[0, 1] + mu[1, 1] - mu[0, 0] - mu[1, 0]) / 2).abs()
    p_eff = ((mu[1, 0] + mu[1, 1] - mu[0, 0] - mu[0, 1]) / 2).abs()
    # A feature constant on every bio has no effect either way (0 / 0 -> 0).
    safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    return torch.where(sd > 0, g_eff / safe, 0 * sd), torch.where(sd > 0, p_eff / safe, 0 * sd)


def judge(model, saes, batch, features, margin=0.2, start=0):
    """Automatic judge over labelled balanced bios: for each (site, feature, effect) the effect sizes of its
    mean-pooled activation for gender and for profession (in within-group standard deviations, see
    effect_sizes); spurious when gender effect > profession effect + margin. One dict per feature.

    Effect sizes rather than AUROC: a feature for one first name is perfectly gendered but active in an
    eighth of the bios of its gender, so its AUROC for gender is near 0.5; its effect size is not."""
    X = pooled_features(model, saes, batch, features, start=start)
    g, p = effect_sizes(X, labels(batch, CONCEPT).to(X.device), labels(batch, SPURIOUS).to(X.device))
    g, p = g.tolist(), p.tolist()
    return [{"site": f[0], "feature": f[1], "effect": f[2] if len(f) > 2 else None,
             "gender_d": g[j], "profession_d": p[j], "spurious": bool(g[j] > p[j] + margin)}
            for j, f in enumerate(features)]


# --- where a concept lives -----------------------------------------------------------------------

@torch.no_grad()
def pooled_parts(model, saes, batch, sites, edit=None, batch_size=256, start=0):
    """{site: {"value", "features", "error"}: (n, d_model)}, each mean-pooled over a bio's real tokens: the
    site's value that flowed downstream (after `edit`), its SAE error e = x - decode(encode(x)) of the value x
    that arrived there (before the site's own edit: the error an ablation keeps), and the rest, value - e
    (what the features carry; decode(encode(x)) when nothing is edited)."""
    edit = edit or {}
    out = {s: {"value": [], "features": [], "error": []} for s in sites}
    last_site = max(sites, key=model.sites.index)
    for i in range(0, len(batch), batch_size):
        b = batch[i:i + batch_size]
        arrived, cache = {}, {}
        record = {s: (lambda x, s=s, fn=edit.get(s): (arrived.__setitem__(s, x), fn(x) if fn else x)[1])
                  for s in sites}
        model(b.clean, edit=record, cache=cache, stop_at=last_site)
        for s in sites:
            x = arrived[s]
            err = error_of(saes[s], x)
            for part, v in (("value", cache[s]), ("features", cache[s] - err), ("error", err)):
                out[s][part].append(mean_over_tokens(v, b.last, start))
    return {s: {part: torch.cat(v) for part, v in parts.items()} for s, parts in out.items()}


def concept_left(model, saes, train, test, sites, ablation=None, l2=1e-3, start=0):
    """Where each concept lives, per site: the held-out accuracy of a linear probe for gender and one for
    profession (fit on the balanced `train` bios, scored on `test`) on the site's mean-pooled value, on the
    part its features carry and on its SAE error (pooled_parts), with `ablation` in place. 0.5 = not
    linearly readable.
    {site: {concept: {part: accuracy}}}."""
    edit = ablation_edit(saes, ablation, start) if ablation else {}
    X_train = pooled_parts(model, saes, train, sites, edit, start=start)
    X_test = pooled_parts(model, saes, test, sites, edit, start=start)
    out = {}
    for s in sites:
        out[s] = {}
        for concept in (SPURIOUS, CONCEPT):
            y, y_test = labels(train, concept), labels(test, concept)
            out[s][concept] = {}
            for part in ("value", "features", "error"):
                w, b = fit_logistic(X_train[s][part], y, l2=l2)
                pred = ((X_test[s][part] @ w + b) > 0).long()
                out[s][concept][part] = (pred == y_test).float().mean().item()
    return out


# --- top contexts from a position on ---------------------------------------------------------------

@torch.no_grad()
def top_positions(model, saes, tokenizer, texts, features, k=5, start=0, batch_size=64):
    """(sample, {(site, feature): [(text index, position, value)]}): the k highest activations of each
    (site, feature, ...) over the positions from `start` of every text (ties: earlier text, then earlier
    position), sample = explain.tokenize_texts(texts). explain's scan reads every position: on a real
    model the header's first position, whose very large vector the SAEs never saw, would fill every list."""
    sample = tokenize_texts(texts, tokenizer, model)
    by_site = {}
    for site, feat, *_ in features:
        if feat not in by_site.setdefault(site, []):
            by_site[site].append(feat)
    if not by_site:
        return sample, {}
    device = next(model.parameters()).device
    last_site = max(by_site, key=model.sites.index)
    found = {(s, f): [] for s, fs in by_site.items() for f in fs}
    for i in range(0, len(sample), batch_size):
        rows = [ids for ids, _ in sample[i:i + batch_size]]
        T = max(map(len, rows))
        pos = torch.arange(T, device=device)
        real = (pos[None] < torch.tensor([len(r) for r in rows], device=device)[:, None]) & (pos[None] >= start)
        cache = {}
        model(pad_right(rows, 0, device), cache=cache, stop_at=last_site)
        for s, fs in by_site.items():
            acts = features_at(saes[s], cache[s], torch.tensor(fs, device=device))      # (n, T, m)
            acts = acts.masked_fill(~real[..., None], float("-inf")).flatten(0, 1)     # rows: (text, position)
            vals, idx = torch.sort(acts, dim=0, descending=True, stable=True)
            for j, f in enumerate(fs):
                found[s, f] += [(i + r // T, r % T, v) for v, r in zip(vals[:k, j].tolist(), idx[:k, j].tolist())
                                if v > float("-inf")]
    return sample, {key: sorted(c, key=lambda c: (-c[2], c[0], c[1]))[:k] for key, c in found.items()}


def start_contexts(model, saes, tokenizer, texts, features, k=5, start=0):
    """explain.feature_contexts' {(site, feature): [{"text", "token", "value"}]} from top_positions: the
    positions before `start` left out."""
    sample, found = top_positions(model, saes, tokenizer, texts, features, k, start)
    return {key: [{"text": marked_text(sample[t][1], p), "token": sample[t][1][p].strip(), "value": v}
                  for t, p, v in rows] for key, rows in found.items()}
