"""Ablation: faithfulness and completeness of a circuit, and sweeps over node thresholds (docs/method.md §8).

The clean input runs through the sites in order; at each evaluated site the current (already edited)
activation is re-encoded, features outside the kept set are set to their ablation value, the error is
ablated unless kept, and decode(f) + err is written back. Ablation values are means over the patch inputs
(clean inputs when there is no patch): per position when all examples share one length (as the original,
whose templates do), otherwise over examples and real positions. Zero ablation uses 0 for features and
errors; resample ablation gives each example the patch-input values of another example, drawn by a seeded
permutation of the dataset (the original's x[randperm]), position by position. A transcoder at mlp_l encodes
the MLP's input u of the same (edited) run and writes decode(f') + skip(u) + err': its skip term follows u,
as it is no node. A cross-layer transcoder's layer t writes decode_t(f'_t) + (what the earlier layers' f'
write into t) + err'_t, its error err_t completing the earlier layers' writes of the same run.
"""
import numpy as np
import torch
from tqdm.auto import tqdm

from . import attribution, ops
from .attribution.common import inputs_from, later_targets, recording_inputs, with_sources
from .errors import MinicircError
from .model.sites import site_layer, sites_from_layer
from .rows import row_ids, rows_from_entries, rows_matmul, rows_to_dense
from .sae.clt import is_clt, split_sites
from .sae.sparse import split_rows

ERROR_MODES = ("default", "remove", "keep")
ABLATIONS = ("mean", "zero", "resample")


