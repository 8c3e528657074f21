"""Circuits: the Circuit object (node and edge effects aggregated over a dataset, and what made them) and
its two files, circuit.json and effects.safetensors. minicirc.attribution.find_circuit makes one.

Aggregation (docs/method.md §7): `sum` sums nodes over positions and edges over both positions, then
averages over examples; `none` keeps positions (all examples must share one length).

Inside the library a site's nodes are one tensor whose last axis has F + 1 entries, column F the error
node ((F + 1,) with `sum`, (T, F + 1) with `none`), and a node is its index into that tensor, flattened.
Node names ("resid_1/37", "resid_1/err", "resid_1/37@5") exist only in circuit.json: `node_id` writes
them and `parse_node_id` reads them.
"""
import json
import os
import re
from typing import NamedTuple, Optional

import torch

from .errors import MinicircError, read_json
from .files import staged_files
from .model import model_hash
from .sae import saes_hash

AGGREGATIONS = ("sum", "none")


# --- nodes, and their names at the file boundary --------------------------------------------------

class Node(NamedTuple):
    """One node of a circuit, as Circuit.all_nodes / kept_nodes return it: column `column` of `site`'s node
    tensor, the features then the error (column n_features, `error` True), at position `pos` (None with
    aggregation `sum`). `id` is its circuit.json name (node_id)."""
    id: str
    site: str
    column: int
    pos: Optional[int]
    effect: float
    error: bool


def node_id(site, column, n_features, pos=None):
    """The circuit.json name of a node: "resid_1/37", "resid_1/err" (column n_features), "resid_1/37@5"."""
    return f"{site}/{'err' if column == n_features else column}" + (f"@{pos}" if pos is not None else "")


_NODE_ID = re.compile(r"(?P<site>[^/@]+)/(?P<feature>err|\d+)(@(?P<pos>\d+))?")


def parse_node_id(text):
    """node_id's inverse: (site, feature index or None for the error node, position or None); None for
    anything that is not a node name (the metric node "y")."""
    m = _NODE_ID.fullmatch(text)
    if m is None:
        return None
    feature, pos = m["feature"], m["pos"]
    return m["site"], None if feature == "err" else int(feature), None if pos is None else int(pos)


# --- the circuit ------------------------------------------------------------------------------------

def pair_order(sites):
    """Sort key of (upstream, downstream) site pairs: by downstream site, then upstream, in model order."""
    rank = {s: j for j, s in enumerate(sites)}
    return lambda pair: (rank.get(pair[1], len(rank)), rank.get(pair[0], len(rank)))


