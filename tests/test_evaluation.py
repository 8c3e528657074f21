"""Faithfulness and completeness (minicirc.evaluation) against the ablation of docs/method.md §8 written out
here: plain runs of the patch inputs give the ablation values, then the clean input runs with an edit at every
evaluated site that re-encodes the current activation, writes the ablation value into every feature (and
error) outside the kept set, and writes back decode(f) + err. float64, tiny random models and dictionaries."""
import random

import pytest
import torch

from minicirc import evaluation
from minicirc.errors import MinicircError
from test_attribution import make_batch, make_model, make_saes, neuron_saes, ref_logit_diff


def layer_of(site):
    return -1 if site == "embed" else int(site.rsplit("_", 1)[1])


def ref_values(model, saes, batch, mode, seed=0):
    """{site: (feature values, error values)}: means over the patch inputs' examples per position when every
    example has the same length, else over all real tokens; zeros for zero ablation; for resample, example b
    takes the patch values of example order[b] (order: a permutation of the examples)."""
    if mode == "zero":
        return {s: (torch.zeros(sae.n_features, dtype=torch.float64), torch.zeros(sae.d_in, dtype=torch.float64))
                for s, sae in saes.items()}
    cache = {}
    with torch.no_grad():
        model(batch.patch, cache=cache)
    lengths = (batch.last + 1).tolist()
    out = {}
    if mode == "resample":
        order = evaluation.resample_order(batch, seed)
        assert sorted(order.tolist()) == list(range(len(batch)))
    for s, sae in saes.items():
        f = sae.encode(cache[s])
        err = cache[s] - sae.decode(f)
        if mode == "resample":
            out[s] = (torch.stack([f[j] for j in order]), torch.stack([err[j] for j in order]))
        elif len(set(lengths)) == 1:
            out[s] = (f.mean(0), err.mean(0))
        else:
            fs = torch.cat([f[b, :n] for b, n in enumerate(lengths)])
            es = torch.cat([err[b, :n] for b, n in enumerate(lengths)])
            out[s] = (fs.mean(0), es.mean(0))
    return out


def ref_metric(model, saes, batch, keep, values, errors, first_layer):
    """Mean metric with every node outside `keep` (a set of (site, feature | "err", pos | None)) ablated.

    keep=None: the unedited model. errors: "default" (error ablated unless kept), "keep" (never ablated),
    "remove" (always ablated)."""
    if keep is None:
        with torch.no_grad():
            return ref_logit_diff(model, batch, batch.clean, {}).mean().item()

    def edit(site):
        sae, (fval, eval_) = saes[site], values[site]

        def fn(x):
            f = sae.encode(x)
            err = x - sae.decode(f)
            f, err = f.clone(), err.clone()
            for t in range(x.shape[1]):
                fv = fval[:, t] if fval.dim() == 3 else fval[t][None] if fval.dim() == 2 else fval[None]
                ev = eval_[:, t] if eval_.dim() == 3 else eval_[t][None] if eval_.dim() == 2 else eval_[None]
                for i in range(sae.n_features):
                    if (site, i, t) not in keep and (site, i, None) not in keep:
                        f[:, t, i] = fv[:, i]
                err_kept = (site, "err", t) in keep or (site, "err", None) in keep
                if errors == "remove" or (errors == "default" and not err_kept):
                    err[:, t] = ev
            return sae.decode(f) + err
        return fn

    edits = {s: edit(s) for s in saes if layer_of(s) >= first_layer or (s == "embed" and first_layer <= 0)}
    with torch.no_grad():
        return ref_logit_diff(model, batch, batch.clean, edits).mean().item()


def all_nodes(saes, T=None):
    return [(s, i, t) for s, sae in saes.items() for i in [*range(sae.n_features), "err"]
            for t in ([None] if T is None else range(T))]


def as_circuit_nodes(nodes):
    """circuit.json's node records for (site, feature | "err", pos | None) triples."""
    return [{"id": f"{s}/{i}" + ("" if t is None else f"@{t}"), "site": s, "feature": i, "effect": 1.0,
             **({} if t is None else {"pos": t})} for s, i, t in nodes]


CASES = [  # (dictionaries, ablation, errors, positional, first_layer, same length)
    ("saes", "mean", "default", False, 0, True),
    ("saes", "mean", "default", False, 0, False),
    ("saes", "mean", "remove", False, 1, True),
    ("saes", "mean", "keep", True, 0, True),
    ("saes", "zero", "default", True, 1, True),
    ("neurons", "mean", "default", False, 1, False),
    ("saes", "resample", "default", False, 0, True),
    ("saes", "resample", "remove", True, 1, True),
    ("neurons", "resample", "default", True, 0, True),
]


