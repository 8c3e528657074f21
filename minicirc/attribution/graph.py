"""Attribution graphs over transcoders (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer 0.5's
`attribute`): for one prompt, the direct effect of every active transcoder feature, error node and input token
on every later feature's pre-activation and on the top logits, in one adjacency matrix (docs/method.md §15).

The local replacement model: every layer's MLP output is y = c + skip(u) + Σ_s a_s W_dec[s] + err, with a_s the
active features of the transcoder that reads the MLP's input u (a cross-layer transcoder: the features of every
layer up to this one, through their decoders into this layer), err what they and the skip term miss (so the
model's values are kept exactly), c the decoder bias; at the first `zero_positions` positions (BOS) features
and errors are left out and c holds y - skip(u) whole. Norm scales and attention patterns are held at
their values on the prompt (SiteModel.frozen_statistics), so the model is linear in its residual stream and
the nodes' contributions add up; the skip term follows u. Edges are vector-Jacobian products of that linear
map, many target rows at once (graph_backward: written out for the Llama family, from autograd for the
others), pushed down one layer at a time and contracted with each layer's source vectors as they pass
(nothing of size rows x features is built).
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import MinicircError
from ..model.sites import check_tokens
from .common import frozen_weights, recording_inputs, site_order
from .graph_backward import AutogradLayers, HeldLayers
from .graph_file import Graph
from .memory import release_freed_memory

KINDS = ("relu", "jumprelu", "topk", "groupmax")   # f_i = pre_i where active: d f_i / d u = W_enc[:, i]


@dataclass
class Replacement:
    """The nodes of the local replacement model on one prompt (`local_replacement`). Per layer l (lists of
    n_layers): `pos[l]`, `feat[l]`, `act[l]` the active features of the transcoder reading u_l (sorted by
    position, then feature), `enc[l]` (n, d) their encoder directions W_enc[:, s]; `writes[k]` the list of
    (source layer i, (n_i, d) vectors) the features of layer i add to the MLP output of layer k (a per-layer
    transcoder: only i = k, a_s W_dec[s]; a cross-layer one: every i <= k, a_s W_dec_i[s, k - i]);
    `err` (L, T, d) the error nodes, `const` (L, T, d) what is neither node nor skip term (c above);
    `u` (L, T, d) the transcoders' inputs, `y` (L, T, d) the MLP outputs; `embed` (T, d) the token nodes'
    vectors (the embed site's value); `logits` (T, vocab)."""
    tokens: torch.Tensor
    pos: list
    feat: list
    act: list
    enc: list
    writes: list
    err: torch.Tensor
    const: torch.Tensor
    u: torch.Tensor
    y: torch.Tensor
    embed: torch.Tensor
    logits: torch.Tensor

    @property
    def n_features(self):
        return sum(len(p) for p in self.pos)


def decoder_of(tc):
    """(F, n_out, d): what a transcoder's features write to the MLP outputs of its own and the next n_out - 1
    layers: a cross-layer transcoder's layer holds W_out (every later layer), a per-layer one W_dec (its own)."""
    W_out = getattr(tc, "W_out", None)
    return tc.W_dec[:, None] if W_out is None else W_out


def check_transcoders(model, transcoders):
    """Refuse, in one line, a set that is not one per-layer transcoder at every mlp_l with a derivative of the
    form W_enc[:, i] (relu, jumprelu, topk, groupmax; no input normalisation)."""
    L = model.cfg.n_layers
    site_order(model, transcoders)
    missing = [f"mlp_{l}" for l in range(L) if f"mlp_{l}" not in transcoders]
    extra = [s for s in transcoders if s not in {f"mlp_{l}" for l in range(L)}]
    if missing or extra:
        raise MinicircError(f"an attribution graph needs one transcoder at every MLP (mlp_0..mlp_{L - 1}); "
                            + (f"missing {missing}" if missing else f"not transcoder sites: {extra}"))
    for s, tc in transcoders.items():
        name = tc.source or s
        if not getattr(tc, "reads", None):
            raise MinicircError(f"{name}: at {s} but not a transcoder (it encodes its own site's value)")
        if tc.kind not in KINDS or tc.input_norm != "none":
            raise MinicircError(f"{name}: kind {tc.kind} with input normalisation {tc.input_norm}; attribution "
                                f"graphs take {', '.join(KINDS)} without normalisation")
        l = int(s.rsplit("_", 1)[1])
        if l + decoder_of(tc).shape[1] > L:
            raise MinicircError(f"{name}: at {s} its features write to {decoder_of(tc).shape[1]} layers, past "
                                f"this model's last layer {L - 1}")


def prepare_tokens(model, tokens):
    """tokens (a tensor or a list of ids) as a (T,) long tensor on the model's device, checked."""
    device = model.unembedding.device
    tokens = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, device=device)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1 or tokens.numel() == 0 or tokens.dtype not in (torch.int32, torch.int64):
        raise MinicircError(f"an attribution graph reads one prompt: token ids of shape (T,), got "
                            f"{tuple(tokens.shape)} {tokens.dtype}")
    check_tokens(tokens, model.cfg.vocab_size)
    return tokens.long().to(device)


