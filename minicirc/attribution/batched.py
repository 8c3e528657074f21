"""Node and edge effects, batched and sparse: the numbers of minicirc.attribution's definitions, fast.

- Site states: a dictionary site's features are compressed rows (minicirc.ops: row pointers, feature ids,
  values) of the active features only, from the sparse encode; its error comes from the sparse decode.
  No (tokens x n_features) tensor is made for a dictionary site; identity dictionaries (d features) and
  kinds without a sparse encode go through the dictionary's own encode, a row chunk at a time.
- Site gradients: dm/dx in one backward for every site (attrib), all IG steps of a site in one batch
  (ig); node effects (dm/dx @ W_dec.T) * delta_f by ops.feature_attribution directly on the clean and
  patch rows, and dm/derr = dm/dx. Per-example node effects stay rows too (SiteEffects).
- Exact patching: `group` patched nodes per forward, by tiling the examples.
- Edges: many downstream nodes share one batched vector-Jacobian product (`downstream_rows` builds their
  cotangents on the downstream site, `upstream_effects` contracts the gradients at the upstream site's
  rows), and the results are sparse: at real scale a dense (rows x positions x 32k features) block would
  not fit.
- EdgeSum: the running sum of one site pair's sparse edge values over batches.
"""
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import ops
from ..data import Batch
from ..errors import MinicircError
from ..rows import (chunk_rows, delta_rows, dense_to_rows, empty_rows, row_ids, rows_from_entries, rows_to_dense,
                    slice_rows)
from ..sae.sparse import decode_rows, encode_rows
from .memory import release_freed_memory
from .reference import METHODS, clean_and_patch_sites, edge_pairs, frozen_weights, site_order

# --- sparse site states -----------------------------------------------------------------------------

@dataclass
class SparseSiteState:
    """A site's clean and patch states with the features as rows over the B * T tokens (row b * T + t)."""
    x_c: torch.Tensor    # (B, T, d) clean site value
    x_p: torch.Tensor    # (B, T, d) patch site value (decode(0) = b_dec when there is no patch)
    c: tuple             # clean features: rows (crow (B*T+1,), col (nnz,), val (nnz,))
    p: tuple             # patch features (no entries when there is no patch)
    err_c: torch.Tensor  # (B, T, d)
    err_p: torch.Tensor
    n_features: int

    @property
    def delta_err(self):
        return self.err_p - self.err_c

    def examples(self, lo, hi):
        """The state of examples lo..hi-1."""
        T = self.x_c.shape[1]
        return SparseSiteState(self.x_c[lo:hi], self.x_p[lo:hi], slice_rows(self.c, lo * T, hi * T),
                               slice_rows(self.p, lo * T, hi * T), self.err_c[lo:hi], self.err_p[lo:hi],
                               self.n_features)

    def delta(self):
        """f_p - f_c as rows, exact zeros dropped."""
        return delta_rows(self.c, self.p, self.n_features)

    def for_edges(self):
        """What the edges read (EdgeSiteState): two (B, T, d) tensors a site instead of four, and the delta
        rows and error difference computed once instead of in every chunk of every edge pass."""
        return EdgeSiteState(self.x_c, self.c, self.delta(), self.delta_err, self.n_features)

    # Dense views, (B, T, F): for tests and small checks against attribution.SiteState; the pipeline never
    # calls them (at real scale they are the tensors this module exists to avoid).
    def dense(self, rows):
        B, T, _ = self.x_c.shape
        return rows_to_dense(*rows, self.n_features).view(B, T, self.n_features)

    @property
    def f_c(self):
        return self.dense(self.c)

    @property
    def f_p(self):
        return self.dense(self.p)

    @property
    def delta_f(self):
        return self.f_p - self.f_c


