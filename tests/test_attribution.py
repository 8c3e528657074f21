"""Node and edge effects: the batched code (minicirc.attribution's states, nodes and edges) against the
definitions (minicirc.attribution.reference), and both against independent references written out here.

The definitions splice one site as decode(f) + err with f and err as autograd leaves and loop over IG steps,
over patched nodes and over downstream nodes (one backward pass each). Independent of both: central finite
differences, patching a whole site, single-neuron patching, site states from plain runs, in float64.
Models are tiny random GPT-NeoX (weights perturbed off their init, parallel and sequential residual) with
random dictionaries (relu, jumprelu, topk; identity for neurons) at every site. Node effects are
(B, T, F + 1) per site, column F the error node.
"""

import pytest
import torch

import minicirc
from minicirc.attribution import reference as A
from minicirc.attribution import edges as AE
from minicirc.attribution import nodes as AN
from minicirc.data import Batch
from minicirc.rows import rows_to_dense
from minicirc.sae import Dictionary

VOCAB, D_MODEL, N_FEAT = 17, 12, 9
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only cost time (and a lot of it on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- fixtures built directly ------------------------------------------------------------------------

def make_model(seed, parallel, dtype=F64, n_layers=2):
    torch.manual_seed(seed)
    cfg = minicirc.Config(vocab_size=VOCAB, d_model=D_MODEL, n_layers=n_layers, n_heads=2, d_mlp=20,
                          rotary_pct=0.5, max_len=16, parallel_residual=parallel)
    model = minicirc.GPTNeoX(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


def make_sae(gen, kind, d=D_MODEL, n=N_FEAT):
    W_enc = torch.randn(d, n, generator=gen) / d ** 0.5 * 1.5
    b_enc = 0.3 * torch.randn(n, generator=gen)
    W_dec = 0.5 * torch.randn(n, d, generator=gen)
    b_dec = 0.3 * torch.randn(d, generator=gen)
    thr = 0.4 * torch.rand(n, generator=gen) if kind == "jumprelu" else None
    k = 4 if kind == "topk" else None
    sub = bool(torch.rand((), generator=gen) < 0.5)
    return Dictionary(W_enc, b_enc, W_dec, b_dec, kind, threshold=thr, k=k, subtract_b_dec=sub)


def make_saes(model, seed, kinds=("relu",), dtype=F64, n=N_FEAT):
    gen = torch.Generator().manual_seed(seed)
    return {s: make_sae(gen, kinds[i % len(kinds)], n=n).to(dtype) for i, s in enumerate(model.sites)}


def neuron_saes(model, dtype=F64):
    return {s: sae.to(dtype) for s, sae in minicirc.identity_saes(model).items()}


def make_batch(seed, B=3, T=4, lengths=None, patch=True):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [T] * B
    T = max(lengths)
    clean = torch.randint(0, VOCAB, (B, T), generator=g)
    pat = torch.randint(0, VOCAB, (B, T), generator=g) if patch else None
    ca = torch.randint(0, VOCAB, (B,), generator=g)
    pa = (ca + torch.randint(1, VOCAB, (B,), generator=g)) % VOCAB if patch else None
    return Batch(clean, pat, ca, pa, torch.tensor([n - 1 for n in lengths]), [None] * B)


def linear_metric(site, seed, T=16, dtype=F64):
    """m = sum over positions and coordinates of site value * a fixed random w: linear in that site."""
    w = torch.randn(T, D_MODEL, generator=torch.Generator().manual_seed(seed)).to(dtype)

    def metric(model, batch, tokens, edit):
        cache = {}
        model(tokens, edit=edit, cache=cache)
        return (cache[site] * w[:tokens.shape[1]]).sum((1, 2))
    return metric


def ref_logit_diff(model, batch, tokens, edit):
    """logit(patch_answer) - logit(clean_answer) at each example's last real token, from the full logits:
    the metric the references use (the fast code runs minicirc.attribution.logit_diff)."""
    logits = model(tokens, edit=edit)
    return torch.stack([logits[b, batch.last[b], batch.patch_answer[b]] - logits[b, batch.last[b], batch.clean_answer[b]]
                        for b in range(tokens.shape[0])])


def probe_metric(seed, dtype=F64):
    """A probe on the logits at the last real token (needs no patch answer)."""
    v = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)).to(dtype)

    def metric(model, batch, tokens, edit):
        logits = model(tokens, edit=edit)
        rows = torch.arange(tokens.shape[0])
        return logits[rows, batch.last] @ v
    return metric


# --- references -----------------------------------------------------------------------------------

def plain_sites(model, tokens, extra=()):
    cache = {}
    with torch.no_grad():
        model(tokens, cache=cache, extra=extra)
    return cache


def ref_states(model, saes, batch):
    """{site: (f_c, err_c, f_p, err_p)} from plain runs; zero patch state when batch.patch is None."""
    xc = plain_sites(model, batch.clean)
    xp = plain_sites(model, batch.patch) if batch.patch is not None else None
    out = {}
    with torch.no_grad():
        for s, sae in saes.items():
            f_c = sae.encode(xc[s])
            e_c = xc[s] - sae.decode(f_c)
            if xp is None:
                f_p, e_p = torch.zeros_like(f_c), torch.zeros_like(e_c)
            else:
                f_p = sae.encode(xp[s])
                e_p = xp[s] - sae.decode(f_p)
            out[s] = (f_c, e_c, f_p, e_p)
    return out