@torch.no_grad()
def local_replacement(model, transcoders, tokens, zero_positions=1):
    """The nodes of the local replacement model (`Replacement`) from one ordinary forward pass."""
    check_transcoders(model, transcoders)
    tokens = prepare_tokens(model, tokens)
    L = model.cfg.n_layers
    sites = [f"mlp_{l}" for l in range(L)]
    cache, inputs = {}, {}
    edit = recording_inputs(model, transcoders, sites, {}, inputs)
    logits = model(tokens[None], edit=edit, cache=cache)[0]
    P = dict(pos=[], feat=[], act=[], enc=[])
    writes = [[] for _ in range(L)]
    for l, s in enumerate(sites):
        tc, u = transcoders[s], inputs[s][0]
        f = tc.encode(u)
        f[:zero_positions] = 0
        pos, feat = f.nonzero(as_tuple=True)           # row-major: by position, then feature
        act = f[pos, feat]
        for k, v in zip(P, (pos, feat, act, tc.W_enc[:, feat].T)):
            P[k].append(v)
        W = decoder_of(tc)
        for j in range(W.shape[1]):
            writes[l + j].append((l, act[:, None] * W[feat, j]))
    err, const = [], []
    for k, s in enumerate(sites):
        tc, u, y = transcoders[s], inputs[s][0], cache[s][0]
        recon = torch.zeros_like(y)
        for i, dec in writes[k]:
            recon.index_add_(0, P["pos"][i], dec)
        e = y - (recon + tc.skip(u) + tc.b_dec)
        e[:zero_positions] = 0
        c = tc.b_dec.expand_as(y).clone()
        c[:zero_positions] = (y - tc.skip(u))[:zero_positions]
        err.append(e)
        const.append(c)
    stack = lambda xs: torch.stack(xs)
    return Replacement(tokens, **P, writes=writes, err=stack(err), const=stack(const),
                       u=stack([inputs[s][0] for s in sites]), y=stack([cache[s][0] for s in sites]),
                       embed=cache["embed"][0], logits=logits)


