"""The sparse pipeline (minicirc.attribution's states, nodes and edges: site states as compressed rows)
against the dense definitions (minicirc.attribution.reference) on dictionaries built to sit on the edges
of each kind's rule: JumpReLU pre-activations exactly at the threshold, TopK with ties at the k-th value,
TopK with fewer than k positive pre-activations, and identity dictionaries (neurons). attrib, ig and exact
node effects, and edges in both aggregations. Also: a circuit and an evaluation run never build a
(tokens x n_features) tensor for a dictionary site, and a dictionary kind the sparse encode does not know
runs through its own encode. float64, tiny random models (test_attribution's fixtures)."""
import pytest
import torch

import minicirc
from minicirc.attribution import reference as A
from minicirc.attribution import edges as AE
from minicirc.attribution import nodes as AN
from minicirc import evaluation
from minicirc.sae import Dictionary
from minicirc.sae.sparse import decode_rows, encode_rows
from test_attribution import (D_MODEL, as_dict, assert_edges_equal, assert_effects_equal, dense_effects, dense_state,
                              make_batch, make_model, make_sae, neuron_saes, plain_sites, ref_logit_diff, threshold_for)

N = 10


def pre_activations(model, sae, x):
    with torch.no_grad():
        return sae.pre_activation(x)


def edge_case_saes(model, batch, case, seed):
    """Dictionaries at every site whose clean inputs hit the case's edge (checked here, so a draw that misses
    it fails instead of passing vacuously)."""
    gen = torch.Generator().manual_seed(seed)
    clean = plain_sites(model, batch.clean)
    saes = {}
    for s in model.sites:
        if case == "jumprelu_at_threshold":
            sae = make_sae(gen, "jumprelu", n=N).to(torch.float64)
            pre = pre_activations(model, sae, clean[s]).reshape(-1, N)
            # threshold of features 0..4 = one clean pre-activation exactly (one token each), strict > drops it
            with torch.no_grad():
                for i in range(5):
                    sae.threshold[i] = pre[(3 * i) % len(pre), i]
            pre = pre_activations(model, sae, clean[s])
            assert (pre == sae.threshold).any() and (sae.encode(clean[s]) != 0).any()
        elif case == "topk_ties":
            sae = make_sae(gen, "topk", n=N).to(torch.float64)
            with torch.no_grad():   # features 2j and 2j+1 identical: every pre-activation has a twin
                sae.W_enc[:, 1::2] = sae.W_enc[:, 0::2]
                sae.b_enc[1::2] = sae.b_enc[0::2]
                sae.b_enc.add_(1.0)      # most pre-activations positive: the k-th value is a tie
            sae.k = 3
            pre = pre_activations(model, sae, clean[s])
            kth = pre.topk(3, dim=-1).values[..., -1]
            assert ((pre == kth[..., None]).sum(-1) >= 2).any()
        elif case == "topk_fewer_than_k":
            sae = make_sae(gen, "topk", n=N).to(torch.float64)
            sae.k = 6
            with torch.no_grad():    # below every token's 4th largest pre-activation: at most 3 positive
                sae.b_enc.sub_(pre_activations(model, sae, clean[s]).topk(4, dim=-1).values[..., -1].max() + 1e-3)
            pos = (pre_activations(model, sae, clean[s]) > 0).sum(-1)
            assert (pos < 6).all() and (pos > 0).any()
        saes[s] = sae
    return saes


