"""minicirc's attribution graphs against circuit-tracer 0.5.0's own, entry by entry, on the same models and
transcoder files: tiny random Llama and Gemma-2 models saved by transformers, circuit-tracer transcoder sets
(ReLU with skip reading mlp.hook_in; JumpReLU without skip reading hook_resid_mid; Gemma-2 JumpReLU with skip
writing hook_mlp_out) and a two-layer JumpReLU cross-layer transcoder, and the graphs and pruning masks circuit-tracer computed from them
(tests/data/graph_refs.safetensors, written by tests/data/make_graph_fixtures.py; versions in tests/data/README.md).
"""
import os

import pytest
import torch
from safetensors.torch import load_file

import minicirc
from minicirc.attribution.graph import attribution_graph
from minicirc.attribution.graph_file import prune_graph
from minicirc.sae import load_saes

DATA = os.path.join(os.path.dirname(__file__), "data")
REFS = load_file(os.path.join(DATA, "graph_refs.safetensors"))
PROMPT = torch.tensor([0, 7, 19, 3, 25, 11, 30])
CASES = ["llama_relu_skip", "llama_jumprelu_resid_mid", "gemma2_jumprelu_skip", "llama_clt"]


def graph(case):
    kind = case.split("_")[0]
    model = minicirc.load_model(os.path.join(DATA, f"graph_{kind}"))
    folder = os.path.join(DATA, f"graph_{kind}", case)
    # minicirc's own loader for every case: per-layer sets and the cross-layer transcoder (sae.clt).
    return attribution_graph(model, load_saes(folder, model), PROMPT)


@pytest.mark.parametrize("case", CASES)
def test_graph_equals_circuit_tracers(case):
    """Same nodes in the same order, same activations and logit targets, and the adjacency to 1e-5 of each entry
    plus 1e-6 of the largest (both float32: a small entry is a difference of larger products, rounded)."""
    g = graph(case)
    ref = lambda k: REFS[f"{case}.{k}"]
    for k in ("active_features", "selected_features", "input_tokens", "logit_token_ids"):
        assert torch.equal(getattr(g, k), ref(k).long()), k
    torch.testing.assert_close(g.activation_values, ref("activation_values"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.logit_probabilities, ref("logit_probabilities"), rtol=1e-5, atol=1e-7)
    A, R = g.adjacency_matrix, ref("adjacency_matrix")
    assert R.abs().max() > 0.1 and (R != 0).sum() > 0.1 * g.n_features ** 2      # a graph with many edges
    torch.testing.assert_close(A, R, rtol=1e-5, atol=1e-6 * float(R.abs().max()))


@pytest.mark.parametrize("case", CASES)
def test_pruning_equals_circuit_tracers(case):
    """prune_graph (node 0.8, edge 0.98) on circuit-tracer's own matrix gives its masks and scores."""
    g = graph(case)
    g.adjacency_matrix = REFS[f"{case}.adjacency_matrix"]
    node_mask, edge_mask, scores = prune_graph(g)
    assert torch.equal(node_mask, REFS[f"{case}.node_mask"])
    assert torch.equal(edge_mask, REFS[f"{case}.edge_mask"])
    assert 0 < node_mask[:g.n_features].sum() < g.n_features and edge_mask.sum() < (g.adjacency_matrix != 0).sum()
    torch.testing.assert_close(scores, REFS[f"{case}.cumulative_scores"], rtol=1e-6, atol=1e-7)


def test_graph_command_writes_circuit_tracers_graph_and_its_page(tmp_path, capsys):
    """`minicirc graph` on the Llama fixture: the text tokenizes to the reference prompt with a BOS put first,
    graph.safetensors holds circuit-tracer's graph, and graph.html draws the pruned graph (tokens at the bottom,
    logits at the top) without script errors."""
    from minicirc.attribution.graph_file import Graph
    from minicirc.cli import main
    out = tmp_path / "g"
    assert main(["graph", "--model", os.path.join(DATA, "graph_llama"), "--transcoders",
                 os.path.join(DATA, "graph_llama", "llama_relu_skip"), "--prompt", "t7 t19 t3 t25 t11 t30",
                 "--out", str(out)]) == 0
    g = Graph.load(out / "graph.safetensors")
    assert g.input_tokens.tolist() == PROMPT.tolist() and g.input_string == "t7 t19 t3 t25 t11 t30"
    R = REFS["llama_relu_skip.adjacency_matrix"]
    torch.testing.assert_close(g.adjacency_matrix, R, rtol=1e-5, atol=1e-6 * float(R.abs().max()))
    assert g.logit_strings == tuple("<bos>" if i == 0 else f"t{i}" for i in g.logit_token_ids.tolist())
    assert "pruned to" in capsys.readouterr().out
    page = (out / "graph.html").read_text()
    assert "__DATA__" not in page and '"kind": "logit"' in page
    assert main(["graph", "--model", os.path.join(DATA, "graph_llama"), "--transcoders",      # an earlier run's
                 os.path.join(DATA, "graph_llama", "llama_relu_skip"), "--prompt", "t1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from browser import Browser, find_chromium
    if find_chromium() is None:
        pytest.skip("no Chromium found: run scripts/install_browser.sh to run the page check")
    with Browser() as b:
        b.open(out / "graph.html")
        n_nodes, n_edges = b.evaluate("[document.querySelectorAll('.node').length, document.querySelectorAll('.edge').length]")
        node_mask, edge_mask, _ = prune_graph(g)
        assert n_nodes == int(node_mask.sum()) and 0 < n_edges <= int(edge_mask.sum())
        ys = b.evaluate("Object.fromEntries(['token','logit','feature'].map(k => [k, "
                        "Math.min(...[...document.querySelectorAll('.node.' + k)].map(e => e.getBoundingClientRect().y))]))")
        assert ys["logit"] < ys["feature"] < ys["token"]
        b.evaluate("document.querySelector('.node.feature').dispatchEvent(new MouseEvent('mouseenter'))")
        assert b.evaluate("document.getElementById('panel').textContent").startswith("feature L")
        assert not b.errors