def chunks(model, batch, batch_size):
    """(first example, slice) for slices of batch_size examples, each on the model's device: memory follows the
    batch size, not the dataset."""
    if batch_size < 1:
        raise MinicircError(f"batch size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    for i in range(0, len(batch), batch_size):
        yield i, batch[i:i + batch_size].to(device)


def resample_order(batch, seed=0):
    """The donor of each example for resample ablation: a permutation drawn on the CPU from `seed`."""
    if len(set(batch.last.tolist())) > 1:
        raise MinicircError("resample ablation swaps whole examples position by position, so all examples must "
                            "have the same length")
    return torch.randperm(len(batch), generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu")


def resample_values(model, saes, batch, donors, sites):
    """{site: (features as rows over the B * T tokens, errors (B, T, d))} of the donor examples' patch inputs
    (clean without patch)."""
    source = batch.patch if batch.patch is not None else batch.clean
    return site_rows(model, saes, source[donors].to(next(model.parameters()).device), sites)


@torch.no_grad()
def site_rows(model, saes, tokens, sites):
    """{site: (features as rows over the B * T tokens, error (B, T, d))} of the unedited model on tokens."""
    cache = {}
    # extra=: the cache holds optional sites (z_l, resid_mid_l) only when asked for.
    model(tokens, cache=cache, stop_at=max(sites, key=model.all_sites.index), extra=with_sources(model, saes, sites))
    return split_sites(saes, sites, cache, inputs_from(model, saes, sites, cache))


def active_units(model, saes, batch, sites, batch_size=64):
    """{site: bool (T, F + 1) on the CPU}: whether feature i (column i) or the error (column F) is non-zero at
    position t on at least one of the batch's prompts, clean or patch (real tokens only), in the unedited model.

    Why: a node inactive on every prompt at its position has mean 0 over the patch prompts and is 0 on the
    clean ones, so mean ablation leaves it (on the unedited run) where it was: counting it in a circuit adds
    a node that does nothing there. An Identity dictionary's error is exactly 0, so a neuron basis's error
    nodes are never active."""
    T = batch.clean.shape[1]
    out = {s: torch.zeros(T, saes[s].n_features + 1, dtype=torch.bool, device="cpu") for s in sites}
    for _, b in chunks(model, batch, batch_size):
        real = torch.arange(T, device=b.clean.device)[None] <= b.last[:, None]     # (B, T)
        for tokens in (b.clean,) if b.patch is None else (b.clean, b.patch):
            for s, ((crow, col, val), err) in site_rows(model, saes, tokens, sites).items():
                F = saes[s].n_features
                n = row_ids(crow)
                hit = (val != 0) & real.flatten()[n]
                feats = torch.zeros(T * F, dtype=torch.bool, device=val.device)
                feats[(n[hit] % T) * F + col[hit]] = True
                out[s][:, :F] |= feats.view(T, F).cpu()
                out[s][:, F] |= ((err != 0).any(-1) & real).any(0).cpu()
    return out


def ablation_values(model, saes, metric, batch, sites, mode="mean", batch_size=64):
    """{site: (feature values (T, F) or (F,), error values (T, d) or (d,))} to ablate to."""
    if mode == "zero":
        return {s: (saes[s].W_enc.new_zeros(saes[s].n_features), saes[s].W_enc.new_zeros(saes[s].d_in))
                for s in sites}
    if mode not in ABLATIONS:
        raise MinicircError(f"unknown ablation {mode!r} (known: {', '.join(ABLATIONS)})")
    if mode == "resample":
        return None     # per example: resample_values, batch by batch
    same_length = len(set(batch.last.tolist())) == 1
    T = batch.clean.shape[1]
    sums, count = {}, 0         # float64 running sums over examples (same length) or over real tokens
    with torch.no_grad():
        for _, b in chunks(model, batch, batch_size):
            tokens = b.patch if b.patch is not None else b.clean
            _, cache = attribution.record_sites(model, metric, b, tokens, with_sources(model, saes, sites))
            split = split_sites(saes, sites, cache, inputs_from(model, saes, sites, cache))
            real = (torch.arange(tokens.shape[1], device=tokens.device)[None] <= b.last[:, None])[..., None]
            count += len(b) if same_length else int(real.sum())
            for s in sites:
                F = saes[s].n_features
                (crow, col, val), err = split[s]
                n, val, err = row_ids(crow), val.double(), err.double()
                if s not in sums:
                    sums[s] = (torch.zeros(*((T,) if same_length else ()), F, dtype=torch.float64, device=val.device),
                               torch.zeros(*((T,) if same_length else ()), err.shape[-1], dtype=torch.float64,
                                           device=val.device))
                # each entry added at its feature (and position), examples in order: the dense sum's order
                if same_length:
                    sums[s][0].view(-1).index_add_(0, (n % tokens.shape[1]) * F + col, val)
                    sums[s][1].add_(err.sum(0))
                else:
                    sums[s][0].index_add_(0, col, val * real.flatten()[n])
                    sums[s][1].add_((err * real).sum((0, 1)))
    dtype = lambda s: saes[s].W_enc.dtype
    return {s: ((f / count).to(dtype(s)), (e / count).to(dtype(s))) for s, (f, e) in sums.items()}


def ablated_metric(model, saes, metric, batch, keep, values, errors="default"):
    """Metric (B,) with every feature outside `keep` set to its ablation value.

    keep: {site: bool mask (F + 1,) or (T, F + 1), column F the error node}; sites absent from keep are not
    touched (e.g. layers before the first evaluated one). values: {site: (features, errors)} shaped
    (F,) / (d,), per position (T, F) / (T, d), or per example (rows over the B * T tokens) / (B, T, d)."""
    if errors not in ERROR_MODES:
        raise MinicircError(f"unknown error handling {errors!r} (known: {', '.join(ERROR_MODES)})")
    clt = [s for s in saes if is_clt(saes[s])]
    if clt and any(s in keep for s in clt) and not all(s in keep for s in clt):
        # each layer's error completes the earlier layers' writes, which reach it only through this run
        raise MinicircError(f"a cross-layer transcoder is ablated at all of its layers or none: keep names "
                            f"{', '.join(s for s in clt if s in keep)} but not {', '.join(s for s in clt if s not in keep)}")

    inputs = {}     # {transcoder site: its input u in this run}
    # A cross-layer transcoder's writes into the later layers in this run: {target site: sum of (what the
    # earlier layers' features write there, what their ablated features write there)}.
    live, ablated = {}, {}

    def ablate(s):
        mask = keep[s]
        fval, eval_ = values[s]
        sae = saes[s]

        def fn(x):
            out = spliced(x)
            return out if s not in inputs else out + sae.skip(inputs[s])

        def writes(rows, m, fval, T, W, bias=None):
            """f' @ W (+ bias), f' the features `rows` where m keeps them and the ablation values elsewhere: the
            kept entries of the rows @ W + (ablation values outside the set) @ W."""
            B = (rows[0].numel() - 1) // T
            out = rows_matmul(*kept_entries(rows, m, T), W)
            out = (out if bias is None else out + bias).view(B, T, -1)
            if isinstance(fval, tuple):     # per example (resample): the donors' rows outside the set
                return out + rows_matmul(*kept_entries(fval, ~m, T), W).view(B, T, -1)
            fv = fval[:T] if fval.dim() == 2 else fval
            return out + (fv.to(W.device) * ~m) @ W

        def spliced(x):
            B, T, d = x.shape
            m = (mask[:T] if mask.dim() == 2 else mask).to(x.device)
            em = m[..., -1] if errors == "default" else torch.tensor(errors == "keep", device=x.device)
            em = em[:, None] if em.dim() == 1 else em
            ev = eval_[:T] if eval_.dim() == 2 else eval_[:, :T] if eval_.dim() == 3 else eval_
            rows, err = split_rows(sae, x, inputs.get(s))
            if is_clt(sae):     # the error completes the earlier layers' writes of this run; they write ablated
                err = err - live.pop(s, 0)
                for t in later_targets(sae):
                    W = sae.W_out[:, site_layer(t) - sae.layer]
                    live[t] = live.get(t, 0) + rows_matmul(*rows, W).view(B, T, d)
                    ablated[t] = ablated.get(t, 0) + writes(rows, m[..., :-1], fval, T, W)
            err = torch.where(em, err, ev.to(x.device))
            if sae.kind not in ops.KINDS:     # identity (d features) and kinds of their own: dense
                f = dense_features(rows, B, T, sae.n_features)
                fv = (dense_features(fval, B, T, sae.n_features) if isinstance(fval, tuple)
                      else fval[:T] if fval.dim() == 2 else fval)
                return sae.decode(torch.where(m[..., :-1], f, fv.to(x.device))) + err
            # decode(f') with f' = f on kept features, the ablation value elsewhere: b_dec + (kept entries of
            # the rows) @ W_dec + (ablation values outside the set) @ W_dec
            out = writes(rows, m[..., :-1], fval, T, sae.W_dec, sae.b_dec)
            writes_in = ablated.pop(s, None)     # a CLT layer's: the earlier layers' ablated writes
            return out + err if writes_in is None else out + err + writes_in
        return fn

    with torch.no_grad():
        edit = recording_inputs(model, saes, list(keep), {s: ablate(s) for s in keep}, inputs)
        return metric(model, batch, batch.clean, edit)


def kept_entries(rows, mask, T):
    """The entries of rows (over B * T tokens, token b * T + t) whose feature is set in mask (F,) or (T, F)."""
    crow, col, val = rows
    n = row_ids(crow)
    keep = mask[n % T, col] if mask.dim() == 2 else mask[col]
    return rows_from_entries(crow.numel() - 1, n[keep], col[keep], val[keep])


def dense_features(rows, B, T, F):
    """Rows over B * T tokens as (B, T, F): only for dictionaries with few features (identity)."""
    return rows_to_dense(*rows, F).view(B, T, F)


def node_masks(circuit_nodes, saes, sites, T=None):
    """Masks {site: bool (F + 1,) or (T, F + 1), column F the error} from kept node records: circuit.json's
    node dicts (feature an index or "err") or Circuit.kept_nodes' Nodes (column n_features the error).

    Nodes on a site with a dictionary that is not in `sites` (below the first evaluated layer) are skipped:
    that site is left unablated, so keeping them changes nothing."""
    positional = T is not None
    masks = {s: torch.zeros(*((T,) if positional else ()), saes[s].n_features + 1, dtype=torch.bool,
                            device=saes[s].W_enc.device) for s in sites}
    for n in circuit_nodes:
        if isinstance(n, dict):   # circuit.json's record
            site, feat, pos = n["site"], n["feature"], n.get("pos")
        else:
            site, pos = n.site, n.pos
            feat = "err" if n.error else n.column
        if site not in saes:
            raise MinicircError(f"circuit node on site {site!r}, which has no dictionary here")
        if feat != "err" and not (0 <= int(feat) < saes[site].n_features):
            raise MinicircError(f"circuit node {site}/{feat}: feature index out of range ({saes[site].n_features})")
        if site not in masks:
            continue
        col = saes[site].n_features if feat == "err" else int(feat)
        if positional:
            if pos is None or not (0 <= pos < T):
                raise MinicircError(f"circuit node {site}/{feat} lacks a valid position for this data")
            masks[site][pos, col] = True
        else:
            masks[site][col] = True
    return masks


def faithfulness(model, saes, batch, circuit_nodes, positional=False, metric=None, ablation="mean",
                 errors="default", first_layer=0, values=None, reference=None, batch_size=64, progress=False,
                 seed=0):
    """{'m_full', 'm_empty', 'm_circuit', 'm_complement', 'faithfulness', 'completeness'} (means over examples).

    reference: (m_full, m_empty) from an earlier call with the same data and settings; they do not depend on
    the circuit, so a sweep computes them once. Examples run batch_size at a time. seed: the donor permutation
    of resample ablation."""
    metric = metric or attribution.logit_diff
    # first_layer <= 0: every site, embed included (embed counts as layer -1)
    sites = sites_from_layer(attribution.site_order(model, saes), first_layer if first_layer > 0 else None)
    if first_layer > 0 and any(is_clt(sae) for sae in saes.values()):
        raise MinicircError("a cross-layer transcoder's error nodes complete the writes of all its earlier layers, "
                            "so it is evaluated from layer 0 (first_layer 0)")
    T = batch.clean.shape[1] if positional else None
    if len(batch) == 0:
        raise MinicircError("the dataset is empty")
    values = values or ablation_values(model, saes, metric, batch, sites, ablation, batch_size)
    order = resample_order(batch, seed) if ablation == "resample" else None
    masks = node_masks(circuit_nodes, saes, sites, T)
    empty = {s: torch.zeros_like(m) for s, m in masks.items()}
    complement = {s: ~m for s, m in masks.items()}
    runs = ["circuit", "complement"] + (["full", "empty"] if reference is None else [])
    bar = tqdm(total=len(runs) * -(-len(batch) // batch_size), desc="ablations", unit="batch", disable=not progress)

    def run(keep):
        """Mean metric over the examples with everything outside `keep` ablated (keep=None: no edit)."""
        total = 0.0
        for i, b in chunks(model, batch, batch_size):
            vals = values if order is None else resample_values(model, saes, batch, order[i:i + len(b)], sites)
            with torch.no_grad():
                m = (metric(model, b, b.clean, {}) if keep is None
                     else ablated_metric(model, saes, metric, b, keep, vals, errors))
            total += m.double().sum().item()
            bar.update()
        return total / len(batch)

    # m(M) is the unedited model, as the original (with errors="remove", keeping every node would still ablate
    # the errors); m(empty) ablates every node of the evaluated sites.
    m_full, m_empty = reference if reference is not None else (run(None), run(empty))
    m_c, m_mc = run(masks), run(complement)
    bar.close()
    denom = m_full - m_empty
    return {"m_full": m_full, "m_empty": m_empty, "m_circuit": m_c, "m_complement": m_mc,
            "faithfulness": (m_c - m_empty) / denom if denom != 0 else float("nan"),
            "completeness": (m_mc - m_empty) / denom if denom != 0 else float("nan")}


def sweep(model, saes, batch, circuit, thresholds=None, metric=None, progress=True, batch_size=64, **kw):
    """Faithfulness and completeness of the circuit's nodes at each node threshold (logspace(-4, 0, 15) by
    default, as the original) -> list of dicts with threshold, n_nodes, faithfulness, completeness."""
    thresholds = list(np.logspace(-4, 0, 15)) if thresholds is None else list(thresholds)
    metric = metric or attribution.logit_diff
    sites = attribution.site_order(model, saes)
    values = kw.pop("values", None) or ablation_values(model, saes, metric, batch, sites, kw.get("ablation", "mean"),
                                                       batch_size)
    out, reference = [], None
    for thr in tqdm(thresholds, desc="threshold sweep", disable=not progress):
        kept = circuit.kept_nodes(threshold=float(thr))
        r = faithfulness(model, saes, batch, kept, positional=circuit.positional, metric=metric, values=values,
                         reference=reference, batch_size=batch_size, **kw)
        reference = (r["m_full"], r["m_empty"])
        out.append({"threshold": float(thr), "n_nodes": len(kept), **r})
    return out


def nodes_for_faithfulness(points, target=0.9):
    """Fewest nodes among sweep points reaching `target` faithfulness (None when none does: a report then
    says "not reached", with best_point's faithfulness and size, never a count of nodes with no effect)."""
    ok = [p["n_nodes"] for p in points if p["faithfulness"] >= target]
    return min(ok) if ok else None


def best_point(points):
    """The point of highest faithfulness, the fewest nodes among ties (None without a finite one)."""
    return min((p for p in points if p["faithfulness"] == p["faithfulness"]),
               key=lambda p: (-p["faithfulness"], p["n_nodes"]), default=None)


@torch.no_grad()
def pair_accuracy(model, batch):
    """The share of a batch's prompts, clean and patch both, where the prompt's own answer outscores the other
    prompt's at the last token (a model that does the task gets 1)."""
    rows = torch.arange(len(batch), device=batch.clean.device)
    right = 0
    for prompt, good, bad in ((batch.clean, batch.clean_answer, batch.patch_answer),
                              (batch.patch, batch.patch_answer, batch.clean_answer)):
        last = model(prompt)[rows, batch.last]
        right += (last[rows, good] > last[rows, bad]).sum().item()
    return right / (2 * len(batch))
