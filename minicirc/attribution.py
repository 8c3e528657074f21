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
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import MinicircError

METHODS = ("attrib", "ig", "exact")


# --- metric ---------------------------------------------------------------------------------------

def logit_diff(model, batch, tokens, edit):
    """logit(patch_answer) - logit(clean_answer) at each example's last real token: (rows,).

    Only the two answer logits are computed (the unembedding of a 50k vocabulary at every position would
    dominate the cost of every forward pass)."""
    cache = {}
    last_site = model.sites[-1]
    model(tokens, edit=edit, cache=cache, stop_at=last_site)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return model.logit_diff(cache[last_site][rows, batch.last], batch.patch_answer, batch.clean_answer)


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

@contextmanager
def frozen_weights(model):
    """The model's weights out of autograd for the duration (restored after). Every gradient here is taken
    with respect to site values; weights that require grad make each forward save activations for weight
    gradients nobody asks for (IG peak memory 40% lower on a 4-layer d_model 256 model; at DESIGN.md's scale
    the dictionaries' states dominate and it changes little)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


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
        grads = (torch.autograd.grad(m.sum(), [vals[s] for s in sites], allow_unused=True) if m.requires_grad
                 else [None] * len(sites))
    return {s: (g if g is not None else torch.zeros_like(vals[s])).detach() for s, g in zip(sites, grads)}


def ig_gradients(model, metric, batch, sites, states, steps, progress=False):
    """Per site, dm/dx averaged over x = (1-a) x_c + a x_p, a = k/steps, k = 0..steps-1, all steps batched."""
    big = tile(batch, steps)
    B = len(batch)
    out = {}
    for s in tqdm(sites, desc=f"IG, {steps} steps", unit="site", leave=False, disable=not progress):
        st = states[s]
        alpha = (torch.arange(steps, dtype=st.x_c.dtype, device=st.x_c.device) / steps).repeat_interleave(B)
        alpha = alpha[:, None, None]
        path = ((1 - alpha) * st.x_c.repeat(steps, 1, 1) + alpha * st.x_p.repeat(steps, 1, 1)).detach().requires_grad_(True)
        with torch.enable_grad():
            m = metric(model, big, big.clean, {s: lambda x, p=path: p})
            # A metric that never reads this site does not depend on it: gradient zero.
            (g,) = torch.autograd.grad(m.sum(), path, allow_unused=True) if m.requires_grad else (None,)
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


def node_effects(model, saes, metric, batch, method="ig", steps=10, use_ext=None, progress=False):
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
    with frozen_weights(model):
        grads = (attrib_gradients(model, metric, batch, sites) if method == "attrib"
                 else ig_gradients(model, metric, batch, sites, states, steps, progress))
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


def downstream_rows(sae_d, f, L, feat_eff, err_eff, node_threshold, aggregation):
    """The downstream nodes that get edges, and their cotangents on the downstream site value y.

    A downstream feature d_i = f_i(y) has dd_i/dy = 1[f_i != 0] W_enc[:, i] (relu, jumprelu and topk alike;
    1 for neurons), and the error err = y - decode(encode(y)) has the vector-Jacobian product
    v - ((v @ W_dec.T) * active) @ W_enc.T. So L_d . dd/du = (cotangent on y) . dy/du, with a cotangent
    in d_model space: cheap to build and to push back through the model. One row per downstream node,
    summing the selected (example, position) entries that aggregation merges anyway (all positions with
    `sum`, the same position with `none`).

    f: the downstream features at the clean input (they fix which features are active).
    Returns (keys, build) where build(lo, hi) gives the cotangents (hi - lo, B, T, d) of rows lo..hi-1."""
    with torch.no_grad():
        active = torch.ones_like(f) if sae_d.kind == "identity" else (f != 0).to(f.dtype)
        coef = (L @ sae_d.W_dec.T) * (feat_eff.abs() > node_threshold) * active      # (B, T, F)
        sel_err = err_eff.abs() > node_threshold                                      # (B, T)
    if aggregation == "sum":
        keys = torch.nonzero((feat_eff.abs() > node_threshold).any(dim=(0, 1))).flatten().tolist()
        keys += ["err"] if sel_err.any() else []
    else:
        keys = [tuple(k) for k in torch.nonzero((feat_eff.abs() > node_threshold).any(dim=0)).tolist()]
        keys += [(t, "err") for t in torch.nonzero(sel_err.any(dim=0)).flatten().tolist()]

    def error_cotangent(v):
        return v - ((v @ sae_d.W_dec.T) * active) @ sae_d.W_enc.T

    def error_cotangent_at(v, t):
        return v - ((v @ sae_d.W_dec.T) * active[:, t]) @ sae_d.W_enc.T

    def build(lo, hi):
        chunk = keys[lo:hi]
        out = torch.zeros(len(chunk), *L.shape, dtype=L.dtype, device=L.device)   # (r, B, T, d)
        feats = [(r, k) for r, k in enumerate(chunk) if (k if aggregation == "sum" else k[1]) != "err"]
        if feats:
            r_idx = torch.tensor([r for r, _ in feats], device=L.device)
            if aggregation == "sum":
                i_idx = torch.tensor([k for _, k in feats], device=L.device)
                # row r: coef[b, t, i_r] * W_enc[:, i_r] at every (b, t)
                out[r_idx] = coef[..., i_idx].permute(2, 0, 1)[..., None] * sae_d.W_enc[:, i_idx].T[:, None, None, :]
            else:
                t_idx = torch.tensor([k[0] for _, k in feats], device=L.device)
                i_idx = torch.tensor([k[1] for _, k in feats], device=L.device)
                # row r: only position t_r is non-zero
                out[r_idx, :, t_idx] = coef[:, t_idx, i_idx].T[..., None] * sae_d.W_enc[:, i_idx].T[:, None, :]
        for r, k in enumerate(chunk):
            if aggregation == "sum" and k == "err":
                out[r] = error_cotangent(L * sel_err[..., None])
            elif aggregation == "none" and k[1] == "err":   # only position t is non-zero
                t = k[0]
                out[r, :, t] = error_cotangent_at(L[:, t] * sel_err[:, t, None], t)
        return out

    return keys, build


def upstream_effects(G, st, sae_u, aggregation):
    """Edge values from the gradients G (R, B, T, d) at the upstream site: for feature j,
    sum over (example, position) of (G . W_dec[j]) * delta_f[j], computed only where delta_f != 0 (the
    sampled product), and G . delta_err for the error.

    Returns a sparse COO tensor (R, F + 1) for `sum`, (R, T, F + 1) for `none` (last column: the error):
    at real scale a dense (rows x positions x 32k features) block would not fit in memory."""
    R, B, T, d = G.shape
    F = st.delta_f.shape[-1]
    delta = st.delta_f.reshape(B * T, F)
    n_idx, j_idx = torch.nonzero(delta, as_tuple=True)            # sorted by position n
    W_sel = sae_u.W_dec[j_idx]                                     # (nnz, d): decoder rows of active features
    d_sel = delta[n_idx, j_idx]
    Gt = G.reshape(R, B * T, d).transpose(0, 1).contiguous()      # (positions, R, d)
    vals = torch.empty(len(n_idx), R, dtype=G.dtype, device=G.device)
    start = 0
    for n, c in enumerate(torch.bincount(n_idx, minlength=B * T).tolist()):
        if c:  # one small GEMM per position: its active features' decoder rows against all R gradients
            vals[start:start + c] = W_sel[start:start + c] @ Gt[n].T
            start += c
    vals = vals.T
    vals *= d_sel
    # Merge entries that aggregation merges: same feature (sum) or same (position, feature) (none).
    col = j_idx if aggregation == "sum" else (n_idx % T) * (F + 1) + j_idx
    cols, inverse = torch.unique(col, return_inverse=True)
    merged = torch.zeros(R, len(cols), dtype=G.dtype, device=G.device).index_add_(1, inverse, vals)
    err = (G * st.delta_err).sum(-1).sum(1)                        # (R, T): over d, then examples
    if aggregation == "sum":
        cols = torch.cat([cols, torch.tensor([F], device=cols.device)])
        merged = torch.cat([merged, err.sum(1, keepdim=True)], dim=1)
    else:
        cols = torch.cat([cols, torch.arange(T, device=cols.device) * (F + 1) + F])
        merged = torch.cat([merged, err], dim=1)
        order = cols.argsort()          # the error columns go between positions
        cols, merged = cols[order], merged[:, order]
    rows = torch.arange(R, device=G.device).repeat_interleave(len(cols))
    cols = cols.repeat(R)
    index = (torch.stack([rows, cols]) if aggregation == "sum"
             else torch.stack([rows, cols // (F + 1), cols % (F + 1)]))
    shape = (R, F + 1) if aggregation == "sum" else (R, T, F + 1)
    # Rows ascend and columns ascend within a row: already coalesced, which skips a costly sort.
    return torch.sparse_coo_tensor(index, merged.reshape(-1), shape, is_coalesced=True, check_invariants=False,
                                   device=G.device)


def sparse_cat_rows(parts):
    """Concatenate coalesced sparse tensors along rows, keeping them coalesced (no sort needed)."""
    if len(parts) == 1:
        return parts[0]
    idx, val, offset = [], [], 0
    for p in parts:
        i = p.indices().clone()
        i[0] += offset
        idx.append(i)
        val.append(p.values())
        offset += p.shape[0]
    return torch.sparse_coo_tensor(torch.cat(idx, 1), torch.cat(val), (offset, *parts[0].shape[1:]),
                                   is_coalesced=True, check_invariants=False, device=parts[0].device)


def edge_effects(model, saes, batch, states, grads, effects, node_threshold, aggregation="sum",
                 chunk_bytes=256 * 2**20, pairs=None, use_vmap=True, progress=False):
    """Edge effects of one batch, summed over its examples (divide by the number of examples later).

    Returns {(U, D): (keys, values)} with values (R, F_U + 1) for `sum` (last column: U's error) and
    (R, T, F_U + 1) for `none`; keys name the downstream node of each row (feature index or "err", with its
    position for `none`). Downstream nodes are the entries whose per-example |effect| > node_threshold.
    U's value is a leaf (the straight-through splice decode(f) + err has d x_U / d f_j = W_dec[j]); the sites
    between U and D are frozen by detaching what flows out of them."""
    sites = site_order(model, saes)
    pairs = pairs if pairs is not None else edge_pairs(model, sites)
    out = {}
    by_up = {}
    for u, d, frozen in pairs:
        by_up.setdefault(u, []).append((d, frozen))
    B, T = batch.clean.shape
    for u, downs in tqdm(by_up.items(), desc="edges", unit="upstream site", leave=False, disable=not progress):
        su, sae_u = states[u], saes[u]
        x_u = su.x_c.detach().clone().requires_grad_(True)
        recorded = {}

        def keep(s, frozen):
            def fn(x):
                recorded[s] = x                       # its own value still depends on U (for U -> s)
                return x.detach() if frozen else x    # but a frozen site passes nothing of U downstream
            return fn

        frozen_any = {fr for _, frs in downs for fr in frs}
        edit = {s: keep(s, s in frozen_any) for s in {d for d, _ in downs} | frozen_any}
        edit[u] = lambda x: x_u
        last = max((d for d, _ in downs), key=sites.index)
        with frozen_weights(model), torch.enable_grad():
            model(batch.clean, edit=edit, stop_at=last)
            for d, _ in downs:
                y = recorded[d]
                keys, build = downstream_rows(saes[d], states[d].f_c, grads[d], *effects[d], node_threshold, aggregation)
                if not keys or not y.requires_grad:
                    continue
                step = max(1, int(chunk_bytes // (B * T * y.shape[-1] * y.element_size() * 8)))
                vals = []
                for lo in range(0, len(keys), step):
                    cot = build(lo, min(len(keys), lo + step))
                    if use_vmap:
                        (G,) = torch.autograd.grad(y, x_u, cot, retain_graph=True, is_grads_batched=True)
                    else:  # one backward per downstream row: the reference the batched path must equal
                        G = torch.stack([torch.autograd.grad(y, x_u, c, retain_graph=True)[0] for c in cot])
                    with torch.no_grad():
                        vals.append(upstream_effects(G, su, sae_u, aggregation))
                out[(u, d)] = (keys, sparse_cat_rows(vals))
    return out