@dataclass
class EdgeSiteState:
    """SparseSiteState.for_edges: a site's state as the edges read it (upstream_site_edges, downstream_rows,
    upstream_effects use these fields only)."""
    x_c: torch.Tensor         # (B, T, d) clean site value
    c: tuple                  # clean feature rows
    delta_rows: tuple         # f_p - f_c as rows (SparseSiteState.delta)
    delta_err: torch.Tensor   # (B, T, d) err_p - err_c
    n_features: int

    def examples(self, lo, hi):
        """The state of examples lo..hi-1."""
        T = self.x_c.shape[1]
        return EdgeSiteState(self.x_c[lo:hi], slice_rows(self.c, lo * T, hi * T),
                             slice_rows(self.delta_rows, lo * T, hi * T), self.delta_err[lo:hi], self.n_features)


def sparse_site_states(model, saes, metric, batch, sites, use_ext=None):
    """attribution.site_states with rows: (m_clean, m_patch or None, {site: SparseSiteState}). Without patch
    inputs (zero ablation) the patch state is f = 0 (no rows), err = 0."""
    m_c, clean, m_p, patch = clean_and_patch_sites(model, metric, batch, sites)
    states = {}
    with torch.no_grad():
        for s in sites:
            sae, x_c = saes[s], clean[s]
            B, T, d = x_c.shape
            c = encode_rows(sae, x_c.reshape(B * T, d), use_ext)
            err_c = x_c - decode_rows(sae, c, B * T).view(B, T, d)
            if patch is None:
                p = empty_rows(B * T, c[2].dtype, x_c.device)
                x_p = decode_rows(sae, p, B * T).view(B, T, d)
                err_p = torch.zeros_like(err_c)
            else:
                x_p = patch[s]
                p = encode_rows(sae, x_p.reshape(B * T, d), use_ext)
                err_p = x_p - decode_rows(sae, p, B * T).view(B, T, d)
            states[s] = SparseSiteState(x_c, x_p, c, p, err_c, err_p, sae.n_features)
            release_freed_memory(x_c.device)
    return m_c, m_p, states


@dataclass
class SiteEffects:
    """Per-example node effects of one site: the features as rows over the B * T tokens (the features
    active on clean or patch; every other feature's effect is 0), the error node dense."""
    rows: tuple          # (crow, col, val)
    err: torch.Tensor    # (B, T)
    n_features: int

    def examples(self, lo, hi):
        T = self.err.shape[1]
        return SiteEffects(slice_rows(self.rows, lo * T, hi * T), self.err[lo:hi], self.n_features)

    def dense(self):
        """(B, T, F + 1), column F the error node (for tests and small problems)."""
        B, T = self.err.shape
        f = rows_to_dense(*self.rows, self.n_features).view(B, T, self.n_features)
        return torch.cat([f, self.err[..., None].to(f.dtype)], -1)

    @classmethod
    def from_dense(cls, eff):
        B, T, F1 = eff.shape
        return cls(dense_to_rows(eff[..., :-1].reshape(B * T, F1 - 1)), eff[..., -1], F1 - 1)


@dataclass
class NodeEffects:
    """Per-example node effects of one batch."""
    m_clean: torch.Tensor           # (B,) metric on the clean inputs
    m_patch: torch.Tensor | None    # (B,) metric on the patch inputs (None without patch inputs)
    states: dict                    # {site: SparseSiteState}
    effects: dict                   # {site: SiteEffects}
    grads: dict | None              # {site: dm/dx (B, T, d)}, the L_d of edges (None for `exact`)

    def dense_effects(self):
        """{site: (B, T, F + 1)}, column F the error node (for tests and small problems)."""
        return {s: e.dense() for s, e in self.effects.items()}


def tile(batch, k):
    """The batch repeated k times along examples (row s*B + b is example b), for batched IG steps."""
    rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))
    return Batch(rep(batch.clean), rep(batch.patch), rep(batch.clean_answer), rep(batch.patch_answer),
                 rep(batch.last), batch.examples * k)


# --- node effects -----------------------------------------------------------------------------------

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


