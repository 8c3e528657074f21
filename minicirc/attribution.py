"""Node and edge effects (DESIGN.md sections 4-6).

Every site x is split by its dictionary into features f = encode(x) and an error err = x - decode(f), so
x = f @ W_dec + b_dec + err. A node is one feature (per example and position) or the error term of a
site. Its indirect effect on the metric m is estimated by
- attrib: IE = (dm/df) * (f_patch - f_clean), one forward and one backward on the clean input;
- ig:     the same product with dm/df averaged over `steps` points on the line from clean to patch
          (integrated gradients), one site interpolated at a time;
- exact:  activation patching, one forward per node.
Because decoding is affine, dm/df = (dm/dx) @ W_dec.T and dm/d(err) = dm/dx: everything is computed from
the dense site gradient and projected at the end (the sampled product that minicirc.ops fuses).

Edges (u -> d between adjacent sites) are L_d . (dd/du) . delta_u with the intermediate sites frozen;
many downstream nodes share one batched vector-Jacobian product.
"""
from dataclasses import dataclass

import torch

from .errors import MinicircError

METHODS = ("attrib", "ig", "exact")


# --- metric ---------------------------------------------------------------------------------------

def logit_diff(model, batch, tokens, edit):
    """logit(patch_answer) - logit(clean_answer) at each example's last real token: (rows,)."""
    logits = model(tokens, edit=edit)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = logits[rows, batch.last]
    return last[rows, batch.patch_answer] - last[rows, batch.clean_answer]


def tile(batch, k):
    """The batch repeated k times along examples (row s*B + b is example b), for batched IG steps."""
    from .data import Batch
    rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))
    return Batch(rep(batch.clean), rep(batch.patch), rep(batch.clean_answer), rep(batch.patch_answer),
                 rep(batch.last), batch.examples * k)


# --- per-site clean and patch states --------------------------------------------------------------

@dataclass
class SiteState:
    x_c: torch.Tensor    # (B, T, d) clean site value
    x_p: torch.Tensor    # (B, T, d) patch site value (decode(0) = b_dec when there is no patch)
    f_c: torch.Tensor    # (B, T, F)
    f_p: torch.Tensor
    err_c: torch.Tensor  # (B, T, d)
    err_p: torch.Tensor

    @property
    def delta_f(self):
        return self.f_p - self.f_c

    @property
    def delta_err(self):
        return self.err_p - self.err_c


def site_order(model, saes):
    model.check_sites(list(saes))
    return [s for s in model.sites if s in saes]


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


def site_states(model, saes, metric, batch, sites):
    """Clean and patch states of every site, each from the unmodified model on its own input."""
    m_c, clean = record_sites(model, metric, batch, batch.clean, sites)
    m_p, patch = (record_sites(model, metric, batch, batch.patch, sites) if batch.patch is not None else (None, None))
    states = {}
    with torch.no_grad():
        for s in sites:
            sae = saes[s]
            x_c = clean[s]
            if not torch.isfinite(x_c).all():
                raise MinicircError(f"site {s} holds NaN or inf on the clean input")
            f_c, err_c = sae(x_c)
            if patch is None:
                f_p, err_p = torch.zeros_like(f_c), torch.zeros_like(err_c)
                x_p = sae.decode(f_p)
            else:
                x_p = patch[s]
                f_p, err_p = sae(x_p)
            states[s] = SiteState(x_c, x_p, f_c, f_p, err_c, err_p)
    return m_c, m_p, states


# --- site gradients: dm/dx at every site (attrib) or averaged along the IG path ----------------------

def attrib_gradients(model, metric, batch, sites):
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
        grads = torch.autograd.grad(m.sum(), [vals[s] for s in sites], allow_unused=True)
    return {s: (g if g is not None else torch.zeros_like(vals[s])).detach() for s, g in zip(sites, grads)}


def ig_gradients(model, metric, batch, sites, states, steps):
    """Per site, dm/dx averaged over x = (1-a) x_c + a x_p, a = k/steps, k = 0..steps-1, all steps batched."""
    big = tile(batch, steps)
    B = len(batch)
    out = {}
    for s in sites:
        st = states[s]
        alpha = (torch.arange(steps, dtype=st.x_c.dtype, device=st.x_c.device) / steps).repeat_interleave(B)
        alpha = alpha[:, None, None]
        path = ((1 - alpha) * st.x_c.repeat(steps, 1, 1) + alpha * st.x_p.repeat(steps, 1, 1)).detach().requires_grad_(True)
        with torch.enable_grad():
            m = metric(model, big, big.clean, {s: lambda x, p=path: p})
            (g,) = torch.autograd.grad(m.sum(), path, allow_unused=True)
        g = torch.zeros_like(path) if g is None else g
        out[s] = g.view(steps, B, *g.shape[1:]).mean(0).detach()
    return out


