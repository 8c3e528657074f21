"""Circuits: node and edge effects aggregated over a dataset, thresholds, the Circuit object and its files.

Aggregation (DESIGN.md section 7): `sum` sums nodes over positions and edges over both positions, then
averages over examples; `none` keeps positions (all examples must share one length). Batches only add to
running sums; the division by the number of examples happens once, so batching never changes a result.
"""
import json
import math
import os
import tempfile

import torch
from tqdm.auto import tqdm

from . import attribution
from .errors import MinicircError
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
                 top_k_edges=None, progress=True, use_ext=None):
    """Node (and unless nodes_only, edge) effects over `examples` (a minicirc.data.Batch) -> Circuit."""
    check_settings(method, steps, node_threshold, edge_threshold, aggregation, batch_size)
    metric = metric or attribution.logit_diff
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

    n = len(examples)
    node_sums, edge_sums = {}, {}
    m_clean, m_patch = 0.0, 0.0
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc=f"circuit ({method}{'' if nodes_only else ' + edges'})", disable=not progress,
               unit="batch")
    for start in bar:
        batch = examples[start:start + batch_size].to(device)
        m_c, m_p, states, effects, grads = attribution.node_effects(model, saes, metric, batch, method, steps, use_ext)
        m_clean += m_c.sum().item()
        m_patch += m_p.sum().item() if m_p is not None else 0.0
        for s, (feat, err) in effects.items():
            add = (feat.sum((0, 1)), err.sum((0, 1))) if aggregation == "sum" else (feat.sum(0), err.sum(0))
            prev = node_sums.get(s)
            node_sums[s] = add if prev is None else (prev[0] + add[0], prev[1] + add[1])
        if not nodes_only:
            edges = attribution.edge_effects(model, saes, batch, states, grads, effects, node_threshold, aggregation)
            for pair, (keys, vals) in edges.items():
                # Rows are downstream nodes; give each key one global row across batches, then sum.
                index, parts = edge_sums.setdefault(pair, ({}, []))
                rows = torch.tensor([index.setdefault(k, len(index)) for k in keys], device=vals.device)
                idx = vals.indices().clone()
                idx[0] = rows[idx[0]]
                parts.append((idx, vals.values(), vals.shape[1:]))
    nodes = {s: (f.cpu() / n, e.cpu() / n) for s, (f, e) in node_sums.items()}
    edges = {}
    for pair, (index, parts) in edge_sums.items():
        idx = torch.cat([p[0] for p in parts], dim=1)
        val = torch.cat([p[1] for p in parts])
        shape = (len(index), *parts[0][2])
        edges[pair] = (list(index), torch.sparse_coo_tensor(idx, val, shape).coalesce().cpu() / n)
    settings = {"method": method, "steps": steps, "node_threshold": node_threshold,
                "edge_threshold": edge_threshold, "aggregation": aggregation, "n_examples": n,
                "model": model_hash(model), "saes": saes_hash(saes)}
    if top_k_nodes is not None:
        settings["top_k_nodes"] = top_k_nodes
    if top_k_edges is not None:
        settings["top_k_edges"] = top_k_edges
    metric_values = {"clean": m_clean / n, "patch": (m_patch / n) if examples.patch is not None else None}
    return Circuit(sites, nodes, edges, settings, metric_values, nodes_only=nodes_only)


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
        edges = [] if self.nodes_only else [{"source": s, "target": t, "effect": e} for s, t, e in self.kept_edges(kept)]
        if self.nodes_only:
            edges = [{"source": nid, "target": "y", "effect": eff} for nid, site, _, _, eff in kept if site == self.sites[-1]]
        return {"version": 1, "settings": self.settings, "metric": self.metric, "sites": self.sites,
                "nodes": nodes, "edges": edges}

    def tensors(self):
        """Every effect, kept or not, for effects.safetensors."""
        out = {}
        for s, (feat, err) in self.nodes.items():
            out[f"nodes.{s}.features"] = feat.float().contiguous()
            out[f"nodes.{s}.error"] = err.float().contiguous()
        for (u, d), (keys, vals) in self.edges.items():
            out[f"edges.{u}.{d}.indices"] = vals.indices().contiguous()
            out[f"edges.{u}.{d}.values"] = vals.values().float().contiguous()
            out[f"edges.{u}.{d}.shape"] = torch.tensor(vals.shape)
            # Downstream key of each row: (position or -1, feature or -1 for the error).
            enc = [(k if isinstance(k, tuple) else (-1, k)) for k in keys]
            out[f"edges.{u}.{d}.rows"] = torch.tensor([(t, -1 if i == "err" else i) for t, i in enc], dtype=torch.long)
        return out

    def save(self, out_dir, contexts=None, picture=True):
        """circuit.json, effects.safetensors, circuit.dot, circuit.png, circuit.html, each written atomically."""
        from safetensors.torch import save_file
        from . import viz
        os.makedirs(out_dir, exist_ok=True)
        data = self.to_json()
        write_atomic(os.path.join(out_dir, "circuit.json"), json.dumps(data, indent=1).encode())
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
        os.close(fd)
        save_file(self.tensors(), tmp, metadata={"settings": json.dumps(self.settings)})
        os.replace(tmp, os.path.join(out_dir, "effects.safetensors"))
        write_atomic(os.path.join(out_dir, "circuit.dot"), viz.to_dot(data).encode())
        if picture:
            viz.draw_circuit(data, os.path.join(out_dir, "circuit.png"))
        try:
            from .viewer import write_html
        except ImportError:
            return data
        write_html(data, os.path.join(out_dir, "circuit.html"), contexts)
        return data


def write_atomic(path, data: bytes):
    """Write to a temporary name and rename, so a failure never leaves a partial file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_circuit_json(path, model=None, saes=None):
    """A circuit.json, checked against the model/SAEs it will be applied to (if given)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "circuit.json")
    if not os.path.exists(path):
        raise MinicircError(f"circuit file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MinicircError(f"{path}: not valid JSON ({e})") from None
    if data.get("version") != 1 or "nodes" not in data or "settings" not in data:
        raise MinicircError(f"{path}: not a minicirc circuit.json (version 1)")
    if model is not None and data["settings"].get("model") != model_hash(model):
        raise MinicircError(f"{path}: this circuit was found on a different model (weights hash differs)")
    if saes is not None and data["settings"].get("saes") != saes_hash(saes):
        raise MinicircError(f"{path}: this circuit was found with different dictionaries (hash differs)")
    return data
