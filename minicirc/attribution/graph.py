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
map, many target rows at once (`torch.autograd.grad(..., is_grads_batched=True)`), pushed down one layer at a
time and contracted with each layer's source vectors as they pass (nothing of size rows x features is built).
"""
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..errors import MinicircError
from ..model.sites import check_tokens
from .common import frozen_edit, frozen_weights, recording_inputs, site_order
from .graph_file import Graph

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


class FrozenRun:
    """The replacement model's forward pass with statistics held, cut at every residual stream: leaves[k] is
    the input of layer k (leaves[0] the embedding, leaves[L] the last residual stream), outs[k] layer k's
    output computed from leaves[k], u[k] the transcoder input of layer k, h the final norm's output. Every
    MLP output is held but for its skip term (common.frozen_edit), so the graph from leaves[k] to outs[k] and
    u[k] is layer k of the linear replacement model, and its VJPs can be taken one layer at a time."""

    def __init__(self, model, transcoders, tokens):
        L = model.cfg.n_layers
        self.leaves, self.outs, self.inputs = [], [], {}
        sites = [f"mlp_{l}" for l in range(L)]

        def cut(x, keep=True):
            if keep:
                self.outs.append(x)
            leaf = x.detach().requires_grad_(True)
            self.leaves.append(leaf)
            return leaf
        edit = {"embed": lambda x: cut(x, keep=False)}
        edit.update({f"resid_{l}": cut for l in range(L)})
        edit.update({s: frozen_edit(transcoders[s], s, self.inputs) for s in sites})
        edit = recording_inputs(model, transcoders, sites, edit, self.inputs)
        model(tokens[None], edit=edit, stop_at=f"resid_{L - 1}")
        self.u = [self.inputs[s] for s in sites]
        self.h = model.final_norm(self.leaves[L])


def vjp(outputs, leaf, cotangents):
    """Σ_o cotangent_o · d(output_o)/d(leaf) for a batch of cotangents (R, *output shape) -> (R, *leaf shape)."""
    (g,) = torch.autograd.grad(outputs, leaf, cotangents, retain_graph=True, is_grads_batched=True)
    return g


def contract_features(g, pos, dec):
    """(R, n): g[r, pos[i]] · dec[i] for a layer's features (sorted by position), one product per position
    present: nothing of size R x n x d."""
    out = g.new_zeros(g.shape[0], len(pos))
    if len(pos) == 0:
        return out
    positions, counts = torch.unique_consecutive(pos, return_counts=True)
    start = 0
    for p, n in zip(positions.tolist(), counts.tolist()):
        out[:, start:start + n] = g[:, p] @ dec[start:start + n].T
        start += n
    return out


def attribution_rows(run, rep, targets, A, rows, columns):
    """Fill A[rows, :] with the direct effects on R targets, given as (layer, pos, vector) with layer L for a
    logit (vector on the final norm's output at the last position) and l < L for a feature of layer l (its
    encoder direction on u_l at pos). run and rep cover the first P positions (every target's position lies
    among them; later positions cannot reach it); columns(k) gives the columns of layer k's features, of its
    errors and of the tokens at those positions. One VJP per layer, from the highest target down."""
    layers, positions, vectors = targets
    L, (P, d), R = len(run.u), rep.embed.shape, len(layers)
    at = torch.arange(R, device=vectors.device)

    present = set(layers.tolist())

    def seed(layer):
        """The cotangents (R, 1, P, d) of the targets of `layer` (0 elsewhere), None if it has none."""
        if layer not in present:
            return None
        m = layers == layer
        s = vectors.new_zeros(R, 1, P, d)
        s[at[m], 0, positions[m]] = vectors[m]
        return s

    top = max(present)
    g = None
    if top == L:
        g = vjp([run.h], run.leaves[L], [seed(L)])
    for k in range(min(top, L - 1), -1, -1):
        if g is not None:      # g: the gradient at layer k's output, where its MLP's nodes are added
            gk = g[:, 0]
            for i, dec in rep.writes[k]:   # layer i's features, as written into layer k's MLP output
                A[rows, columns(i)[0]] += contract_features(gk, rep.pos[i], dec).to(A)
            A[rows, columns(k)[1]] = torch.einsum("rtd,td->rt", gk, rep.err[k]).to(A)
        outs, cots = ([run.outs[k]], [g]) if g is not None else ([], [])
        s = seed(k)
        if s is not None:
            outs.append(run.u[k])
            cots.append(s)
        g = vjp(outs, run.leaves[k], cots)
    A[rows, columns(0)[2]] = torch.einsum("rtd,td->rt", g[:, 0], rep.embed).to(A)


def prefix(rep, P):
    """The replacement's nodes at the first P positions (features are sorted by position within a layer)."""
    keep = [int(torch.searchsorted(p, P)) for p in rep.pos]
    cut = lambda xs: [x[:n] for x, n in zip(xs, keep)]
    writes = [[(i, dec[:keep[i]]) for i, dec in w] for w in rep.writes]
    return replace(rep, tokens=rep.tokens[:P], pos=cut(rep.pos), feat=cut(rep.feat), act=cut(rep.act),
                   enc=cut(rep.enc), writes=writes, err=rep.err[:, :P], const=rep.const[:, :P], u=rep.u[:, :P],
                   y=rep.y[:, :P], embed=rep.embed[:P], logits=rep.logits[:P])


