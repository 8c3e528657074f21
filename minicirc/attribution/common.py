"""What the definitions (reference.py) and the fast path (states, nodes, edges, find) share: the methods,
the metric, the dictionary sites in model order, the clean and patch site values, the weights out of
autograd, and the site pairs that carry edges (docs/method.md §4-6)."""
import os
from contextlib import contextmanager

import torch

from ..errors import MinicircError
from ..model.sites import site_kind, site_layer
from ..sae.clt import is_clt

METHODS = ("attrib", "ig", "exact")


def logit_diff(model, batch, tokens, edit):
    """m = logit(patch_answer) - logit(clean_answer) at each example's last real token: (rows,).

    Only the two answer logits are computed (the unembedding of a 50k vocabulary at every position would
    dominate the cost of every forward pass)."""
    cache = {}
    last_site = model.sites[-1]
    model(tokens, edit=edit, cache=cache, stop_at=last_site)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return model.logit_diff(cache[last_site][rows, batch.last], batch.patch_answer, batch.clean_answer)


def site_order(model, saes):
    """The sites that have a dictionary, in model order (optional sites z_l and resid_mid_l included); a
    transcoder anywhere but at an MLP output is refused, and a cross-layer transcoder without all of its layers, each at
    the MLP output of its own (its features write to every later layer, and each error node completes the
    writes of all earlier layers)."""
    model.check_sites(list(saes))
    for s, sae in saes.items():
        if getattr(sae, "reads", None) and site_kind(s) != "mlp":
            raise MinicircError(f"{sae.source or 'dictionary'}: a transcoder maps an MLP's input to its output, "
                                f"so it sits at mlp_l, not at {s}")
    clts = [(s, sae) for s, sae in saes.items() if is_clt(sae)]
    for s, sae in clts:
        if s != f"mlp_{sae.layer}":
            raise MinicircError(f"{sae.source}: layer {sae.layer} of a cross-layer transcoder sits at mlp_{sae.layer}, "
                                f"not at {s}")
    if clts and sorted(sae.layer for _, sae in clts) != list(range(clts[0][1].n_layers)):
        raise MinicircError(f"{clts[0][1].source}: a cross-layer transcoder of {clts[0][1].n_layers} layers takes "
                            f"part with all of them or none (given: {', '.join(sorted(s for s, _ in clts))})")
    return [s for s in model.all_sites if s in saes]


def transcoder_inputs(model, saes, sites):
    """{site: (source site, fn)} for the transcoders among `sites` (sites without a dictionary are none): the
    input u = fn(value of the source site) is the MLP's input of the transcoder's layer (SiteModel.mlp_input)."""
    return {s: model.mlp_input(site_layer(s), saes[s].reads) for s in sites if getattr(saes.get(s), "reads", None)}


def with_sources(model, saes, sites):
    """`sites` plus the source sites of their transcoders' inputs, in model order: what to record so that
    `inputs_from` can compute every u."""
    need = set(sites) | {src for src, _ in transcoder_inputs(model, saes, sites).values()}
    return [s for s in model.all_sites if s in need]


def inputs_from(model, saes, sites, values):
    """{site: u} for the transcoders among `sites`, from recorded values {site: value} that hold their sources
    ({} when there is no transcoder)."""
    return {s: fn(values[src]) for s, (src, fn) in transcoder_inputs(model, saes, sites).items()}


def recording_inputs(model, saes, sites, edit, inputs):
    """`edit` with the source site of each transcoder among `sites` also recording u into `inputs`
    ({site: u}, filled as the forward pass goes): the value that flows downstream of the source (after its
    own edit, if any) is the MLP's input, and the source comes before the transcoder's site, so an edit at the
    transcoder's site finds its u there. Returns a new dict; `edit` is not changed."""
    out = dict(edit)
    for s, (src, fn) in transcoder_inputs(model, saes, sites).items():
        def record(x, s=s, fn=fn, before=out.get(src)):
            x = x if before is None else before(x)
            inputs[s] = fn(x)
            return x
        out[src] = record
    return out


def record_sites(model, metric, batch, tokens, sites):
    """Run the unmodified model once; return (metric, {site: value})."""
    cache = {}
    def keep(s):
        def fn(x):
            cache[s] = x
            return x
        return fn
    with torch.no_grad():
        m = metric(model, batch, tokens, {s: keep(s) for s in sites})
    missing = [s for s in sites if s not in cache]
    if missing:
        raise MinicircError(f"the metric never computed sites {missing}: drop their dictionaries")
    return m, cache


