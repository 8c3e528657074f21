"""Node and edge effects, batched and sparse: the numbers of minicirc.attribution's definitions, fast.

- Site gradients: dm/dx in one backward for every site (attrib), all IG steps of a site in one batch
  (ig); dm/df = (dm/dx) @ W_dec.T is projected only where delta_f != 0 (the sampled product minicirc.ops
  fuses), and dm/derr = dm/dx.
- Exact patching: `group` patched nodes per forward, by tiling the examples.
- Edges: many downstream nodes share one batched vector-Jacobian product (`downstream_rows` builds their
  cotangents on the downstream site, `upstream_effects` contracts the gradients at the upstream site), and
  the results are sparse: at real scale a dense (rows x positions x 32k features) block would not fit.
- EdgeSum: the running sum of one site pair's sparse edge values over batches.
"""
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .attribution import METHODS, edge_pairs, frozen_weights, site_order, site_states
from .errors import MinicircError


@dataclass
class NodeEffects:
    """Per-example node effects of one batch."""
    m_clean: torch.Tensor           # (B,) metric on the clean inputs
    m_patch: torch.Tensor | None    # (B,) metric on the patch inputs (None without patch inputs)
    states: dict                    # {site: SiteState}
    effects: dict                   # {site: (B, T, F + 1)}, column F the error node
    grads: dict | None              # {site: dm/dx (B, T, d)}, the L_d of edges (None for `exact`)


def tile(batch, k):
    """The batch repeated k times along examples (row s*B + b is example b), for batched IG steps."""
    from .data import Batch
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


def ig_site_gradients(model, metric, batch, sites, states, steps, progress=False):
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


def grouped_exact_effects(model, saes, metric, batch, sites, states, m_clean, group=64):
    """attribution.exact_effects with `group` patched nodes per forward (the examples tiled): moving one
    node to its patch value moves the site by delta_f * (its decoder row), or by delta_err."""
    B, T = batch.clean.shape
    out = {}
    with torch.no_grad():
        for s in sites:
            st, sae = states[s], saes[s]
            F = st.f_c.shape[-1]
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
            out[s] = eff
    return out


def node_effects(model, saes, metric, batch, method="ig", steps=10, use_ext=None, progress=False):
    """Per-example node effects of one batch by `method` (attrib, ig or exact) -> NodeEffects."""
    if method not in METHODS:
        raise MinicircError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    sites = site_order(model, saes)
    m_c, m_p, states = site_states(model, saes, metric, batch, sites)
    if method == "exact":
        return NodeEffects(m_c, m_p, states, grouped_exact_effects(model, saes, metric, batch, sites, states, m_c), None)
    with frozen_weights(model):
        grads = (attrib_site_gradients(model, metric, batch, sites) if method == "attrib"
                 else ig_site_gradients(model, metric, batch, sites, states, steps, progress))
    effects = {}
    with torch.no_grad():
        for s in sites:
            st = states[s]
            err = (grads[s] * st.delta_err).sum(-1, keepdim=True)
            effects[s] = torch.cat([feature_effects(grads[s], saes[s], st.delta_f, use_ext), err], -1)
    return NodeEffects(m_c, m_p, states, effects, grads)


# --- edges ----------------------------------------------------------------------------------------

