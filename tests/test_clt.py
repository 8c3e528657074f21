"""Cross-layer transcoders in the method (docs/method.md §3.3): layer l's features f_l = encode_l(u_l) read the MLP
input of layer l and write W_out_l[:, t - l] into the MLP output of every layer t >= l; the error node of mlp_t
completes the model's value, y_t = f_t @ W_out_t[:, 0] + b_dec_t + (earlier layers' writes) + err_t.

References, written here by hand: u_l from the family's own norm modules (test_transcoders.hand_input); the
errors from the plain runs' values; brute-force patching (one forward per node, each later MLP output moved
by the node's write) for exact, central finite differences along one node's delta for attrib, and the whole
layer patched for the sum of its IG effects; ablations written out layer by layer for evaluation. And the
definitions of minicirc.attribution.reference for the batched code. Models: tiny random Llama and GPT-2
(float64; Llama's RMSNorm mean square in float32), sequential residual.
"""
import pytest
import torch

import minicirc
from minicirc import evaluation as E
from minicirc.attribution import nodes as AN
from minicirc.attribution import reference as A
from minicirc.errors import MinicircError
from minicirc.sae.clt import CrossLayerDictionary
import test_attribution as TA
import test_transcoders as TT

F64 = torch.float64
D, N = TT.D, 7


def make_clt(model, seed, reads="mlp_in", kind="relu"):
    """{mlp_l: CrossLayerDictionary}: a random CLT over every layer (features that fire on about half the
    tokens, decoders to every later layer of the size of the MLP outputs)."""
    gen = torch.Generator().manual_seed(seed)
    L = model.cfg.n_layers
    out = {}
    for l in range(L):
        W_enc = torch.randn(D, N, generator=gen) / D ** 0.5 * 1.5
        b_enc = 0.3 * torch.randn(N, generator=gen)
        W_out = 0.5 * torch.randn(N, L - l, D, generator=gen)
        b_dec = 0.3 * torch.randn(D, generator=gen)
        thr = 0.3 * torch.rand(N, generator=gen) if kind == "jumprelu" else None
        out[f"mlp_{l}"] = CrossLayerDictionary(W_enc, b_enc, W_out, b_dec, l, L, kind=kind, threshold=thr,
                                               subtract_b_dec=False, reads=reads).to(F64)
    return out


def make_saes(model, which, seed):
    saes = make_clt(model, seed, reads="mlp_in" if seed % 2 else "resid_mid", kind=("relu", "jumprelu")[seed % 2])
    if which == "with saes":
        gen = torch.Generator().manual_seed(seed + 100)
        kinds = ("relu", "jumprelu", "topk")
        saes.update({s: TA.make_sae(gen, kinds[i % 3]).to(F64)
                     for i, s in enumerate(s for s in model.sites if not s.startswith("mlp"))})
    return saes


MODELS = ["llama", "gpt2"]
CASES = [(n, w) for n in MODELS for w in ("alone", "with saes")]


def hand_states(model, saes, tokens):
    """{site: (f (B, T, F), err (B, T, d))} of the CLT sites from a plain run, by hand."""
    cache = TT.plain(model, tokens)
    clt = sorted((s for s in saes if isinstance(saes[s], CrossLayerDictionary)), key=lambda s: saes[s].layer)
    f = {s: saes[s].encode(TT.hand_input(model, s, saes[s], cache)) for s in clt}
    out = {}
    for s in clt:
        t = saes[s].layer
        recon = sum(saes[r].W_out.new_zeros(()) + f[r] @ saes[r].W_out[:, t - saes[r].layer] for r in clt
                    if saes[r].layer <= t) + saes[s].b_dec
        out[s] = (f[s], cache[s] - recon)
    return out


def moved(saes, site, pos, i, delta):
    """Brute-force edit: node i (F = the error) of CLT site `site` at position pos moved by delta (a scalar
    times its decoder rows for a feature; a (B, d) vector for the error), written out for every later layer."""
    sae = saes[site]
    l, L = sae.layer, sae.n_layers
    edit = {}
    for t in range(l, L):
        if i == sae.n_features and t > l:
            break
        def fn(x, t=t):
            x = x.clone()
            x[:, pos] += delta[:, None] * sae.W_out[i, t - l] if i < sae.n_features else delta
            return x
        edit[f"mlp_{t}"] = fn
    return edit