@pytest.mark.parametrize("dicts,ablation,errors,positional,first_layer,same_length", CASES)
def test_faithfulness_and_completeness_equal_the_written_out_ablation(dicts, ablation, errors, positional,
                                                                      first_layer, same_length):
    seed = int(torch.randint(0, 10**6, ()).item())
    rng = random.Random(seed)
    model = make_model(seed, parallel=bool(seed % 2))
    saes = make_saes(model, seed + 1, ("relu", "jumprelu", "topk")) if dicts == "saes" else neuron_saes(model)
    batch = make_batch(seed + 2, B=4, lengths=None if same_length else [4, 2, 3, 4])
    T = batch.clean.shape[1] if positional else None
    # A random circuit: about a third of every site's nodes, layer-0 sites included (left unablated when
    # first_layer is 1, so their nodes must not matter).
    circuit = {n for n in all_nodes(saes, T) if rng.random() < 0.35}
    assert any(layer_of(s) < first_layer or first_layer == 0 for s, _, _ in circuit)
    batch_size = rng.choice([1, 3, 64])     # examples run in slices; the means must not depend on it
    got = evaluation.faithfulness(model, saes, batch, as_circuit_nodes(sorted(circuit, key=str)),
                                  positional=positional, ablation=ablation, errors=errors, first_layer=first_layer,
                                  batch_size=batch_size, seed=seed)
    values = ref_values(model, saes, batch, ablation, seed)
    every = set(all_nodes(saes, T))
    m = {name: ref_metric(model, saes, batch, keep, values, errors, first_layer)
         for name, keep in [("full", None), ("empty", set()), ("circuit", circuit), ("complement", every - circuit)]}
    denom = m["full"] - m["empty"]
    assert abs(denom) > 1e-3, "degenerate draw: ablating everything barely changes the metric"
    want = {"m_full": m["full"], "m_empty": m["empty"], "m_circuit": m["circuit"], "m_complement": m["complement"],
            "faithfulness": (m["circuit"] - m["empty"]) / denom, "completeness": (m["complement"] - m["empty"]) / denom}
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9), batch_size


@pytest.mark.parametrize("positional", [False, True])
def test_full_model_is_1_empty_circuit_is_0_and_its_complement_is_1(positional):
    seed = int(torch.randint(0, 10**6, ()).item())
    model = make_model(seed, parallel=False)
    saes = make_saes(model, seed + 1, ("relu", "jumprelu"))
    batch = make_batch(seed + 2, B=3)
    T = batch.clean.shape[1] if positional else None
    full = evaluation.faithfulness(model, saes, batch, as_circuit_nodes(all_nodes(saes, T)), positional=positional)
    empty = evaluation.faithfulness(model, saes, batch, [], positional=positional)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert full["completeness"] == pytest.approx(0.0, abs=1e-9)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-9)
    assert empty["completeness"] == pytest.approx(1.0, abs=1e-9)
    # m(M) is the model itself: re-encoding every site and writing decode(f) + err back changes nothing.
    assert full["m_full"] == pytest.approx(ref_logit_diff(model, batch, batch.clean, {}).mean().item(), abs=1e-9)


def test_nodes_on_unknown_sites_or_out_of_range_are_refused():
    model = make_model(5, parallel=False)
    saes = {s: d for s, d in make_saes(model, 6).items() if s != "mlp_1"}
    batch = make_batch(7)
    with pytest.raises(MinicircError, match="no dictionary"):
        evaluation.faithfulness(model, saes, batch, as_circuit_nodes([("mlp_1", 0, None)]))
    with pytest.raises(MinicircError, match="out of range"):
        evaluation.faithfulness(model, saes, batch, as_circuit_nodes([("resid_0", 10**6, None)]), first_layer=1)
    with pytest.raises(MinicircError, match="same length"):
        evaluation.faithfulness(model, saes, make_batch(8, lengths=[3, 4]), [], ablation="resample")
    with pytest.raises(MinicircError, match="unknown ablation"):
        evaluation.faithfulness(model, saes, batch, [], ablation="shuffle")
    with pytest.raises(MinicircError, match="valid position"):
        evaluation.faithfulness(model, saes, batch, as_circuit_nodes([("resid_0", 0, 99)]), positional=True)


