"""Node and edge effects (minicirc.attribution) against slow references written out here.

Every reference is computed independently of attribution.py: explicit splices of one site as
decode(f) + err with f and err as autograd leaves, explicit loops over IG steps, over patched nodes and over
downstream nodes (one backward pass each), and central finite differences, in float64. Models are tiny
random GPT-NeoX (weights perturbed off their init, parallel and sequential residual) with random
dictionaries (relu, jumprelu, topk; identity for neurons) at every site.
"""
import itertools

import pytest
import torch

import minicirc
from minicirc import attribution as A
from minicirc.data import Batch
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

def plain_sites(model, tokens):
    cache = {}
    with torch.no_grad():
        model(tokens, cache=cache)
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


def spliced_grads(model, sae, metric, batch, site, f, e):
    """d m[b] / d f and d m[b] / d err with only `site` replaced by decode(f) + err (leaves), one backward
    per example b; everything else is the plain model (gradients straight through)."""
    f = f.detach().clone().requires_grad_(True)
    e = e.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        m = metric(model, batch, batch.clean, {site: lambda x: sae.decode(f) + e})
        gf, ge = torch.zeros_like(f), torch.zeros_like(e)
        for b in range(len(batch)):
            a, c = torch.autograd.grad(m[b], [f, e], retain_graph=True, allow_unused=True)
            if a is not None:
                gf[b] = a[b]
            if c is not None:
                ge[b] = c[b]
    return gf, ge


def ref_gradients(model, saes, metric, batch, states, method, steps=None):
    """{site: (dm/df, dm/derr)} at alpha = 0 (attrib) or averaged over alpha = k/steps (ig), one
    forward/backward per alpha with f_alpha and err_alpha interpolated explicitly."""
    out = {}
    alphas = [0.0] if method == "attrib" else [k / steps for k in range(steps)]
    for s, sae in saes.items():
        f_c, e_c, f_p, e_p = states[s]
        gf_sum, ge_sum = torch.zeros_like(f_c), torch.zeros_like(e_c)
        for a in alphas:
            gf, ge = spliced_grads(model, sae, metric, batch, s, (1 - a) * f_c + a * f_p, (1 - a) * e_c + a * e_p)
            gf_sum += gf
            ge_sum += ge
        out[s] = (gf_sum / len(alphas), ge_sum / len(alphas))
    return out


def effects_from(grads, states):
    out = {}
    for s, (gf, ge) in grads.items():
        f_c, e_c, f_p, e_p = states[s]
        out[s] = (gf * (f_p - f_c), (ge * (e_p - e_c)).sum(-1))
    return out


def ref_exact(model, saes, metric, batch, states):
    """Activation patching, one forward per (position, node): inside the edit the site is re-encoded, the one
    feature (or the error) at one position is set to its patch value, and decode(f) + err written back."""
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
        out = {}
        for s, sae in saes.items():
            f_c, e_c, f_p, e_p = states[s]
            B, T, F = f_c.shape
            eff = torch.zeros(B, T, F + 1, dtype=f_c.dtype)
            for t in range(T):
                for i in range(F + 1):
                    def edit(x, t=t, i=i, sae=sae, f_p=f_p, e_p=e_p):
                        f = sae.encode(x).clone()
                        e = (x - sae.decode(f)).clone()
                        if i < F:
                            f[:, t, i] = f_p[:, t, i]
                        else:
                            e[:, t] = e_p[:, t]
                        return sae.decode(f) + e
                    eff[:, t, i] = metric(model, batch, batch.clean, {s: edit}) - m_c
            out[s] = (eff[..., :F], eff[..., F])
    return m_c, out


def design_pairs(n_layers, parallel):
    """The edge table of DESIGN.md section 6, written out again: (U, D, frozen sites)."""
    pairs = []
    for l in range(n_layers):
        prev = "embed" if l == 0 else f"resid_{l - 1}"
        a, m, r = f"attn_{l}", f"mlp_{l}", f"resid_{l}"
        pairs += [(m, r, set()), (a, r, {m}), (prev, m, {a}), (prev, a, set()), (prev, r, {a, m})]
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