def feature_effects(g_x, sae, delta_f, use_ext=None):
    """(g_x @ W_dec.T) * delta_f, computed only where delta_f != 0 (minicirc.ops when available)."""
    shape = delta_f.shape
    if sae.kind == "identity":
        return g_x * delta_f
    from . import ops
    flat = ops.sampled_feature_effects(g_x.reshape(-1, g_x.shape[-1]), sae.W_dec, delta_f.reshape(-1, shape[-1]),
                                       use_ext=use_ext)
    return flat.view(shape)


def exact_effects(model, saes, metric, batch, sites, states, m_clean, group=64):
    """Activation patching: for every (position, feature) and every error term, m(clean with that node set to
    its patch value) - m(clean). Nodes are batched `group` at a time by tiling the examples."""
    B, T = batch.clean.shape
    out = {}
    with torch.no_grad():
        for s in sites:
            st, sae = states[s], saes[s]
            F = st.f_c.shape[-1]
            # Moving one node to its patch value moves the site by delta * (its decoder row), or delta_err.
            nodes = [(t, i) for t in range(T) for i in range(F + 1)]
            eff = torch.zeros(B, T, F + 1, dtype=st.x_c.dtype, device=st.x_c.device)
            for start in range(0, len(nodes), group):
                chunk = nodes[start:start + group]
                G = len(chunk)
                shift = torch.zeros(G, B, T, st.x_c.shape[-1], dtype=st.x_c.dtype, device=st.x_c.device)
                for g, (t, i) in enumerate(chunk):
                    if i == F:
                        shift[g, :, t] = st.delta_err[:, t]
                    elif sae.kind == "identity":
                        shift[g, :, t, i] = st.delta_f[:, t, i]
                    else:
                        shift[g, :, t] = st.delta_f[:, t, i, None] * sae.W_dec[i]
                shift = shift.view(G * B, T, -1)
                big = tile(batch, G)
                m = metric(model, big, big.clean, {s: lambda x, d=shift: x + d}).view(G, B)
                for g, (t, i) in enumerate(chunk):
                    eff[:, t, i] = m[g] - m_clean
            out[s] = (eff[..., :F], eff[..., F])
    return out


def node_effects(model, saes, metric, batch, method="ig", steps=10, use_ext=None):
    """Per-example node effects of one batch.

    Returns (m_clean (B,), m_patch (B,) or None, states, effects, grads) where effects[site] =
    (features (B, T, F), error (B, T)) and grads[site] = the site gradient L (B, T, d) used for edges
    (None for `exact`)."""
    if method not in METHODS:
        raise MinicircError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    sites = site_order(model, saes)
    m_c, m_p, states = site_states(model, saes, metric, batch, sites)
    if method == "exact":
        return m_c, m_p, states, exact_effects(model, saes, metric, batch, sites, states, m_c), None
    grads = (attrib_gradients(model, metric, batch, sites) if method == "attrib"
             else ig_gradients(model, metric, batch, sites, states, steps))
    effects = {}
    with torch.no_grad():
        for s in sites:
            st = states[s]
            effects[s] = (feature_effects(grads[s], saes[s], st.delta_f, use_ext), (grads[s] * st.delta_err).sum(-1))
    return m_c, m_p, states, effects, grads


# --- edges ----------------------------------------------------------------------------------------

def edge_pairs(model, sites):
    """(upstream, downstream, frozen sites) for adjacent sites, DESIGN.md section 6."""
    have = set(sites)
    pairs = []
    for l in range(model.cfg.n_layers):
        prev = f"resid_{l - 1}" if l > 0 else "embed"
        a, m, r = f"attn_{l}", f"mlp_{l}", f"resid_{l}"
        cand = [(m, r, (), ), (a, r, (m,)), (prev, m, (a,)), (prev, a, ()), (prev, r, (a, m))]
        if not model.cfg.parallel_residual:
            cand.append((a, m, ()))
        pairs += [(u, d, fr) for u, d, fr in cand if u in have and d in have]
    return pairs


def downstream_rows(L_f, L_err, sel_f, sel_err, aggregation):
    """Vectors for the batched VJP: one row per downstream node, summing the selected (example, position)
    entries that aggregation merges anyway (all positions with `sum`, same position with `none`).

    Returns keys and (R, B, T, F), (R, B, T, d) cotangents on (f_D, err_D)."""
    B, T, F = L_f.shape
    keys, vf, ve = [], [], []
    if aggregation == "sum":
        for i in torch.nonzero(sel_f.any(dim=(0, 1))).flatten().tolist():
            v = torch.zeros_like(L_f)
            v[..., i] = L_f[..., i] * sel_f[..., i]
            keys.append(i), vf.append(v), ve.append(None)
        if sel_err.any():
            keys.append("err"), vf.append(None), ve.append(L_err * sel_err[..., None])
    else:
        for t, i in torch.nonzero(sel_f.any(dim=0)).tolist():
            v = torch.zeros_like(L_f)
            v[:, t, i] = L_f[:, t, i] * sel_f[:, t, i]
            keys.append((t, i)), vf.append(v), ve.append(None)
        for t in torch.nonzero(sel_err.any(dim=0)).flatten().tolist():
            v = torch.zeros_like(L_err)
            v[:, t] = L_err[:, t] * sel_err[:, t, None]
            keys.append((t, "err")), vf.append(None), ve.append(v)
    zf, ze = torch.zeros_like(L_f), torch.zeros_like(L_err)
    vf = torch.stack([zf if v is None else v for v in vf]) if keys else zf[None][:0]
    ve = torch.stack([ze if v is None else v for v in ve]) if keys else ze[None][:0]
    return keys, vf, ve