def states_of(model, saes, metric, batch):
    """The definitions' site states (attribution.site_states)."""
    return A.site_states(model, saes, metric, batch, A.site_order(model, saes))[2]


# --- dense views of the fast path's rows (here only: at real scale they are the tensors it avoids) -------

def dense_state(st):
    """A states.SparseSiteState as the definitions' SiteState: f_c and f_p dense, (B, T, F)."""
    B, T, _ = st.x_c.shape
    dense = lambda rows: rows_to_dense(*rows, st.n_features).view(B, T, st.n_features)
    return A.SiteState(st.x_c, st.x_p, dense(st.c), dense(st.p), st.err_c, st.err_p)


def dense_effects(node):
    """{site: (B, T, F + 1)} of a node_effects result (NodeEffects), column F the error node."""
    out = {}
    for s, e in node.effects.items():
        B, T = e.err.shape
        f = rows_to_dense(*e.rows, e.n_features).view(B, T, e.n_features)
        out[s] = torch.cat([f, e.err[..., None].to(f.dtype)], -1)
    return out


def definition_gradients(model, saes, metric, batch, states, method, steps=None):
    """{site: (dm/df, dm/derr)} of the definitions: at alpha = 0 (attrib) or averaged over alpha = k/steps."""
    return A.ig_gradients(model, saes, metric, batch, states, 1 if method == "attrib" else steps)


def effects_from(grads, states):
    return {s: A.effects_from_gradients(*grads[s], states[s]) for s in grads}


def site_grads(L):
    """The site gradients dm/dx (= dm/derr) that edges take as L_d."""
    return {s: ge for s, (_, ge) in L.items()}


def design_pairs(n_layers, parallel):
    """The edge table of docs/method.md §6, written out again: (U, D, frozen sites). With the parallel
    residual the MLP reads prev, not attn: prev -> mlp and attn -> resid have nothing to freeze."""
    pairs = []
    for l in range(n_layers):
        prev = "embed" if l == 0 else f"resid_{l - 1}"
        a, m, r = f"attn_{l}", f"mlp_{l}", f"resid_{l}"
        pairs += [(m, r, set()), (a, r, set() if parallel else {m}), (prev, m, set() if parallel else {a}),
                  (prev, a, set()), (prev, r, {a, m})]
        if not parallel:
            pairs.append((a, m, set()))
    return pairs


def downstream_value(sae_d, y, b, t, j, L):
    """The scalar L_d * d for downstream node j (feature index, or F for the error) at (b, t), with
    f_D = encode(y) and err_D = y - decode(f_D)."""
    f_d = sae_d.encode(y)
    L_f, L_e = L
    if j < f_d.shape[-1]:
        return L_f[b, t, j] * f_d[b, t, j]
    return (L_e[b, t] * (y - sae_d.decode(f_d))[b, t]).sum()


def as_dict(edges):
    """{pair: {downstream node: (F_U + 1,) or (T, F_U + 1)}}; the batched edge_effects returns sparse rows
    (a dense block would not fit at real scale): densify to compare."""
    return {pair: dict(zip(torch.as_tensor(rows).tolist(), vals.to_dense() if vals.is_sparse else vals))
            for pair, (rows, vals) in edges.items()}


def assert_edges_equal(fast, ref, rtol=1e-8, atol=1e-10):
    assert set(fast) == set(ref), (sorted(set(fast) ^ set(ref)))
    for pair in ref:
        assert set(fast[pair]) == set(ref[pair]), (pair, set(fast[pair]) ^ set(ref[pair]))
        for key, v in ref[pair].items():
            torch.testing.assert_close(fast[pair][key], v, rtol=rtol, atol=atol, msg=lambda s: f"{pair} {key}: {s}")


def assert_effects_equal(fast, ref, rtol=1e-8, atol=1e-10, sites=None):
    for s in (sites or ref):    # features and the error node (column F) alike
        torch.testing.assert_close(fast[s], ref[s], rtol=rtol, atol=atol, msg=lambda m: f"{s}: {m}")


def moved_node(st, b, t, i, e):
    """(f, err) of the clean run with node (b, t, i) moved e of the way to its patch value (i None: the error)."""
    f, err = st.f_c.clone(), st.err_c.clone()
    if i is None:
        err[b, t] += e * st.delta_err[b, t]
    else:
        f[b, t, i] += e * st.delta_f[b, t, i]
    return f, err


def ig_reference_and_fast(model, saes, batch, steps=3):
    """(the definitions' states, IG gradients and effects, the fast IG node effects) on the same batch."""
    st = A.site_states(model, saes, ref_logit_diff, batch, A.site_order(model, saes))[2]
    L = A.ig_gradients(model, saes, ref_logit_diff, batch, st, steps)
    return st, L, effects_from(L, st), AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=steps)