def ref_edges(model, saes, batch, states, L, sel, aggregation, pairs):
    """One backward pass per selected downstream (example, position, node), intermediate sites detached.
    Returns {(U, D): {key: value}} with value (F_U + 1,) for `sum`, (T, F_U + 1) for `none`."""
    out = {}
    for U, Dn, frozen in pairs:
        sae_u, sae_d = saes[U], saes[Dn]
        f_c, e_c, f_p, e_p = states[U]
        F_d = states[Dn][0].shape[-1]
        f_leaf = f_c.clone().requires_grad_(True)
        e_leaf = e_c.clone().requires_grad_(True)
        rec = {}
        edit = {U: lambda x: sae_u.decode(f_leaf) + e_leaf}
        for fr in frozen:
            edit[fr] = lambda x: x.detach()
        edit[Dn] = lambda x: rec.setdefault("y", x)
        acc = {}
        with torch.enable_grad():
            model(batch.clean, edit=edit, stop_at=Dn)
            sel_f, sel_e = sel[Dn]
            chosen = [(b, t, j) for b, t, j in itertools.product(*map(range, sel_f.shape)) if sel_f[b, t, j]]
            chosen += [(b, t, F_d) for b, t in itertools.product(*map(range, sel_e.shape)) if sel_e[b, t]]
            for b, t, j in chosen:
                val = downstream_value(sae_d, rec["y"], b, t, j, L[Dn])
                gf, ge = torch.autograd.grad(val, [f_leaf, e_leaf], retain_graph=True, allow_unused=True)
                gf = torch.zeros_like(f_leaf) if gf is None else gf
                ge = torch.zeros_like(e_leaf) if ge is None else ge
                contrib = torch.cat([gf * (f_p - f_c), (ge * (e_p - e_c)).sum(-1, keepdim=True)], -1).sum(0)
                name = "err" if j == F_d else j
                key, v = (name, contrib.sum(0)) if aggregation == "sum" else ((t, name), contrib)
                acc[key] = acc[key] + v if key in acc else v.detach().clone()
        if acc:
            out[(U, Dn)] = acc
    return out


def as_dict(edges):
    # edge_effects returns sparse rows (a dense block would not fit at real scale): densify to compare.
    return {pair: {(tuple(k) if isinstance(k, list) else k): v for k, v in zip(keys, vals.to_dense())}
            for pair, (keys, vals) in edges.items()}


def assert_edges_equal(fast, ref, rtol=1e-8, atol=1e-10):
    assert set(fast) == set(ref), (sorted(set(fast) ^ set(ref)))
    for pair in ref:
        assert set(fast[pair]) == set(ref[pair]), (pair, set(fast[pair]) ^ set(ref[pair]))
        for key, v in ref[pair].items():
            torch.testing.assert_close(fast[pair][key], v, rtol=rtol, atol=atol, msg=lambda s: f"{pair} {key}: {s}")


def assert_effects_equal(fast, ref, rtol=1e-8, atol=1e-10, sites=None):
    for s in (sites or ref):
        for part, a, b in [("features", fast[s][0], ref[s][0]), ("error", fast[s][1], ref[s][1])]:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{s} {part}: {m}")


def threshold_for(effects):
    """A node threshold that selects roughly half of the non-zero per-example effects."""
    vals = torch.cat([torch.cat([f.flatten(), e.flatten()]) for f, e in effects.values()]).abs()
    vals = vals[vals > 0].sort().values
    lo, hi = len(vals) // 4, 3 * len(vals) // 4
    k = lo + int((vals[lo + 1:hi + 1] / vals[lo:hi]).argmax())  # widest relative gap in the middle half
    return (vals[k] * vals[k + 1]).sqrt().item()  # no effect sits near it, even after float32 rounding


def selection(effects, tau):
    return {s: (f.abs() > tau, e.abs() > tau) for s, (f, e) in effects.items()}


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
    _, _, _, exact, _ = A.node_effects(model, saes, fast_metric, batch, "exact")
    _, _, _, attrib, _ = A.node_effects(model, saes, fast_metric, batch, "attrib")
    _, _, _, ig, _ = A.node_effects(model, saes, fast_metric, batch, "ig", steps=3)
    assert exact[read][0].abs().max() > 1e-3 and exact[read][1].abs().max() > 1e-3
    assert_effects_equal(attrib, exact, rtol=1e-9, atol=1e-11, sites=linear)
    assert_effects_equal(ig, exact, rtol=1e-9, atol=1e-11, sites=linear)
    for s in sites[sites.index(read) + 1:]:
        assert attrib[s][0].abs().max() == 0 and attrib[s][1].abs().max() == 0


