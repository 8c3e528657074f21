"""The Circuit object (minicirc.circuit) against references written here: the means find_circuit reports
against one direct call on the whole dataset, node and edge selection against loops over every node and
every dense edge entry, and circuit.json / effects.safetensors against the object they were written from.
float64 tiny random models and dictionaries (test_attribution's fixtures)."""
import heapq
import json

import pytest
import torch
from safetensors.torch import load_file

import minicirc
from minicirc.attribution import reference as A
from minicirc.attribution import nodes as AN
from minicirc.circuit import load_circuit_json, node_id, parse_node_id
from minicirc.errors import MinicircError
from test_attribution import dense_effects, make_batch, make_model, make_saes


def fresh_seed():
    return int(torch.randint(0, 10**6, ()).item())


def setup(seed, aggregation, B=5, **kw):
    model = make_model(seed, parallel=bool(seed % 2))
    saes = make_saes(model, seed + 1, ("relu", "jumprelu", "topk"))
    batch = make_batch(seed + 2, B=B, T=4, lengths=None if aggregation == "none" else [4, 2, 3, 4, 1][:B])
    args = dict(method="ig", steps=3, node_threshold=0.05, edge_threshold=0.02, aggregation=aggregation,
                batch_size=2, progress=False)
    args.update(kw)
    return model, saes, batch, minicirc.find_circuit(model, saes, batch, **args)


# --- what find_circuit reports: means over examples ----------------------------------------------------

@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_metric_and_node_effects_are_means_over_examples(aggregation):
    """Batches of 2 over 5 examples: the circuit's metric and node effects equal one node_effects call on the
    whole dataset, summed over examples (and positions for sum) and divided by the number of examples."""
    model, saes, batch, c = setup(fresh_seed(), aggregation, nodes_only=True)
    r = AN.node_effects(model, saes, A.logit_diff, batch, "ig", 3)
    assert c.metric_values["clean"] == pytest.approx(r.m_clean.mean().item(), abs=1e-12)
    assert c.metric_values["patch"] == pytest.approx(r.m_patch.mean().item(), abs=1e-12)
    assert c.metric_values["clean"] != pytest.approx(c.metric_values["patch"])
    assert c.to_json()["metric"] == c.metric_values          # circuit.json keeps the field name "metric"
    dims = (0, 1) if aggregation == "sum" else (0,)
    for s, eff in dense_effects(r).items():                       # features and the error node (column F) alike
        torch.testing.assert_close(c.nodes[s], eff.sum(dims) / len(batch), rtol=1e-10, atol=1e-13)
    assert any(float(v[..., -1].abs().max()) > 0 for v in c.nodes.values())


# --- node and edge selection ---------------------------------------------------------------------------