class Circuit:
    """Aggregated node effects for every site (kept or not), edge effects, and what made them."""

    def __init__(self, sites, nodes, edges, settings, metric_values, nodes_only=False):
        self.sites = list(sites)
        self.nodes = nodes          # {site: (F + 1,) | (T, F + 1)}, column F the error
        self.edges = edges          # {(U, D): (rows (R,) long: D's nodes, sparse (R, F_U + 1) | (R, T, F_U + 1))}
        self.settings = dict(settings)
        self.metric_values = metric_values    # {"clean": mean metric, "patch": mean metric or None}
        self.nodes_only = nodes_only
        self.annotations = {}       # node id -> extra fields written into circuit.json

    @property
    def positional(self):
        return self.settings["aggregation"] == "none"

    def n_features(self, site):
        return self.nodes[site].shape[-1] - 1

    def _node(self, site, index, effect=0.0):
        """The Node at flat `index` of `site`'s node tensor ((F + 1,), or (T, F + 1) flattened)."""
        F = self.n_features(site)
        pos, col = divmod(index, F + 1) if self.positional else (None, index)
        return Node(node_id(site, col, F, pos), site, col, pos, effect, col == F)

    def all_nodes(self):
        """Every node as a Node, in site order, then position, then column (the error last)."""
        return [self._node(s, index, effect) for s in self.sites
                for index, effect in enumerate(self.nodes[s].flatten().tolist())]

    def kept_nodes(self, threshold=None, top_k=None):
        top_k = top_k if top_k is not None else (self.settings.get("top_k_nodes") if threshold is None else None)
        threshold = self.settings["node_threshold"] if threshold is None else threshold
        nodes = self.all_nodes()
        if top_k is not None:
            keep = set(sorted(range(len(nodes)), key=lambda j: -abs(nodes[j].effect))[:top_k])
            return [nd for j, nd in enumerate(nodes) if j in keep and nd.effect != 0]
        return [nd for nd in nodes if abs(nd.effect) > threshold]

    def kept_edges(self, kept=None):
        """(source id, target id, effect) between kept nodes, passing the edge threshold (or top-k)."""
        kept = kept if kept is not None else self.kept_nodes()
        ids = {nd.id for nd in kept}
        out = []
        for (u, d), (rows, vals) in self.edges.items():
            idx, v = vals.indices(), vals.values().tolist()
            # An upstream entry's flat index into u's node tensor: (position, column) or column.
            src_index = idx[1] * vals.shape[2] + idx[2] if self.positional else idx[1]
            for k, (r, j) in enumerate(zip(rows[idx[0]].tolist(), src_index.tolist())):
                target, src = self._node(d, r).id, self._node(u, j).id
                if target in ids and src in ids:
                    out.append((src, target, v[k]))
        # The metric node y: edges from the last site's kept nodes carry their node effects.
        last = self.sites[-1]
        out += [(nd.id, "y", nd.effect) for nd in kept if nd.site == last]
        k = self.settings.get("top_k_edges")
        if k is not None:
            return sorted(out, key=lambda e: -abs(e[2]))[:k]
        return [e for e in out if abs(e[2]) > self.settings["edge_threshold"] or e[1] == "y"]

    def to_json(self):
        kept = self.kept_nodes()
        nodes = []
        for nd in kept:
            row = {"id": nd.id, "site": nd.site, "feature": "err" if nd.error else nd.column, "effect": nd.effect}
            if nd.pos is not None:
                row["pos"] = nd.pos
            row.update(self.annotations.get(nd.id, {}))
            nodes.append(row)
        # With nodes_only there are no edge effects: only the edges into y (the node effects themselves).
        edges = [{"source": s, "target": t, "effect": e} for s, t, e in self.kept_edges(kept)]
        return {"version": 1, "settings": self.settings, "metric": self.metric_values, "sites": self.sites,
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
        try:
            nodes = {s: torch.cat([f[f"nodes.{s}.features"], f[f"nodes.{s}.error"][..., None]], -1) for s in sites}
        except RuntimeError as e:
            raise MinicircError(f"{path}: node effects of different shapes ({e})") from None
        positional = data["settings"]["aggregation"] == "none"
        edges = {}
        for name in sorted(k for k in f if k.startswith("edges.") and k.endswith(".indices")):
            p = name[:-len(".indices")]
            try:    # checked: indices out of the shape would otherwise read out of bounds later
                _, u, d = p.split(".")
                rows = rows_from_file(f[p + ".rows"], nodes[d].shape, positional)
                vals = torch.sparse_coo_tensor(f[p + ".indices"], f[p + ".values"], tuple(f[p + ".shape"].tolist()),
                                               check_invariants=True).coalesce()
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                raise MinicircError(f"{path}: {p} is corrupt ({type(e).__name__}: {e})") from None
            if len(rows) != vals.shape[0]:
                raise MinicircError(f"{path}: edges {u} -> {d} have {vals.shape[0]} rows but {len(rows)} row keys")
            edges[(u, d)] = (rows, vals)
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
        for s, v in self.nodes.items():
            out[f"nodes.{s}.features"] = v[..., :-1].float().contiguous()
            out[f"nodes.{s}.error"] = v[..., -1].float().contiguous()
        for (u, d), (rows, vals) in self.edges.items():
            out[f"edges.{u}.{d}.indices"] = vals.indices().contiguous()
            out[f"edges.{u}.{d}.values"] = vals.values().float().contiguous()
            out[f"edges.{u}.{d}.shape"] = torch.tensor(vals.shape, device="cpu")
            out[f"edges.{u}.{d}.rows"] = rows_to_file(rows, self.nodes[d].shape, self.positional)
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


def rows_to_file(rows, shape, positional):
    """effects.safetensors' encoding of downstream nodes: (R, 2) long of (position or -1, feature or -1 for
    the error)."""
    F = shape[-1] - 1
    pos, col = (rows // (F + 1), rows % (F + 1)) if positional else (torch.full_like(rows, -1), rows)
    return torch.stack([pos, torch.where(col == F, -1, col)], 1).cpu()


def rows_from_file(encoded, shape, positional):
    """rows_to_file's inverse, checked against the node tensor's shape."""
    F = shape[-1] - 1
    pos, col = encoded.long().unbind(1)
    T = shape[0] if positional else 1
    if ((col < -1) | (col >= F)).any() or (((pos < 0) | (pos >= T)) if positional else (pos != -1)).any():
        raise ValueError(f"row keys outside the node tensor {tuple(shape)}")
    col = torch.where(col == -1, F, col)
    return pos * (F + 1) + col if positional else col


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