def clean_and_patch_sites(model, metric, batch, sites, saes=None):
    """(m_clean, {site: clean value}, m_patch or None, {site: patch value} or None), clean values checked.
    With `saes`, the source sites of the transcoders' inputs (with_sources) are recorded too."""
    rec = sites if saes is None else with_sources(model, saes, sites)
    m_c, clean = record_sites(model, metric, batch, batch.clean, rec)
    m_p, patch = (record_sites(model, metric, batch, batch.patch, rec) if batch.patch is not None else (None, None))
    for s in sites:
        if not torch.isfinite(clean[s]).all():
            raise MinicircError(f"site {s} holds NaN or inf on the clean input")
    return m_c, clean, m_p, patch


def frozen_edit(sae, site, inputs):
    """A frozen site's edit (edges, docs/method.md §6): its value with no gradient; for a transcoder with a skip
    term, its nodes held and skip(u) left to follow u (inputs[site], recorded in the same run by
    recording_inputs): value x, gradient that of skip(u), a linear path and not a node."""
    if not (getattr(sae, "reads", None) and sae.has_skip):
        return lambda x: x.detach()

    def fn(x):
        k = sae.skip(inputs[site])
        return x.detach() + (k - k.detach())
    return fn


@contextmanager
def frozen_weights(model):
    """The model's weights out of autograd for the duration (restored after). Every gradient here is taken
    with respect to site values; weights that require grad make each forward save activations for weight
    gradients nobody asks for (IG peak memory 40% lower on a 4-layer d_model 256 model; at the scale of the
    original's Pythia-70m dictionaries their states dominate and it changes little)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def edge_pairs(model, sites):
    """(upstream, downstream, frozen sites) for the sites that carry dictionaries (docs/method.md §6).

    Over the model's site graph (SiteModel.site_graph), (U, D) is a pair when some path leads from U to D
    with no dictionary site inside it: a site without a dictionary is part of the computation between its
    neighbours, whatever it is. The edge counts those paths only, so the dictionary sites that other U -> D
    paths cross are frozen; it is enough to freeze the last one before D on each, i.e. the dictionary sites
    W that U reaches and that pair with D themselves. Sites without a dictionary are never frozen.
    With dictionaries at every standard site this is the per-layer table of §6 (mlp_l -> resid_l,
    attn_l -> resid_l with mlp_l frozen, ...); with dictionaries at resid sites only it is
    resid_{l-1} -> resid_l through the whole layer, or resid_1 -> resid_3 through two.
    Order: by upstream site, then downstream site, in model order; frozen sites in model order."""
    graph = model.site_graph()
    order = model.all_sites
    have = set(sites)
    model.check_sites(sites)
    # reach[s]: every site downstream of s; near[s]: the dictionary sites s reaches with none inside the path.
    reach, near = {}, {}
    for s in reversed(order):
        reach[s] = set()
        near[s] = set()
        for t in graph[s]:
            reach[s] |= {t} | reach[t]
            near[s] |= {t} if t in have else near[t]
    pairs = []
    for u in (s for s in order if s in have):
        for d in sorted(near[u], key=order.index):
            frozen = tuple(w for w in order if w in have and w in reach[u] and d in near[w])
            pairs.append((u, d, frozen))
    return pairs


def later_targets(sae):
    """The sites a cross-layer transcoder's layer-l features write to after their own: mlp_{l+1} .. mlp_{L-1}
    (none for any other dictionary)."""
    return [f"mlp_{t}" for t in range(sae.layer + 1, sae.n_layers)] if is_clt(sae) else []


def clt_edit(sae, site, splice, shift):
    """The edit moving a site's nodes: `splice` (x -> new value) at `site`, and for a cross-layer transcoder
    x -> x + shift(t) at every later target t (what its layer's moved features write there); shift(t) None
    is added to t's value."""
    edit = {site: splice}
    for t in later_targets(sae):
        edit[t] = lambda x, t=t: x + shift(t)
    return edit


def clt_edge_error(saes):
    """Why edges are refused with a cross-layer transcoder (None without one)."""
    clt = next((sae for sae in saes.values() if is_clt(sae)), None)
    if clt is None:
        return None
    return (f"{os.path.dirname(clt.source) or clt.source}: edges between cross-layer transcoder features are not "
            "defined in minicirc (a feature writes to every later MLP output, so one edge would cross sites that "
            "§6 freezes); compute nodes only (--nodes-only, nodes_only=True)")


def clean_and_patch_states(model, metric, batch, sites, saes):
    """clean_and_patch_sites plus what each transcoder reads on either run (inputs_from):
    (m_clean, clean, m_patch, patch, u_clean, u_patch); patch and m_patch are None, u_patch {}, without patch
    inputs."""
    m_c, clean, m_p, patch = clean_and_patch_sites(model, metric, batch, sites, saes)
    u_c = inputs_from(model, saes, sites, clean)
    u_p = inputs_from(model, saes, sites, patch) if patch is not None else {}
    return m_c, clean, m_p, patch, u_c, u_p