def every_node(c):
    """(id, site, column, pos, effect, error) of every node (Circuit.Node's fields), straight from the stored
    tensors: column F is the error node."""
    out = []
    for s in c.sites:
        v = c.nodes[s]
        F = v.shape[-1] - 1
        for t in (range(v.shape[0]) if c.positional else [None]):
            row = v[t] if t is not None else v
            out += [(f"{s}/{i}" + ("" if t is None else f"@{t}"), s, i, t, float(row[i]), False) for i in range(F)]
            out.append((f"{s}/err" + ("" if t is None else f"@{t}"), s, F, t, float(row[F]), True))
    return out


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_kept_nodes_by_threshold_and_top_k(aggregation):
    model, saes, batch, c = setup(fresh_seed(), aggregation, nodes_only=True, top_k_nodes=4)
    # A feature inactive on every example has effect exactly 0; some draws have none, so make one.
    feat = c.nodes[c.sites[int(torch.randint(0, len(c.sites), ()))]][..., :-1]
    feat[tuple(int(torch.randint(0, n, ())) for n in feat.shape)] = 0.0
    nodes = every_node(c)
    effects = sorted({abs(n[4]) for n in nodes if n[4] != 0})
    for thr in (effects[len(effects) // 2], effects[-3], 0.0):   # thresholds equal to an effect: kept only above
        want = {n[0] for n in nodes if abs(n[4]) > thr}
        # An explicit threshold wins over the top-k the circuit was found with.
        assert {n[0] for n in c.kept_nodes(threshold=thr)} == want
    assert any(n[4] == 0 for n in nodes)                    # inactive features: never kept, even by top-k
    for k in (1, 4, 7, len(nodes)):
        want = {n[0] for n in heapq.nlargest(k, nodes, key=lambda n: abs(n[4])) if n[4] != 0}
        assert {n[0] for n in c.kept_nodes(top_k=k)} == want
    assert {n[0] for n in c.kept_nodes()} == {n[0] for n in heapq.nlargest(4, nodes, key=lambda n: abs(n[4]))}
    strongest = max(nodes, key=lambda n: abs(n[4]))
    assert strongest in c.kept_nodes(top_k=1)


def dense_edges(c):
    """{(source id, target id): value} for every non-zero entry of every dense edge tensor."""
    out = {}
    for (u, d), (rows, vals) in c.edges.items():
        dense = vals.to_dense()
        F_u, F_d = dense.shape[-1] - 1, c.nodes[d].shape[-1] - 1
        for r, key in enumerate(rows.tolist()):
            t, i = divmod(key, F_d + 1) if c.positional else (None, key)
            for tu in (range(dense.shape[1]) if c.positional else [None]):
                row = dense[r, tu] if c.positional else dense[r]
                for j in range(F_u + 1):
                    if row[j] != 0:
                        out[(node_id(u, j, F_u, tu), node_id(d, i, F_d, t))] = float(row[j])
    return out


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_kept_edges_equal_a_loop_over_the_dense_edges(aggregation):
    model, saes, batch, c = setup(fresh_seed(), aggregation, node_threshold=0.02, edge_threshold=0.01)
    kept = c.kept_nodes()
    ids = {n[0] for n in kept}
    entries = dense_edges(c)
    assert any(src.endswith(("/err", "@0")) or "/err@" in src for src, _ in entries)
    last = c.sites[-1]
    y = {(n[0], "y"): n[4] for n in kept if n[1] == last}
    assert y, "no node of the last site kept: the draw cannot check the edges into y"
    y_median = sorted(abs(v) for v in y.values())[len(y) // 2]
    for edge_threshold in (c.settings["edge_threshold"], 0.0, y_median):
        c.settings["edge_threshold"] = edge_threshold
        want = {(s, t): v for (s, t), v in entries.items() if s in ids and t in ids and abs(v) > edge_threshold}
        want.update(y)                                      # edges into y carry node effects, unthresholded
        got = {(s, t): v for s, t, v in c.kept_edges()}
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], abs=1e-12) for k in want)
    between = [(k, v) for k, v in entries.items() if k[0] in ids and k[1] in ids]
    assert len(between) > 3
    c.settings["top_k_edges"] = 3
    pool = [(s, t, v) for (s, t), v in between] + [(s, t, v) for (s, t), v in y.items()]
    want = {(s, t) for s, t, _ in heapq.nlargest(3, pool, key=lambda e: abs(e[2]))}
    assert {(s, t) for s, t, _ in c.kept_edges()} == want


# --- files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_circuit_json_and_effects_file_hold_the_circuit(aggregation, tmp_path):
    model, saes, batch, c = setup(fresh_seed(), aggregation, node_threshold=0.0, edge_threshold=0.01)
    data = c.save(tmp_path / "c")
    assert load_circuit_json(tmp_path / "c" / "circuit.json", model, saes) == json.loads(json.dumps(data))
    nodes = {n[0]: n for n in every_node(c)}
    assert len(data["nodes"]) == sum(1 for n in nodes.values() if abs(n[4]) > 0)
    for row in data["nodes"]:
        _, site, col, pos, eff, error = nodes[row["id"]]
        assert (row["site"], row["feature"], row["effect"]) == (site, "err" if error else col, eff)
        assert row.get("pos") == pos and ("pos" in row) == (aggregation == "none")
    if aggregation == "none":
        assert any(row["pos"] == 0 for row in data["nodes"]) and any(row["pos"] > 0 for row in data["nodes"])
    # effects.safetensors: every node effect, and each edge tensor rebuilt from indices/values/shape/rows.
    f = load_file(tmp_path / "c" / "effects.safetensors")
    for s, v in c.nodes.items():
        torch.testing.assert_close(f[f"nodes.{s}.features"], v[..., :-1].float())
        torch.testing.assert_close(f[f"nodes.{s}.error"], v[..., -1].float())
    assert c.edges
    for (u, d), (rows, vals) in c.edges.items():
        p = f"edges.{u}.{d}"
        rebuilt = torch.sparse_coo_tensor(f[p + ".indices"], f[p + ".values"], tuple(f[p + ".shape"].tolist()))
        torch.testing.assert_close(rebuilt.to_dense(), vals.to_dense().float())
        F_d = c.nodes[d].shape[-1] - 1
        assert len(f[p + ".rows"]) == len(rows)
        for (t, i), key in zip(f[p + ".rows"].tolist(), rows.tolist()):
            # On disk: (position or -1, feature or -1 for the error); in the object: the flat node index.
            assert key == ((t * (F_d + 1) + (F_d if i == -1 else i)) if aggregation == "none" else (F_d if i == -1 else i))
            assert (t == -1) == (aggregation == "sum")