# Same, on the float32 model through the default (extension when built) and the torch path.
@pytest.mark.parametrize("use_ext", [None, False])
def test_attrib_equals_exact_for_linear_metric_float32(use_ext):
    model = make_model(211, True, dtype=torch.float32)
    saes = make_saes(model, 212, kinds=("relu", "topk"), dtype=torch.float32)
    batch = make_batch(213)
    fast_metric = linear_metric("resid_0", 214, dtype=torch.float32)
    _, _, _, exact, _ = A.node_effects(model, saes, fast_metric, batch, "exact")
    _, _, _, attrib, _ = A.node_effects(model, saes, fast_metric, batch, "attrib", use_ext=use_ext)
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
    m_c_fast, m_p_fast, _, eff4, _ = A.node_effects(model, saes, fast_metric, batch, "ig", steps=4)
    *_, eff64, _ = A.node_effects(model, saes, fast_metric, batch, "ig", steps=64)
    torch.testing.assert_close(m_c_fast, m_c)
    torch.testing.assert_close(m_p_fast, m_p)
    worst = 0.0
    for s in model.sites:
        with torch.no_grad():
            target = metric(model, batch, batch.clean, {s: lambda x, v=xp[s]: v}) - m_c
        if s == "embed":
            torch.testing.assert_close(target, m_p - m_c)  # patching the embedding is the patch run
        e4 = (eff4[s][0].sum((1, 2)) + eff4[s][1].sum(1) - target).abs().max().item()
        e64 = (eff64[s][0].sum((1, 2)) + eff64[s][1].sum(1) - target).abs().max().item()
        assert e64 < 0.25 * e4 + 1e-9, (s, e4, e64)
        worst = max(worst, e64 / max(target.abs().max().item(), 1e-3))
    assert worst < 0.1


# --- 3. every node method against explicit loops --------------------------------------------------------

# References: attrib = autograd on a model with only the scored site spliced as decode(f) + err (leaves),
# one backward per example, times delta; ig = a loop over alpha, one forward/backward each; exact = a loop
# over (position, node) patching one node via `edit`. All float64.
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("kinds", [("relu",), ("jumprelu", "topk", "relu")])
def test_node_methods_against_loops(parallel, kinds):
    seed = 401 + 10 * parallel + len(kinds)
    model = make_model(seed, parallel)
    saes = make_saes(model, seed + 1, kinds, n=17 if len(kinds) > 1 else N_FEAT)  # 4 * 18 nodes > exact's group
    batch = make_batch(seed + 2, B=2, T=4)
    metric = ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    st = ref_states(model, saes, batch)
    m_c, m_p, states, attrib, g_attrib = A.node_effects(model, saes, fast_metric, batch, "attrib")
    for s, (f_c, e_c, f_p, e_p) in st.items():
        for a, b in [(states[s].f_c, f_c), (states[s].err_c, e_c), (states[s].f_p, f_p), (states[s].err_p, e_p)]:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert 0 < (f_c != 0).double().mean() < 1
    ref_g = ref_gradients(model, saes, metric, batch, st, "attrib")
    assert_effects_equal(attrib, effects_from(ref_g, st))
    for s in saes:  # the site gradient handed to edges is dm/dx, and dm/df = dm/dx @ W_dec.T
        torch.testing.assert_close(g_attrib[s], ref_g[s][1], rtol=1e-9, atol=1e-12)

    steps = 5
    *_, ig, g_ig = A.node_effects(model, saes, fast_metric, batch, "ig", steps=steps)
    ref_ig = ref_gradients(model, saes, metric, batch, st, "ig", steps)
    assert_effects_equal(ig, effects_from(ref_ig, st))
    for s in saes:
        torch.testing.assert_close(g_ig[s], ref_ig[s][1], rtol=1e-9, atol=1e-12)

    m_c_ex, _, _, exact, none = A.node_effects(model, saes, fast_metric, batch, "exact")
    assert none is None
    m_ref, ref_ex = ref_exact(model, saes, metric, batch, st)
    torch.testing.assert_close(m_c_ex, m_ref)
    assert_effects_equal(exact, ref_ex, rtol=1e-9, atol=1e-11)
    assert all(ref_ex[s][0].abs().max() > 1e-4 for s in saes)


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
    _, _, states, attrib, _ = A.node_effects(model, saes, fast_metric, batch, "attrib")
    g = torch.Generator().manual_seed(seed + 3)
    eps = 1e-4
    checked = 0
    for s in model.sites:
        st, sae = states[s], saes[s]
        nz = torch.nonzero(st.delta_f)
        picks = [tuple(nz[j].tolist()) for j in torch.randperm(len(nz), generator=g)[:2].tolist()]
        picks.append((int(torch.randint(0, 3, (), generator=g)), int(torch.randint(0, 4, (), generator=g)), None))
        for b, t, i in picks:
            def m_at(e):
                f, err = st.f_c.clone(), st.err_c.clone()
                if i is None:
                    err[b, t] += e * st.delta_err[b, t]
                else:
                    f[b, t, i] += e * st.delta_f[b, t, i]
                with torch.no_grad():
                    return metric(model, batch, batch.clean, {s: lambda x: sae.decode(f) + err})[b]
            fd = (m_at(eps) - m_at(-eps)) / (2 * eps)
            fast = attrib[s][1][b, t] if i is None else attrib[s][0][b, t, i]
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
    st = ref_states(model, saes, batch)
    L = ref_gradients(model, saes, metric, batch, st, method, steps)
    ref_eff = effects_from(L, st)
    node = A.node_effects(model, saes, fast_metric, batch, method, steps)
    return model, saes, batch, metric, st, L, ref_eff, node