def ig_site_gradients(model, metric, batch, sites, states, steps, progress=False):
    """Per site, dm/dx averaged over x = (1-a) x_c + a x_p, a = k/steps, k = 0..steps-1, the steps batched
    (ig_groups: at most IG_TOKENS tokens per forward; the examples do not interact, so a batch may be split
    among them). Models with forward_from resume each forward at the interpolated site from the clean values
    below it (the metric stops at its own last site)."""
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
        grads = {}                  # example group -> its gradients at each step group, (n, e, T, d)
        for e0, e1, k0, k1 in groups:
            n, part = k1 - k0, example_slice(batch, e0, e1)
            x_c, x_p = st.x_c[e0:e1], st.x_p[e0:e1]
            big = tile(part, n)
            alpha = (torch.arange(k0, k1, dtype=x_c.dtype, device=x_c.device) / steps).repeat_interleave(e1 - e0)
            alpha = alpha[:, None, None]
            path = ((1 - alpha) * x_c.repeat(n, 1, 1) + alpha * x_p.repeat(n, 1, 1)).detach().requires_grad_(True)
            runner = model if clean is None else Resumed(model, s, Tiled({k: v[e0:e1] for k, v in clean.items()}, n))
            with torch.enable_grad():
                m = metric(runner, big, big.clean, {s: lambda x, p=path: p})
                # A metric that never reads this site does not depend on it: gradient zero.
                (g,) = torch.autograd.grad(m.sum(), path, allow_unused=True) if m.requires_grad else (None,)
            g = torch.zeros_like(path) if g is None else g.detach()
            grads.setdefault((e0, e1), []).append(g.view(n, e1 - e0, *path.shape[1:]))
        parts = [(g[0] if len(g) == 1 else torch.cat(g)).mean(0) for g in grads.values()]
        out[s] = parts[0] if len(parts) == 1 else torch.cat(parts)
        release_freed_memory(st.x_c.device)
    return out


def site_effects(g_x, st, sae, use_ext=None):
    """SiteEffects from the site gradient g_x (B, T, d): (g_x @ W_dec.T) * (f_p - f_c) by
    ops.feature_attribution on the clean and patch rows, and the error node g_x . (err_p - err_c)."""
    B, T, d = g_x.shape
    err = (g_x * st.delta_err).sum(-1)
    if sae.kind == "identity":     # W_dec = I: the product is g_x itself (d features, dense is fine)
        rows = dense_to_rows((g_x * st.delta_f).reshape(B * T, d))
    else:
        rows = ops.feature_attribution(g_x.reshape(B * T, d), sae.W_dec, st.c, st.p, use_ext=use_ext)
    return SiteEffects(rows, err, st.n_features)


def grouped_exact_effects(model, saes, metric, batch, sites, states, m_clean, group=64):
    """attribution.exact_effects with `group` patched nodes per forward (the examples tiled): moving one
    node to its patch value moves the site by delta_f * (its decoder row), or by delta_err. A feature whose
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
            for start in range(0, len(nodes), group):
                chunk = nodes[start:start + group]
                G = len(chunk)
                shift = torch.zeros(G, B, T, st.x_c.shape[-1], dtype=st.x_c.dtype, device=st.x_c.device)
                for g, (t, i) in enumerate(chunk):
                    if i == F:
                        shift[g, :, t] = delta_err[:, t]
                sel = (where >= start) & (where < start + G)
                g_e, b_e, t_e, i_e, d_e = where[sel] - start, b_of[sel], t_of[sel], col[sel], dv[sel]
                if sae.kind == "identity":
                    shift[g_e, b_e, t_e, i_e] = d_e
                else:
                    shift[g_e, b_e, t_e] = d_e[:, None] * sae.W_dec[i_e]
                shift = shift.view(G * B, T, -1)
                big = tile(batch, G)
                m = metric(model, big, big.clean, {s: lambda x, d=shift: x + d}).view(G, B)
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
    same examples can share them. Only the sites missing from it are computed, and it is filled with them."""
    if method not in METHODS:
        raise MinicircError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    sites = site_order(model, saes)
    m_c, m_p, states = sparse_site_states(model, saes, metric, batch, sites, use_ext)
    if method == "exact":
        return NodeEffects(m_c, m_p, states, grouped_exact_effects(model, saes, metric, batch, sites, states, m_c), None)
    known = {} if known is None else known
    missing = [s for s in sites if s not in known]
    if missing:
        with frozen_weights(model):
            known.update(attrib_site_gradients(model, metric, batch, missing) if method == "attrib"
                         else ig_site_gradients(model, metric, batch, missing, states, steps, progress))
    grads = {s: known[s] for s in sites}
    with torch.no_grad():
        effects = {s: site_effects(grads[s], states[s], saes[s], use_ext) for s in sites}
    return NodeEffects(m_c, m_p, states, effects, grads)