# --- the splice ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,which", CASES)
def test_clt_states_keep_the_value_and_equal_hand_written(name, which):
    model = TT.make_model(name, 3)
    saes = make_saes(model, which, 1)
    batch = TA.make_batch(2, B=2, T=4)
    states = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    fast = AN.node_effects(model, saes, A.logit_diff, batch, "attrib").states
    for tokens, fk, ek in [(batch.clean, "f_c", "err_c"), (batch.patch, "f_p", "err_p")]:
        for s, (f, err) in hand_states(model, saes, tokens).items():
            torch.testing.assert_close(getattr(states[s], fk), f, rtol=0, atol=0)
            torch.testing.assert_close(getattr(states[s], ek), err, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(getattr(fast[s], ek), err, rtol=1e-12, atol=1e-12)
            assert (f != 0).any() and err.abs().max() > 0.1
    # the earlier layer's writes are part of the reconstruction: without them the error would differ
    st = states["mlp_1"]
    assert (st.incoming - saes["mlp_0"].write(states["mlp_0"].f_c, 1)).abs().max() == 0
    assert st.incoming.abs().max() > 0.1
    # x_p: mlp_1's own nodes at their patch values, the incoming writes clean
    torch.testing.assert_close(st.x_p, saes["mlp_1"].decode(st.f_p) + st.incoming + st.err_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast["mlp_1"].x_p, st.x_p, rtol=1e-12, atol=1e-12)


# --- node effects ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,which", CASES)
def test_clt_node_effects_equal_definition(name, which):
    model = TT.make_model(name, 5)
    saes = make_saes(model, which, 7 if which == "alone" else 8)
    batch = TA.make_batch(9, B=2, T=4)
    states = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    defs = {"attrib": A.attrib_effects(model, saes, TA.ref_logit_diff, batch, states),
            "ig": A.ig_effects(model, saes, TA.ref_logit_diff, batch, states, 3),
            "exact": A.exact_effects(model, saes, TA.ref_logit_diff, batch, states)}
    for method, ref in defs.items():
        fast = AN.node_effects(model, saes, A.logit_diff, batch, method, steps=3)
        TA.assert_effects_equal(TA.dense_effects(fast), ref, **TT.tolerance(name))
        for s in ("mlp_0", "mlp_1"):
            assert ref[s][..., :-1].abs().max() > 1e-3 and ref[s][..., -1].abs().max() > 1e-3, (method, s)


@pytest.mark.parametrize("name", MODELS)
def test_clt_exact_is_brute_force_patching_and_attrib_is_its_derivative(name):
    """exact: m(clean with the node moved by its delta, its writes to every later layer included) - m(clean);
    attrib: the derivative of that along the delta at 0 (central finite differences), per example."""
    model = TT.make_model(name, 11)
    saes = make_saes(model, "alone", 3)
    batch = TA.make_batch(12, B=2, T=4)
    metric = TA.ref_logit_diff
    clean, patch = hand_states(model, saes, batch.clean), hand_states(model, saes, batch.patch)
    exact = TA.dense_effects(AN.node_effects(model, saes, A.logit_diff, batch, "exact"))
    attrib = TA.dense_effects(AN.node_effects(model, saes, A.logit_diff, batch, "attrib"))
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
        checked = 0
        for s in ("mlp_0", "mlp_1"):
            (f_c, e_c), (f_p, e_p) = clean[s], patch[s]
            for pos in range(4):
                for i in range(N + 1):
                    delta = (f_p - f_c)[:, pos, i] if i < N else (e_p - e_c)[:, pos]
                    if i < N and not delta.any():
                        assert exact[s][:, pos, i].abs().max() == 0
                        continue
                    m = metric(model, batch, batch.clean, moved(saes, s, pos, i, delta))
                    torch.testing.assert_close(exact[s][:, pos, i], m - m_c, rtol=1e-8, atol=1e-9 if name == "gpt2" else 1e-6)
                    S = lambda e: metric(model, batch, batch.clean, moved(saes, s, pos, i, e * delta))
                    torch.testing.assert_close(attrib[s][:, pos, i], TT.derivative(S, name), **TT.FD_TOL[name])
                    checked += 1
    assert checked > 20


@pytest.mark.parametrize("name", MODELS)
def test_clt_ig_effects_of_a_layer_sum_to_patching_the_whole_layer(name):
    """IG's path moves a layer's nodes together, its writes to the later layers included: with many steps the
    layer's effects sum to m(clean with every node of the layer at its patch value) - m(clean) (a left Riemann
    sum: error O(1/steps))."""
    model = TT.make_model(name, 13)
    saes = make_saes(model, "alone", 5)
    batch = TA.make_batch(14, B=2, T=4)
    metric = TA.ref_logit_diff
    clean, patch = hand_states(model, saes, batch.clean), hand_states(model, saes, batch.patch)
    ig = TA.dense_effects(AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=400))
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
        for s in ("mlp_0", "mlp_1"):
            sae, l = saes[s], saes[s].layer
            d_f = patch[s][0] - clean[s][0]
            edit = {f"mlp_{t}": (lambda x, t=t: x + d_f @ sae.W_out[:, t - l] + (patch[s][1] - clean[s][1] if t == l else 0))
                    for t in range(l, sae.n_layers)}
            whole = metric(model, batch, batch.clean, edit) - m_c
            assert whole.abs().min() > 1e-2
            torch.testing.assert_close(ig[s].sum((1, 2)), whole, rtol=2e-2, atol=1e-3)