def check_against_definitions(model, saes, batch, methods=("attrib", "ig", "exact"), steps=3, edges=True):
    """Node effects of every method and (unless edges=False) edges of both aggregations equal the
    definitions'."""
    metric = ref_logit_diff
    st = A.site_states(model, saes, metric, batch, A.site_order(model, saes))[2]
    for method in methods:
        node = AN.node_effects(model, saes, A.logit_diff, batch, method, steps)
        for s in saes:     # the sparse states are the dense ones
            d = dense_state(node.states[s])
            for a, b in [(d.f_c, st[s].f_c), (d.f_p, st[s].f_p), (d.err_c, st[s].err_c), (d.err_p, st[s].err_p)]:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        if method == "exact":
            ref = A.exact_effects(model, saes, metric, batch, st)
            assert_effects_equal(dense_effects(node), ref, rtol=1e-9, atol=1e-11)
            continue
        grads = A.ig_gradients(model, saes, metric, batch, st, 1 if method == "attrib" else steps)
        ref = {s: A.effects_from_gradients(*grads[s], st[s]) for s in grads}
        assert_effects_equal(dense_effects(node), ref)
        if not edges:
            continue
        tau = threshold_for(ref)
        for aggregation in ("sum", "none"):
            want = as_dict(A.edge_effects(model, saes, batch, st, {s: g for s, (_, g) in grads.items()}, ref, tau,
                                          aggregation))
            assert sum(len(v) for v in want.values()) > 3
            # find_circuit passes the edges the states' for_edges part only: both give the definition's edges
            for states in (node.states, {s: v.for_edges() for s, v in node.states.items()}):
                got = as_dict(AE.edge_effects(model, saes, batch, states, node.grads, node.effects, tau, aggregation))
                assert_edges_equal(got, want)


@pytest.mark.parametrize("case", ["jumprelu_at_threshold", "topk_ties", "topk_fewer_than_k"])
def test_sparse_path_equals_definitions_at_the_kinds_edges(case):
    seed = {"jumprelu_at_threshold": 901, "topk_ties": 911, "topk_fewer_than_k": 921}[case]
    model = make_model(seed, parallel=bool(seed % 2))
    batch = make_batch(seed + 1, B=2, T=3)
    saes = edge_case_saes(model, batch, case, seed + 2)
    if case != "jumprelu_at_threshold":
        check_against_definitions(model, saes, batch)
        return
    check_against_definitions(model, saes, batch, edges=False)
    # Edges: the definition re-encodes the downstream site from a recomputed value (upstream spliced as
    # decode(f) + err, equal to the clean value up to rounding), where a pre-activation exactly at the
    # threshold lands on either side by an ulp. So only embed, never a downstream site, keeps its
    # thresholds exactly at clean pre-activations; elsewhere they move just above them (still inactive there).
    with torch.no_grad():
        for s, sae in saes.items():
            if s != "embed":
                sae.threshold[:5] += 1e-9 * (1 + sae.threshold[:5].abs())
    check_against_definitions(model, saes, batch, methods=("attrib", "ig"))


def test_sparse_path_equals_definitions_for_neurons():
    model = make_model(931, parallel=False)
    check_against_definitions(model, neuron_saes(model), make_batch(932, B=2, T=3), methods=("attrib", "ig"))


class Halved(Dictionary):
    """A kind the sparse encode does not know, with a decode of its own: f = relu(pre) / 2, decoded 2 f W_dec."""

    def encode(self, x):
        return torch.relu(self.pre_activation(x)) / 2

    def decode(self, f):
        return 2 * f @ self.W_dec + self.b_dec


def test_unknown_kind_falls_back_to_its_own_encode():
    model = make_model(941, parallel=True)
    gen = torch.Generator().manual_seed(942)
    saes = {}
    for s in model.sites:
        base = make_sae(gen, "relu", n=N)
        saes[s] = Halved(base.W_enc, base.b_enc, base.W_dec, base.b_dec, "relu", subtract_b_dec=True).to(torch.float64)
        saes[s].kind = "halved"
    batch = make_batch(943, B=2, T=3)
    st = A.site_states(model, saes, ref_logit_diff, batch, A.site_order(model, saes))[2]
    node = AN.node_effects(model, saes, A.logit_diff, batch, "attrib")
    for s in saes:
        torch.testing.assert_close(dense_state(node.states[s]).f_c, st[s].f_c, rtol=0, atol=1e-12)
        torch.testing.assert_close(node.states[s].err_c, st[s].err_c, rtol=0, atol=1e-12)
    assert any((st[s].f_c != 0).any() for s in saes)


