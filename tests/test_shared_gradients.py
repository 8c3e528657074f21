"""IG's site gradients shared between dictionaries (node_effects' `known`, find_circuit's `site_gradients`,
which the demo uses to find its feature and neuron circuits on the same prompts).

With patch inputs the IG path x = (1-a) x_c + a x_p is the site's own values, the same for every dictionary,
so a neuron circuit computed with the feature circuit's gradients must equal one computed alone. Without patch
inputs (SHIFT's zero counterfactual) x_p = b_dec is the dictionary's own: the gradients differ between
dictionaries, and node_effects must ignore what it is given. Reference: the same call without sharing.
Model: tiny random GPT-NeoX, float64.
"""
import torch

from minicirc.attribution.nodes import ig_site_gradients, node_effects
from minicirc.attribution.states import sparse_site_states
from minicirc.experiments.compare import output_neurons
import test_attribution as TA
from test_attribution import one_thread  # noqa: F401  (autouse: tiny tensors, one thread)


def clean_answer_logit(model, batch, tokens, edit):
    """A metric that needs no patch inputs: the clean answer's logit at the last real token."""
    logits = model(tokens, edit=edit)
    return logits[torch.arange(tokens.shape[0]), batch.last, batch.clean_answer]


def test_shared_gradients_equal_unshared_with_patch_inputs():
    model = TA.make_model(4101, False, n_layers=2)
    features = TA.make_saes(model, 4102)
    neurons = output_neurons(model, features)
    batch = TA.make_batch(4103, B=3, T=4)
    known = {}
    node_effects(model, features, TA.ref_logit_diff, batch, "ig", 4, known=known)
    assert set(known) == set(features)
    shared = node_effects(model, neurons, TA.ref_logit_diff, batch, "ig", 4, known=known)
    alone = node_effects(model, neurons, TA.ref_logit_diff, batch, "ig", 4)
    TA.assert_effects_equal(TA.dense_effects(shared), TA.dense_effects(alone), rtol=1e-12, atol=1e-14)


def test_zero_counterfactual_never_shares():
    model = TA.make_model(4111, False, n_layers=2)
    features = TA.make_saes(model, 4112)
    neurons = output_neurons(model, features)
    batch = TA.make_batch(4113, B=3, T=4, patch=False)
    sites = list(features)
    # The reason: the paths, and so the gradients, of the two dictionaries differ.
    grads = [ig_site_gradients(model, clean_answer_logit, batch, sites,
                               sparse_site_states(model, d, clean_answer_logit, batch, sites)[2], 4)
             for d in (features, neurons)]
    assert max((grads[0][s] - grads[1][s]).abs().max() for s in sites) > 1e-3
    # So node_effects neither reads nor fills `known` there: a neuron run handed the features' gradients
    # (here a dict filled by hand with them) equals the neuron run alone.
    known = dict(grads[0])
    shared = node_effects(model, neurons, clean_answer_logit, batch, "ig", 4, known=known)
    alone = node_effects(model, neurons, clean_answer_logit, batch, "ig", 4)
    TA.assert_effects_equal(TA.dense_effects(shared), TA.dense_effects(alone), rtol=1e-12, atol=1e-14)
    assert known.keys() == grads[0].keys() and all(known[s] is grads[0][s] for s in sites)
    fresh = {}
    node_effects(model, features, clean_answer_logit, batch, "ig", 4, known=fresh)
    assert fresh == {}
    # attrib's gradient is taken at the clean input, the same for every dictionary: still shared, and exact.
    node_effects(model, features, clean_answer_logit, batch, "attrib", known=fresh)
    assert set(fresh) == set(sites)
    shared = node_effects(model, neurons, clean_answer_logit, batch, "attrib", known=fresh)
    alone = node_effects(model, neurons, clean_answer_logit, batch, "attrib")
    TA.assert_effects_equal(TA.dense_effects(shared), TA.dense_effects(alone), rtol=1e-12, atol=1e-14)
