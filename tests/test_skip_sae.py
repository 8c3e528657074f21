"""SAEs with a skip term on their own site (sparsify's skip_connection; docs/method.md §3.1): output
decode(f) + skip(x) with skip(x) = x @ W_skip.T, spliced as x = decode(f) + err with err = x - decode(f), the
skip term folded into the error node.

References, written here by hand: the spliced forward pass against the model's logits; brute-force patching
(one forward per node: x + delta_f W_dec[i], or x + delta_err with err = x - decode(encode(x)) from plain runs)
for exact and central finite differences of it for attrib; the definitions of minicirc.attribution.reference
(one backward per site, IG step and downstream node) for the batched node and edge effects; a zero-ablated
empty circuit written out. Models: tiny random Llama and GPT-2 in float64.
"""
import pytest
import torch

from minicirc import evaluation as E
from minicirc.attribution import edges as AE
from minicirc.attribution import nodes as AN
from minicirc.attribution import reference as A
from minicirc.sae import Dictionary
import test_attribution as TA
import test_transcoders as TT

F64 = torch.float64
D = TT.D
MODELS = ["llama", "gpt2"]


def make_skip_saes(model, seed, every=1):
    """SAEs at the model's standard sites, every `every`-th with a skip term (W_skip of norm ~ the SAE's)."""
    gen = torch.Generator().manual_seed(seed)
    kinds = ("relu", "jumprelu", "topk")
    out = {}
    for n, s in enumerate(model.sites):
        a = TA.make_sae(gen, kinds[n % 3])
        W_skip = 0.4 * torch.randn(D, D, generator=gen) if n % every == 0 else None
        out[s] = Dictionary(a.W_enc, a.b_enc, a.W_dec, a.b_dec, a.kind, threshold=a.threshold if a.kind == "jumprelu"
                            else None, k=a.k, subtract_b_dec=a.subtract_b_dec, W_skip=W_skip).to(F64)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_skip_sae_splice_keeps_the_value(name):
    model = TT.make_model(name, 3)
    saes = make_skip_saes(model, 4)
    tokens = TA.make_batch(2).clean
    cache = TT.plain(model, tokens)
    for s, sae in saes.items():
        x = cache[s]
        f, err = sae.split(x)
        assert torch.equal(f, sae.encode(x)) and (f != 0).any()       # the library's features
        torch.testing.assert_close(sae.decode(f) + err, x, rtol=0, atol=1e-12)
        # the error node is the skip term plus the library's residual x - (decode(f) + skip(x))
        torch.testing.assert_close(err, sae.skip(x) + (x - (sae.decode(f) + sae.skip(x))), rtol=0, atol=1e-12)
        assert sae.skip(x).abs().max() > 0.1
    resplit = {s: (lambda x, s=s: (lambda f, e: saes[s].decode(f) + e)(*saes[s].split(x))) for s in saes}
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, edit=resplit), model(tokens), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_skip_sae_node_effects_equal_definition_patching_and_finite_differences(name):
    model = TT.make_model(name, 5)
    saes = make_skip_saes(model, 6, every=2)
    batch = TA.make_batch(7, B=2, T=4)
    states = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    defs = {"attrib": A.attrib_effects(model, saes, TA.ref_logit_diff, batch, states),
            "ig": A.ig_effects(model, saes, TA.ref_logit_diff, batch, states, 3),
            "exact": A.exact_effects(model, saes, TA.ref_logit_diff, batch, states)}
    fast = {}
    for method, ref in defs.items():
        fast[method] = TA.dense_effects(AN.node_effects(model, saes, A.logit_diff, batch, method, steps=3))
        TA.assert_effects_equal(fast[method], ref, **TT.tolerance(name))
    # brute force, written out: errors from plain runs, each node moved alone at one site
    metric = TA.ref_logit_diff
    clean, patch = TT.plain(model, batch.clean), TT.plain(model, batch.patch)
    checked = 0
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
        for s, sae in saes.items():
            if not sae.has_skip:
                continue
            f_c, f_p = sae.encode(clean[s]), sae.encode(patch[s])
            d_err = (patch[s] - sae.decode(f_p)) - (clean[s] - sae.decode(f_c))
            for pos in range(4):
                for i in [*torch.nonzero((f_p - f_c)[:, pos].abs().sum(0)).flatten().tolist()[:3], sae.n_features]:
                    shift = ((f_p - f_c)[:, pos, i, None] * sae.W_dec[i] if i < sae.n_features else d_err[:, pos])

                    def S(e, s=s, pos=pos, shift=shift):
                        def fn(x):
                            x = x.clone()
                            x[:, pos] += e * shift
                            return x
                        return metric(model, batch, batch.clean, {s: fn})
                    torch.testing.assert_close(fast["exact"][s][:, pos, i], S(1.0) - m_c, rtol=1e-8,
                                               atol=1e-9 if name == "gpt2" else 1e-6)
                    torch.testing.assert_close(fast["attrib"][s][:, pos, i], TT.derivative(S, name), **TT.FD_TOL[name])
                    checked += 1
            assert fast["exact"][s][..., -1].abs().max() > 1e-3     # the error node (skip term inside) matters
    assert checked > 20


@pytest.mark.parametrize("name", MODELS)
def test_skip_sae_edges_equal_definition(name):
    model = TT.make_model(name, 8)
    saes = make_skip_saes(model, 9)
    batch = TA.make_batch(10, B=2, T=4)
    st = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    L = A.ig_gradients(model, saes, TA.ref_logit_diff, batch, st, 3)
    ref_eff = TA.effects_from(L, st)
    node = AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=3)
    tau = TA.threshold_for(ref_eff)
    ref = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), ref_eff, tau, "sum"))
    fast = AE.edge_effects(model, saes, batch, node.states, node.grads, node.effects, tau, "sum")
    TA.assert_edges_equal(TA.as_dict(fast), ref, **TT.tolerance(name))
    assert len(ref) > 3 and max(v.abs().max() for r in ref.values() for v in r.values()) > 1e-3


def test_skip_sae_empty_circuit_and_every_node():
    """Zero ablation of every node sets each site to decode(0) = b_dec (the skip term goes with the error);
    keeping every node gives the model's value."""
    model = TT.make_model("gpt2", 11)
    saes = make_skip_saes(model, 12)
    batch = TA.make_batch(13, B=3, T=4)
    r = E.faithfulness(model, saes, batch, [], ablation="zero")
    with torch.no_grad():
        m_empty = TA.ref_logit_diff(model, batch, batch.clean, {s: (lambda x, s=s: saes[s].b_dec.expand_as(x))
                                                                for s in saes})
        m_full = TA.ref_logit_diff(model, batch, batch.clean, {})
    assert r["m_empty"] == pytest.approx(m_empty.mean().item(), rel=1e-9)
    assert r["m_full"] == pytest.approx(m_full.mean().item(), rel=1e-12)
    every = [{"site": s, "feature": f} for s in saes for f in [*range(saes[s].n_features), "err"]]
    r = E.faithfulness(model, saes, batch, every, ablation="mean")
    assert r["faithfulness"] == pytest.approx(1.0, abs=1e-9)
