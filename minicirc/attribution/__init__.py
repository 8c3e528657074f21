"""Node and edge effects. reference.py holds the definitions, one readable function each, as a porter reads
them, and common.py what they share with the fast path: states.py (site states as compressed rows),
nodes.py (node effects), edges.py (edge effects) and sums.py (running sums over batches) compute the same
numbers fast, and find.py (find_circuit) puts them together into a Circuit."""
from .reference import (
                        METHODS,
                        SiteState,
                        attrib_effects,
                        clean_and_patch_sites,
                        edge_effects,
                        edge_pairs,
                        exact_effects,
                        frozen_weights,
                        ig_effects,
                        ig_gradients,
                        logit_diff,
                        node_gradient,
                        record_sites,
                        site_order,
                        site_states,
)