def threshold_for(effects):
    """A node threshold that selects roughly half of the non-zero per-example effects."""
    vals = torch.cat([e.flatten() for e in effects.values()]).abs()
    vals = vals[vals > 0].sort().values
    lo, hi = len(vals) // 4, 3 * len(vals) // 4
    k = lo + int((vals[lo + 1:hi + 1] / vals[lo:hi]).argmax())  # widest relative gap in the middle half
    return (vals[k] * vals[k + 1]).sqrt().item()  # no effect sits near it, even after float32 rounding


def selection(effects, tau):
    return {s: e.abs() > tau for s, e in effects.items()}


# --- 1. attrib == exact where the metric is linear in the site ----------------------------------------

# Reference: `exact` (activation patching). With m = <w, site>, the site's gradient is w everywhere, so
# attribution patching is exact for that site, for every site after it (both zero) and for mlp_l (and attn_l
# with parallel residual) under resid_l, which resid_l reads linearly.
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("read", ["embed", "attn_1", "mlp_0", "resid_0", "resid_1"])
def test_attrib_equals_exact_for_linear_metric(parallel, read):
    seed = 101 + 7 * len(read) + parallel
    model = make_model(seed, parallel)
    saes = make_saes(model, seed + 1, kinds=("relu", "jumprelu", "topk"))
    batch = make_batch(seed + 2)
    fast_metric = linear_metric(read, seed + 3)
    sites = model.sites
    linear = sites[sites.index(read):]
    if read.startswith("resid"):
        l = read.split("_")[1]
        linear += [f"mlp_{l}"] + ([f"attn_{l}"] if parallel else [])
    exact = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "exact"))
    attrib = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "attrib"))
    ig = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "ig", steps=3))
    assert exact[read][..., :-1].abs().max() > 1e-3 and exact[read][..., -1].abs().max() > 1e-3
    assert_effects_equal(attrib, exact, rtol=1e-9, atol=1e-11, sites=linear)
    assert_effects_equal(ig, exact, rtol=1e-9, atol=1e-11, sites=linear)
    for s in sites[sites.index(read) + 1:]:
        assert attrib[s][..., :-1].abs().max() == 0 and attrib[s][..., -1].abs().max() == 0


# Same, on the float32 model through the default (extension when built) and the torch path.
@pytest.mark.parametrize("use_ext", [None, False])
def test_attrib_equals_exact_for_linear_metric_float32(use_ext):
    model = make_model(211, True, dtype=torch.float32)
    saes = make_saes(model, 212, kinds=("relu", "topk"), dtype=torch.float32)
    batch = make_batch(213)
    fast_metric = linear_metric("resid_0", 214, dtype=torch.float32)
    exact = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "exact"))
    attrib = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "attrib", use_ext=use_ext))
    assert_effects_equal(attrib, exact, rtol=1e-4, atol=2e-5, sites=["mlp_0", "attn_0", "resid_0"])


# --- 2. IG converges to the effect of patching the whole site -----------------------------------------

# Reference: m(clean with the site set to its patch value) - m(clean), one forward with the whole site
# replaced; the sum of a site's IG node effects is a left Riemann sum of that integral (error ~ 1/steps).
@pytest.mark.parametrize("parallel", [True, False])
def test_ig_site_sum_converges_to_site_patch(parallel):
    model = make_model(303 + parallel, parallel)
    saes = make_saes(model, 305)
    batch = make_batch(306)
    metric = ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    xp = plain_sites(model, batch.patch)
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
        m_p = metric(model, batch, batch.patch, {})
    r4 = AN.node_effects(model, saes, fast_metric, batch, "ig", steps=4)
    eff4, eff64 = dense_effects(r4), dense_effects(AN.node_effects(model, saes, fast_metric, batch, "ig", steps=64))
    torch.testing.assert_close(r4.m_clean, m_c)
    torch.testing.assert_close(r4.m_patch, m_p)
    worst = 0.0
    for s in model.sites:
        with torch.no_grad():
            target = metric(model, batch, batch.clean, {s: lambda x, v=xp[s]: v}) - m_c
        if s == "embed":
            torch.testing.assert_close(target, m_p - m_c)  # patching the embedding is the patch run
        e4 = (eff4[s][..., :-1].sum((1, 2)) + eff4[s][..., -1].sum(1) - target).abs().max().item()
        e64 = (eff64[s][..., :-1].sum((1, 2)) + eff64[s][..., -1].sum(1) - target).abs().max().item()
        assert e64 < 0.25 * e4 + 1e-9, (s, e4, e64)
        worst = max(worst, e64 / max(target.abs().max().item(), 1e-3))
    assert worst < 0.1


# --- 3. every node method against explicit loops --------------------------------------------------------