def test_circuit_json_versions_and_positions(tmp_path):
    model, saes, batch, c = setup(fresh_seed(), "none", nodes_only=True, node_threshold=0.0)
    data = c.to_json()
    p = tmp_path / "circuit.json"
    at0 = [n for n in data["nodes"] if n["pos"] == 0]
    assert at0
    p.write_text(json.dumps(dict(data, nodes=at0)))
    assert load_circuit_json(p)["nodes"] == at0            # position 0 is a position
    p.write_text(json.dumps(dict(data, version=2)))
    with pytest.raises(MinicircError, match="version 1"):
        load_circuit_json(p)
    p.write_text(json.dumps(dict(data, nodes=[dict(at0[0], pos=-1)])))
    with pytest.raises(MinicircError, match="pos"):
        load_circuit_json(p)


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_load_gives_back_the_saved_circuit(aggregation, tmp_path):
    """Circuit.load(folder) rebuilds the object save(folder) wrote (float32 effects, as stored): the same
    circuit.json, every node and edge tensor, and new thresholds select as on the original."""
    seed = fresh_seed()
    model = make_model(seed, parallel=False).float()
    saes = {s: d.float() for s, d in make_saes(model, seed + 1, ("relu", "jumprelu")).items()}
    batch = make_batch(seed + 2, B=3, T=4)
    c = minicirc.find_circuit(model, saes, batch, steps=2, node_threshold=0.02, edge_threshold=0.01,
                              aggregation=aggregation, progress=False)
    c.annotations[c.kept_nodes()[0][0]] = {"label": "a note"}
    data = c.save(tmp_path / "c")
    back = minicirc.Circuit.load(tmp_path / "c")
    assert json.dumps(back.to_json()) == json.dumps(data)
    for s in c.sites:
        torch.testing.assert_close(back.nodes[s], c.nodes[s], rtol=0, atol=0)
    assert back.edges.keys() == c.edges.keys() and c.edges
    for pair, (rows, vals) in c.edges.items():
        assert torch.equal(back.edges[pair][0], rows)
        torch.testing.assert_close(back.edges[pair][1].to_dense(), vals.to_dense(), rtol=0, atol=0)
    assert back.kept_nodes(threshold=0.05) == c.kept_nodes(threshold=0.05)
    # Saving again without contexts drops the earlier run's contexts.json (view would show stale ones).
    from minicirc.viz import save_circuit
    (tmp_path / "c" / "contexts.json").write_text("{}")
    save_circuit(c, tmp_path / "c", picture=False)
    assert not (tmp_path / "c" / "contexts.json").exists()
    # An edge tensor that does not fit its shape, and a corrupt effects file, are refused with the file's name.
    from safetensors.torch import save_file
    f = load_file(tmp_path / "c" / "effects.safetensors")
    name = next(k for k in f if k.endswith(".indices"))
    f[name] = f[name] + 10**6
    save_file(f, tmp_path / "c" / "effects.safetensors")
    with pytest.raises(MinicircError, match="is corrupt"):
        minicirc.Circuit.load(tmp_path / "c")
    (tmp_path / "c" / "effects.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MinicircError, match="effects.safetensors"):
        minicirc.Circuit.load(tmp_path / "c")


def test_node_ids_round_trip():
    """node_id and parse_node_id, the only place node names are made and read, are each other's inverse."""
    F = 7
    for site in ("embed", "resid_1", "attn_0"):
        for col in range(F + 1):
            for pos in (None, 0, 5):
                name = node_id(site, col, F, pos)
                assert name == f"{site}/{'err' if col == F else col}" + ("" if pos is None else f"@{pos}")
                assert parse_node_id(name) == (site, None if col == F else col, pos)
    for text in ("y", "resid_1", "resid_1/", "resid_1/x", "resid_1/3@", "resid_1/-1", "a/b/3"):
        assert parse_node_id(text) is None
