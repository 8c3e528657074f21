"""Determinism: the same seed and inputs give byte-identical files; batching and a (one-process) process
group change nothing. 1 vs 2 ranks (effects within 1e-6) is in test_distributed.py."""
import json

import pytest
import torch

import minicirc
from minicirc.cli import main
from minicirc.data import load_examples, tokenize
from test_distributed import edge_entries, make_inputs


def run_cli(t, out, *extra):
    return main([str(a) for a in ["circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl",
                                  "--out", out, "--steps", 2, "--node-threshold", 0.05, "--edge-threshold", 0.5,
                                  "--batch-size", 2, "--seed", 5, *extra]])


def test_two_runs_write_identical_files(tmp_path):
    t = make_inputs(tmp_path, 3)
    assert run_cli(t, t / "a") == 0
    assert run_cli(t, t / "b") == 0
    for name in ("circuit.json", "effects.safetensors", "circuit.dot", "circuit.html"):
        assert (t / "a" / name).read_bytes() == (t / "b" / name).read_bytes(), name
    data = json.loads((t / "a" / "circuit.json").read_text())
    assert data["nodes"] and len(data["edges"]) > len([e for e in data["edges"] if e["target"] == "y"])


def load(t):
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    return model, saes, batch


def assert_same_effects(a, b, atol, rtol=0.0):
    assert a.sites == b.sites
    for s in a.sites:
        torch.testing.assert_close(a.nodes[s], b.nodes[s], atol=atol, rtol=rtol)      # the error in column F
    assert a.edges.keys() == b.edges.keys()
    for pair in a.edges:
        ea, eb = edge_entries(*a.edges[pair], a.positional), edge_entries(*b.edges[pair], b.positional)
        # Stored entries may include explicit zeros that depend on the batching: compare values, absent = 0.
        for k in ea.keys() | eb.keys():
            va, vb = ea.get(k, 0.0), eb.get(k, 0.0)
            assert abs(va - vb) <= atol + rtol * abs(vb), (pair, k, va, vb)


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_batch_size_does_not_change_the_circuit(tmp_path, aggregation, monkeypatch):
    from minicirc.attribution import reference as attribution
    from minicirc.attribution import edges as attribution_edges, nodes as attribution_nodes, sums
    monkeypatch.setattr(sums.EdgeSum, "MERGE_MIN", 1)     # merge the running edge sums after every batch
    t = make_inputs(tmp_path, 3, same_length=aggregation == "none")
    model, saes, batch = load(t)
    kw = dict(steps=2, node_threshold=0.05, edge_threshold=0.05, aggregation=aggregation, progress=False)
    one = minicirc.find_circuit(model, saes, batch, batch_size=1, **kw)
    all_ = minicirc.find_circuit(model, saes, batch, batch_size=3, **kw)
    assert sum(v._nnz() for _, v in one.edges.values()) > 0
    assert_same_effects(one, all_, 1e-5, rtol=1e-4)   # other batch shapes: float32 rounding only
    # ... and the same order: rows sorted by node, so circuit.json lists nodes and edges identically.
    assert all(torch.equal(one.edges[p][0], all_.edges[p][0]) for p in one.edges)
    ends = lambda c: [(e["source"], e["target"]) for e in c.to_json()["edges"]]
    assert ends(one) == ends(all_) and len(ends(one)) > 0
    # ... and both equal the edge sums of one direct call on the whole dataset, divided by n.
    r = attribution_nodes.node_effects(model, saes, attribution.logit_diff, batch, "ig", 2)
    direct = attribution_edges.edge_effects(model, saes, batch, r.states, r.grads, r.effects, 0.05, aggregation)
    assert direct.keys() == one.edges.keys()
    for pair, (keys, vals) in direct.items():
        want = edge_entries(keys, vals.coalesce(), aggregation == "none")
        got = edge_entries(*one.edges[pair], aggregation == "none")
        for k in want.keys() | got.keys():
            assert abs(got.get(k, 0.0) - want.get(k, 0.0) / len(batch)) <= 1e-5 + 1e-4 * abs(want.get(k, 0.0)), (pair, k)


def test_one_process_group_equals_no_group(tmp_path):
    """distributed=True in a one-rank gloo group (the code path torchrun runs) gives the identical circuit."""
    import torch.distributed as dist
    from test_device import explicit_devices_only
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    t = make_inputs(tmp_path, 3)
    model, saes, batch = load(t)
    kw = dict(steps=2, node_threshold=0.05, edge_threshold=0.05, batch_size=2, progress=False)
    plain = minicirc.find_circuit(model, saes, batch, **kw)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with explicit_devices_only():   # the reduction path names its devices too (test_device.py)
            grouped = minicirc.find_circuit(model, saes, batch, distributed=True, **kw)
    finally:
        dist.destroy_process_group()
    assert json.dumps(grouped.to_json()) == json.dumps(plain.to_json())
    assert_same_effects(plain, grouped, 0.0)