# References: the definitions (minicirc.attribution): attrib = autograd on a model with only the scored site
# spliced as decode(f) + err (leaves), times delta; ig = a loop over alpha, one forward/backward each; exact =
# a loop over (position, node) patching one node via `edit`. Site states against plain runs. All float64.
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("kinds", [("relu",), ("jumprelu", "topk", "relu")])
def test_node_methods_against_loops(parallel, kinds):
    seed = 401 + 10 * parallel + len(kinds)
    model = make_model(seed, parallel)
    saes = make_saes(model, seed + 1, kinds, n=17 if len(kinds) > 1 else N_FEAT)  # 4 * 18 nodes > exact's group
    batch = make_batch(seed + 2, B=2, T=4)
    metric = ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    r = AN.node_effects(model, saes, fast_metric, batch, "attrib")
    states, attrib, g_attrib = r.states, dense_effects(r), r.grads
    for s, (f_c, e_c, f_p, e_p) in ref_states(model, saes, batch).items():
        d = dense_state(states[s])
        for a, b in [(d.f_c, f_c), (d.err_c, e_c), (d.f_p, f_p), (d.err_p, e_p)]:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert 0 < (f_c != 0).double().mean() < 1
    st = states_of(model, saes, metric, batch)
    ref_g = definition_gradients(model, saes, metric, batch, st, "attrib")
    assert_effects_equal(attrib, effects_from(ref_g, st))
    assert_effects_equal(attrib, A.attrib_effects(model, saes, metric, batch, st))
    for s in saes:  # the site gradient handed to edges is dm/dx, and dm/df = dm/dx @ W_dec.T
        torch.testing.assert_close(g_attrib[s], ref_g[s][1], rtol=1e-9, atol=1e-12)

    steps = 5
    r = AN.node_effects(model, saes, fast_metric, batch, "ig", steps=steps)
    ig, g_ig = dense_effects(r), r.grads
    ref_ig = definition_gradients(model, saes, metric, batch, st, "ig", steps)
    assert_effects_equal(ig, effects_from(ref_ig, st))
    assert_effects_equal(ig, A.ig_effects(model, saes, metric, batch, st, steps))
    for s in saes:
        torch.testing.assert_close(g_ig[s], ref_ig[s][1], rtol=1e-9, atol=1e-12)

    r = AN.node_effects(model, saes, fast_metric, batch, "exact")
    assert r.grads is None
    with torch.no_grad():
        torch.testing.assert_close(r.m_clean, metric(model, batch, batch.clean, {}))
    ref_ex = A.exact_effects(model, saes, metric, batch, st)
    assert_effects_equal(dense_effects(r), ref_ex, rtol=1e-9, atol=1e-11)
    assert all(ref_ex[s][..., :-1].abs().max() > 1e-4 for s in saes)


# Reference: central finite differences of m[b] along one node's delta (f_c + eps * delta_i e_i, or
# err_c + eps * delta_err at one position) on the spliced float64 model; equals the attrib effect.
@pytest.mark.parametrize("parallel", [True, False])
def test_attrib_gradient_finite_differences(parallel):
    seed = 503 + parallel
    model = make_model(seed, parallel)
    saes = make_saes(model, seed + 1, ("topk", "relu", "jumprelu"))
    batch = make_batch(seed + 2)
    metric = ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    r = AN.node_effects(model, saes, fast_metric, batch, "attrib")
    states, attrib = r.states, dense_effects(r)
    g = torch.Generator().manual_seed(seed + 3)
    eps = 1e-4
    checked = 0
    for s in model.sites:
        st, sae = dense_state(states[s]), saes[s]
        nz = torch.nonzero(st.delta_f)
        picks = [tuple(nz[j].tolist()) for j in torch.randperm(len(nz), generator=g)[:2].tolist()]
        picks.append((int(torch.randint(0, 3, (), generator=g)), int(torch.randint(0, 4, (), generator=g)), None))
        for b, t, i in picks:
            def m_at(e):
                f, err = moved_node(st, b, t, i, e)
                with torch.no_grad():
                    return metric(model, batch, batch.clean, {s: lambda x: sae.decode(f) + err})[b]
            fd = (m_at(eps) - m_at(-eps)) / (2 * eps)
            fast = attrib[s][b, t, -1 if i is None else i]
            torch.testing.assert_close(fast, fd, rtol=1e-6, atol=1e-9, msg=lambda m: f"{s} {(b, t, i)}: {m}")
            checked += 1
    assert checked >= 3 * len(model.sites)


# Reference: logits from the full forward pass, read at each example's last real token (padded batch, with an
# edit in place).
def test_logit_diff_matches_full_logits():
    model = make_model(1201, True)
    batch = make_batch(1202, lengths=[4, 2, 3])
    edit = {"mlp_0": lambda x: 1.5 * x}
    with torch.no_grad():
        torch.testing.assert_close(A.logit_diff(model, batch, batch.clean, edit),
                                   ref_logit_diff(model, batch, batch.clean, edit), rtol=1e-12, atol=1e-12)


# --- 4. edges ------------------------------------------------------------------------------------------

def edge_setup(seed, parallel, kinds=("relu",), method="ig", steps=4, batch=None, saes=None, metric=None):
    model = make_model(seed, parallel)
    saes = saes(model) if callable(saes) else make_saes(model, seed + 1, kinds)
    batch = batch or make_batch(seed + 2, B=2, T=4)
    metric = metric or ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    st = states_of(model, saes, metric, batch)
    L = definition_gradients(model, saes, metric, batch, st, method, steps)
    ref_eff = effects_from(L, st)
    node = AN.node_effects(model, saes, fast_metric, batch, method, steps)
    return model, saes, batch, metric, st, L, ref_eff, node