def edge_effects(model, saes, batch, states, grads, effects, node_threshold, aggregation="sum",
                 chunk_bytes=256 * 2**20, pairs=None, use_vmap=True):
    """Edge effects of one batch, summed over its examples (divide by the number of examples later).

    Returns {(U, D): (keys, values)} with values (R, F_U + 1) for `sum` (last column: U's error) and
    (R, T, F_U + 1) for `none`; keys name the downstream node of each row (feature index or "err", with its
    position for `none`). Downstream nodes are the entries whose per-example |effect| > node_threshold."""
    sites = site_order(model, saes)
    pairs = pairs if pairs is not None else edge_pairs(model, sites)
    out = {}
    by_up = {}
    for u, d, frozen in pairs:
        by_up.setdefault(u, []).append((d, frozen))
    for u, downs in by_up.items():
        su, sae_u = states[u], saes[u]
        frozen_any = {fr for _, frs in downs for fr in frs}
        recorded = {}
        f_leaf = su.f_c.detach().clone().requires_grad_(True)
        e_leaf = su.err_c.detach().clone().requires_grad_(True)

        def splice(x):
            return sae_u.decode(f_leaf) + e_leaf

        def freeze(s):
            def fn(x):
                recorded[s] = x          # its own value still depends on U (for U -> s)
                return x.detach()        # but nothing downstream sees U through it
            return fn

        def keep(s):
            def fn(x):
                recorded[s] = x
                return x
            return fn

        edit = {u: splice}
        for d, _ in downs:
            edit[d] = keep(d)
        for fr in frozen_any:
            edit[fr] = freeze(fr)
        last = max((d for d, _ in downs), key=sites.index)
        with torch.enable_grad():
            model(batch.clean, edit=edit, stop_at=last)
            for d, _ in downs:
                sd, sae_d = states[d], saes[d]
                y = recorded[d]
                f_d = sae_d.encode(y)
                e_d = y - sae_d.decode(f_d)
                feat_eff, err_eff = effects[d]
                L_err = grads[d]
                L_f = L_err if sae_d.kind == "identity" else L_err @ sae_d.W_dec.T
                keys, vf, ve = downstream_rows(L_f, L_err, feat_eff.abs() > node_threshold,
                                               err_eff.abs() > node_threshold, aggregation)
                if not keys:
                    continue
                B, T, F_u = su.f_c.shape
                per_row = B * T * (F_u + su.err_c.shape[-1] + vf.shape[-1] + ve.shape[-1]) * 4 * 3
                step = max(1, int(chunk_bytes // per_row))
                vals = []
                for r0 in range(0, len(keys), step):
                    cot_f, cot_e = vf[r0:r0 + step], ve[r0:r0 + step]
                    if use_vmap:
                        g_f, g_e = torch.autograd.grad([f_d, e_d], [f_leaf, e_leaf], [cot_f, cot_e],
                                                       retain_graph=True, is_grads_batched=True, allow_unused=True)
                    else:  # one backward per downstream row: the reference the batched path must equal
                        rows = [torch.autograd.grad([f_d, e_d], [f_leaf, e_leaf], [cf, ce], retain_graph=True,
                                                    allow_unused=True) for cf, ce in zip(cot_f, cot_e)]
                        g_f = torch.stack([r[0] if r[0] is not None else torch.zeros_like(f_leaf) for r in rows])
                        g_e = torch.stack([r[1] if r[1] is not None else torch.zeros_like(e_leaf) for r in rows])
                    g_f = torch.zeros_like(cot_f[..., :1]).expand(-1, B, T, F_u) if g_f is None else g_f
                    g_e = torch.zeros_like(cot_e) if g_e is None else g_e
                    with torch.no_grad():
                        ef = g_f * su.delta_f            # (r, B, T, F_u)
                        ee = (g_e * su.delta_err).sum(-1)  # (r, B, T)
                        both = torch.cat([ef, ee[..., None]], dim=-1).sum(1)  # over examples: (r, T, F_u+1)
                        vals.append(both.sum(1) if aggregation == "sum" else both)
                out[(u, d)] = (keys, torch.cat(vals).detach())
    return out
