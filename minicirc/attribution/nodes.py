"""Node effects, batched and sparse: the numbers of reference.py's attrib_effects, ig_effects and
exact_effects, fast.

- Site gradients: dm/dx in one backward for every site (attrib), all IG steps of a site in one batch (ig);
  node effects (dm/dx @ W_dec.T) * delta_f by ops.feature_attribution directly on the clean and patch rows
  (states.SparseSiteState), and dm/derr = dm/dx. Per-example node effects stay rows too (SiteEffects).
- Exact patching: `group` patched nodes per forward, by tiling the examples.
"""
import torch
from tqdm.auto import tqdm

from .. import ops
from ..errors import MinicircError
from ..model.sites import site_layer
from ..rows import dense_to_rows, row_ids, rows_from_entries, rows_to_dense, slice_rows
from ..sae.clt import is_clt
from .common import METHODS, clt_edit, frozen_weights, later_targets, site_order
from .memory import release_freed_memory
from .states import NodeEffects, SiteEffects, example_slice, sparse_site_states, tile


def attrib_site_gradients(model, metric, batch, sites):
    """dm/dx at every site on the clean input, in one backward pass (sum over examples)."""
    vals = {}
    def keep(s, first):
        def fn(x):
            if first:  # a leaf, so every later site is part of the graph
                x = x.detach().requires_grad_(True)
            vals[s] = x
            return x
        return fn
    with torch.enable_grad():
        m = metric(model, batch, batch.clean, {s: keep(s, i == 0) for i, s in enumerate(sites)})
        grads = (torch.autograd.grad(m.sum(), [vals[s] for s in sites], allow_unused=True) if m.requires_grad
                 else [None] * len(sites))
    return {s: (g if g is not None else torch.zeros_like(vals[s])).detach() for s, g in zip(sites, grads)}


# Tokens per IG forward pass: a site's steps (and, past that, the batch's examples) run in groups of at most
# this many tokens, since the activations kept for the backward pass grow with it (a Pythia-70M-shaped model,
# the issue-14 workload: the run's RSS during IG 3.81 GiB at 1024 tokens, 3.57 GiB at 512, for 17% more
# time; BENCHMARKS.md, issue 14). A batch of more tokens is split by examples.
IG_TOKENS = 512