# Reference: the definition attribution.edge_effects, one backward per selected downstream (example, position,
# node) through a model with U spliced, the table's intermediate sites detached and f_D = encode(y),
# err_D = y - decode(f_D); L_d from the loop-over-alpha IG definition. Also checks the pair table against
# docs/method.md §6.
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_edges_equal_one_at_a_time(parallel, aggregation):
    seed = 601 + 2 * parallel + (aggregation == "none")
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(seed, parallel, ("relu", "jumprelu"))
    states, effects, grads = node.states, dense_effects(node), node.grads
    assert_effects_equal(effects, ref_eff)
    pairs = design_pairs(model.cfg.n_layers, parallel)
    got = [(u, d, frozenset(fr)) for u, d, fr in A.edge_pairs(model, A.site_order(model, saes))]
    assert len(got) == len(pairs) and set(got) == {(u, d, frozenset(fr)) for u, d, fr in pairs}
    tau = threshold_for(ref_eff)
    ref = as_dict(A.edge_effects(model, saes, batch, st, site_grads(L), ref_eff, tau, aggregation, pairs))
    fast = AE.edge_effects(model, saes, batch, states, grads, node.effects, tau, aggregation, use_vmap=True)
    assert_edges_equal(as_dict(fast), ref)
    # edges out of and into error nodes are present and non-zero somewhere
    assert any(v[..., -1].abs().max() > 1e-6 for acc in ref.values() for v in acc.values())
    F_of = lambda d: saes[d].n_features
    assert any(k % (F_of(d) + 1) == F_of(d) for (_, d), acc in ref.items() for k in acc)
    # chunked and one-row-at-a-time paths of the fast code agree too
    small = AE.edge_effects(model, saes, batch, states, grads, node.effects, tau, aggregation, chunk_bytes=1)
    assert_edges_equal(as_dict(small), ref)
    loop = AE.edge_effects(model, saes, batch, states, grads, node.effects, tau, aggregation, use_vmap=False)
    assert_edges_equal(as_dict(loop), ref)


# The batched code against the definition for every dictionary kind (relu, jumprelu, topk; identity for
# neurons), both aggregations, from attrib and ig gradients.
@pytest.mark.parametrize("aggregation", ["sum", "none"])
@pytest.mark.parametrize("kinds,method", [(("relu", "jumprelu", "topk"), "ig"), (("topk", "jumprelu"), "attrib"),
                                          ("neurons", "ig")])
def test_batched_edges_equal_definition_every_kind(aggregation, kinds, method):
    seed = 621 + 2 * len(kinds) + (aggregation == "none") + 5 * (method == "attrib")
    saes = neuron_saes if kinds == "neurons" else None
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(seed, bool(seed % 2), kinds, method=method, saes=saes)
    tau = threshold_for(ref_eff)
    ref = as_dict(A.edge_effects(model, saes, batch, st, site_grads(L), ref_eff, tau, aggregation))
    assert sum(len(acc) for acc in ref.values()) > 3
    fast = AE.edge_effects(model, saes, batch, node.states, node.grads, node.effects, tau, aggregation)
    assert_edges_equal(as_dict(fast), ref)


# Same reference with attrib gradients as L_d and topk dictionaries (batched VJP through topk/scatter).
def test_edges_equal_one_at_a_time_attrib_topk():
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(613, False, ("topk", "relu"), method="attrib")
    states, effects, grads = node.states, node.effects, node.grads
    tau = threshold_for(ref_eff)
    ref = as_dict(A.edge_effects(model, saes, batch, st, site_grads(L), ref_eff, tau, "sum", design_pairs(2, False)))
    fast = AE.edge_effects(model, saes, batch, states, grads, effects, tau, "sum", use_vmap=True)
    assert_edges_equal(as_dict(fast), ref)


# Reference: central finite differences in float64 of S(eps) = sum over selected examples of
# L_d * d(u_c + eps * delta_u), with u moved at one upstream (position, node) in every example, the table's
# intermediate sites held at their clean values and d re-encoded from the recomputed downstream site.
@pytest.mark.parametrize("parallel", [True, False])
def test_edges_finite_differences(parallel):
    seed = 701 + parallel
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(seed, parallel, ("relu", "jumprelu", "topk"))
    check_edges_by_finite_differences(model, saes, batch, st, L, ref_eff, node, design_pairs(model.cfg.n_layers, parallel),
                                      seed + 5)