# --- circuits and evaluation -----------------------------------------------------------------------------------

def test_clt_circuits_are_nodes_only_and_their_nodes_are_the_mean_effects():
    model = TT.make_model("llama", 15)
    saes = make_saes(model, "with saes", 9)
    batch = TA.make_batch(16, B=3, T=4)
    with pytest.raises(MinicircError, match="--nodes-only") as e:
        minicirc.find_circuit(model, saes, batch, method="attrib", progress=False)
    assert "\n" not in str(e.value) and "cross-layer" in str(e.value)
    circuit = minicirc.find_circuit(model, saes, batch, method="ig", steps=3, nodes_only=True, progress=False,
                                    batch_size=2)
    ref = A.ig_effects(model, saes, TA.ref_logit_diff, batch, A.site_states(
        model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2], 3)
    for s in ("mlp_0", "mlp_1", "resid_1"):
        torch.testing.assert_close(circuit.nodes[s], ref[s].sum(1).mean(0), rtol=1e-4, atol=1e-6)
    # one layer of a CLT alone is refused
    with pytest.raises(MinicircError, match="all of them or none"):
        minicirc.find_circuit(model, {"mlp_1": saes["mlp_1"]}, batch, nodes_only=True, progress=False)


def hand_ablated_metric(model, saes, batch, keep, values):
    """The metric with every CLT node outside `keep` ({site: bool (F + 1,)}) at its value in `values`
    ({site: (f (F,), err (d,))}), written out layer by layer: layer l's features f'_l = encode(u_l) where kept,
    the value elsewhere; mlp_l = sum over l' <= l of f'_l' W_out_l'[:, l - l'] + b_dec_l + err'_l, err_l the
    run's own error (its value minus the run's own reconstruction) where kept."""
    f_live, f_abl = {}, {}

    def edit_for(s):
        sae = saes[s]
        l = sae.layer

        def fn(x):
            u = u_of[s]
            f_live[l] = sae.encode(u)
            f_abl[l] = torch.where(keep[s][:-1], f_live[l], values[s][0])
            recon = sum(saes[f"mlp_{r}"].write(f_live[r], l) for r in range(l + 1)) + sae.b_dec
            err = x - recon
            err = err if keep[s][-1] else values[s][1].expand_as(err)
            return sum(saes[f"mlp_{r}"].write(f_abl[r], l) for r in range(l + 1)) + sae.b_dec + err
        return fn

    u_of = {}
    edit = {}
    for s in saes:
        l = saes[s].layer
        src = TT.mlp_reads(model, l)
        edit[src] = (lambda x, s=s: (u_of.__setitem__(s, TT.mlp_norm(model, saes[s].layer)(x)
                                                      if saes[s].reads == "mlp_in" else x), x)[1])
        edit[s] = edit_for(s)
    with torch.no_grad():
        return TA.ref_logit_diff(model, batch, batch.clean, edit)


