"""Attribution graphs (minicirc.attribution.graph, docs/method.md §15) on tiny random Llama, Gemma-2, GPT-2 and
GPT-NeoX (parallel residual) models in float64 with random per-layer transcoders (ReLU and JumpReLU, with and
without skip, reading the MLP's normed input or the residual before the norm).

References, written here apart from the code under test: the transcoder inputs from each family's own norm
module; the replaced model as a forward pass whose MLP outputs are rebuilt from the graph's nodes; every
adjacency entry as a finite difference of the frozen model (statistics held at their values on the prompt,
every MLP output held but for its skip term, which follows u), one source moved at a time, read at each
target's pre-activation W_enc[:, i] · u or demeaned logit; the logit targets by sorting the probabilities;
influence by a matrix inverse. circuit-tracer's own graphs are compared in test_graph_circuit_tracer.py.
"""
import pytest
import torch

import minicirc
from minicirc import MinicircError
from minicirc.attribution.graph import attribution_graph, local_replacement, logit_targets
from minicirc.attribution.graph_file import Graph, compute_influence, normalize_matrix, prune_graph
from minicirc.model.gpt2 import GPT2, Config as GPT2Config
from minicirc.model.llama import Llama, config_from_hf
from minicirc.sae import Dictionary

F64 = torch.float64
V, D, NF = 19, 12, 9
TOKENS = torch.tensor([0, 5, 3, 11, 2, 7])


def perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.to(F64).eval()


def make_model(name, seed=0):
    torch.manual_seed(seed)
    if name in ("llama", "gemma2"):
        hf = dict(model_type=name, vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=20, max_position_embeddings=16, tie_word_embeddings=False)
        if name == "gemma2":
            hf.update(head_dim=8, query_pre_attn_scalar=6, attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
                      sliding_window=3, hidden_activation="gelu_pytorch_tanh")
        return perturbed(Llama(config_from_hf(hf)), seed)
    if name == "gpt2":
        return perturbed(GPT2(GPT2Config(vocab_size=V, d_model=D, n_layers=3, n_heads=2, d_mlp=20, max_len=16)), seed)
    cfg = minicirc.Config(vocab_size=V, d_model=D, n_layers=3, n_heads=2, d_mlp=20, rotary_pct=0.5, max_len=16,
                          parallel_residual=True)
    return perturbed(minicirc.GPTNeoX(cfg), seed)


# (kind, reads, skip) per layer, cycled: every layer of every model has a different mix
KINDS = [("relu", "mlp_in", True), ("jumprelu", "resid_mid", False), ("jumprelu", "mlp_in", True),
         ("relu", "resid_mid", False)]


def make_transcoders(model, seed=1, kinds=KINDS):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for l in range(model.cfg.n_layers):
        kind, reads, skip = kinds[(l + seed) % len(kinds)]
        reads = "mlp_in" if model.cfg.parallel_residual else reads
        W_enc = torch.randn(D, NF, generator=gen) / D ** 0.5 * 1.5
        thr = 0.3 * torch.rand(NF, generator=gen) if kind == "jumprelu" else None
        out[f"mlp_{l}"] = Dictionary(W_enc, 0.3 * torch.randn(NF, generator=gen), 0.5 * torch.randn(NF, D, generator=gen),
                                     0.3 * torch.randn(D, generator=gen), kind, threshold=thr, subtract_b_dec=False,
                                     W_skip=0.4 * torch.randn(D, D, generator=gen) if skip else None, reads=reads).to(F64)
    return out


class CrossLayer(Dictionary):
    """Layer l of a cross-layer transcoder as attribution graphs read one: a transcoder at mlp_l (reading u_l)
    whose features write W_out[:, j] into mlp_{l+j} for every later layer (its own decode is W_out[:, 0])."""

    def __init__(self, W_enc, b_enc, W_out, b_dec, **kw):
        super().__init__(W_enc, b_enc, W_out[:, 0], b_dec, **kw)
        self.W_out = torch.nn.Parameter(W_out.float().contiguous(), requires_grad=False)