def draw_edge(pairs, fast, saes, g, trial):
    """One edge to check by finite differences: a random site pair among those with edges, a random downstream
    node of it with edges (the error node on trials 2, 3 mod 4, a feature otherwise) and whether the upstream
    end is the error (odd trials): (U, D, frozen, t, j, upstream is error), or None when the pair drawn has no
    such node. `fast` is as_dict of edge_effects with aggregation none."""
    U, Dn, frozen = pairs[int(torch.randint(0, len(pairs), (), generator=g))]
    if (U, Dn) not in fast:
        return None
    want_err = bool((trial // 2) % 2)
    F_d = saes[Dn].n_features
    keys = [divmod(k, F_d + 1) for k in fast[(U, Dn)] if (k % (F_d + 1) == F_d) == want_err]
    if not keys:
        return None
    t, j = keys[int(torch.randint(0, len(keys), (), generator=g))]
    return U, Dn, frozen, t, j, bool(trial % 2)


def check_edges_by_finite_differences(model, saes, batch, st, L, ref_eff, node, pairs, seed):
    """Random (downstream node, upstream node) entries of `pairs`, from the fast code and the definition,
    against central finite differences; until every combination of feature / error at each end was seen
    non-zero three times."""
    states, effects, grads = node.states, node.effects, node.grads
    tau = threshold_for(ref_eff)
    sel = selection(ref_eff, tau)
    fast = as_dict(AE.edge_effects(model, saes, batch, states, grads, effects, tau, "none"))
    defn = as_dict(A.edge_effects(model, saes, batch, st, site_grads(L), ref_eff, tau, "none"))
    clean = plain_sites(model, batch.clean, extra=model.all_sites)    # frozen sites may be optional ones (z_l)
    g = torch.Generator().manual_seed(seed)
    eps = 1e-5
    seen = {}  # (upstream is error, downstream is error) -> number of checks with a non-zero edge
    for trial in range(400):
        if len(seen) == 4 and min(seen.values()) >= 3:
            break
        drawn = draw_edge(pairs, fast, saes, g, trial)
        if drawn is None:
            continue
        U, Dn, frozen, t, j, up_err = drawn
        F_d = saes[Dn].n_features
        F_u = st[U].f_c.shape[-1]
        f_c, e_c, f_p, e_p = st[U].f_c, st[U].err_c, st[U].f_p, st[U].err_p
        t_u = int(torch.randint(0, t + 1, (), generator=g))
        if up_err:
            i = F_u
        else:
            active = torch.nonzero((f_p - f_c)[:, t_u].abs().sum(0)).flatten()
            if not len(active):
                continue
            i = int(active[int(torch.randint(0, len(active), (), generator=g))])
        sae_u, sae_d = saes[U], saes[Dn]
        rows = [b for b in range(len(batch)) if sel[Dn][b, t, j]]

        def S(e):
            f, err = f_c.clone(), e_c.clone()
            if up_err:
                err[:, t_u] += e * (e_p - e_c)[:, t_u]
            else:
                f[:, t_u, i] += e * (f_p - f_c)[:, t_u, i]
            rec = {}
            edit = {U: lambda x: sae_u.decode(f) + err}
            for fr in frozen:
                edit[fr] = lambda x, v=clean[fr]: v
            edit[Dn] = lambda x: rec.setdefault("y", x)
            with torch.no_grad():
                model(batch.clean, edit=edit, stop_at=Dn)
                return sum(downstream_value(sae_d, rec["y"], b, t, j, L[Dn]) for b in rows)
        fd = (S(eps) - S(-eps)) / (2 * eps)
        val = fast[(U, Dn)][t * (F_d + 1) + j][t_u, i]
        torch.testing.assert_close(val, fd, rtol=1e-6, atol=1e-8, msg=lambda m: f"{U}->{Dn} {(t, j, t_u, i)}: {m}")
        # the definition too, on its own (its L_d from the IG definition)
        torch.testing.assert_close(defn[(U, Dn)][t * (F_d + 1) + j][t_u, i], fd, rtol=1e-6, atol=1e-8)
        if abs(fd) > 1e-6:
            seen[(up_err, j == F_d)] = seen.get((up_err, j == F_d), 0) + 1
    assert len(seen) == 4 and min(seen.values()) >= 3, seen


# --- 5. neurons ----------------------------------------------------------------------------------------

# Reference: exact = a loop patching one neuron coordinate x[:, t, k] := x_patch[:, t, k] at a time;
# attrib/ig = autograd on a leaf that replaces the whole site (neurons: f = x, W_dec = I), times delta x;
# error nodes are identically zero. Edges against the one-at-a-time definition.
def check_neuron_node_effects(model, saes, batch):
    """exact, attrib and ig (3 steps) over identity dictionaries `saes` against the loops of test_neurons;
    returns the exact loop's effects {site: (B, T, d)}."""
    metric = ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    sites = list(saes)
    xc, xp = plain_sites(model, batch.clean, extra=sites), plain_sites(model, batch.patch, extra=sites)
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
    exact = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "exact"))
    r = AN.node_effects(model, saes, fast_metric, batch, "attrib")
    states, attrib = r.states, dense_effects(r)
    ig = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "ig", steps=3))
    refs = {}
    for s in sites:
        B, T, d = xc[s].shape
        refs[s] = ref = torch.zeros(B, T, d, dtype=F64)
        for t in range(T):
            for k in range(d):
                def edit(x, t=t, k=k, v=xp[s]):
                    x = x.clone()
                    x[:, t, k] = v[:, t, k]
                    return x
                with torch.no_grad():
                    ref[:, t, k] = metric(model, batch, batch.clean, {s: edit}) - m_c
        torch.testing.assert_close(exact[s][..., :-1], ref, rtol=1e-9, atol=1e-11)
        assert attrib[s][..., -1].abs().max() == 0 and ig[s][..., -1].abs().max() == 0  # err = 0 for neurons
        assert exact[s][..., -1].abs().max() < 1e-12
        torch.testing.assert_close(states[s].x_p, xp[s], rtol=0, atol=0)
        for eff, alphas in [(attrib, [0.0]), (ig, [0, 1 / 3, 2 / 3])]:
            gsum = torch.zeros_like(xc[s])
            for a in alphas:
                leaf = ((1 - a) * xc[s] + a * xp[s]).requires_grad_(True)
                with torch.enable_grad():
                    (gx,) = torch.autograd.grad(metric(model, batch, batch.clean, {s: lambda x: leaf}).sum(), leaf)
                gsum += gx
            torch.testing.assert_close(eff[s][..., :-1], gsum / len(alphas) * (xp[s] - xc[s]), rtol=1e-9, atol=1e-12)
    return refs