def test_resample_donors_follow_the_seed_whatever_the_batch_size():
    seed = int(torch.randint(0, 10**6, ()).item())
    model = make_model(seed, parallel=True)
    saes = make_saes(model, seed + 1, ("relu",))
    batch = make_batch(seed + 2, B=5)
    orders = [evaluation.resample_order(batch, s).tolist() for s in (seed, seed + 1, seed)]
    assert sorted(orders[0]) == list(range(5)) and orders[0] == orders[2]
    assert orders[0] == torch.randperm(5, generator=torch.Generator().manual_seed(seed)).tolist()
    assert orders[1] == torch.randperm(5, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    nodes = as_circuit_nodes(sorted({n for n in all_nodes(saes) if random.Random(seed).random() < 0.5}, key=str))
    run = lambda bs: evaluation.faithfulness(model, saes, batch, nodes, ablation="resample", seed=seed, batch_size=bs)
    whole = run(64)
    for bs in (1, 2, 3):
        assert run(bs) == pytest.approx(whole, rel=1e-9, abs=1e-9), bs


def test_empty_dataset_and_nodes_for_faithfulness():
    model = make_model(3, parallel=False)
    saes = make_saes(model, 4)
    with pytest.raises(MinicircError, match="empty"):
        evaluation.faithfulness(model, saes, make_batch(5)[0:0], [])
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    target = rng.choice([0.8, 0.9])
    points = [{"n_nodes": rng.randint(1, 100), "faithfulness": rng.uniform(-0.5, 1.2)} for _ in range(8)]
    points.append({"n_nodes": 0, "faithfulness": target - 1e-9})   # just short: never chosen
    assert evaluation.nodes_for_faithfulness(points, target) == \
        min([p["n_nodes"] for p in points if p["faithfulness"] >= target], default=None)
    exact = [{"n_nodes": 7, "faithfulness": target}, {"n_nodes": 3, "faithfulness": target / 2}]
    assert evaluation.nodes_for_faithfulness(exact, target) == 7
    assert evaluation.nodes_for_faithfulness(exact[1:], target) is None
    # best_point: the highest faithfulness, the fewest nodes among ties, NaN never chosen.
    tie = [{"n_nodes": 9, "faithfulness": 0.7}, {"n_nodes": 4, "faithfulness": 0.7}, {"n_nodes": 2, "faithfulness": 0.1},
           {"n_nodes": 1, "faithfulness": float("nan")}]
    assert evaluation.best_point(tie) == tie[1] and evaluation.best_point(tie[3:]) is None
    assert evaluation.best_point(points) == max(points, key=lambda p: (p["faithfulness"], -p["n_nodes"]))


@pytest.mark.parametrize("dicts", ["saes", "neurons"])
def test_active_units_equal_the_dense_activations(dicts):
    """A feature is active at a position when its activation is non-zero there on at least one prompt, clean
    or patch, over real tokens only (padding never counts); the error when its error vector is non-zero:
    against encode / decode of each site's value in plain runs. Identity dictionaries: every error inactive."""
    seed = int(torch.randint(0, 10**6, ()).item())
    model = make_model(seed, parallel=bool(seed % 2))
    saes = make_saes(model, seed + 1, ("relu", "jumprelu", "topk")) if dicts == "saes" else neuron_saes(model)
    lengths = [4, 2, 3, 4, 1]
    batch = make_batch(seed + 2, B=len(lengths), lengths=lengths)
    sites = random.Random(seed).sample(list(saes), 3)
    got = evaluation.active_units(model, saes, batch, sites, batch_size=2)
    T = batch.clean.shape[1]
    for s in sites:
        want = torch.zeros(T, saes[s].n_features + 1, dtype=torch.bool)
        for tokens in (batch.clean, batch.patch):
            cache = {}
            with torch.no_grad():
                model(tokens, cache=cache)
                f = saes[s].encode(cache[s])
                err = cache[s] - saes[s].decode(f)
            for b, n in enumerate(lengths):
                want[:n, :-1] |= f[b, :n] != 0
                want[:n, -1] |= (err[b, :n].abs() > 1e-12).any(-1)
        assert torch.equal(got[s], want), s
        assert got[s][:, :-1].any()
        if dicts == "neurons":
            assert not got[s][:, -1].any()
        else:
            assert got[s][:, -1].any()