def make_clt(model, seed=2, kind="jumprelu", reads="mlp_in"):
    """A random cross-layer transcoder over every layer (no skip term, as circuit-tracer's files hold none)."""
    gen = torch.Generator().manual_seed(seed)
    L = model.cfg.n_layers
    out = {}
    for l in range(L):
        thr = 0.3 * torch.rand(NF, generator=gen) if kind == "jumprelu" else None
        out[f"mlp_{l}"] = CrossLayer(torch.randn(D, NF, generator=gen) / D ** 0.5 * 1.5, 0.3 * torch.randn(NF, generator=gen),
                                     0.5 * torch.randn(NF, L - l, D, generator=gen), 0.3 * torch.randn(D, generator=gen),
                                     kind=kind, threshold=thr, subtract_b_dec=False, reads=reads).to(F64)
    return out


def make_set(model, which):
    """Per-layer transcoders (KINDS), or a cross-layer transcoder reading the residual before the MLP's norm
    (circuit-tracer's default for them) where the model has one, else the norm's output."""
    if which == "clt":
        return make_clt(model, reads="mlp_in" if model.cfg.parallel_residual else "resid_mid")
    return make_transcoders(model)


MODELS = ["llama", "gemma2", "gpt2", "neox parallel"]
CASES = [(m, "per-layer") for m in MODELS] + [("llama", "clt"), ("gemma2", "clt"), ("neox parallel", "clt")]


def mlp_norm(model, l):
    """The norm before layer l's MLP, by the family's own module name."""
    layer = model.layers[l]
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"):
        if hasattr(layer, name):
            return getattr(layer, name)


def mlp_source(model, l):
    return (f"resid_{l - 1}" if l else "embed") if model.cfg.parallel_residual else f"resid_mid_{l}"


def hand_input(model, l, tc, values):
    r = values[mlp_source(model, l)]
    return mlp_norm(model, l)(r) if tc.reads == "mlp_in" else r


def mids(model):
    return [] if model.cfg.parallel_residual else [f"resid_mid_{l}" for l in range(model.cfg.n_layers)]


def tolerance(name):
    """Llama and Gemma-2 take their RMSNorm in float32 (as transformers does): float32 rounding of the norm."""
    return 2e-6 if name in ("llama", "gemma2") else 1e-10


def sources(g, rep, L, T):
    """Every source node as (column, [(site, position, vector it adds there)]): a feature of a cross-layer
    transcoder adds a vector at every later MLP output."""
    out = []
    for i, (l, p, f) in enumerate(g.active_features.tolist()):
        at = (rep.pos[l] == p) & (rep.feat[l] == f)
        out.append((i, [(f"mlp_{k}", p, dec[at][0]) for k in range(L) for j, dec in rep.writes[k] if j == l]))
    for l in range(L):
        for p in range(T):
            out.append((g.n_features + l * T + p, [(f"mlp_{l}", p, rep.err[l, p])]))
    for p in range(T):
        out.append((g.n_features + L * T + p, [("embed", p, rep.embed[p])]))
    return out


def written(rep, k, T):
    """Σ of what the features write into layer k's MLP output, (T, d)."""
    y = torch.zeros(T, D, dtype=F64)
    for i, dec in rep.writes[k]:
        y = y.index_add(0, rep.pos[i], dec)
    return y


