"""Dictionaries at a subset of the sites: a site without a dictionary is part of the computation between the
sites that have one, never frozen, and edges join the dictionary sites that a path links with no other
dictionary site inside it (docs/method.md §6).

References: the pair tables written out by hand for each subset; central finite differences in float64
(test_attribution.check_edges_by_finite_differences) through the unmodified model with only the hand table's
frozen sites held at their clean values; the one-backward-per-downstream-node definition
(attribution.edge_effects) for the batched code. Models: tiny random GPT-NeoX, sequential and parallel
residual, 3 layers.
"""
import pytest
import torch

import minicirc
from minicirc.attribution import reference as A
from minicirc.attribution import edges as AE
import test_attribution as TA
from test_attribution import one_thread  # noqa: F401  (autouse: tiny tensors, one thread)
from test_optional_sites import dicts_at

# Subsets of a 3-layer model's sites, and their pairs by hand: (upstream, downstream, frozen).
SUBSETS = {
    # every resid site: each edge runs through a whole layer (attention and MLP computed, not frozen)
    "resid": (["embed", "resid_0", "resid_1", "resid_2"],
              {("embed", "resid_0", ()), ("resid_0", "resid_1", ()), ("resid_1", "resid_2", ())}),
    # every other layer, as minicirc.real_lm places them: resid_0 -> resid_2 runs through layers 1 and 2
    "strided": (["resid_0", "resid_2"], {("resid_0", "resid_2", ())}),
    # a mixed subset: attn_0 cuts embed's attention path, mlp_1 the MLP path of layer 1; resid_1 computed
    "mixed": (["embed", "attn_0", "resid_0", "mlp_1", "resid_2"],
              {("embed", "attn_0", ()), ("embed", "resid_0", ("attn_0",)), ("attn_0", "resid_0", ()),
               ("resid_0", "mlp_1", ()), ("resid_0", "resid_2", ("mlp_1",)), ("mlp_1", "resid_2", ())}),
}


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_pairs_over_a_subset_follow_the_hand_table(subset, parallel):
    model = TA.make_model(71, parallel, n_layers=3)
    sites, table = SUBSETS[subset]
    got = A.edge_pairs(model, sites)
    assert len(got) == len(set(got))
    assert set(got) == table
    # never a site without a dictionary in a frozen set
    assert all(set(fr) <= set(sites) for _, _, fr in got)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_edges_over_a_subset_equal_the_definition_and_finite_differences(subset, parallel):
    seed = 3100 + 10 * list(SUBSETS).index(subset) + parallel
    model = TA.make_model(seed, parallel, n_layers=3)
    sites, table = SUBSETS[subset]
    saes = dicts_at(model, sites, seed + 1)
    batch = TA.make_batch(seed + 2, B=2, T=4)
    st, L, ref_eff, node = TA.ig_reference_and_fast(model, saes, batch)
    TA.assert_effects_equal(TA.dense_effects(node), ref_eff)
    tau = TA.threshold_for(ref_eff)
    hand = sorted(table)
    for aggregation in ("sum", "none"):
        ref = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), ref_eff, tau, aggregation, hand))
        fast = AE.edge_effects(model, saes, batch, node.states, node.grads, node.effects, tau, aggregation)
        TA.assert_edges_equal(TA.as_dict(fast), ref)
        assert {(u, d) for u, d, _ in hand} == set(ref)       # every pair carries edges
    TA.check_edges_by_finite_differences(model, saes, batch, st, L, ref_eff, node, hand, seed + 3)


def test_a_resid_edge_carries_more_than_the_skip_path():
    """Before, resid_0 -> resid_1 with no dictionary at attn_1 and mlp_1 froze both, leaving the identity
    (skip) path only. The Jacobian the edge uses now is the whole layer's: it differs from the identity."""
    model = TA.make_model(3201, False, n_layers=3)
    saes = dicts_at(model, ["resid_0", "resid_1"], 3202, kinds=("relu",))
    batch = TA.make_batch(3203, B=2, T=4)
    st = A.site_states(model, saes, TA.ref_logit_diff, batch, ["resid_0", "resid_1"])[2]
    L = A.ig_gradients(model, saes, TA.ref_logit_diff, batch, st, 3)
    eff = TA.effects_from(L, st)
    tau = TA.threshold_for(eff)
    whole = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), eff, tau, "none",
                                      A.edge_pairs(model, ["resid_0", "resid_1"])))
    skip = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), eff, tau, "none",
                                     [("resid_0", "resid_1", ("attn_1", "mlp_1"))]))
    pair = ("resid_0", "resid_1")
    assert set(whole[pair]) == set(skip[pair])
    diff = max((whole[pair][k] - skip[pair][k]).abs().max() for k in whole[pair])
    scale = max(v.abs().max() for v in whole[pair].values())
    assert diff > 1e-3 * scale


def test_find_circuit_over_resid_sites_only():
    """The public entry point with dictionaries at resid_0 and resid_2 only: its edges are the pair's, and
    its edge values are the definition's averaged over examples."""
    model = TA.make_model(3301, False, n_layers=3)
    saes = dicts_at(model, ["resid_0", "resid_2"], 3302, kinds=("relu",))
    batch = TA.make_batch(3303, B=3, T=4)
    c = minicirc.find_circuit(model, saes, batch, method="ig", steps=3, node_threshold=0.0, edge_threshold=0.0,
                              progress=False)
    assert set(c.edges) == {("resid_0", "resid_2")}
    st = A.site_states(model, saes, TA.ref_logit_diff, batch, ["resid_0", "resid_2"])[2]
    L = A.ig_gradients(model, saes, TA.ref_logit_diff, batch, st, 3)
    eff = TA.effects_from(L, st)
    ref = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), eff, 0.0, "sum",
                                    [("resid_0", "resid_2", ())]))[("resid_0", "resid_2")]
    got = TA.as_dict(c.edges)[("resid_0", "resid_2")]
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k] / len(batch), rtol=1e-5, atol=1e-7)