def downstream_rows(sae_d, f, L, effects, node_threshold, aggregation):
    """The downstream nodes that get edges, and their cotangents on the downstream site value y.

    A downstream feature d_i = f_i(y) has dd_i/dy = 1[f_i != 0] W_enc[:, i] (relu, jumprelu and topk alike;
    1 for neurons), and the error err = y - decode(encode(y)) has the vector-Jacobian product
    v - ((v @ W_dec.T) * active) @ W_enc.T. So L_d . dd/du = (cotangent on y) . dy/du, with a cotangent
    in d_model space: cheap to build and to push back through the model. One row per downstream node,
    summing the selected (example, position) entries that aggregation merges anyway (all positions with
    `sum`, the same position with `none`).

    f: the downstream features at the clean input (they fix which features are active); effects: the
    per-example node effects (B, T, F + 1). Returns (rows, build): rows name the downstream node of each row
    (its index into the aggregated node tensor, (F + 1,) or (T, F + 1) flattened; the features first, then
    the errors), and build(lo, hi) gives the cotangents (hi - lo, B, T, d) of rows lo..hi-1."""
    F = f.shape[-1]
    with torch.no_grad():
        active = torch.ones_like(f) if sae_d.kind == "identity" else (f != 0).to(f.dtype)
        sel_feat = effects[..., :F].abs() > node_threshold                          # (B, T, F)
        coef = (L @ sae_d.W_dec.T) * sel_feat * active                              # (B, T, F)
        sel_err = effects[..., F].abs() > node_threshold                            # (B, T)
    if aggregation == "sum":
        rows = torch.nonzero(sel_feat.any(dim=(0, 1))).flatten().tolist()
        rows += [F] if sel_err.any() else []
    else:
        rows = [t * (F + 1) + i for t, i in torch.nonzero(sel_feat.any(dim=0)).tolist()]
        rows += [t * (F + 1) + F for t in torch.nonzero(sel_err.any(dim=0)).flatten().tolist()]

    def error_cotangent(v):
        return v - ((v @ sae_d.W_dec.T) * active) @ sae_d.W_enc.T

    def error_cotangent_at(v, t):
        return v - ((v @ sae_d.W_dec.T) * active[:, t]) @ sae_d.W_enc.T

    def build(lo, hi):
        chunk = [divmod(r, F + 1) for r in rows[lo:hi]]          # (position, column); position 0 for `sum`
        out = torch.zeros(len(chunk), *L.shape, dtype=L.dtype, device=L.device)   # (r, B, T, d)
        feats = [(r, t, i) for r, (t, i) in enumerate(chunk) if i != F]
        if feats:
            r_idx, t_idx, i_idx = (torch.tensor(v, device=L.device) for v in zip(*feats))
            if aggregation == "sum":
                # row r: coef[b, t, i_r] * W_enc[:, i_r] at every (b, t)
                out[r_idx] = coef[..., i_idx].permute(2, 0, 1)[..., None] * sae_d.W_enc[:, i_idx].T[:, None, None, :]
            else:
                # row r: only position t_r is non-zero
                out[r_idx, :, t_idx] = coef[:, t_idx, i_idx].T[..., None] * sae_d.W_enc[:, i_idx].T[:, None, :]
        for r, (t, i) in enumerate(chunk):
            if i == F and aggregation == "sum":
                out[r] = error_cotangent(L * sel_err[..., None])
            elif i == F:   # only position t is non-zero
                out[r, :, t] = error_cotangent_at(L[:, t] * sel_err[:, t, None], t)
        return out

    return rows, build


def upstream_effects(G, st, sae_u, aggregation):
    """Edge values from the gradients G (R, B, T, d) at the upstream site: for feature j,
    sum over (example, position) of (G . W_dec[j]) * delta_f[j], computed only where delta_f != 0 (the
    sampled product), and G . delta_err for the error.

    Returns a sparse COO tensor (R, F + 1) for `sum`, (R, T, F + 1) for `none` (last column: the error)."""
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
    """attribution.edge_effects, batched: {(U, D): (rows, values)} with rows a list of D's node indices (in
    the order `downstream_rows` makes them, not sorted) and values a sparse COO tensor (R, F_U + 1) for
    `sum`, (R, T, F_U + 1) for `none`, summed over the batch's examples.

    U's value is a leaf (the straight-through splice decode(f) + err has d x_U / d f_j = W_dec[j]); the sites
    between U and D are frozen by detaching what flows out of them."""
    sites = site_order(model, saes)
    pairs = pairs if pairs is not None else edge_pairs(model, sites)
    for _, d, _ in pairs:   # downstream_rows assumes dd_i/dy = 1[d_i != 0] W_enc[:, i]; some dictionaries differ
        if saes[d].edge_form_error:
            raise MinicircError(saes[d].edge_form_error)
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
                rows, build = downstream_rows(saes[d], states[d].f_c, grads[d], effects[d], node_threshold, aggregation)
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
