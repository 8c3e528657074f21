"""find_circuit: node (and edge) effects over a dataset -> Circuit. A loop over batches: each batch's node
effects (nodes.py), then its edges (edges.py), added to running sums (sums.py) and divided by the number of
examples once at the end; with `distributed`, each rank sums its own batches and the sums are reduced over
the ranks (distributed.py)."""
import math
from contextlib import nullcontext

from tqdm.auto import tqdm

from ..circuit import AGGREGATIONS, Circuit
from ..data import Batch, Example, tokenize
from ..errors import MinicircError
from ..hashing import sha256_of
from ..model import model_hash
from ..model.sites import width_name
from ..sae import saes_hash
from . import distributed as dist_mod
from .common import METHODS, clt_edge_error, logit_diff, site_order
from .edges import edge_effects
from .memory import release_freed_memory
from .nodes import node_effects
from .sums import EffectSums


def check_arguments(model, saes, examples, metric, method, steps, node_threshold, edge_threshold, aggregation,
                    batch_size, nodes_only, top_k_nodes, top_k_edges):
    """find_circuit's arguments, each with a one-line error; returns the sites with dictionaries, in order."""
    if method not in METHODS:
        raise MinicircError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if aggregation not in AGGREGATIONS:
        raise MinicircError(f"unknown aggregation {aggregation!r} (known: sum, none)")
    if not (isinstance(steps, int) and steps >= 1):
        raise MinicircError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise MinicircError(f"batch size must be a positive integer, got {batch_size!r}")
    for name, v in [("node threshold", node_threshold), ("edge threshold", edge_threshold)]:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise MinicircError(f"{name} must be a finite number >= 0, got {v!r}")
    for name, k in [("top_k_nodes", top_k_nodes), ("top_k_edges", top_k_edges)]:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise MinicircError(f"{name} must be a positive integer, got {k!r}")
    if len(examples) == 0:
        raise MinicircError("the dataset is empty")
    if metric is logit_diff and examples.patch is None:
        raise MinicircError("the logit-difference metric needs patch prefixes and answers")
    sites = site_order(model, saes)
    if not sites:
        raise MinicircError("no dictionaries given")
    for s in sites:   # d_model, except z_l (n_heads * head_dim) and mlp_hidden_l (d_mlp)
        if saes[s].d_in != model.site_width(s):
            raise MinicircError(f"dictionary for {s} has width {saes[s].d_in}, the model's {width_name(s)} is "
                                f"{model.site_width(s)}")
    if aggregation == "none" and len(set(examples.last.tolist())) > 1:
        raise MinicircError("aggregation 'none' keeps positions, so all examples must have the same length")
    if not nodes_only and clt_edge_error(saes):
        raise MinicircError(clt_edge_error(saes))
    if method == "exact" and not nodes_only:
        raise MinicircError("method 'exact' computes node effects only: pass nodes_only (--nodes-only)")
    return sites


def find_circuit(model, saes, examples, method="ig", steps=10, node_threshold=0.1, edge_threshold=0.01,
                 aggregation="sum", nodes_only=False, batch_size=32, metric=None, top_k_nodes=None,
                 top_k_edges=None, progress=True, use_ext=None, distributed=False, tokenizer=None,
                 site_gradients=None):
    """Node (and unless nodes_only, edge) effects over `examples` -> Circuit. `examples` is a Batch
    (minicirc.tokenize) or what the loaders return (minicirc.load_examples, the task generators: a list of
    Example), which is tokenized here with `tokenizer`.

    Memory is streamed: each batch only adds to running sums (float64; dense per site for nodes, sparse and
    merged as it grows for edges), so peak memory follows the batch size and the circuit, not the dataset.

    distributed: True (the default torch.distributed group) or a ProcessGroup. This rank computes its
    contiguous share of whole batches, the sums are reduced over the group, and every rank returns the same
    Circuit, equal to the single-process one up to float rounding. Progress shows on rank 0 only.

    site_gradients: a dict kept by the caller across calls on the same examples (and metric): each batch's
    site gradients are stored in it, keyed by method, steps and the batch's contents, and reused by later
    calls that meet the same batch, whatever their dictionaries (nodes.node_effects says why), e.g. a feature
    circuit and a neuron circuit of one template. Without patch inputs IG leaves it unused (its path then
    ends at each dictionary's own b_dec)."""
    metric = metric or logit_diff
    examples = as_batch(examples, tokenizer, model)
    sites = check_arguments(model, saes, examples, metric, method, steps, node_threshold, edge_threshold,
                            aggregation, batch_size, nodes_only, top_k_nodes, top_k_edges)
    device = next(model.parameters()).device
    group = distributed if distributed not in (False, True, None) else None
    rank, world = dist_mod.group_info(group) if distributed else (0, 1)
    sums = EffectSums(saes, sites, aggregation, int(examples.last.max()) + 1, device)
    lo, hi = dist_mod.shard(-(-len(examples) // batch_size), rank, world)
    bar = tqdm(range(lo, hi), desc=f"circuit ({method}{'' if nodes_only else ' + edges'})",
               disable=not progress or rank != 0, unit="batch")
    show = progress and rank == 0
    with dist_mod.summed_over_ranks(sums, group) if distributed else nullcontext():
        for b in bar:
            batch = examples[b * batch_size:(b + 1) * batch_size].to(device)
            known = None
            if site_gradients is not None:
                key = (method, steps, sha256_of([t if t is not None else "-" for t in (
                    batch.clean, batch.patch, batch.clean_answer, batch.patch_answer, batch.last)]))
                known = site_gradients.setdefault(key, {})
            result = node_effects(model, saes, metric, batch, method, steps, use_ext, progress=show, known=known)
            sums.add_nodes(result)
            if not nodes_only:   # the edges read part of the states (for_edges: x_p and the error terms go)
                states = {s: st.for_edges() for s, st in result.states.items()}
                grads, effects = result.grads, result.effects
            # The rest of the batch's states goes before the edge stage, and the pages of what is freed back to
            # the system (release_freed_memory).
            del result
            release_freed_memory(device)
            if not nodes_only:
                edges = edge_effects(model, saes, batch, states, grads, effects, node_threshold, aggregation,
                                     progress=show)
                del states, grads, effects
                release_freed_memory(device)
                sums.add_edges(edges)
                del edges
    settings = {"method": method, "steps": steps, "node_threshold": node_threshold,
                "edge_threshold": edge_threshold, "aggregation": aggregation, "n_examples": len(examples),
                "model": model_hash(model), "saes": saes_hash(saes)}
    if top_k_nodes is not None:
        settings["top_k_nodes"] = top_k_nodes
    if top_k_edges is not None:
        settings["top_k_edges"] = top_k_edges
    nodes, edges, metric_values = sums.means(len(examples), next(model.parameters()).dtype,
                                             has_patch=examples.patch is not None)
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
