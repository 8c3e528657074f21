"""Edge effects, batched and sparse: the numbers of reference.edge_effects, fast.

Many downstream nodes share one batched vector-Jacobian product: `downstream_rows` builds their cotangents
on the downstream site, one forward pass from the upstream site is pushed back by all of them, and
`upstream_effects` contracts the gradients at the upstream site's rows. The results are sparse: at real
scale a dense (rows x positions x 32k features) block would not fit. What every level of one call reads
(the model, the dictionaries, the settings and one group of examples) travels down as one EdgeRun.
"""
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..data import Batch
from ..errors import MinicircError
from ..rows import chunk_rows, row_ids
from .common import clt_edge_error, edge_pairs, frozen_edit, frozen_weights, recording_inputs, site_order
from .memory import release_freed_memory
from .states import EdgeSiteState, example_slice


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
    lo..hi-1 on y, and None, or for a transcoder (features f(u) of its input u, err = y - decode(f) - skip(u))
    the pair: the features' cotangents on u, the error's v on y and -((v @ W_dec.T) * active) @ W_enc.T
    - v @ W_skip on u."""
    F = st.n_features
    B, T, d = L.shape
    L2 = L.reshape(B * T, d)
    identity = sae_d.kind == "identity"
    transcoder = bool(getattr(sae_d, "reads", None))
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
        def error_cotangent(v, out):        # v - ((v @ I) * 1) @ I: exactly 0
            return torch.zeros_like(v)
    else:
        a_n, a_i = row_ids(st.c[0]), st.c[1]                                   # the active entries

        def error_cotangent(v, out):
            """out - ((v @ W_dec.T) * active) @ W_enc.T for v (N, d) (out: v, or a transcoder's -v @ W_skip;
            changed in place), the product on the active entries only."""
            step = chunk_rows(d)
            for lo in range(0, len(a_n), step):
                n, i = a_n[lo:lo + step], a_i[lo:lo + step]
                s_e = (v[n] * sae_d.W_dec[i]).sum(-1)
                out.index_add_(0, n, -(s_e[:, None] * sae_d.W_enc[:, i].T))
            return out

    n_feat = len(feat_keys)

    def error_rows(v, r, out, out_u):
        """Row r's error cotangent for v (B * T, d): on y, and on u for a transcoder."""
        if not transcoder:
            out[r] = error_cotangent(v, v.clone())
            return
        out[r] = v
        out_u[r] = error_cotangent(v, -(v @ sae_d.W_skip) if sae_d.has_skip else torch.zeros_like(v))

    def build(lo, hi):
        chunk = [divmod(r, F + 1) for r in rows[lo:hi]]          # (position, column); position 0 for `sum`
        out = torch.zeros(len(chunk), B * T, d, dtype=L.dtype, device=L.device)   # (r, B*T, d)
        out_u = torch.zeros_like(out) if transcoder else None
        f_lo, f_hi = min(lo, n_feat), min(hi, n_feat)
        if f_hi > f_lo:
            # each selected active entry (n, i) puts coef * W_enc[:, i] at token n of its row (on u: a
            # transcoder's features read its input)
            e = (entry_row >= f_lo) & (entry_row < f_hi)
            (out_u if transcoder else out)[entry_row[e] - lo, n_sel[e]] = coef[e, None] * sae_d.W_enc[:, i_sel[e]].T
        for r, (t, i) in enumerate(chunk):
            if i != F:
                continue
            if aggregation == "sum":
                error_rows(L2 * sel_err.reshape(-1, 1), r, out, out_u)
            else:   # only position t is non-zero
                v = torch.zeros_like(L)
                v[:, t] = L[:, t] * sel_err[:, t, None]
                error_rows(v.reshape(B * T, d), r, out, out_u)
        return out.view(len(chunk), B, T, d), (None if out_u is None else out_u.view(len(chunk), B, T, d))

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


@dataclass
class EdgeRun:
    """One edge_effects call as its levels read it (edge_effects -> group_edge_effects ->
    upstream_site_edges): the model and dictionaries, the settings, and one group of examples."""
    model: torch.nn.Module
    saes: dict              # {site: Dictionary}
    sites: list             # the dictionary sites, in model order
    node_threshold: float
    aggregation: str        # "sum" or "none"
    chunk_bytes: int        # the cotangents of one batched backward pass stay under about this many bytes
    use_vmap: bool          # one batched backward pass per chunk of rows (False: one per row)
    progress: bool
    batch: Batch
    states: dict            # {site: EdgeSiteState}
    grads: dict             # {site: dm/dx (B, T, d)}
    effects: dict           # {site: SiteEffects}

    def examples(self, lo, hi):
        """The same run on examples lo..hi-1."""
        return replace(self, batch=example_slice(self.batch, lo, hi),
                       states={s: st.examples(lo, hi) for s, st in self.states.items()},
                       grads={s: g[lo:hi] for s, g in self.grads.items()},
                       effects={s: e.examples(lo, hi) for s, e in self.effects.items()})