# --- edges ----------------------------------------------------------------------------------------

def downstream_rows(sae_d, st, L, effects, node_threshold, aggregation):
    """The downstream nodes that get edges, and their cotangents on the downstream site value y.

    A downstream feature d_i = f_i(y) has dd_i/dy = 1[f_i != 0] W_enc[:, i] (relu, jumprelu and topk alike;
    1 for neurons), and the error err = y - decode(encode(y)) has the vector-Jacobian product
    v - ((v @ W_dec.T) * active) @ W_enc.T. So L_d . dd/du = (cotangent on y) . dy/du, with a cotangent
    in d_model space: cheap to build and to push back through the model. One row per downstream node,
    summing the selected (example, position) entries that aggregation merges anyway (all positions with
    `sum`, the same position with `none`).

    st: the downstream site's state (its clean rows fix which features are active); effects: its
    per-example SiteEffects. Only the selected entries of the effect rows and the active entries of the
    clean rows are touched: nothing of size (tokens x F). Returns (rows, build): rows name the downstream
    node of each row (its index into the aggregated node tensor, (F + 1,) or (T, F + 1) flattened; the
    features first, then the errors), and build(lo, hi) gives the cotangents (hi - lo, B, T, d) of rows
    lo..hi-1."""
    F = st.n_features
    B, T, d = L.shape
    L2 = L.reshape(B * T, d)
    identity = sae_d.kind == "identity"
    with torch.no_grad():
        crow, col, val = effects.rows
        n_all = row_ids(crow)
        sel = val.abs() > node_threshold
        n_sel, i_sel = n_all[sel], col[sel]
        if not identity:    # active on the clean input: the selected entry is one of the clean rows' entries
            clean_keys = row_ids(st.c[0]) * F + st.c[1]                       # sorted
            keys = n_sel * F + i_sel
            at = torch.searchsorted(clean_keys, keys).clamp(max=max(len(clean_keys) - 1, 0))
            active = (clean_keys[at] == keys) if len(clean_keys) else torch.zeros_like(keys, dtype=torch.bool)
            n_sel, i_sel = n_sel[active], i_sel[active]
        # coef[n, i] = (L @ W_dec.T)[n, i] at the selected active entries only
        coef = (L2[n_sel] * sae_d.W_dec[i_sel]).sum(-1)
        sel_err = effects.err.abs() > node_threshold                              # (B, T)
    t_sel = n_sel % T
    # The rows that selection touched, not those of selected but inactive entries (their coefficient is 0):
    # as before, any entry above the threshold names its row.
    sel_rows_all = col[sel] if aggregation == "sum" else (n_all[sel] % T) * (F + 1) + col[sel]
    feat_keys = torch.unique(sel_rows_all)                                          # sorted
    rows = feat_keys.tolist()
    if aggregation == "sum":
        rows += [F] if sel_err.any() else []
    else:
        rows += [t * (F + 1) + F for t in torch.nonzero(sel_err.any(dim=0)).flatten().tolist()]
    entry_key = i_sel if aggregation == "sum" else t_sel * (F + 1) + i_sel
    entry_row = torch.searchsorted(feat_keys, entry_key)                           # each entry's row

    if identity:
        def error_cotangent(v):        # v - ((v @ I) * 1) @ I: exactly 0
            return torch.zeros_like(v)
    else:
        a_n, a_i = row_ids(st.c[0]), st.c[1]                                   # the active entries

        def error_cotangent(v):
            """v - ((v @ W_dec.T) * active) @ W_enc.T for v (N, d), the product on the active entries only."""
            out = v.clone()
            step = chunk_rows(d)
            for lo in range(0, len(a_n), step):
                n, i = a_n[lo:lo + step], a_i[lo:lo + step]
                s_e = (v[n] * sae_d.W_dec[i]).sum(-1)
                out.index_add_(0, n, -(s_e[:, None] * sae_d.W_enc[:, i].T))
            return out

    n_feat = len(feat_keys)

    def build(lo, hi):
        chunk = [divmod(r, F + 1) for r in rows[lo:hi]]          # (position, column); position 0 for `sum`
        out = torch.zeros(len(chunk), B * T, d, dtype=L.dtype, device=L.device)   # (r, B*T, d)
        f_lo, f_hi = min(lo, n_feat), min(hi, n_feat)
        if f_hi > f_lo:
            # each selected active entry (n, i) puts coef * W_enc[:, i] at token n of its row
            e = (entry_row >= f_lo) & (entry_row < f_hi)
            out[entry_row[e] - lo, n_sel[e]] = coef[e, None] * sae_d.W_enc[:, i_sel[e]].T
        for r, (t, i) in enumerate(chunk):
            if i != F:
                continue
            if aggregation == "sum":
                out[r] = error_cotangent(L2 * sel_err.reshape(-1, 1))
            else:   # only position t is non-zero
                v = torch.zeros_like(L)
                v[:, t] = L[:, t] * sel_err[:, t, None]
                out[r] = error_cotangent(v.reshape(B * T, d))
        return out.view(len(chunk), B, T, d)

    return rows, build


