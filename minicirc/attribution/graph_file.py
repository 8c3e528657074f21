"""The attribution graph object and its file, graph.safetensors: the fields of circuit-tracer's Graph under the
same names, so graphs compare entry by entry and convert to circuit-tracer's files; and its pruning by
cumulative influence (circuit-tracer's prune_graph, the same steps)."""
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import MinicircError

FIELDS = ("adjacency_matrix", "active_features", "activation_values", "selected_features", "input_tokens",
          "logit_token_ids", "logit_probabilities")


@dataclass
class Graph:
    """adjacency_matrix (n, n): [target, source] direct effects over the nodes [selected features, error nodes
    (layer-major: layer l, position p at n_features + l * n_pos + p), token nodes, logit nodes];
    active_features (F, 3) (layer, position, feature) of every active feature and activation_values (F,)
    their values; selected_features indexes the features that are nodes (all of them here);
    input_tokens (n_pos,); logit_token_ids and logit_probabilities of the logit nodes in order."""
    adjacency_matrix: torch.Tensor
    active_features: torch.Tensor
    activation_values: torch.Tensor
    selected_features: torch.Tensor
    input_tokens: torch.Tensor
    logit_token_ids: torch.Tensor
    logit_probabilities: torch.Tensor
    n_layers: int
    input_string: str = ""
    logit_strings: tuple = ()

    @property
    def n_pos(self):
        return len(self.input_tokens)

    @property
    def n_features(self):
        return len(self.selected_features)

    @property
    def n_logits(self):
        return len(self.logit_token_ids)

    def node(self, i):
        """What node i is: ("feature", layer, pos, feature), ("error", layer, pos), ("token", pos, token id) or
        ("logit", k, token id)."""
        nf, T = self.n_features, self.n_pos
        if i < nf:
            return ("feature", *self.active_features[self.selected_features[i]].tolist())
        if i < nf + self.n_layers * T:
            return ("error", *divmod(i - nf, T))
        if i < nf + (self.n_layers + 1) * T:
            p = i - nf - self.n_layers * T
            return ("token", p, int(self.input_tokens[p]))
        k = i - nf - (self.n_layers + 1) * T
        return ("logit", k, int(self.logit_token_ids[k]))

    def save(self, path):
        """graph.safetensors: the seven tensors, and n_layers, input_string, logit_strings as metadata."""
        meta = {"format": "minicirc attribution graph 1", "n_layers": str(self.n_layers),
                "input_string": self.input_string, "logit_strings": json.dumps(list(self.logit_strings))}
        save_file({k: getattr(self, k).contiguous() for k in FIELDS}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path):
        path = os.fspath(path)
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
        except (OSError, SafetensorError) as e:
            raise MinicircError(f"{path}: cannot read ({e})") from None
        missing = [k for k in FIELDS if k not in tensors]
        if missing or "n_layers" not in meta:
            raise MinicircError(f"{path}: not an attribution graph (lacks {missing or ['n_layers']})")
        g = cls(**{k: tensors[k] for k in FIELDS}, n_layers=int(meta["n_layers"]),
                input_string=meta.get("input_string", ""), logit_strings=tuple(json.loads(meta.get("logit_strings", "[]"))))
        n = g.n_features + (g.n_layers + 1) * g.n_pos + g.n_logits
        if g.adjacency_matrix.shape != (n, n):
            raise MinicircError(f"{path}: adjacency_matrix is {tuple(g.adjacency_matrix.shape)}, its nodes need ({n}, {n})")
        return g


def normalize_matrix(A):
    """|A| with each row scaled to sum 1 (rows of zeros stay 0): the share of each source in a target's input."""
    a = A.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A, weights, max_iter=1000):
    """weights · (A + A² + ...): the influence of each node on the weighted targets through paths of every
    length, by power series (A is strictly triangular in node order up to the logits, so it ends)."""
    current = weights @ A
    influence = current
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ A
        influence = influence + current
    raise MinicircError(f"influence did not converge after {max_iter} steps (the graph has a cycle)")