@pytest.mark.parametrize("parallel", [True, False])
def test_neurons(parallel):
    seed = 811 + parallel
    model = make_model(seed, parallel)
    saes = neuron_saes(model)
    batch = make_batch(seed + 2, B=2, T=3)
    check_neuron_node_effects(model, saes, batch)
    # with a linear readout, attrib over neurons is exactly single-neuron patching
    lin = linear_metric("resid_1", seed + 3)
    ex_lin = dense_effects(AN.node_effects(model, saes, lin, batch, "exact"))
    at_lin = dense_effects(AN.node_effects(model, saes, lin, batch, "attrib"))
    assert_effects_equal(at_lin, ex_lin, rtol=1e-9, atol=1e-11, sites=["resid_1", "mlp_1"])
    # edges between neurons
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(seed, parallel, saes=neuron_saes, batch=batch)
    states, effects, grads = node.states, node.effects, node.grads
    tau = threshold_for(ref_eff)
    ref = as_dict(A.edge_effects(model, saes, batch, st, site_grads(L), ref_eff, tau, "sum", design_pairs(2, parallel)))
    assert_edges_equal(as_dict(AE.edge_effects(model, saes, batch, states, grads, effects, tau, "sum")), ref)


# --- 6. zero ablation (patch = None) -----------------------------------------------------------------

# Reference: patch state f = 0, err = 0 (site value decode(0) = b_dec; 0 for neurons) written out here; attrib,
# ig and exact against the loop references above with that state; edges against the one-at-a-time definition.
@pytest.mark.parametrize("neurons", [False, True])
def test_zero_ablation(neurons):
    seed = 907 + neurons
    model = make_model(seed, False)
    saes = neuron_saes(model) if neurons else make_saes(model, seed + 1, ("relu", "jumprelu", "topk"))
    batch = make_batch(seed + 2, B=2, T=4, patch=False)
    assert batch.patch is None and batch.patch_answer is None
    metric = fast_metric = probe_metric(seed + 3)
    st = states_of(model, saes, metric, batch)  # zero patch state
    r = AN.node_effects(model, saes, fast_metric, batch, "attrib")
    states, attrib = r.states, dense_effects(r)
    assert r.m_patch is None
    for s in model.sites:
        assert dense_state(states[s]).f_p.abs().max() == 0 and states[s].err_p.abs().max() == 0
        expect = torch.zeros(D_MODEL, dtype=F64) if neurons else saes[s].b_dec
        torch.testing.assert_close(states[s].x_p, expect.expand_as(states[s].x_c), rtol=0, atol=0)
    assert_effects_equal(attrib, A.attrib_effects(model, saes, metric, batch, st))
    ig = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "ig", steps=4))
    L = definition_gradients(model, saes, metric, batch, st, "ig", 4)
    ref_ig = effects_from(L, st)
    assert_effects_equal(ig, ref_ig)
    exact = dense_effects(AN.node_effects(model, saes, fast_metric, batch, "exact"))
    assert_effects_equal(exact, A.exact_effects(model, saes, metric, batch, st), rtol=1e-9, atol=1e-11)
    tau = threshold_for(ref_ig)
    ref = as_dict(A.edge_effects(model, saes, batch, st, site_grads(L), ref_ig, tau, "sum", design_pairs(2, False)))
    r = AN.node_effects(model, saes, fast_metric, batch, "ig", steps=4)
    states, effects, grads = r.states, r.effects, r.grads
    assert_edges_equal(as_dict(AE.edge_effects(model, saes, batch, states, grads, effects, tau, "sum")), ref)


# --- 7. right padding ----------------------------------------------------------------------------------