def frozen_differences(model, tcs, tokens, moves, targets):
    """The frozen model's response to each move: rows (targets) x columns (moves). moves: [(site, pos, vector)];
    targets: ("feature", l, p, i) read as W_enc[:, i] · u_l[p], or ("logit", vec) as vec · final_norm(resid)[-1].
    One forward pass of batch len(moves) + 1 (the last row unmoved) with the statistics held at the clean run's:
    every MLP output is its clean value plus skip(u) - skip(u clean) (direct effects: no feature responds)."""
    L, T = model.cfg.n_layers, len(tokens)
    B = len(moves) + 1
    with model.frozen_statistics(), torch.no_grad():
        clean = {}
        model(tokens[None], cache=clean, extra=mids(model))          # records the statistics
        u_clean = {l: hand_input(model, l, tcs[f"mlp_{l}"], clean) for l in range(L)}
        delta = {s: torch.zeros(B, T, D, dtype=F64) for s in ["embed"] + [f"mlp_{l}" for l in range(L)]}
        for b, move in enumerate(moves):
            for site, p, vec in move:
                delta[site][b, p] += vec
        run = {}

        def keep(site):
            def fn(x):
                run[site] = x
                return x
            return fn

        def mlp(l):
            tc = tcs[f"mlp_{l}"]
            return lambda y: (clean[f"mlp_{l}"] + tc.skip(hand_input(model, l, tc, run))
                              - tc.skip(u_clean[l]) + delta[f"mlp_{l}"])
        edit = {"embed": lambda x: keep("embed")(x + delta["embed"])}
        edit.update({s: keep(s) for s in mids(model) + [f"resid_{l}" for l in range(L - 1)]})
        edit.update({f"mlp_{l}": mlp(l) for l in range(L)})
        cache = {}
        model(tokens[None].expand(B, T), edit=edit, cache=cache, extra=mids(model))
        out = []
        for t in targets:
            if t[0] == "feature":
                _, l, p, i = t
                tc = tcs[f"mlp_{l}"]
                v = hand_input(model, l, tc, cache)[:, p] @ tc.W_enc[:, i]
            else:
                v = model.final_norm(cache[f"resid_{L - 1}"])[:, -1] @ t[1]
            out.append(v[:-1] - v[-1])
        return torch.stack(out)


@pytest.mark.parametrize("name, which", CASES)
def test_replaced_model_keeps_the_logits(name, which):
    """The nodes rebuild every MLP output: a forward pass whose mlp_l is const + skip(u) + Σ a_s W_dec[s] + err,
    u recomputed in that pass by the family's own norm, gives the model's logits, with statistics live and held."""
    model = make_model(name)
    tcs = make_set(model, which)
    rep = local_replacement(model, tcs, TOKENS)
    L, T = model.cfg.n_layers, len(TOKENS)
    with torch.no_grad():
        clean = {}
        expected = model(TOKENS[None], cache=clean, extra=mids(model))[0]
        dense = {}
        for l in range(L):                                  # the features are those of the MLP's own input
            tc = tcs[f"mlp_{l}"]
            f = tc.encode(hand_input(model, l, tc, clean)[0])
            f[0] = 0
            dense[l] = f
            assert torch.equal(torch.stack([rep.pos[l], rep.feat[l]]), f.nonzero().T)
            torch.testing.assert_close(rep.act[l], f[f != 0], rtol=1e-12, atol=0)
        for k in range(L):     # the error: y minus every write into layer k (a CLT's layers i <= k), skip, bias
            tc = tcs[f"mlp_{k}"]
            writes = sum(dense[i] @ (tcs[f"mlp_{i}"].W_out[:, k - i] if which == "clt" else tcs[f"mlp_{i}"].W_dec)
                         for i in (range(k + 1) if which == "clt" else [k]))
            e = clean[f"mlp_{k}"][0] - writes - tc.skip(hand_input(model, k, tc, clean)[0]) - tc.b_dec
            e[0] = 0
            torch.testing.assert_close(rep.err[k], e, rtol=0, atol=1e-12)
        assert rep.n_features > 10 and rep.err[:, 1:].abs().min() > 0 and rep.err[:, 0].abs().max() == 0
        for frozen in (False, True):
            run = {}
            edit = {s: (lambda s: lambda x: run.__setitem__(s, x) or x)(s) for s in mids(model)}

            def rebuilt(l):
                tc = tcs[f"mlp_{l}"]
                return lambda y: (rep.const[l] + tc.skip(hand_input(model, l, tc, run))
                                  + written(rep, l, T) + rep.err[l])
            edit.update({f"mlp_{l}": rebuilt(l) for l in range(L)})
            if model.cfg.parallel_residual:   # the MLP reads the layer's input: record it there
                edit.update({s: (lambda s: lambda x: run.__setitem__(s, x) or x)(s)
                             for s in ["embed"] + [f"resid_{l}" for l in range(L - 1)]})
            if frozen:
                with model.frozen_statistics():
                    model(TOKENS[None])                    # holds the statistics of the unmodified pass
                    got = model(TOKENS[None], edit=edit)[0]
            else:
                got = model(TOKENS[None], edit=edit)[0]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if name in ("llama", "gemma2") else 1e-12)
            assert (got - expected).abs().max() < 1e-3 * expected.abs().max()