# Reference: `ref_edges`, one backward per selected downstream (example, position, node) through a model with
# U spliced, the table's intermediate sites detached and f_D = encode(y), err_D = y - decode(f_D); L_d from the
# loop-over-alpha IG reference. Also checks the pair table against DESIGN.md section 6.
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_edges_equal_one_at_a_time(parallel, aggregation):
    seed = 601 + 2 * parallel + (aggregation == "none")
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(seed, parallel, ("relu", "jumprelu"))
    _, _, states, effects, grads = node
    assert_effects_equal(effects, ref_eff)
    pairs = design_pairs(model.cfg.n_layers, parallel)
    got = [(u, d, frozenset(fr)) for u, d, fr in A.edge_pairs(model, A.site_order(model, saes))]
    assert len(got) == len(pairs) and set(got) == {(u, d, frozenset(fr)) for u, d, fr in pairs}
    tau = threshold_for(ref_eff)
    ref = ref_edges(model, saes, batch, st, L, selection(ref_eff, tau), aggregation, pairs)
    fast = A.edge_effects(model, saes, batch, states, grads, effects, tau, aggregation, use_vmap=True)
    assert_edges_equal(as_dict(fast), ref)
    # edges out of and into error nodes are present and non-zero somewhere
    assert any(v[..., -1].abs().max() > 1e-6 for acc in ref.values() for v in acc.values())
    assert any((k == "err" or (isinstance(k, tuple) and k[1] == "err")) for acc in ref.values() for k in acc)
    # chunked and one-row-at-a-time paths of the fast code agree too
    small = A.edge_effects(model, saes, batch, states, grads, effects, tau, aggregation, chunk_bytes=1)
    assert_edges_equal(as_dict(small), ref)
    loop = A.edge_effects(model, saes, batch, states, grads, effects, tau, aggregation, use_vmap=False)
    assert_edges_equal(as_dict(loop), ref)


# Same reference with attrib gradients as L_d and topk dictionaries (batched VJP through topk/scatter).
def test_edges_equal_one_at_a_time_attrib_topk():
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(613, False, ("topk", "relu"), method="attrib")
    _, _, states, effects, grads = node
    tau = threshold_for(ref_eff)
    ref = ref_edges(model, saes, batch, st, L, selection(ref_eff, tau), "sum", design_pairs(2, False))
    fast = A.edge_effects(model, saes, batch, states, grads, effects, tau, "sum", use_vmap=True)
    assert_edges_equal(as_dict(fast), ref)