@pytest.mark.parametrize("name", MODELS)
def test_clt_ablation_equals_hand_written_and_keeping_everything_is_faithful(name):
    model = TT.make_model(name, 17)
    saes = make_clt(model, 19, reads="mlp_in" if name == "llama" else "resid_mid")
    batch = TA.make_batch(18, B=4, T=4)
    # mean ablation values: the means of f and err over the patch inputs, per example and position (same length)
    patch = hand_states(model, saes, batch.patch)
    values = E.ablation_values(model, saes, A.logit_diff, batch, list(saes), "mean")
    for s in saes:
        torch.testing.assert_close(values[s][0], patch[s][0].mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(values[s][1], patch[s][1].mean(0), rtol=1e-12, atol=1e-12)
    zero = E.ablation_values(model, saes, A.logit_diff, batch, list(saes), "zero")
    gen = torch.Generator().manual_seed(3)
    keeps = [{s: torch.rand(N + 1, generator=gen) < 0.5 for s in saes} for _ in range(3)]
    keeps.append({s: torch.zeros(N + 1, dtype=torch.bool) for s in saes})
    for keep in keeps:
        for vals in (zero, {s: (v[0][0], v[1][0]) for s, v in values.items()}):   # zero; position-0 means
            fast = E.ablated_metric(model, saes, A.logit_diff, batch, keep, vals)
            torch.testing.assert_close(fast, hand_ablated_metric(model, saes, batch, keep, vals),
                                       **TT.tolerance(name))
    m_full = TA.ref_logit_diff(model, batch, batch.clean, {})
    assert (hand_ablated_metric(model, saes, batch, keeps[-1], {s: (v[0][0], v[1][0]) for s, v in values.items()})
            - m_full).abs().max() > 1e-2
    # every node kept: the model's own value, faithfulness 1 under each ablation
    all_nodes = [{"site": s, "feature": f} for s in saes for f in [*range(N), "err"]]
    for ablation in ("mean", "zero", "resample"):
        r = E.faithfulness(model, saes, batch, all_nodes, ablation=ablation)
        assert r["faithfulness"] == pytest.approx(1.0, abs=1e-9) and r["completeness"] == pytest.approx(0.0, abs=1e-9)
        assert abs(r["m_full"] - r["m_empty"]) > 1e-2
    with pytest.raises(MinicircError, match="first_layer 0"):
        E.faithfulness(model, saes, batch, all_nodes, first_layer=1)
    # ablating some of its layers only would leave the others' errors holding the ablated writes: refused
    with pytest.raises(MinicircError, match="all of its layers or none"):
        E.ablated_metric(model, saes, A.logit_diff, batch, {s: k for s, k in keeps[0].items() if s != list(saes)[0]},
                         zero)


def test_clt_explain_reads_the_layers_input_and_sums_the_writes_for_logit_effects():
    """explain: a CLT feature's top activations are encode_l(u_l) of the layer's MLP input (by hand), and its
    direct logit effect is that of all its writes, sum over t of W_out[i, t - l], through the unembedding."""
    from minicirc.explain import logit_effects, top_activations
    model = TT.make_model("gpt2", 21)
    saes = make_clt(model, 22)
    sae = saes["mlp_0"]
    i = 2
    scores = (sae.W_out[i].sum(0) @ model.unembedding.T)
    eff = logit_effects(model, sae, i, n=3, site="mlp_0")
    assert [v for _, v in eff["promoted"]] == pytest.approx(scores.sort(descending=True).values[:3].tolist(), rel=1e-6)
    assert not torch.allclose(scores, sae.W_dec[i] @ model.unembedding.T)
    texts = [[1, 2, 3, 4], [5, 6, 7]]
    cache = {}
    with torch.no_grad():
        model(torch.tensor([texts[0]]), cache=cache, extra=model.all_sites)
        f = sae.encode(TT.hand_input(model, "mlp_0", sae, cache))[0]
    j = int(f.max(0).values.argmax())
    top = top_activations(model, {"mlp_0": sae}, {"mlp_0": [j]}, texts[:1], k=1)["mlp_0"][j]
    assert top[0][2] == pytest.approx(f[:, j].max().item(), rel=1e-9)