def upstream_effects(G, st, sae_u, aggregation):
    """Edge values from the gradients G (R, B, T, d) at the upstream site: for feature j,
    sum over (example, position) of (G . W_dec[j]) * delta_f[j], computed only on the entries of the
    upstream state's delta rows (the sampled product), and G . delta_err for the error.

    Returns a sparse COO tensor (R, F + 1) for `sum`, (R, T, F + 1) for `none` (last column: the error)."""
    R, B, T, d = G.shape
    F = st.n_features
    crow, j_idx, d_sel = st.delta_rows
    n_idx = row_ids(crow)                                      # sorted by position n
    W_sel = sae_u.W_dec[j_idx]                                     # (nnz, d): decoder rows of active features
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
                 chunk_bytes=256 * 2**20, pairs=None, use_vmap=True, progress=False, group=1):
    """attribution.edge_effects, batched: {(U, D): (rows, values)} with rows a list of D's node indices (in
    the order `downstream_rows` makes them, not sorted) and values a sparse COO tensor (R, F_U + 1) for
    `sum`, (R, T, F_U + 1) for `none`, summed over the batch's examples. `states` are SparseSiteState or their
    for_edges() part (find_circuit passes that, to free the rest first).

    U's value is a leaf (the straight-through splice decode(f) + err has d x_U / d f_j = W_dec[j]); the sites
    between U and D are frozen by detaching what flows out of them. Examples run `group` at a time: they do
    not interact, and a downstream row's backward pass then covers only the examples where that node was
    selected (with all examples at once, every row's pass ran over the whole batch)."""
    sites = site_order(model, saes)
    pairs = pairs if pairs is not None else edge_pairs(model, sites)
    for _, d, _ in pairs:   # downstream_rows assumes dd_i/dy = 1[d_i != 0] W_enc[:, i]; some dictionaries differ
        if saes[d].edge_form_error:
            raise MinicircError(saes[d].edge_form_error)
    effects = {s: e if isinstance(e, SiteEffects) else SiteEffects.from_dense(e) for s, e in effects.items()}
    states = {s: st if isinstance(st, EdgeSiteState) else st.for_edges() for s, st in states.items()}
    B = len(batch)
    parts = {}
    for lo in range(0, B, group):
        hi = min(B, lo + group)
        sub = {s: st.examples(lo, hi) for s, st in states.items()}
        sub_eff = {s: e.examples(lo, hi) for s, e in effects.items()}
        for pair, (rows, vals) in group_edge_effects(model, saes, example_slice(batch, lo, hi), sites, pairs, sub,
                                                     {s: g[lo:hi] for s, g in grads.items()}, sub_eff, node_threshold,
                                                     aggregation, chunk_bytes, use_vmap, progress).items():
            parts.setdefault(pair, []).append((rows, vals))
    out = {}
    for pair in list(parts):      # each pair's group parts freed once merged: never all parts and all sums
        out[pair] = merge_groups(parts.pop(pair), saes[pair[1]].n_features)
        release_freed_memory(batch.clean.device)
    return out