def attribution_graph(model, transcoders, tokens, max_n_logits=10, desired_logit_prob=0.95, batch_size=256,
                      zero_positions=1, position_buckets=8, progress=False):
    """The attribution graph of `tokens` (one prompt, (T,) ids; its first `zero_positions` positions, the BOS,
    carry no feature and no error node) on the local replacement model of `transcoders` ({mlp_l: per-layer
    transcoder} at every layer): a Graph whose adjacency_matrix[target, source] is the direct effect of
    source on target. Nodes: active features by (layer, position, feature), then one error node per (layer,
    position), one token node per position, then the logit nodes (logit_targets). A feature row is the effect
    on its pre-activation W_enc[:, i] · u; a logit row on its demeaned logit; error and token rows are 0.

    `batch_size` target rows share each VJP. A target at position p depends on positions up to p only
    (attention is causal), so targets are grouped into `position_buckets` ranges of positions and each group's
    VJPs run on the replacement model of the prompt's prefix up to its range's end: the same numbers (causal
    attention and per-token norms give the prefix the same frozen statistics), about half the work. Runs on the
    model's device; the matrix is kept on the CPU."""
    rep = local_replacement(model, transcoders, tokens, zero_positions)
    L, (T, d) = model.cfg.n_layers, rep.embed.shape
    dev = rep.embed.device
    ids, probs, vecs = logit_targets(rep.logits[-1], model.unembedding, max_n_logits, desired_logit_prob)
    n_f = rep.n_features
    f0 = [0]                                                          # first column of each layer's features
    for p in rep.pos:
        f0.append(f0[-1] + len(p))
    e0, t0 = n_f, n_f + L * T
    n = t0 + T + len(ids)
    A = torch.zeros(n, n, dtype=rep.embed.dtype, device="cpu")
    layer_of = torch.cat([torch.full((len(p),), l, device=dev) for l, p in enumerate(rep.pos)])
    pos_of = torch.cat(rep.pos) if n_f else torch.zeros(0, dtype=torch.long, device=dev)
    enc = torch.cat(rep.enc) if n_f else vecs.new_zeros(0, d)
    K = max(1, min(position_buckets, T))
    ends = [-(-T * (b + 1) // K) for b in range(K)]                 # ceil(T (b+1) / K): the buckets' prefixes
    bucket = torch.bucketize(pos_of, torch.tensor(ends, device=dev), right=True)
    bar = tqdm(total=n_f + len(ids), desc="graph rows", disable=not progress)
    with frozen_weights(model), torch.enable_grad():
        for b, P in enumerate(ends):
            members = (bucket == b).nonzero().flatten()
            if not len(members) and b < K - 1:
                continue
            view = prefix(rep, P)

            def columns(k):
                return (slice(f0[k], f0[k] + len(view.pos[k])), slice(e0 + k * T, e0 + k * T + P), slice(t0, t0 + P))
            with model.frozen_statistics():
                run = FrozenRun(model, transcoders, view.tokens)
                if b == K - 1:
                    k = len(ids)
                    attribution_rows(run, view, (torch.full((k,), L, device=dev), torch.full((k,), P - 1, device=dev),
                                                 vecs), A, torch.arange(n - k, n, device="cpu"), columns)
                    bar.update(k)
                for lo in range(0, len(members), batch_size):
                    m = members[lo:lo + batch_size]
                    attribution_rows(run, view, (layer_of[m], pos_of[m], enc[m]), A, m.cpu(), columns)
                    bar.update(len(m))
            del run
    bar.close()
    active = torch.stack([layer_of, pos_of, torch.cat(rep.feat) if n_f else pos_of], 1).cpu()
    return Graph(adjacency_matrix=A, active_features=active,
                 activation_values=(torch.cat(rep.act) if n_f else vecs.new_zeros(0)).cpu(),
                 selected_features=torch.arange(n_f, device="cpu"), input_tokens=rep.tokens.cpu(), logit_token_ids=ids.cpu(),
                 logit_probabilities=probs.cpu(), n_layers=L)