# Reference: each example run alone, unpadded (its own Batch of one): per-example node effects (all methods)
# must match on real positions and be zero on padding; batched "sum" edges equal the sum of per-example edges.
@pytest.mark.parametrize("parallel", [True, False])
def test_padding_matches_single_examples(parallel):
    seed = 1009 + parallel
    model = make_model(seed, parallel)
    saes = make_saes(model, seed + 1, ("relu", "jumprelu"))
    lengths = [5, 3, 4]
    batch = make_batch(seed + 2, lengths=lengths)  # padding holds random tokens, not a pad id
    metric = ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    singles = [Batch(batch.clean[b:b + 1, :n].clone(), batch.patch[b:b + 1, :n].clone(), batch.clean_answer[b:b + 1],
                     batch.patch_answer[b:b + 1], torch.tensor([n - 1]), [None]) for b, n in enumerate(lengths)]
    for method in ["attrib", "ig", "exact"]:
        r = AN.node_effects(model, saes, fast_metric, batch, method, steps=3)
        m_c, m_p, eff = r.m_clean, r.m_patch, dense_effects(r)
        for b, (n, one) in enumerate(zip(lengths, singles)):
            r1 = AN.node_effects(model, saes, fast_metric, one, method, steps=3)
            m_c1, m_p1, eff1 = r1.m_clean, r1.m_patch, dense_effects(r1)
            torch.testing.assert_close(m_c[b:b + 1], m_c1)
            torch.testing.assert_close(m_p[b:b + 1], m_p1)
            for s in model.sites:
                torch.testing.assert_close(eff[s][b:b + 1, :n], eff1[s], rtol=1e-9, atol=1e-11)
                pad = eff[s][b, n:].flatten()
                assert (pad.abs() < 1e-12).all(), (s, method, b, pad)
    r = AN.node_effects(model, saes, fast_metric, batch, "ig", steps=3)
    states, eff, grads = r.states, dense_effects(r), r.grads
    tau = threshold_for(eff)
    batched = as_dict(AE.edge_effects(model, saes, batch, states, grads, r.effects, tau, "sum"))
    total = {}
    for one in singles:
        r1 = AN.node_effects(model, saes, fast_metric, one, "ig", steps=3)
        st1, eff1, g1 = r1.states, r1.effects, r1.grads
        for pair, acc in as_dict(AE.edge_effects(model, saes, one, st1, g1, eff1, tau, "sum")).items():
            for k, v in acc.items():
                total.setdefault(pair, {})
                total[pair][k] = total[pair][k] + v if k in total[pair] else v
    assert_edges_equal(batched, total, rtol=1e-9, atol=1e-11)


# --- float32 ----------------------------------------------------------------------------------------

# Reference: the same computation in float64 (same weights). The float32 fast path (extension when built,
# and the torch path) must agree to float32 accuracy for ig nodes and for edges.
@pytest.mark.parametrize("use_ext", [None, False])
def test_float32_matches_float64(use_ext):
    model64 = make_model(1103, False)
    saes64 = make_saes(model64, 1104, ("relu", "topk", "jumprelu"))
    model32 = make_model(1103, False).float()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    saes32 = {s: Dictionary(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.kind,
                            threshold=sae.threshold if sae.kind == "jumprelu" else None, k=sae.k,
                            subtract_b_dec=sae.subtract_b_dec) for s, sae in saes64.items()}
    batch = make_batch(1105)
    out, dense = {}, {}
    for name, model, saes in [("64", model64, saes64), ("32", model32, saes32)]:
        r = AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=4, use_ext=use_ext)
        out[name], dense[name] = (r.states, r.grads, r.effects), dense_effects(r)
    tau = threshold_for(dense["64"])
    for s in model64.sites:
        assert dense["32"][s].dtype == torch.float32
    assert_effects_equal({s: e.double() for s, e in dense["32"].items()}, dense["64"],
                         rtol=2e-4, atol=2e-5)
    edges = {n: as_dict(AE.edge_effects(m, sa, batch, *out[n], tau, "sum"))
             for n, m, sa in [("64", model64, saes64), ("32", model32, saes32)]}
    e32 = {p: {k: v.double() for k, v in acc.items()} for p, acc in edges["32"].items()}
    assert_edges_equal(e32, edges["64"], rtol=2e-4, atol=5e-5)


# --- dictionaries at some sites only --------------------------------------------------------------------

# Reference: the loop references above on the sites that have dictionaries (the others run plainly), and the
# one-at-a-time edges over the edge table's pairs whose two ends both have dictionaries.
def test_subset_of_sites():
    model = make_model(1301, False)
    saes = {s: sae for s, sae in make_saes(model, 1302, ("relu", "jumprelu")).items()
            if s != "resid_1"}  # every frozen site of a kept pair still has a dictionary
    batch = make_batch(1303, B=2, T=4)
    st = states_of(model, saes, ref_logit_diff, batch)
    L = definition_gradients(model, saes, ref_logit_diff, batch, st, "ig", 3)
    ref_eff = effects_from(L, st)
    r = AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=3)
    states, effects, grads = r.states, dense_effects(r), r.grads
    assert set(effects) == set(saes)
    assert_effects_equal(effects, ref_eff)
    pairs = [(u, d, fr) for u, d, fr in design_pairs(2, False) if u in saes and d in saes]
    tau = threshold_for(ref_eff)
    ref = as_dict(A.edge_effects(model, saes, batch, st, site_grads(L), ref_eff, tau, "sum", pairs))
    assert_edges_equal(as_dict(AE.edge_effects(model, saes, batch, states, grads, r.effects, tau, "sum")), ref)


def test_weights_leave_autograd_only_for_the_call():
    """node_effects and edge_effects take weights out of autograd while they run (gradients are with respect
    to site values) and restore each weight's requires_grad flag afterwards, whatever it was."""
    model = make_model(1401, False)
    saes = make_saes(model, 1402)
    batch = make_batch(1403, B=2, T=3)
    params = list(model.parameters())
    flags = [bool(j % 3) for j in range(len(params))]
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    r = AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=2)
    states, effects, grads = r.states, dense_effects(r), r.grads
    assert [p.requires_grad for p in params] == flags
    edges = AE.edge_effects(model, saes, batch, states, grads, r.effects, threshold_for(effects), "sum")
    assert [p.requires_grad for p in params] == flags
    assert edges and all(p.grad is None for p in params)