# Reference: central finite differences in float64 of S(eps) = sum over selected examples of
# L_d * d(u_c + eps * delta_u), with u moved at one upstream (position, node) in every example, the table's
# intermediate sites held at their clean values and d re-encoded from the recomputed downstream site.
@pytest.mark.parametrize("parallel", [True, False])
def test_edges_finite_differences(parallel):
    seed = 701 + parallel
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(seed, parallel, ("relu", "jumprelu", "topk"))
    _, _, states, effects, grads = node
    tau = threshold_for(ref_eff)
    sel = selection(ref_eff, tau)
    fast = as_dict(A.edge_effects(model, saes, batch, states, grads, effects, tau, "none"))
    clean = plain_sites(model, batch.clean)
    g = torch.Generator().manual_seed(seed + 5)
    pairs = design_pairs(model.cfg.n_layers, parallel)
    eps = 1e-5
    seen = {}  # (upstream is error, downstream is error) -> number of checks with a non-zero edge
    for trial in range(400):
        if len(seen) == 4 and min(seen.values()) >= 3:
            break
        U, Dn, frozen = pairs[int(torch.randint(0, len(pairs), (), generator=g))]
        if (U, Dn) not in fast:
            continue
        want_err = bool((trial // 2) % 2)
        keys = [k for k in fast[(U, Dn)] if (k[1] == "err") == want_err]
        if not keys:
            continue
        t, j = keys[int(torch.randint(0, len(keys), (), generator=g))]
        up_err = bool(trial % 2)
        F_u = st[U][0].shape[-1]
        f_c, e_c, f_p, e_p = st[U]
        t_u = int(torch.randint(0, t + 1, (), generator=g))
        if up_err:
            i = F_u
        else:
            active = torch.nonzero((f_p - f_c)[:, t_u].abs().sum(0)).flatten()
            if not len(active):
                continue
            i = int(active[int(torch.randint(0, len(active), (), generator=g))])
        sae_u, sae_d = saes[U], saes[Dn]
        sel_f, sel_e = sel[Dn]
        rows = [b for b in range(len(batch)) if (sel_e[b, t] if j == "err" else sel_f[b, t, j])]
        jj = st[Dn][0].shape[-1] if j == "err" else j

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
                return sum(downstream_value(sae_d, rec["y"], b, t, jj, L[Dn]) for b in rows)
        fd = (S(eps) - S(-eps)) / (2 * eps)
        val = fast[(U, Dn)][(t, j)][t_u, i]
        torch.testing.assert_close(val, fd, rtol=1e-6, atol=1e-8, msg=lambda m: f"{U}->{Dn} {(t, j, t_u, i)}: {m}")
        if abs(fd) > 1e-6:
            seen[(up_err, j == "err")] = seen.get((up_err, j == "err"), 0) + 1
    assert len(seen) == 4 and min(seen.values()) >= 3, seen


# --- 5. neurons ----------------------------------------------------------------------------------------

# Reference: exact = a loop patching one neuron coordinate x[:, t, k] := x_patch[:, t, k] at a time;
# attrib/ig = autograd on a leaf that replaces the whole site (neurons: f = x, W_dec = I), times delta x;
# error nodes are identically zero. Edges against the one-at-a-time reference.
@pytest.mark.parametrize("parallel", [True, False])
def test_neurons(parallel):
    seed = 811 + parallel
    model = make_model(seed, parallel)
    saes = neuron_saes(model)
    batch = make_batch(seed + 2, B=2, T=3)
    metric = ref_logit_diff
    fast_metric = A.logit_diff if metric is ref_logit_diff else metric
    xc, xp = plain_sites(model, batch.clean), plain_sites(model, batch.patch)
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
    m_c_fast, _, _, exact, _ = A.node_effects(model, saes, fast_metric, batch, "exact")
    _, _, states, attrib, _ = A.node_effects(model, saes, fast_metric, batch, "attrib")
    _, _, _, ig, _ = A.node_effects(model, saes, fast_metric, batch, "ig", steps=3)
    for s in model.sites:
        B, T, d = xc[s].shape
        ref = torch.zeros(B, T, d, dtype=F64)
        for t in range(T):
            for k in range(d):
                def edit(x, t=t, k=k, v=xp[s]):
                    x = x.clone()
                    x[:, t, k] = v[:, t, k]
                    return x
                with torch.no_grad():
                    ref[:, t, k] = metric(model, batch, batch.clean, {s: edit}) - m_c
        torch.testing.assert_close(exact[s][0], ref, rtol=1e-9, atol=1e-11)
        assert attrib[s][1].abs().max() == 0 and ig[s][1].abs().max() == 0  # err = 0 for neurons
        assert exact[s][1].abs().max() < 1e-12
        torch.testing.assert_close(states[s].x_p, xp[s], rtol=0, atol=0)
        for eff, alphas in [(attrib, [0.0]), (ig, [0, 1 / 3, 2 / 3])]:
            gsum = torch.zeros_like(xc[s])
            for a in alphas:
                leaf = ((1 - a) * xc[s] + a * xp[s]).requires_grad_(True)
                with torch.enable_grad():
                    (gx,) = torch.autograd.grad(metric(model, batch, batch.clean, {s: lambda x: leaf}).sum(), leaf)
                gsum += gx
            torch.testing.assert_close(eff[s][0], gsum / len(alphas) * (xp[s] - xc[s]), rtol=1e-9, atol=1e-12)
    # with a linear readout, attrib over neurons is exactly single-neuron patching
    lin = linear_metric("resid_1", seed + 3)
    *_, ex_lin, _ = A.node_effects(model, saes, lin, batch, "exact")
    *_, at_lin, _ = A.node_effects(model, saes, lin, batch, "attrib")
    assert_effects_equal(at_lin, ex_lin, rtol=1e-9, atol=1e-11, sites=["resid_1", "mlp_1"])
    # edges between neurons
    model, saes, batch, metric, st, L, ref_eff, node = edge_setup(seed, parallel, saes=neuron_saes, batch=batch)
    _, _, states, effects, grads = node
    tau = threshold_for(ref_eff)
    ref = ref_edges(model, saes, batch, st, L, selection(ref_eff, tau), "sum", design_pairs(2, parallel))
    assert_edges_equal(as_dict(A.edge_effects(model, saes, batch, states, grads, effects, tau, "sum")), ref)


# --- 6. zero ablation (patch = None) -----------------------------------------------------------------

# Reference: patch state f = 0, err = 0 (site value decode(0) = b_dec; 0 for neurons) written out here; attrib,
# ig and exact against the loop references above with that state; edges against the one-at-a-time reference.
@pytest.mark.parametrize("neurons", [False, True])
def test_zero_ablation(neurons):
    seed = 907 + neurons
    model = make_model(seed, False)
    saes = neuron_saes(model) if neurons else make_saes(model, seed + 1, ("relu", "jumprelu", "topk"))
    batch = make_batch(seed + 2, B=2, T=4, patch=False)
    assert batch.patch is None and batch.patch_answer is None
    metric = fast_metric = probe_metric(seed + 3)
    st = ref_states(model, saes, batch)  # zero patch state
    m_c, m_p, states, attrib, _ = A.node_effects(model, saes, fast_metric, batch, "attrib")
    assert m_p is None
    for s in model.sites:
        assert states[s].f_p.abs().max() == 0 and states[s].err_p.abs().max() == 0
        expect = torch.zeros(D_MODEL, dtype=F64) if neurons else saes[s].b_dec
        torch.testing.assert_close(states[s].x_p, expect.expand_as(states[s].x_c), rtol=0, atol=0)
    assert_effects_equal(attrib, effects_from(ref_gradients(model, saes, metric, batch, st, "attrib"), st))
    *_, ig, grads = A.node_effects(model, saes, fast_metric, batch, "ig", steps=4)
    L = ref_gradients(model, saes, metric, batch, st, "ig", 4)
    ref_ig = effects_from(L, st)
    assert_effects_equal(ig, ref_ig)
    *_, exact, _ = A.node_effects(model, saes, fast_metric, batch, "exact")
    assert_effects_equal(exact, ref_exact(model, saes, metric, batch, st)[1], rtol=1e-9, atol=1e-11)
    tau = threshold_for(ref_ig)
    ref = ref_edges(model, saes, batch, st, L, selection(ref_ig, tau), "sum", design_pairs(2, False))
    _, _, states, effects, grads = A.node_effects(model, saes, fast_metric, batch, "ig", steps=4)
    assert_edges_equal(as_dict(A.edge_effects(model, saes, batch, states, grads, effects, tau, "sum")), ref)


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
        m_c, m_p, _, eff, _ = A.node_effects(model, saes, fast_metric, batch, method, steps=3)
        for b, (n, one) in enumerate(zip(lengths, singles)):
            m_c1, m_p1, _, eff1, _ = A.node_effects(model, saes, fast_metric, one, method, steps=3)
            torch.testing.assert_close(m_c[b:b + 1], m_c1)
            torch.testing.assert_close(m_p[b:b + 1], m_p1)
            for s in model.sites:
                torch.testing.assert_close(eff[s][0][b:b + 1, :n], eff1[s][0], rtol=1e-9, atol=1e-11)
                torch.testing.assert_close(eff[s][1][b:b + 1, :n], eff1[s][1], rtol=1e-9, atol=1e-11)
                pad = torch.cat([eff[s][0][b, n:].flatten(), eff[s][1][b, n:]])
                assert (pad.abs() < 1e-12).all(), (s, method, b, pad)
    _, _, states, eff, grads = A.node_effects(model, saes, fast_metric, batch, "ig", steps=3)
    tau = threshold_for(eff)
    batched = as_dict(A.edge_effects(model, saes, batch, states, grads, eff, tau, "sum"))
    total = {}
    for one in singles:
        _, _, st1, eff1, g1 = A.node_effects(model, saes, fast_metric, one, "ig", steps=3)
        for pair, acc in as_dict(A.edge_effects(model, saes, one, st1, g1, eff1, tau, "sum")).items():
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
    out = {}
    for name, model, saes in [("64", model64, saes64), ("32", model32, saes32)]:
        _, _, states, eff, grads = A.node_effects(model, saes, A.logit_diff, batch, "ig", steps=4, use_ext=use_ext)
        out[name] = (states, grads, eff)
    tau = threshold_for(out["64"][2])
    for s in model64.sites:
        assert out["32"][2][s][0].dtype == torch.float32
    assert_effects_equal({s: (f.double(), e.double()) for s, (f, e) in out["32"][2].items()}, out["64"][2],
                         rtol=2e-4, atol=2e-5)
    edges = {n: as_dict(A.edge_effects(m, sa, batch, *out[n], tau, "sum"))
             for n, m, sa in [("64", model64, saes64), ("32", model32, saes32)]}
    e32 = {p: {k: v.double() for k, v in acc.items()} for p, acc in edges["32"].items()}
    assert_edges_equal(e32, edges["64"], rtol=2e-4, atol=5e-5)


# --- dictionaries at some sites only --------------------------------------------------------------------

# Reference: the loop references above on the sites that have dictionaries (the others run plainly), and the
# one-at-a-time edges over the DESIGN table's pairs whose two ends both have dictionaries.
def test_subset_of_sites():
    model = make_model(1301, False)
    saes = {s: sae for s, sae in make_saes(model, 1302, ("relu", "jumprelu")).items()
            if s != "resid_1"}  # every frozen site of a kept pair still has a dictionary
    batch = make_batch(1303, B=2, T=4)
    st = ref_states(model, saes, batch)
    L = ref_gradients(model, saes, ref_logit_diff, batch, st, "ig", 3)
    ref_eff = effects_from(L, st)
    _, _, states, effects, grads = A.node_effects(model, saes, A.logit_diff, batch, "ig", steps=3)
    assert set(effects) == set(saes)
    assert_effects_equal(effects, ref_eff)
    pairs = [(u, d, fr) for u, d, fr in design_pairs(2, False) if u in saes and d in saes]
    tau = threshold_for(ref_eff)
    ref = ref_edges(model, saes, batch, st, L, selection(ref_eff, tau), "sum", pairs)
    assert_edges_equal(as_dict(A.edge_effects(model, saes, batch, states, grads, effects, tau, "sum")), ref)


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
    _, _, states, effects, grads = A.node_effects(model, saes, A.logit_diff, batch, "ig", steps=2)
    assert [p.requires_grad for p in params] == flags
    edges = A.edge_effects(model, saes, batch, states, grads, effects, threshold_for(effects), "sum")
    assert [p.requires_grad for p in params] == flags
    assert edges and all(p.grad is None for p in params)
