"""Running sums over batches (docs/method.md §7): the metric, every site's node effects and each site
pair's edge effects, in float64. Batches only add to them and the division by the number of examples
happens once, at the end, so batching never changes a result. `sum` aggregation sums nodes over positions
and edges over both positions; `none` keeps positions.
"""
import math

import torch

from ..circuit import pair_order
from ..rows import row_ids
from . import distributed as dist_mod
from .memory import release_freed_memory


class EffectSums:
    """Running float64 sums over examples: the metric (clean, patch), every site's nodes, and each site
    pair's edges (an EdgeSum). `reduce(group)` sums them over the ranks of a process group."""

    def __init__(self, saes, sites, aggregation, T, device):
        acc = dict(dtype=torch.float64, device=device)
        self.positions = aggregation == "none"
        self.sites = sites
        self.metric = torch.zeros(2, **acc)
        self.nodes = {s: torch.zeros(*((T,) if self.positions else ()), saes[s].n_features + 1, **acc) for s in sites}
        self.edges = {}       # (U, D) -> EdgeSum

    def add_nodes(self, result):
        self.metric[0] += result.m_clean.double().sum()
        if result.m_patch is not None:
            self.metric[1] += result.m_patch.double().sum()
        dims = (0,) if self.positions else (0, 1)
        for s, eff in result.effects.items():
            # The features from their rows: each entry added at its feature (and position with `none`), in
            # row order, so every sum runs over the examples in the order a dense sum would. The error apart.
            F = eff.n_features
            crow, col, val = eff.rows
            if self.positions:
                T = eff.err.shape[1]
                index = (row_ids(crow) % T) * (F + 1) + col
                self.nodes[s].view(-1).index_add_(0, index, val.double())
            else:
                self.nodes[s][:F].index_add_(0, col, val.double())
            self.nodes[s][..., F].add_(eff.err.contiguous().double().sum(dims))

    def add_edges(self, edges):
        """Adds a batch's {pair: (rows, sparse values)} and empties that dict: each pair's values are freed
        once added, so the batch's edges and the grown sums are not all held at once."""
        for pair in list(edges):
            rows, vals = edges.pop(pair)
            self.edges.setdefault(pair, EdgeSum(vals.shape[1:])).add(rows, vals)
            del vals
            release_freed_memory(self.metric.device)

    def reduce(self, group=None):
        """Every rank ends with the sums over all ranks (collective)."""
        dist_mod.all_reduce_sum([self.metric, *self.nodes.values()], group)
        # Edge sums are sparse with rank-specific rows: gather them all, merge in rank order (the order a
        # single process sees the batches in, so rows come out in the same order).
        shards = dist_mod.all_gather_sparse([(pair, *es.export()) for pair, es in self.edges.items()], group)
        device = self.metric.device
        self.edges = {}
        for part in shards:
            for pair, rows, lin, val, rest in part:
                self.edges.setdefault(pair, EdgeSum(rest)).add_linear(rows, lin.to(device), val.to(device), merge=False)

    def means(self, n, dtype, has_patch):
        """(nodes, edges, metric values): the sums divided by the number of examples n, nodes and edges as
        `dtype` on the CPU. Consumes the edge sums (called once, at the end of a run)."""
        nodes = {s: (v / n).to(dtype).cpu() for s, v in self.nodes.items()}
        # Each pair's running sum is dropped once its result exists (the sums are not used after this), so the
        # float64 sums and the results of every pair are never held at once.
        edges = {}
        for pair in sorted(self.edges, key=pair_order(self.sites)):
            edges[pair] = self.edges.pop(pair).result(n, dtype)
            release_freed_memory(self.metric.device)
        m_clean, m_patch = self.metric.tolist()
        return nodes, edges, {"clean": m_clean / n, "patch": (m_patch / n) if has_patch else None}


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