def example_slice(batch, lo, hi):
    """Examples lo..hi-1 with all the batch's positions (slicing a Batch trims them to its longest example)."""
    cut = lambda t: None if t is None else t[lo:hi]
    return Batch(cut(batch.clean), cut(batch.patch), cut(batch.clean_answer), cut(batch.patch_answer),
                 cut(batch.last), batch.examples[lo:hi])


def merge_groups(parts, F):
    """One pair's (rows, values) of several example groups summed: rows in downstream_rows' order (features
    ascending, then the error nodes ascending)."""
    if len(parts) == 1:
        return parts[0]
    keys = sorted({r for rows, _ in parts for r in rows}, key=lambda r: (r % (F + 1) == F, r))
    where = {r: j for j, r in enumerate(keys)}
    idx, val = [], []
    for rows, vals in parts:
        i = vals.indices().clone()
        i[0] = torch.tensor([where[r] for r in rows], dtype=torch.long, device=i.device)[i[0]]
        idx.append(i)
        val.append(vals.values())
    total = torch.sparse_coo_tensor(torch.cat(idx, 1), torch.cat(val), (len(keys), *parts[0][1].shape[1:]),
                                    device=val[0].device).coalesce()
    return keys, total


def group_edge_effects(model, saes, batch, sites, pairs, states, grads, effects, node_threshold, aggregation,
                       chunk_bytes, use_vmap, progress):
    """edge_effects of one group of examples."""
    out = {}
    by_up = {}
    for u, d, frozen in pairs:
        by_up.setdefault(u, []).append((d, frozen))
    for u, downs in tqdm(by_up.items(), desc="edges", unit="upstream site", leave=False, disable=not progress):
        out.update(upstream_site_edges(model, saes, batch, sites, u, downs, states, grads, effects, node_threshold,
                                       aggregation, chunk_bytes, use_vmap))
        # The graph of this upstream site's forward pass is gone now (it lived in the call above).
        release_freed_memory(batch.clean.device)
    return out