@pytest.mark.parametrize("name", MODELS)
def test_frozen_model_is_linear_and_live_model_is_not(name):
    """What frozen_statistics holds makes the replacement model linear in a moved embedding (the response to
    2δ is twice that to δ); with live norms and attention the same move is not linear (the test can fail)."""
    model = make_model(name)
    tcs = make_transcoders(model)
    vec = model.unembedding[3] - model.unembedding.mean(0)
    delta = torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(3))
    moves = [[("embed", 2, delta)], [("embed", 2, 2 * delta)]]
    r = frozen_differences(model, tcs, TOKENS, moves, [("logit", vec)])[0]
    torch.testing.assert_close(r[1], 2 * r[0], rtol=tolerance(name) * 10, atol=0)
    with torch.no_grad():
        e = torch.zeros(3, len(TOKENS), D, dtype=F64)
        e[1, 2], e[2, 2] = delta, 2 * delta
        cache = {}
        model(TOKENS[None].expand(3, -1), edit={"embed": lambda x: x + e}, cache=cache)
        h = model.final_norm(cache[f"resid_{model.cfg.n_layers - 1}"])[:, -1] @ vec
    assert abs((h[2] - h[0]) - 2 * (h[1] - h[0])) > 1e-4 * abs(h[1] - h[0])


@pytest.mark.parametrize("name, which", CASES)
def test_every_adjacency_entry_equals_finite_differences(name, which):
    """Every row (features, logits) and column (features, errors, tokens) of the matrix against the frozen
    model moved one source at a time; error and token rows and logit columns are 0; each block is non-zero."""
    model = make_model(name)
    tcs = make_set(model, which)
    g = attribution_graph(model, tcs, TOKENS, batch_size=7)
    rep = local_replacement(model, tcs, TOKENS)
    L, T, nf = model.cfg.n_layers, len(TOKENS), g.n_features
    A = g.adjacency_matrix
    ids, probs, vecs = logit_targets(rep.logits[-1], model.unembedding)
    src = sources(g, rep, L, T)
    cols = [c for c, *_ in src]
    targets = [("feature", *t) for t in g.active_features.tolist()] + [("logit", v) for v in vecs]
    rows = list(range(nf)) + list(range(A.shape[0] - len(ids), A.shape[0]))
    ref = frozen_differences(model, tcs, TOKENS, [s[1] for s in src], targets)
    got = A[rows][:, cols]
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= tolerance(name) * scale, (got - ref).abs().max() / scale
    assert cols == list(range(nf + (L + 1) * T))                      # every source column checked
    assert A[nf:A.shape[0] - len(ids)].abs().max() == 0 and A[:, -len(ids):].abs().max() == 0
    blocks = {"feature": slice(0, nf), "error": slice(nf, nf + L * T), "token": slice(nf + L * T, nf + (L + 1) * T)}
    for rname, r in {"feature": slice(0, nf), "logit": slice(A.shape[0] - len(ids), None)}.items():
        for cname, c in blocks.items():
            assert A[r, c].abs().max() > 1e-3 * scale, (rname, cname)