def test_no_dense_feature_tensor_in_a_circuit_or_an_evaluation(monkeypatch):
    """With 4096 features at every site and 6 tokens, a (tokens x n_features) block has 24576 elements: every
    tensor the run creates through torch's factory functions and matmuls stays below that, and the
    dictionaries' dense encode and decode are never called."""
    F = 4096
    model = make_model(951, parallel=False)
    gen = torch.Generator().manual_seed(952)
    batch = make_batch(953, B=2, T=3)
    saes = {s: make_sae(gen, ("relu", "jumprelu")[i % 2], n=F).to(torch.float64) for i, s in enumerate(model.sites)}
    clean = plain_sites(model, batch.clean)
    with torch.no_grad():   # about 5 active features per token, as real dictionaries (L0 << n_features)
        for s, sae in saes.items():
            pre = sae.pre_activation(clean[s]).flatten()
            sae.b_enc.sub_(pre.kthvalue(len(pre) - 5 * batch.clean.numel()).values)
    l0 = [float((saes[s].encode(clean[s]) != 0).sum(-1).double().mean()) for s in saes]
    assert 0.5 < sum(l0) / len(l0) < 100, l0
    for s in saes:
        monkeypatch.setattr(saes[s], "encode", lambda x: pytest.fail("dense encode called"))
        monkeypatch.setattr(saes[s], "forward", lambda x: pytest.fail("dense forward called"))
    limit = batch.clean.numel() * F
    seen = []
    real = {name: getattr(torch, name) for name in ("zeros", "empty", "zeros_like", "cat", "stack")}

    def watch(name):
        def fn(*args, **kw):
            out = real[name](*args, **kw)
            seen.append((name, out.numel()))
            return out
        return fn
    for name in real:
        monkeypatch.setattr(torch, name, watch(name))
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: (lambda o: seen.append(("@", o.numel())) or o)(
        real_matmul(a, b)))
    c = minicirc.find_circuit(model, saes, batch, method="ig", steps=2, node_threshold=1e-3, batch_size=2,
                              progress=False)
    r = evaluation.faithfulness(model, saes, batch, c.kept_nodes(), batch_size=2)
    assert r["m_full"] == r["m_full"]     # a number, not NaN
    assert len(seen) > 100 and max(n for _, n in seen) < limit, max(seen, key=lambda e: e[1])
    assert sum(len(v._values()) for _, v in c.edges.values()) > 0


@pytest.mark.parametrize("parallel", [True, False])
def test_forward_from_equals_forward(parallel):
    """model.forward_from(start, clean values, ...) against the plain forward pass, for every start site: the
    same logits and cache without edits, and the same with an edit at the start site."""
    model = make_model(961 + parallel, parallel)
    batch = make_batch(963, B=2, T=4)
    clean = plain_sites(model, batch.clean)
    shift = torch.randn(2, 4, D_MODEL, generator=torch.Generator().manual_seed(964), dtype=torch.float64)
    with torch.no_grad():
        for start in model.sites:
            for edit in ({}, {start: lambda x: x + shift}):
                want_cache, got_cache = {}, {}
                want = model(batch.clean, edit=edit, cache=want_cache)
                got = model.forward_from(start, clean, batch.clean, edit=edit, cache=got_cache)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                assert set(got_cache) == set(want_cache)
                for s in want_cache:
                    torch.testing.assert_close(got_cache[s], want_cache[s], rtol=1e-12, atol=1e-12)
            assert model.forward_from(start, clean, batch.clean, stop_at=start) is None


@pytest.mark.parametrize("B,T,steps,tokens", [(32, 64, 10, 1024), (2, 3, 4, 1), (5, 7, 3, 20), (4, 2, 9, 17),
                                               (3, 2000, 2, 1024)])