def ig_groups(B, T, steps):
    """(example lo, example hi, step lo, step hi) groups of at most IG_TOKENS tokens each (at least one
    example at one step): all of a group's examples at all of its steps run in one forward pass."""
    per_ex = max(1, min(B, IG_TOKENS // max(T, 1)))          # examples in one step of a group
    per_step = max(1, IG_TOKENS // max(per_ex * T, 1)) if per_ex == B else 1
    return [(e0, min(B, e0 + per_ex), k0, min(steps, k0 + per_step))
            for e0 in range(0, B, per_ex) for k0 in range(0, steps, per_step)]


class Resumed:
    """The model as a metric sees it, every forward pass resumed at site `start` from the clean values
    below it (model.forward_from) instead of recomputed from the embedding. Valid for metrics that run the
    model on the tokens they are given (all of minicirc's)."""

    def __init__(self, model, start, clean):
        self.model, self.start, self.clean = model, start, clean

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, edit=None, cache=None, stop_at=None):
        return self.model.forward_from(self.start, self.clean, tokens, edit=edit, cache=cache, stop_at=stop_at)


class Tiled(dict):
    """{site: clean value (B, T, d)} read as repeated k times along examples, each site tiled when first read."""

    def __init__(self, clean, k):
        super().__init__()
        self.source, self.k = clean, k

    def __missing__(self, name):
        self[name] = v = self.source[name].repeat(self.k, 1, 1)
        return v


def ig_site_gradients(model, metric, batch, sites, states, steps, progress=False, saes=None):
    """Per site, dm/dx averaged over x = (1-a) x_c + a x_p, a = k/steps, k = 0..steps-1, the steps batched
    (ig_groups: at most IG_TOKENS tokens per forward; the examples do not interact, so a batch may be split
    among them). Models with forward_from resume each forward at the interpolated site from the clean values
    below it (the metric stops at its own last site).

    With `saes`, a cross-layer transcoder's site l also moves every later MLP output t by a * (what its
    layer's f_p - f_c writes there), and its gradient is [dm/dx_l, dm/dx_{l+1}, ..., dm/dx_{L-1}] along that
    path, concatenated on the last axis (B, T, (L - l) d): the gradient of its nodes' whole write."""
    B, T = batch.clean.shape
    clean = None
    if hasattr(model, "forward_from"):
        clean = {}
        with torch.no_grad():
            model(batch.clean, cache=clean, stop_at=max(sites, key=model.all_sites.index), extra=sites)
    groups = ig_groups(B, T, steps)
    out = {}
    for s in tqdm(sites, desc=f"IG, {steps} steps", unit="site", leave=False, disable=not progress):
        st = states[s]
        sae = saes[s] if saes is not None else None
        later = later_targets(sae) if sae is not None else []
        delta = st.delta() if later else None
        grads = {}                  # example group -> its gradients at each step group, (n, e, T, d)
        for e0, e1, k0, k1 in groups:
            n, part = k1 - k0, example_slice(batch, e0, e1)
            x_c, x_p = st.x_c[e0:e1], st.x_p[e0:e1]
            big = tile(part, n)
            alpha = (torch.arange(k0, k1, dtype=x_c.dtype, device=x_c.device) / steps).repeat_interleave(e1 - e0)
            alpha = alpha[:, None, None]
            path = ((1 - alpha) * x_c.repeat(n, 1, 1) + alpha * x_p.repeat(n, 1, 1)).detach().requires_grad_(True)
            runner = model if clean is None else Resumed(model, s, Tiled({k: v[e0:e1] for k, v in clean.items()}, n))
            edit, moved = {s: lambda x, p=path: p}, {}
            if later:
                part_delta = slice_rows(delta, e0 * T, e1 * T)
                shift = {t: (alpha * sae.write_rows(part_delta, site_layer(t)).view(e1 - e0, T, -1).repeat(n, 1, 1))
                         for t in later}
                edit.update(clt_edit(sae, s, edit[s], lambda t: shift[t]))
                edit.update({t: lambda x, t=t, fn=edit[t]: moved.setdefault(t, fn(x)) for t in later})
            with torch.enable_grad():
                m = metric(runner, big, big.clean, edit)
                # A metric that never reads a site does not depend on it: gradient zero.
                wrt = [path] + [moved[t] for t in later if t in moved]
                g = torch.autograd.grad(m.sum(), wrt, allow_unused=True) if m.requires_grad else [None] * len(wrt)
            g = [torch.zeros_like(path) if v is None else v.detach() for v in g]
            g = torch.cat(g + [torch.zeros_like(path)] * (len(later) + 1 - len(g)), -1) if later else g[0]
            grads.setdefault((e0, e1), []).append(g.view(n, e1 - e0, *g.shape[1:]))
        parts = [(g[0] if len(g) == 1 else torch.cat(g)).mean(0) for g in grads.values()]
        out[s] = parts[0] if len(parts) == 1 else torch.cat(parts)
        release_freed_memory(st.x_c.device)
    return out


def site_effects(g_x, st, sae, use_ext=None):
    """SiteEffects from the site gradient g_x (B, T, d): (g_x @ W_dec.T) * (f_p - f_c) by
    ops.feature_attribution on the clean and patch rows, and the error node g_x . (err_p - err_c). A
    cross-layer transcoder's g_x is the gradient of its whole write, (B, T, (L - l) d) (ig_site_gradients),
    against its decoder to every layer W_out (F, L - l, d) flattened the same way."""
    B, T, d = g_x.shape
    if is_clt(sae):
        d = sae.d_in
        err = (g_x[..., :d] * st.delta_err).sum(-1)
        rows = ops.feature_attribution(g_x.reshape(B * T, -1), sae.W_out.reshape(sae.n_features, -1), st.c, st.p,
                                       use_ext=use_ext)
        return SiteEffects(rows, err, st.n_features)
    err = (g_x * st.delta_err).sum(-1)
    if sae.kind == "identity":     # W_dec = I: the product is g_x itself (d features, dense is fine)
        F = st.n_features
        delta_f = rows_to_dense(*st.p, F).view(B, T, F) - rows_to_dense(*st.c, F).view(B, T, F)
        rows = dense_to_rows((g_x * delta_f).reshape(B * T, d))
    else:
        rows = ops.feature_attribution(g_x.reshape(B * T, d), sae.W_dec, st.c, st.p, use_ext=use_ext)
    return SiteEffects(rows, err, st.n_features)


def grouped_exact_effects(model, saes, metric, batch, sites, states, m_clean, group=64):
    """reference.exact_effects with `group` patched nodes per forward (the examples tiled): moving one
    node to its patch value moves the site by delta_f * (its decoder row), or by delta_err (a cross-layer
    transcoder's feature also moves each later MLP output t by delta_f * W_out[i, t - l]). A feature whose
    delta_f is 0 at a position in every example is not patched there (its effect is exactly 0)."""
    B, T = batch.clean.shape
    out = {}
    with torch.no_grad():
        for s in sites:
            st, sae = states[s], saes[s]
            F = st.n_features
            crow, col, dv = st.delta()
            n = row_ids(crow)
            b_of, t_of = n // T, n % T
            node_key = t_of * (F + 1) + col                          # (position, feature) of each delta entry
            keys = torch.cat([node_key.unique(), torch.arange(T, device=col.device) * (F + 1) + F]).sort().values
            nodes = [divmod(k, F + 1) for k in keys.tolist()]
            where = torch.searchsorted(keys, node_key)                # each delta entry's node
            vals = torch.zeros(len(nodes), B, dtype=st.x_c.dtype, device=st.x_c.device)
            delta_err = st.delta_err            # a property (err_p - err_c): once, not once per error node
            later = later_targets(sae)
            step = max(1, group // (1 + len(later)))   # a CLT's shifts at every later layer: same memory per forward
            for start in range(0, len(nodes), step):
                chunk = nodes[start:start + step]
                G = len(chunk)
                shift = torch.zeros(G, B, T, st.x_c.shape[-1], dtype=st.x_c.dtype, device=st.x_c.device)
                far = {t: torch.zeros_like(shift) for t in later}      # a CLT feature's writes to later layers
                for g, (t, i) in enumerate(chunk):
                    if i == F:
                        shift[g, :, t] = delta_err[:, t]
                sel = (where >= start) & (where < start + G)
                g_e, b_e, t_e, i_e, d_e = where[sel] - start, b_of[sel], t_of[sel], col[sel], dv[sel]
                if sae.kind == "identity":
                    shift[g_e, b_e, t_e, i_e] = d_e
                else:
                    shift[g_e, b_e, t_e] = d_e[:, None] * sae.W_dec[i_e]
                for t, v in far.items():
                    v[g_e, b_e, t_e] = d_e[:, None] * sae.W_out[i_e, site_layer(t) - sae.layer]
                shift = shift.view(G * B, T, -1)
                big = tile(batch, G)
                edit = {s: lambda x, d=shift: x + d}
                edit.update({t: lambda x, d=v.view(G * B, T, -1): x + d for t, v in far.items()})
                m = metric(model, big, big.clean, edit).view(G, B)
                vals[start:start + G] = m - m_clean
            # Feature nodes as rows: entry (b * T + t, i) for every example of every patched (t, i).
            t_k, i_k = keys // (F + 1), keys % (F + 1)
            feat = i_k < F
            order_b = torch.arange(B, device=keys.device)
            row = (order_b[:, None] * T + t_k[feat][None]).flatten()
            key = row * F + i_k[feat].repeat(B)
            v = vals[feat].T.flatten()
            key, perm = key.sort()
            rows = rows_from_entries(B * T, key // F, key % F, v[perm])
            err = torch.zeros(B, T, dtype=st.x_c.dtype, device=st.x_c.device)
            err[:, t_k[~feat]] = vals[~feat].T
            out[s] = SiteEffects(rows, err, F)
    return out


def node_effects(model, saes, metric, batch, method="ig", steps=10, use_ext=None, progress=False, known=None):
    """Per-example node effects of one batch by `method` (attrib, ig or exact) -> NodeEffects.

    known: {site: dm/dx} from an earlier call on the same batch, method, steps and metric, for any
    dictionaries: the site gradients do not depend on them (attrib's is taken at the clean input, IG's
    along x = (1-a) x_c + a x_p, the site's own values), so circuits of features and of neurons over the
    same examples can share them. Only the sites missing from it are computed, and it is filled with them.
    Without patch inputs (the zero counterfactual) x_p = decode(0) = b_dec is the dictionary's own, so is the
    IG path: IG then neither reads nor fills `known` (attrib's clean-input gradient is still shared)."""
    if method not in METHODS:
        raise MinicircError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    sites = site_order(model, saes)
    m_c, m_p, states = sparse_site_states(model, saes, metric, batch, sites, use_ext)
    if method == "exact":
        return NodeEffects(m_c, m_p, states, grouped_exact_effects(model, saes, metric, batch, sites, states, m_c), None)
    known = {} if known is None or (batch.patch is None and method == "ig") else known
    # A cross-layer transcoder's IG path moves the later layers too: its gradients depend on the dictionary,
    # so they are neither read from nor stored in `known`.
    clt = [s for s in sites if is_clt(saes[s])] if method == "ig" else []
    missing = [s for s in sites if s not in known and s not in clt]
    with frozen_weights(model):
        if missing:
            known.update(attrib_site_gradients(model, metric, batch, missing) if method == "attrib"
                         else ig_site_gradients(model, metric, batch, missing, states, steps, progress))
        whole = ig_site_gradients(model, metric, batch, clt, states, steps, progress, saes) if clt else {}
    grads = {s: whole[s][..., :saes[s].d_in] if s in whole else known[s] for s in sites}
    for s in sites:     # attrib: a CLT layer's nodes write to its own and every later MLP output
        if s not in whole and is_clt(saes[s]):
            whole[s] = torch.cat([grads[s]] + [grads[t] for t in later_targets(saes[s])], -1)
    with torch.no_grad():
        effects = {s: site_effects(whole.get(s, grads[s]), states[s], saes[s], use_ext) for s in sites}
    return NodeEffects(m_c, m_p, states, effects, grads)