@pytest.mark.parametrize("name, which", [("llama", "per-layer"), ("gemma2", "per-layer"), ("llama", "clt"),
                                         ("gpt2", "per-layer")])
def test_rows_do_not_depend_on_batches_prefixes_or_backward(name, which):
    """One target row per autograd VJP on the whole prompt; rows spanning layers; all rows at once; targets
    grouped by position and run on prefixes of the prompt (2 and 6 groups); and, for the Llama family, the
    backward pass written out (graph_backward.HeldLayers) in batches of 1, 3 and all rows: the same matrix."""
    model = make_model(name)
    tcs = make_set(model, which)
    run = lambda **kw: attribution_graph(model, tcs, TOKENS, **kw).adjacency_matrix
    one = run(batch_size=1, position_buckets=1, backward="autograd")
    tol = dict(rtol=1e-9, atol=1e-9 * float(one.abs().max()))
    for b, k in ((5, 1), (1000, 1), (3, 2), (1000, 6)):
        torch.testing.assert_close(run(batch_size=b, position_buckets=k, backward="autograd"), one, **tol)
    if name != "gpt2":
        # The Llama family's RMSNorm computes in float32 whatever the model's dtype, so autograd rounds every
        # gradient through a norm to float32; the held pass multiplies by the same held scale in float64.
        held = run(batch_size=1, backward="held")
        torch.testing.assert_close(held, one, rtol=1e-5, atol=1e-6 * float(one.abs().max()))
        for b in (3, 1000):
            torch.testing.assert_close(run(batch_size=b, backward="held"), held, **tol)
        torch.testing.assert_close(run(batch_size=4), held, **tol)          # "auto" takes the held pass


def test_first_positions_carry_no_feature_and_no_error():
    """zero_positions=2: no feature at positions 0 and 1, their error columns are 0, and the nodes there are
    held whole in const (the replaced model still rebuilds y)."""
    model = make_model("gpt2")
    tcs = make_transcoders(model)
    g = attribution_graph(model, tcs, TOKENS, zero_positions=2)
    rep = local_replacement(model, tcs, TOKENS, zero_positions=2)
    assert g.active_features[:, 1].min() == 2
    L, T, nf = model.cfg.n_layers, len(TOKENS), g.n_features
    for l in range(L):
        assert g.adjacency_matrix[:, nf + l * T:nf + l * T + 2].abs().max() == 0
        y = rep.const[l] + tcs[f"mlp_{l}"].skip(rep.u[l]) + rep.err[l] + written(rep, l, T)
        torch.testing.assert_close(y, rep.y[l], rtol=0, atol=1e-12)


