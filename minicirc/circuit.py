"""Circuits: node and edge effects aggregated over a dataset, thresholds, the Circuit object and its files.

Aggregation (DESIGN.md section 7): `sum` sums nodes over positions and edges over both positions, then
averages over examples; `none` keeps positions (all examples must share one length). Batches only add to
running sums; the division by the number of examples happens once, so batching never changes a result.
"""
import json
import math
import os

import torch
from tqdm.auto import tqdm

from . import attribution
from .data import Batch, Example, tokenize
from .errors import MinicircError, read_json
from .files import staged_files
from .model import model_hash
from .sae import saes_hash

AGGREGATIONS = ("sum", "none")


def node_id(site, feature, pos=None):
    return f"{site}/{feature}" + (f"@{pos}" if pos is not None else "")


def check_settings(method, steps, node_threshold, edge_threshold, aggregation, batch_size=1):
    if method not in attribution.METHODS:
        raise MinicircError(f"unknown method {method!r} (known: {', '.join(attribution.METHODS)})")
    if aggregation not in AGGREGATIONS:
        raise MinicircError(f"unknown aggregation {aggregation!r} (known: sum, none)")
    if not (isinstance(steps, int) and steps >= 1):
        raise MinicircError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise MinicircError(f"batch size must be a positive integer, got {batch_size!r}")
    for name, v in [("node threshold", node_threshold), ("edge threshold", edge_threshold)]:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise MinicircError(f"{name} must be a finite number >= 0, got {v!r}")


