"""Node and edge effects. reference.py holds the definitions, one readable function each, as a porter reads
them; the other modules compute the same numbers fast (sparse rows, batched gradients) and find_circuit
puts them together."""
from .reference import (METHODS, SiteState, attrib_effects, clean_and_patch_sites, edge_effects, edge_pairs,
                        exact_effects, frozen_weights, ig_effects, ig_gradients, logit_diff, node_gradient,
                        record_sites, site_order, site_states)