def test_ig_groups_cover_every_example_step_once(monkeypatch, B, T, steps, tokens):
    monkeypatch.setattr(AN, "IG_TOKENS", tokens)
    seen = []
    for e0, e1, k0, k1 in AN.ig_groups(B, T, steps):
        assert 0 <= e0 < e1 <= B and 0 <= k0 < k1 <= steps
        assert (e1 - e0) * (k1 - k0) * T <= max(tokens, T)      # one example at one step is the least a group holds
        seen += [(e, k) for e in range(e0, e1) for k in range(k0, k1)]
    assert sorted(seen) == [(e, k) for e in range(B) for k in range(steps)]


def test_ig_in_step_groups_and_without_forward_from(monkeypatch):
    """IG with its forward passes split by steps and by examples (IG_TOKENS from one example at one step up
    to all steps at once), and on a model without forward_from (every forward from the embedding), equals
    the definition."""
    model = make_model(971, parallel=False)
    gen = torch.Generator().manual_seed(972)
    saes = {s: make_sae(gen, ("relu", "jumprelu", "topk")[i % 3], n=N).to(torch.float64)
            for i, s in enumerate(model.sites)}
    batch = make_batch(973, B=2, T=3)
    st = A.site_states(model, saes, ref_logit_diff, batch, A.site_order(model, saes))[2]
    ref = A.ig_effects(model, saes, ref_logit_diff, batch, st, 4)
    for tokens in (1, 3, 6, 13):    # less than an example (still one); one example; the batch a step; two steps
        monkeypatch.setattr(AN, "IG_TOKENS", tokens)
        assert_effects_equal(dense_effects(AN.node_effects(model, saes, A.logit_diff, batch, "ig", 4)), ref)
    monkeypatch.setattr(AN, "IG_TOKENS", 4096)

    class Plain(torch.nn.Module):     # the same model behind a forward() only
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args, **kw):
            return self.m(*args, **kw)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "forward_from":
                    raise
                return getattr(self.m, name)
    plain = Plain(model)
    assert not hasattr(plain, "forward_from")
    assert_effects_equal(dense_effects(AN.node_effects(plain, saes, A.logit_diff, batch, "ig", 4)), ref)


@pytest.mark.parametrize("input_norm", ["layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("kind", ["relu", "jumprelu", "gated"])
def test_rows_equal_the_dictionary_for_normalised_and_gated_kinds(kind, input_norm):
    """encode_rows / decode_rows against the dictionary's own encode / decode for what the fused kernel
    does not compute: per-token input normalisations (decode without b_dec, the offset in the error term) and
    the gated kind; node effects of such dictionaries equal the definitions."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    d, F = D_MODEL, 40
    W_enc = torch.randn(d, F, generator=g, dtype=torch.float64) / d ** 0.5
    extra = dict(W_gate=W_enc + 0.3 * torch.randn(d, F, generator=g, dtype=torch.float64) / d ** 0.5,
                 b_gate=0.1 * torch.randn(F, generator=g, dtype=torch.float64)) if kind == "gated" else {}
    sae = Dictionary(W_enc, 0.3 * torch.randn(F, generator=g, dtype=torch.float64),
                     torch.randn(F, d, generator=g, dtype=torch.float64) / d ** 0.5,
                     0.5 * torch.randn(d, generator=g, dtype=torch.float64), kind,
                     threshold=0.2 * torch.rand(F, generator=g, dtype=torch.float64) if kind == "jumprelu" else None,
                     input_norm=input_norm, **extra).to(torch.float64)
    x = 2 * torch.randn(37, d, generator=g, dtype=torch.float64) + 0.7
    rows = encode_rows(sae, x)
    dense = sae.encode(x)
    assert (dense != 0).any() and (dense == 0).any()
    torch.testing.assert_close(minicirc.rows.rows_to_dense(*rows, F), dense, rtol=0, atol=0)
    torch.testing.assert_close(decode_rows(sae, rows, len(x)), sae.decode(dense), rtol=1e-12, atol=1e-12)
    model = make_model(5, parallel=True)
    saes = {s: sae for s in model.sites}
    check_against_definitions(model, saes, make_batch(6, B=2, T=4), edges=False)