def find_circuit(model, saes, examples, method="ig", steps=10, node_threshold=0.1, edge_threshold=0.01,
                 aggregation="sum", nodes_only=False, batch_size=32, metric=None, top_k_nodes=None,
                 top_k_edges=None, progress=True, use_ext=None, distributed=False, tokenizer=None):
    """Node (and unless nodes_only, edge) effects over `examples` -> Circuit. `examples` is a Batch
    (minicirc.tokenize) or what the loaders return (minicirc.load_examples, the task generators: a list of
    Example), which is tokenized here with `tokenizer`.

    Memory is streamed: each batch only adds to running sums (float64; dense per site for nodes, sparse and
    merged as it grows for edges), so peak memory follows the batch size and the circuit, not the dataset.

    distributed: True (the default torch.distributed group) or a ProcessGroup. This rank computes its
    contiguous share of whole batches, the sums are reduced over the group, and every rank returns the same
    Circuit, equal to the single-process one up to float rounding. Progress shows on rank 0 only."""
    from . import distributed as dist_mod
    check_settings(method, steps, node_threshold, edge_threshold, aggregation, batch_size)
    for name, k in [("top_k_nodes", top_k_nodes), ("top_k_edges", top_k_edges)]:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise MinicircError(f"{name} must be a positive integer, got {k!r}")
    metric = metric or attribution.logit_diff
    examples = as_batch(examples, tokenizer, model)
    if len(examples) == 0:
        raise MinicircError("the dataset is empty")
    if metric is attribution.logit_diff and examples.patch is None:
        raise MinicircError("the logit-difference metric needs patch prefixes and answers")
    sites = attribution.site_order(model, saes)
    if not sites:
        raise MinicircError("no dictionaries given")
    for s in sites:
        if saes[s].d_in != model.cfg.d_model:
            raise MinicircError(f"dictionary for {s} has width {saes[s].d_in}, the model's d_model is {model.cfg.d_model}")
    if aggregation == "none" and len(set(examples.last.tolist())) > 1:
        raise MinicircError("aggregation 'none' keeps positions, so all examples must have the same length")
    if method == "exact" and not nodes_only:
        raise MinicircError("method 'exact' computes node effects only: pass nodes_only (--nodes-only)")
    device = next(model.parameters()).device
    out_dtype = next(model.parameters()).dtype
    group = distributed if distributed not in (False, True, None) else None
    rank, world = dist_mod.group_info(group) if distributed else (0, 1)

    n = len(examples)
    acc = dict(dtype=torch.float64, device=device)
    T = int(examples.last.max()) + 1
    node_sums = {s: ((torch.zeros(saes[s].n_features, **acc), torch.zeros((), **acc)) if aggregation == "sum" else
                     (torch.zeros(T, saes[s].n_features, **acc), torch.zeros(T, **acc))) for s in sites}
    metric_sums = torch.zeros(2, **acc)
    edge_sums = {}        # (U, D) -> _EdgeSum
    lo, hi = dist_mod.shard(-(-n // batch_size), rank, world)
    bar = tqdm(range(lo, hi), desc=f"circuit ({method}{'' if nodes_only else ' + edges'})",
               disable=not progress or rank != 0, unit="batch")
    failure = None
    try:
        for b in bar:
            batch = examples[b * batch_size:(b + 1) * batch_size].to(device)
            m_c, m_p, states, effects, grads = attribution.node_effects(model, saes, metric, batch, method, steps, use_ext,
                                                                        progress=progress and rank == 0)
            metric_sums[0] += m_c.double().sum()
            if m_p is not None:
                metric_sums[1] += m_p.double().sum()
            for s, (feat, err) in effects.items():
                dims = (0, 1) if aggregation == "sum" else (0,)
                node_sums[s][0].add_(feat.double().sum(dims))
                node_sums[s][1].add_(err.double().sum(dims))
            if not nodes_only:
                edges = attribution.edge_effects(model, saes, batch, states, grads, effects, node_threshold,
                                                 aggregation, progress=progress and rank == 0)
                for pair, (keys, vals) in edges.items():
                    edge_sums.setdefault(pair, _EdgeSum(vals.shape[1:])).add(keys, vals)
            del states, effects, grads
    except Exception as e:
        if not distributed:
            raise
        failure = e
    if distributed:
        dist_mod.agree(failure, rank, group)   # every rank stops if any failed, before any reduction
        flat = [metric_sums] + [t for pair in node_sums.values() for t in pair]
        dist_mod.all_reduce_sum(flat, group)
        # Edge sums are sparse with rank-specific rows: gather them all, merge in rank order (the order a
        # single process sees the batches in, so rows come out in the same order).
        shards = dist_mod.all_gather_sparse([(pair, *es.export()) for pair, es in edge_sums.items()], group)
        edge_sums = {}
        for part in shards:
            for pair, keys, idx, val, rest in part:
                edge_sums.setdefault(pair, _EdgeSum(rest)).add_linear(keys, idx.to(device), val.to(device), merge=False)
    nodes = {s: ((f / n).to(out_dtype).cpu(), (e / n).to(out_dtype).cpu()) for s, (f, e) in node_sums.items()}
    edges = {pair: edge_sums[pair].result(n, out_dtype) for pair in sorted(edge_sums, key=pair_order(sites))}
    settings = {"method": method, "steps": steps, "node_threshold": node_threshold,
                "edge_threshold": edge_threshold, "aggregation": aggregation, "n_examples": n,
                "model": model_hash(model), "saes": saes_hash(saes)}
    if top_k_nodes is not None:
        settings["top_k_nodes"] = top_k_nodes
    if top_k_edges is not None:
        settings["top_k_edges"] = top_k_edges
    m_clean, m_patch = metric_sums.tolist()
    metric_values = {"clean": m_clean / n, "patch": (m_patch / n) if examples.patch is not None else None}
    return Circuit(sites, nodes, edges, settings, metric_values, nodes_only=nodes_only)


def as_batch(examples, tokenizer, model):
    """A Batch as is; a list of Example records tokenized with `tokenizer` (token ids checked against the
    model's vocabulary)."""
    if isinstance(examples, Batch):
        return examples
    if isinstance(examples, (list, tuple)) and all(isinstance(e, Example) for e in examples):
        if tokenizer is None:
            raise MinicircError("examples are untokenized Example records: pass tokenizer= (minicirc.load_tokenizer"
                                "(model_dir)) or a Batch from minicirc.tokenize(examples, tokenizer)")
        if not examples:
            raise MinicircError("the dataset is empty")
        return tokenize(list(examples), tokenizer, vocab_size=model.cfg.vocab_size)
    raise MinicircError(f"examples must be a minicirc Batch or a list of minicirc Example records, "
                        f"got {type(examples).__name__}")


class _EdgeSum:
    """Running sum of one (U, D) pair's sparse edge values over batches.

    Rows are downstream nodes, one row each in the order first seen. An entry is stored as one linear key
    row * prod(rest) + (its flat position in rest) and a float64 value, so the running sum is a sorted key
    array and merging is a sort + segment sum (about twice as fast as torch's coalesce, and a third of the
    index memory). Pending batch parts are merged whenever they outgrow the running sum, so memory stays
    within a small multiple of the summed circuit's size, whatever the number of batches."""

    MERGE_MIN = 1 << 16             # entries pending before a merge is worth it

    def __init__(self, rest):
        self.rest = tuple(rest)     # (F_U + 1,) or (T, F_U + 1)
        self.width = math.prod(self.rest)
        self.index = {}             # downstream key -> row
        self.parts = []             # [(linear keys, float64 values)]: parts[0] is the merged sum
        self.merged_nnz, self.pending_nnz = 0, 0

    def add(self, keys, vals):
        """A batch's sparse (R, *rest) values whose rows are `keys`."""
        idx = vals.indices()
        flat = idx[1] if len(self.rest) == 1 else idx[1] * self.rest[1] + idx[2]
        self.add_linear(keys, idx[0] * self.width + flat, vals.values())

    def add_linear(self, keys, lin, val, merge=True):
        """Entries with linear keys over rows 0..len(keys)-1 of `keys` (another batch's or rank's rows)."""
        rows = torch.tensor([self.index.setdefault(k, len(self.index)) for k in keys], dtype=torch.long,
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
        """(keys, linear keys, values, rest), for gathering over ranks."""
        lin, val = self.merge()
        return list(self.index), lin, val, self.rest

    def result(self, n, dtype):
        """(downstream keys, coalesced sparse (R, *rest) of sum / n), rows in node order (position, then
        feature, the error last) whatever order the batches met them in."""
        lin, val = self.merge()
        keys = list(self.index)
        order = sorted(range(len(keys)), key=lambda r: _node_order(keys[r]))
        new_row = torch.empty(len(keys), dtype=torch.long, device=lin.device)
        new_row[torch.tensor(order, dtype=torch.long, device=lin.device)] = torch.arange(len(keys), device=lin.device)
        lin, perm = torch.sort(new_row[lin // self.width] * self.width + lin % self.width)
        val = val[perm]
        keys = [keys[r] for r in order]
        row, flat = lin // self.width, lin % self.width
        idx = (torch.stack([row, flat]) if len(self.rest) == 1
               else torch.stack([row, flat // self.rest[1], flat % self.rest[1]]))
        shape = (len(keys), *self.rest)
        vals = torch.sparse_coo_tensor(idx, (val / n).to(dtype), shape, is_coalesced=True, check_invariants=False,
                                       device=val.device)
        return keys, vals.cpu()


def pair_order(sites):
    """Sort key of (upstream, downstream) site pairs: by downstream site, then upstream, in model order."""
    rank = {s: j for j, s in enumerate(sites)}
    return lambda pair: (rank.get(pair[1], len(rank)), rank.get(pair[0], len(rank)))


def _node_order(key):
    """Sort key of a downstream node key: feature index or "err" (last), or (position, that)."""
    pos, feat = key if isinstance(key, tuple) else (-1, key)
    return (pos, 1, 0) if feat == "err" else (pos, 0, feat)


class Circuit:
    """Aggregated node effects for every site (kept or not), edge effects, and what made them."""

    def __init__(self, sites, nodes, edges, settings, metric, nodes_only=False):
        self.sites = list(sites)
        self.nodes = nodes          # {site: (features (F,) | (T, F), error () | (T,))}
        self.edges = edges          # {(U, D): (downstream keys, sparse (R, F_U + 1) | (R, T, F_U + 1))}
        self.settings = dict(settings)
        self.metric = metric
        self.nodes_only = nodes_only
        self.annotations = {}       # node id -> extra fields written into circuit.json

    @property
    def positional(self):
        return self.settings["aggregation"] == "none"

    def all_nodes(self):
        """Every node as (id, site, feature | "err", pos | None, effect), in site order."""
        out = []
        for s in self.sites:
            feat, err = self.nodes[s]
            if self.positional:
                for t in range(feat.shape[0]):
                    out += [(node_id(s, i, t), s, i, t, float(feat[t, i])) for i in range(feat.shape[1])]
                    out.append((node_id(s, "err", t), s, "err", t, float(err[t])))
            else:
                out += [(node_id(s, i), s, i, None, float(feat[i])) for i in range(feat.shape[0])]
                out.append((node_id(s, "err"), s, "err", None, float(err)))
        return out

    def kept_nodes(self, threshold=None, top_k=None):
        top_k = top_k if top_k is not None else (self.settings.get("top_k_nodes") if threshold is None else None)
        threshold = self.settings["node_threshold"] if threshold is None else threshold
        nodes = self.all_nodes()
        if top_k is not None:
            keep = set(sorted(range(len(nodes)), key=lambda j: -abs(nodes[j][4]))[:top_k])
            return [nd for j, nd in enumerate(nodes) if j in keep and nd[4] != 0]
        return [nd for nd in nodes if abs(nd[4]) > threshold]

    def kept_edges(self, kept=None):
        """(source id, target id, effect) between kept nodes, passing the edge threshold (or top-k)."""
        kept = kept if kept is not None else self.kept_nodes()
        ids = {nd[0] for nd in kept}
        out = []
        for (u, d), (keys, vals) in self.edges.items():
            idx, v = vals.indices().tolist(), vals.values().tolist()
            F_u = vals.shape[-1] - 1
            for k, entry in enumerate(zip(*idx)):
                if self.positional:
                    r, tu, j = entry
                    t, i = keys[r]
                    target, src = node_id(d, i, t), node_id(u, "err" if j == F_u else j, tu)
                else:
                    r, j = entry
                    target, src = node_id(d, keys[r]), node_id(u, "err" if j == F_u else j)
                if target in ids and src in ids:
                    out.append((src, target, v[k]))
        # The metric node y: edges from the last site's kept nodes carry their node effects.
        last = self.sites[-1]
        out += [(nd[0], "y", nd[4]) for nd in kept if nd[1] == last]
        k = self.settings.get("top_k_edges")
        if k is not None:
            return sorted(out, key=lambda e: -abs(e[2]))[:k]
        return [e for e in out if abs(e[2]) > self.settings["edge_threshold"] or e[1] == "y"]

    def to_json(self):
        kept = self.kept_nodes()
        nodes = []
        for nid, site, feat, pos, eff in kept:
            row = {"id": nid, "site": site, "feature": feat, "effect": eff}
            if pos is not None:
                row["pos"] = pos
            row.update(self.annotations.get(nid, {}))
            nodes.append(row)
        # With nodes_only there are no edge effects: only the edges into y (the node effects themselves).
        edges = [{"source": s, "target": t, "effect": e} for s, t, e in self.kept_edges(kept)]
        return {"version": 1, "settings": self.settings, "metric": self.metric, "sites": self.sites,
                "nodes": nodes, "edges": edges}

    @classmethod
    def load(cls, folder):
        """The Circuit that `save(folder)` wrote, from circuit.json (settings, metric, sites, annotations) and
        effects.safetensors (every node and edge effect, as float32): thresholds and top-k can be changed
        and the files rewritten without recomputing anything."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        data = load_circuit_json(folder)
        folder = os.fspath(folder)
        folder = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
        path = os.path.join(folder, "effects.safetensors")
        try:
            f = load_file(path)
        except (OSError, SafetensorError) as e:
            raise MinicircError(f"{path}: cannot read the effects file ({e})") from None
        sites = data.get("sites") or []
        missing = [s for s in sites if f"nodes.{s}.features" not in f or f"nodes.{s}.error" not in f]
        if not sites or missing:
            raise MinicircError(f"{path}: does not hold the node effects of sites {missing or 'listed in circuit.json'}")
        nodes = {s: (f[f"nodes.{s}.features"], f[f"nodes.{s}.error"]) for s in sites}
        edges = {}
        for name in sorted(k for k in f if k.startswith("edges.") and k.endswith(".indices")):
            p = name[:-len(".indices")]
            try:    # checked: indices out of the shape would otherwise read out of bounds later
                _, u, d = p.split(".")
                rows = [(t, "err" if i == -1 else i) for t, i in f[p + ".rows"].tolist()]
                keys = rows if data["settings"]["aggregation"] == "none" else [i for _, i in rows]
                vals = torch.sparse_coo_tensor(f[p + ".indices"], f[p + ".values"], tuple(f[p + ".shape"].tolist()),
                                               check_invariants=True).coalesce()
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                raise MinicircError(f"{path}: {p} is corrupt ({type(e).__name__}: {e})") from None
            if len(keys) != vals.shape[0]:
                raise MinicircError(f"{path}: edges {u} -> {d} have {vals.shape[0]} rows but {len(keys)} row keys")
            edges[(u, d)] = (keys, vals)
        edges = {pair: edges[pair] for pair in sorted(edges, key=pair_order(sites))}
        circuit = cls(sites, nodes, edges, data["settings"], data["metric"], nodes_only=not edges)
        known = {"id", "site", "feature", "effect", "pos"}
        for row in data["nodes"]:
            extra = {k: v for k, v in row.items() if k not in known}
            if extra:
                circuit.annotations[row["id"]] = extra
        return circuit

    def tensors(self):
        """Every effect, kept or not, for effects.safetensors."""
        out = {}
        for s, (feat, err) in self.nodes.items():
            out[f"nodes.{s}.features"] = feat.float().contiguous()
            out[f"nodes.{s}.error"] = err.float().contiguous()
        for (u, d), (keys, vals) in self.edges.items():
            out[f"edges.{u}.{d}.indices"] = vals.indices().contiguous()
            out[f"edges.{u}.{d}.values"] = vals.values().float().contiguous()
            out[f"edges.{u}.{d}.shape"] = torch.tensor(vals.shape, device="cpu")
            # Downstream key of each row: (position or -1, feature or -1 for the error).
            enc = [(k if isinstance(k, tuple) else (-1, k)) for k in keys]
            out[f"edges.{u}.{d}.rows"] = torch.tensor([(t, -1 if i == "err" else i) for t, i in enc], dtype=torch.long,
                                                          device="cpu")
        return out

    def write(self, stage):
        """Stage circuit.json and effects.safetensors (minicirc.files.staged_files); returns the JSON data."""
        from safetensors.torch import save_file
        data = self.to_json()
        with open(stage("circuit.json"), "wb") as f:
            f.write(json.dumps(data, indent=1).encode())
        save_file(self.tensors(), stage("effects.safetensors"), metadata={"settings": json.dumps(self.settings)})
        return data

    def save(self, out_dir):
        """circuit.json and effects.safetensors in out_dir, both or neither (the pictures and the page are
        minicirc.viz.save_circuit's job). Returns the circuit.json data."""
        with staged_files(out_dir) as stage:
            data = self.write(stage)
        return data


def load_circuit_json(path, model=None, saes=None):
    """A circuit.json, checked against the model/SAEs it will be applied to (if given)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "circuit.json")
    if not os.path.exists(path):
        raise MinicircError(f"circuit file {path} does not exist")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != 1 or "nodes" not in data or "settings" not in data:
        raise MinicircError(f"{path}: not a minicirc circuit.json (version 1)")
    _check_circuit_json(data, path)
    if model is not None and data["settings"].get("model") != model_hash(model):
        raise MinicircError(f"{path}: this circuit was found on a different model (weights hash differs)")
    if saes is not None and data["settings"].get("saes") != saes_hash(saes):
        raise MinicircError(f"{path}: this circuit was found with different dictionaries (hash differs)")
    return data


def _check_circuit_json(data, path):
    """The fields evaluation and the viewer read, with their types: a clear error instead of a KeyError."""
    settings = data["settings"]
    if not isinstance(settings, dict) or settings.get("aggregation") not in AGGREGATIONS:
        raise MinicircError(f"{path}: settings.aggregation must be one of {', '.join(AGGREGATIONS)}")
    if not isinstance(data["nodes"], list) or not isinstance(data.get("edges", []), list):
        raise MinicircError(f"{path}: nodes and edges must be lists")
    positional = settings["aggregation"] == "none"
    for j, nd in enumerate(data["nodes"]):
        ok = (isinstance(nd, dict) and isinstance(nd.get("site"), str)
              and (nd.get("feature") == "err" or (isinstance(nd.get("feature"), int) and not isinstance(nd.get("feature"), bool)))
              and isinstance(nd.get("effect"), (int, float)) and not isinstance(nd.get("effect"), bool)
              and (not positional or (isinstance(nd.get("pos"), int) and nd["pos"] >= 0)))
        if not ok:
            raise MinicircError(f"{path}: node {j} ({nd!r:.80}) needs site (string), feature (integer or \"err\"), "
                                f"effect (number){' and pos (integer >= 0)' if positional else ''}")