def edge_effects(model, saes, batch, states, grads, effects, node_threshold, aggregation="sum",
                 chunk_bytes=256 * 2**20, pairs=None, use_vmap=True, progress=False, group=1):
    """reference.edge_effects, batched: {(U, D): (rows, values)} with rows a list of D's node indices (in
    the order `downstream_rows` makes them, not sorted) and values a sparse COO tensor (R, F_U + 1) for
    `sum`, (R, T, F_U + 1) for `none`, summed over the batch's examples. `states` are SparseSiteState or their
    for_edges() part (find_circuit passes that, to free the rest first); `effects` are SiteEffects.

    U's value is a leaf (the straight-through splice decode(f) + err has d x_U / d f_j = W_dec[j]); the sites
    between U and D are frozen by detaching what flows out of them. Examples run `group` at a time: they do
    not interact, and a downstream row's backward pass then covers only the examples where that node was
    selected (with all examples at once, every row's pass ran over the whole batch). Not defined for
    cross-layer transcoders (common.clt_edge_error)."""
    if clt_edge_error(saes):
        raise MinicircError(clt_edge_error(saes))
    sites = site_order(model, saes)
    pairs = pairs if pairs is not None else edge_pairs(model, sites)
    for _, d, _ in pairs:   # downstream_rows assumes dd_i/dy = 1[d_i != 0] W_enc[:, i]; some dictionaries differ
        if saes[d].edge_form_error:
            raise MinicircError(saes[d].edge_form_error)
    states = {s: st if isinstance(st, EdgeSiteState) else st.for_edges() for s, st in states.items()}
    run = EdgeRun(model, saes, sites, node_threshold, aggregation, chunk_bytes, use_vmap, progress, batch, states,
                  grads, effects)
    B = len(batch)
    parts = {}
    for lo in range(0, B, group):
        for pair, (rows, vals) in group_edge_effects(run.examples(lo, min(B, lo + group)), pairs).items():
            parts.setdefault(pair, []).append((rows, vals))
    out = {}
    for pair in list(parts):      # each pair's group parts freed once merged: never all parts and all sums
        out[pair] = merge_groups(parts.pop(pair), saes[pair[1]].n_features)
        release_freed_memory(batch.clean.device)
    return out


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
    # check_invariants=False: the indices are in range by construction (checking costs a pass over them)
    total = torch.sparse_coo_tensor(torch.cat(idx, 1), torch.cat(val), (len(keys), *parts[0][1].shape[1:]),
                                    check_invariants=False, device=val[0].device).coalesce()
    return keys, total


def group_edge_effects(run, pairs):
    """edge_effects of one group of examples (run.examples), for the site pairs `pairs`."""
    out = {}
    by_up = {}
    for u, d, frozen in pairs:
        by_up.setdefault(u, []).append((d, frozen))
    for u, downs in tqdm(by_up.items(), desc="edges", unit="upstream site", leave=False, disable=not run.progress):
        out.update(upstream_site_edges(run, u, downs))
        # The graph of this upstream site's forward pass is gone now (it lived in the call above).
        release_freed_memory(run.batch.clean.device)
    return out


def upstream_site_edges(run, u, downs):
    """The edges from upstream site u to each of its downstream sites `downs` [(D, frozen sites)]: one forward
    pass from u, then batched vector-Jacobian products of each D's selected nodes back to u."""
    B, T = run.batch.clean.shape
    out = {}
    su, sae_u = run.states[u], run.saes[u]
    x_u = su.x_c.detach().clone().requires_grad_(True)
    recorded, inputs = {}, {}

    def keep(s, frozen):
        hold = frozen_edit(run.saes.get(s), s, inputs) if frozen else None
        def fn(x):
            recorded[s] = x                       # its own value still depends on U (for U -> s)
            return x if hold is None else hold(x)   # but a frozen site passes nothing of U's through its nodes
        return fn

    frozen_any = {fr for _, frs in downs for fr in frs}
    edit = {s: keep(s, s in frozen_any) for s in {d for d, _ in downs} | frozen_any}
    edit[u] = lambda x: x_u
    edit = recording_inputs(run.model, run.saes, list(edit), edit, inputs)
    last = max((d for d, _ in downs), key=run.sites.index)
    with frozen_weights(run.model), torch.enable_grad():
        run.model(run.batch.clean, edit=edit, stop_at=last)
        for d, _ in downs:
            y, x_in = recorded[d], inputs.get(d)     # x_in: a transcoder's input u in this run
            rows, build = downstream_rows(run.saes[d], run.states[d], run.grads[d], run.effects[d],
                                          run.node_threshold, run.aggregation)
            live = [i for i, v in enumerate((y, x_in)) if v is not None and v.requires_grad]
            if not rows or not live:
                continue
            outs = [(y, x_in)[i] for i in live]
            per_row = B * T * y.shape[-1] * y.element_size() * 8 * (1 if x_in is None else 2)
            step = max(1, int(run.chunk_bytes // per_row))
            vals = []
            for lo in range(0, len(rows), step):
                both = build(lo, min(len(rows), lo + step))
                cot = [both[i] for i in live]
                if run.use_vmap:
                    (G,) = torch.autograd.grad(outs, x_u, cot, retain_graph=True, is_grads_batched=True)
                else:  # one backward per downstream row
                    G = torch.stack([torch.autograd.grad(outs, x_u, [c[r] for c in cot], retain_graph=True)[0]
                                     for r in range(len(cot[0]))])
                with torch.no_grad():
                    vals.append(upstream_effects(G, su, sae_u, run.aggregation))
            out[(u, d)] = (rows, sparse_cat_rows(vals))
    return out