def logit_targets(logits, unembedding, max_n_logits=10, desired_logit_prob=0.95):
    """(token ids, probabilities, vectors): the most probable next tokens at the last position, up to
    max_n_logits or until their cumulative probability reaches desired_logit_prob (the first k whose sum
    passes it, circuit-tracer's rule), each as its unembedding row minus the mean row (a logit minus the mean
    logit: the direction of that token's probability that no shift of all logits changes)."""
    probs = torch.softmax(logits, dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_n_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
    idx = top_idx[:cutoff]
    return idx, probs[idx], unembedding[idx] - unembedding.mean(dim=0, keepdim=True)


def contract_features(g, pos, dec):
    """(R, n): g[r, pos[i]] · dec[i] for a layer's features (sorted by position), one product per position
    present: nothing of size R x n x d (a gather of g[:, pos] would be, gigabytes at real sizes)."""
    out = g.new_zeros(g.shape[0], len(pos))
    if len(pos) == 0:
        return out
    positions, counts = torch.unique_consecutive(pos, return_counts=True)
    start = 0
    for p, n in zip(positions.tolist(), counts.tolist()):
        out[:, start:start + n] = g[:, p] @ dec[start:start + n].T
        start += n
    return out


def plan_batches(layer_of, pos_of, P_of, batch_size):
    """The rows in batches: rows of the same prefix length P (P_of) together, each batch sorted by target layer,
    highest first, at most batch_size rows. A batch's backward pass starts at its highest layer with its rows
    there and takes in the rows of each lower layer as it reaches it, so no row is carried above its own layer
    and none past its prefix: the work is Σ_rows (layer + 1) P, not (batch's top layer + 1) P per row."""
    order = torch.argsort(layer_of * (P_of.max() + 1) - P_of, descending=True, stable=True)
    order = order[torch.argsort(P_of[order], stable=True)]
    batches = []
    for P in torch.unique(P_of).flip(0).tolist():   # longest first: later batches' tensors fit in freed ones
        rows = order[P_of[order] == P]
        batches += [(rows[lo:lo + batch_size], P) for lo in range(0, len(rows), batch_size)]
    return batches


def attribution_rows(layers, rep, targets, A, rows, P, columns):
    """Fill A[rows, :] with the direct effects on a batch of targets sorted by layer, highest first, given as
    (layer, pos, vector) with layer L for a logit (vector on the final norm's output at position P - 1) and
    l < L for a feature of layer l (its encoder direction on u_l at pos), all at positions below P.
    `layers` is the backward pass (graph_backward); columns(k, P) gives the columns of layer k's features, of its
    errors and of the tokens at the first P positions. From the top down, the gradient g at each layer's
    output (where its MLP's nodes are added) is contracted with the source vectors there."""
    lay, pos, vecs = targets
    L = len(rep.pos)
    n = [int((lay >= k).sum()) for k in range(L + 1)]     # rows started at or above layer k (sorted)
    g = layers.top(vecs[:n[L]], P) if n[L] else None
    for k in range(int(lay[0].clamp(max=L - 1)), -1, -1):
        if g is not None:
            for i, dec in rep.writes[k]:    # layer i's features, as written into layer k's MLP output
                m = int(torch.searchsorted(rep.pos[i], P))
                A[rows[:len(g)], columns(i, P)[0]] += contract_features(g, rep.pos[i][:m], dec[:m]).to(A)
            A[rows[:len(g)], columns(k, P)[1]] = (g * rep.err[k][:P]).sum(-1).to(A)
        new = slice(n[k + 1], n[k])
        g = layers.back(k, g, (pos[new], vecs[new]) if n[k] > n[k + 1] else None, P)
    A[rows, columns(0, P)[2]] = (g * rep.embed[:P]).sum(-1).to(A)


def attribution_graph(model, transcoders, tokens, max_n_logits=10, desired_logit_prob=0.95, batch_size=256,
                      zero_positions=1, position_buckets=8, progress=False, backward="auto"):
    """The attribution graph of `tokens` (one prompt, (T,) ids; its first `zero_positions` positions, the BOS,
    carry no feature and no error node) on the local replacement model of `transcoders` ({mlp_l: per-layer
    transcoder} at every layer): a Graph whose adjacency_matrix[target, source] is the direct effect of
    source on target. Nodes: active features by (layer, position, feature), then one error node per (layer,
    position), one token node per position, then the logit nodes (logit_targets). A feature row is the effect
    on its pre-activation W_enc[:, i] · u; a logit row on its demeaned logit; error and token rows are 0.

    At most `batch_size` target rows share each backward pass (plan_batches). A target at position p depends on
    positions up to p only (attention is causal), so a batch runs on the prompt's first P positions, the same
    numbers (causal attention and per-token norms give the prefix the same frozen statistics): P = p + 1 with
    the backward pass written out (`backward` "held", the Llama family's default), else the end of one of
    `position_buckets` ranges of positions ("autograd", every family; each range's forward pass is taken once).
    Runs on the model's device; the matrix is kept on the CPU."""
    rep = local_replacement(model, transcoders, tokens, zero_positions)
    L, T = model.cfg.n_layers, len(rep.tokens)
    dev = rep.embed.device
    ids, probs, vecs = logit_targets(rep.logits[-1], model.unembedding, max_n_logits, desired_logit_prob)
    n_f = rep.n_features
    f0 = [0]                                                          # first column of each layer's features
    for p in rep.pos:
        f0.append(f0[-1] + len(p))
    e0, t0 = n_f, n_f + L * T
    n = t0 + T + len(ids)
    k = len(ids)
    layer_of = torch.cat([torch.full((len(p),), l, device=dev) for l, p in enumerate(rep.pos)]
                         + [torch.full((k,), L, device=dev)])
    pos_of = torch.cat(rep.pos + [torch.full((k,), T - 1, device=dev)])
    vec_of = torch.cat(rep.enc + [vecs]).detach()
    row_of = torch.cat([torch.arange(n_f, device="cpu"), torch.arange(n - k, n, device="cpu")])
    if backward not in ("auto", "held", "autograd") or (backward == "held" and not HeldLayers.supports(model)):
        raise MinicircError(f"backward {backward!r}: 'auto', 'autograd', or 'held' for the Llama family's models")
    held = backward == "held" or (backward == "auto" and HeldLayers.supports(model))
    if held:
        layers, P_of = HeldLayers(model, transcoders, rep.tokens), pos_of + 1
    else:
        K = max(1, min(position_buckets, T))
        ends = torch.tensor([-(-T * (b + 1) // K) for b in range(K)], device=dev)   # ceil(T (b+1) / K)
        layers, P_of = AutogradLayers(model, transcoders, rep.tokens), ends[torch.bucketize(pos_of, ends, right=True)]
    # The forward passes above leave about 4x their live memory freed but kept in glibc's heap (the values they
    # keep pin it): given back before the matrix is allocated on top of it.
    release_freed_memory(dev)
    A = torch.zeros(n, n, dtype=rep.embed.dtype, device="cpu")

    def columns(k, P):
        return (slice(f0[k], f0[k] + int(torch.searchsorted(rep.pos[k], P))), slice(e0 + k * T, e0 + k * T + P),
                slice(t0, t0 + P))
    bar = tqdm(total=n_f + k, desc="graph rows", disable=not progress)
    with frozen_weights(model), torch.set_grad_enabled(not held):
        for m, P in plan_batches(layer_of, pos_of, P_of, batch_size):
            attribution_rows(layers, rep, (layer_of[m], pos_of[m], vec_of[m]), A, row_of[m.cpu()], P, columns)
            bar.update(len(m))
    bar.close()
    active = torch.stack([layer_of[:n_f], pos_of[:n_f], torch.cat(rep.feat)], 1).cpu()
    return Graph(adjacency_matrix=A, active_features=active, activation_values=torch.cat(rep.act).cpu(),
                 selected_features=torch.arange(n_f, device="cpu"), input_tokens=rep.tokens.cpu(), logit_token_ids=ids.cpu(),
                 logit_probabilities=probs.cpu(), n_layers=L)