def find_threshold(scores, fraction):
    """The score above which the largest scores hold `fraction` of the total."""
    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, 0) / torch.sum(s)
    return s[min(int(torch.searchsorted(cum, fraction)), len(cum) - 1)]


class Pruned(NamedTuple):
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative_scores: torch.Tensor


def prune_graph(graph, node_threshold=0.8, edge_threshold=0.98):
    """circuit-tracer's prune_graph: keep the nodes holding `node_threshold` of the total influence on the
    logits (weighted by their probabilities) and the tokens and logits; on the graph restricted to them, keep
    the edges holding `edge_threshold` of the edge influence (normalised edge times its target's influence plus
    the target's logit weight); then drop, until nothing changes, feature and error nodes without a kept
    outgoing edge and features without a kept incoming edge. Returns (node_mask, edge_mask, cumulative_scores),
    the last each node's share of influence counted down from the most influential."""
    if not (0 <= node_threshold <= 1 and 0 <= edge_threshold <= 1):
        raise MinicircError("node and edge thresholds must lie between 0 and 1")
    A = graph.adjacency_matrix.float()
    nl, nt, nf = graph.n_logits, graph.n_pos, graph.n_features
    w = torch.zeros(A.shape[0], device=A.device)
    w[-nl:] = graph.logit_probabilities.float()
    influence = compute_influence(normalize_matrix(A), w)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[-nl - nt:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize_matrix(pruned)
    edge_scores = norm * (compute_influence(norm, w) + w)[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)
    old = node_mask.clone()

    def drop_unconnected():
        node_mask[:-nl - nt] &= edge_mask[:, :-nl - nt].any(0)    # feature and error nodes: an outgoing edge
        node_mask[:nf] &= edge_mask[:nf].any(1)                   # features: an incoming edge
    drop_unconnected()
    while not torch.equal(node_mask, old):    # each pass can leave more nodes unconnected
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        drop_unconnected()
    s, order = torch.sort(influence, descending=True)
    scores = torch.zeros_like(influence)
    scores[order] = torch.cumsum(s, 0) / torch.sum(s)
    return Pruned(node_mask, edge_mask, scores)


def graph_json(graph, pruned, token_strings=None):
    """The pruned graph as the viewer reads it: {"prompt": [token strings], "n_layers", "nodes": [{id, kind,
    layer (-1 for tokens, n_layers for logits), pos, label, influence, ...}], "edges": [{source, target,
    weight}]} over the kept nodes and edges. token_strings: id -> text (default: the ids)."""
    show = token_strings or (lambda i: str(i))
    L, T = graph.n_layers, graph.n_pos
    influence = pruned.cumulative_scores.tolist()
    nodes = []
    for i in pruned.node_mask.nonzero().flatten().tolist():
        kind, *rest = graph.node(i)
        n = {"id": i, "kind": kind, "influence": influence[i]}
        if kind == "feature":
            l, p, f = rest
            act = float(graph.activation_values[graph.selected_features[i]])
            n.update(layer=l, pos=p, feature=f, activation=act, label=f"L{l} #{f} @{p}")
        elif kind == "error":
            n.update(layer=rest[0], pos=rest[1], label=f"error L{rest[0]} @{rest[1]}")
        elif kind == "token":
            n.update(layer=-1, pos=rest[0], label=show(rest[1]))
        else:
            k, tok = rest
            n.update(layer=L, pos=T - 1, token=tok, probability=float(graph.logit_probabilities[k]),
                     label=show(tok))
        nodes.append(n)
    kept = set(n["id"] for n in nodes)
    A = graph.adjacency_matrix
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    edges = [{"source": s, "target": t, "weight": float(A[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in kept and t in kept]
    return {"prompt": [show(int(t)) for t in graph.input_tokens], "n_layers": L, "nodes": nodes, "edges": edges}