def upstream_site_edges(model, saes, batch, sites, u, downs, states, grads, effects, node_threshold, aggregation,
                        chunk_bytes, use_vmap):
    """The edges from upstream site u to each of its downstream sites `downs` [(D, frozen sites)]: one forward
    pass from u, then batched vector-Jacobian products of each D's selected nodes back to u."""
    B, T = batch.clean.shape
    out = {}
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
            rows, build = downstream_rows(saes[d], states[d], grads[d], effects[d], node_threshold, aggregation)
            if not rows or not y.requires_grad:
                continue
            step = max(1, int(chunk_bytes // (B * T * y.shape[-1] * y.element_size() * 8)))
            vals = []
            for lo in range(0, len(rows), step):
                cot = build(lo, min(len(rows), lo + step))
                if use_vmap:
                    (G,) = torch.autograd.grad(y, x_u, cot, retain_graph=True, is_grads_batched=True)
                else:  # one backward per downstream row
                    G = torch.stack([torch.autograd.grad(y, x_u, c, retain_graph=True)[0] for c in cot])
                with torch.no_grad():
                    vals.append(upstream_effects(G, su, sae_u, aggregation))
            out[(u, d)] = (rows, sparse_cat_rows(vals))
    return out


class EdgeSum:
    """Running sum of one (U, D) pair's sparse edge values over batches.

    Rows are downstream nodes (their indices into D's node tensor), one row each in the order first seen.
    An entry is stored as one linear key row * prod(rest) + (its flat position in rest) and a float64 value,
    so the running sum is a sorted key array and merging is a sort + segment sum (about twice as fast as
    torch's coalesce, and a third of the index memory). Pending batch parts are merged whenever they outgrow
    the running sum, so memory stays within a small multiple of the summed circuit's size, whatever the
    number of batches."""

    MERGE_MIN = 1 << 16             # entries pending before a merge is worth it

    def __init__(self, rest):
        self.rest = tuple(rest)     # (F_U + 1,) or (T, F_U + 1)
        self.width = math.prod(self.rest)
        self.index = {}             # downstream node -> row
        self.parts = []             # [(linear keys, float64 values)]: parts[0] is the merged sum
        self.merged_nnz, self.pending_nnz = 0, 0

    def add(self, nodes, vals):
        """A batch's sparse (R, *rest) values whose rows are the downstream `nodes`."""
        idx = vals.indices()
        flat = idx[1] if len(self.rest) == 1 else idx[1] * self.rest[1] + idx[2]
        self.add_linear(nodes, idx[0] * self.width + flat, vals.values())

    def add_linear(self, nodes, lin, val, merge=True):
        """Entries with linear keys over rows 0..len(nodes)-1 of `nodes` (another batch's or rank's rows)."""
        rows = torch.tensor([self.index.setdefault(k, len(self.index)) for k in nodes], dtype=torch.long,
                            device=lin.device)
        if lin.numel():
            lin = rows[lin // self.width] * self.width + lin % self.width
        self.parts.append((lin, val.to(torch.float64)))
        self.pending_nnz += val.numel()
        if merge and self.pending_nnz >= max(self.merged_nnz, self.MERGE_MIN):
            self.merge()

    def merge(self):
        if len(self.parts) > 1 or (self.parts and self.pending_nnz):
            lin = torch.cat([p[0] for p in self.parts])
            val = torch.cat([p[1] for p in self.parts])
            keys, inverse = torch.unique(lin, sorted=True, return_inverse=True)
            # index_add_ adds in the order of the entries: parts in arrival order, so the sums are reproducible
            self.parts = [(keys, torch.zeros(len(keys), dtype=val.dtype, device=val.device).index_add_(0, inverse, val))]
            self.merged_nnz, self.pending_nnz = len(keys), 0
        return self.parts[0] if self.parts else (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64))

    def export(self):
        """(downstream nodes, linear keys, values, rest), for gathering over ranks."""
        lin, val = self.merge()
        return list(self.index), lin, val, self.rest

    def result(self, n, dtype):
        """(rows (R,) long ascending, coalesced sparse (R, *rest) of sum / n): rows in node order (position,
        then feature, the error last), whatever order the batches met them in."""
        lin, val = self.merge()
        nodes = list(self.index)
        order = sorted(range(len(nodes)), key=nodes.__getitem__)
        new_row = torch.empty(len(nodes), dtype=torch.long, device=lin.device)
        new_row[torch.tensor(order, dtype=torch.long, device=lin.device)] = torch.arange(len(nodes), device=lin.device)
        lin, perm = torch.sort(new_row[lin // self.width] * self.width + lin % self.width)
        val = val[perm]
        row, flat = lin // self.width, lin % self.width
        idx = (torch.stack([row, flat]) if len(self.rest) == 1
               else torch.stack([row, flat // self.rest[1], flat % self.rest[1]]))
        shape = (len(nodes), *self.rest)
        vals = torch.sparse_coo_tensor(idx, (val / n).to(dtype), shape, is_coalesced=True, check_invariants=False,
                                       device=val.device)
        return torch.tensor([nodes[r] for r in order], dtype=torch.long, device="cpu"), vals.cpu()