def test_logit_targets_by_sorting():
    """Most probable first, until the cumulative probability first reaches the threshold or 10 tokens;
    vectors are unembedding rows minus the mean row."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(30, 4, generator=gen, dtype=F64)
    for scale, p in [(0.1, 0.95), (8.0, 0.95), (3.0, 0.5), (3.0, 1.0)]:
        logits = scale * torch.randn(30, generator=gen, dtype=F64)
        ids, probs, vecs = logit_targets(logits, W, desired_logit_prob=p)
        order = sorted(range(30), key=lambda i: -float(logits[i]))
        pr = torch.softmax(logits, 0)
        k, total = 0, 0.0
        while k < 10:
            total += float(pr[order[k]])
            k += 1
            if total >= p:
                break
        assert ids.tolist() == order[:k]
        torch.testing.assert_close(probs, pr[ids])
        torch.testing.assert_close(vecs, W[ids] - W.mean(0))


def test_influence_is_the_series_and_pruning_keeps_tokens_and_logits(tmp_path):
    """compute_influence = w (I - A)^-1 - w on the normalised matrix; graph.safetensors round-trips; pruning
    keeps every token and logit node and at most the nodes needed for 80% of the influence."""
    model = make_model("llama")
    g = attribution_graph(model, make_transcoders(model), TOKENS)
    An = normalize_matrix(g.adjacency_matrix.float())
    w = torch.zeros(An.shape[0])
    w[-g.n_logits:] = g.logit_probabilities.float()
    inv = w @ torch.linalg.inv(torch.eye(An.shape[0]) - An) - w
    torch.testing.assert_close(compute_influence(An, w), inv, rtol=1e-4, atol=1e-6)
    g.save(tmp_path / "graph.safetensors")
    h = Graph.load(tmp_path / "graph.safetensors")
    for k in ("adjacency_matrix", "active_features", "logit_token_ids", "input_tokens"):
        assert torch.equal(getattr(h, k), getattr(g, k))
    node_mask, edge_mask, scores = prune_graph(h)
    n_tl = g.n_pos + g.n_logits
    assert node_mask[-n_tl:].all() and 0 < node_mask[:-n_tl].sum() < len(node_mask) - n_tl
    assert scores.max() <= 1 + 1e-6


@pytest.mark.parametrize("bad, message", [
    (lambda m, t: {k: v for k, v in t.items() if k != "mlp_1"}, "missing \\['mlp_1'\\]"),
    (lambda m, t: {**t, "mlp_1": Dictionary(t["mlp_1"].W_enc, t["mlp_1"].b_enc, t["mlp_1"].W_dec,
                                             t["mlp_1"].b_dec, "relu", subtract_b_dec=False)}, "not a transcoder"),
    (lambda m, t: {**t, "resid_0": t["mlp_0"]}, "sits at mlp_l"),
])
def test_bad_transcoder_sets_are_refused_in_one_line(bad, message):
    model = make_model("gpt2")
    with pytest.raises(MinicircError, match=message):
        attribution_graph(model, bad(model, make_transcoders(model)), TOKENS)


def test_backward_not_written_for_a_family_is_refused_in_one_line():
    model = make_model("gpt2")
    with pytest.raises(MinicircError, match="backward 'held'"):
        attribution_graph(model, make_transcoders(model), TOKENS, backward="held")


def test_bad_tokens_are_refused_in_one_line():
    model = make_model("gpt2")
    tcs = make_transcoders(model)
    with pytest.raises(MinicircError, match="one prompt"):
        attribution_graph(model, tcs, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(MinicircError, match="out of the vocabulary"):
        attribution_graph(model, tcs, torch.tensor([0, V]))


def test_every_tensor_names_its_device():
    """Under test_device's guard (a tensor made on the default device raises) the graph is computed the same:
    nothing in it would land on the CPU when the model is on a GPU (the matrix itself is kept on the CPU)."""
    from test_device import explicit_devices_only
    model = make_model("llama")
    tcs = make_set(model, "clt")
    plain = attribution_graph(model, tcs, TOKENS, batch_size=4)
    with explicit_devices_only():
        guarded = attribution_graph(model, tcs, TOKENS, batch_size=4)
    assert torch.equal(guarded.adjacency_matrix, plain.adjacency_matrix)
    assert torch.equal(guarded.active_features, plain.active_features)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the CUDA run is checked only where one exists")
@pytest.mark.parametrize("which", ["per-layer", "clt"])
def test_cuda_graph_equals_cpu_graph(which):
    model = make_model("gemma2")
    tcs = make_set(model, which)
    want = attribution_graph(model, tcs, TOKENS)
    got = attribution_graph(model.to("cuda"), {s: t.to("cuda") for s, t in tcs.items()}, TOKENS)
    assert torch.equal(got.active_features, want.active_features)
    torch.testing.assert_close(got.adjacency_matrix, want.adjacency_matrix, rtol=1e-6,
                               atol=1e-9 * float(want.adjacency_matrix.abs().max()))
