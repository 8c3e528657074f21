"""Dictionaries at the optional sites z_l (head outputs before the output projection), resid_mid_l (the
residual between attention and MLP) and mlp_hidden_l (the MLP's neurons, before the down projection): node
effects, edges and evaluation, and the MLP-neuron baseline (identity dictionaries at mlp_hidden_l).

References: the definitions in minicirc.attribution (one backward per site, IG step and downstream node;
one forward per patched node) for the batched code; plain forward passes with `extra=` for site states;
ablations written out by hand (mean and resample values from plain runs, spliced with `edit=`) for
evaluation; the edge table of docs/method.md §6, written out again by hand; central finite differences in
float64 for node effects and edges. Models: tiny random GPT-NeoX
in float64 (sequential and parallel residual, from test_attribution) and a Qwen3 written by transformers
whose z width (n_heads * head_dim = 48) differs from d_model (32).
"""
import pytest
import torch

import minicirc
from minicirc.model import site_kind
from minicirc.attribution import reference as A
from minicirc.attribution import edges as AE
from minicirc.attribution import nodes as AN
from minicirc import evaluation as E
import test_attribution as TA

F64 = torch.float64


def dicts_at(model, sites, seed, kinds=("relu", "jumprelu", "topk")):
    """Random dictionaries of each site's own width (n_heads * head_dim at z_l, d_mlp at mlp_hidden_l)."""
    gen = torch.Generator().manual_seed(seed)
    return {s: TA.make_sae(gen, kinds[i % len(kinds)], d=model.site_width(s)).to(F64) for i, s in enumerate(sites)}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """transformers' Qwen3 with head_dim 12 (z width 48, d_model 32), read in float64."""
    from test_families import CASES, write_hf
    path = tmp_path_factory.mktemp("qwen3")
    kind, kw = CASES["qwen3 qk-norm head_dim"]
    write_hf(path, kind, seed=31, **kw)
    return minicirc.load_model(path, dtype=F64)


def model_for(name, request):
    if name == "qwen3":
        return request.getfixturevalue("qwen3")
    return TA.make_model(41, parallel=name == "neox parallel")


def tolerance(name):
    """float64 throughout for GPT-NeoX; Qwen3 computes its RMSNorm and softmax in float32 as transformers
    does, so two orders of the same sums differ by float32 rounding."""
    return dict(rtol=1e-4, atol=1e-5) if name == "qwen3" else dict(rtol=1e-8, atol=1e-10)


# --- the edge table -----------------------------------------------------------------------------------

def hand_table(layer_sites, parallel):
    """docs/method.md §6 for one layer (l = 0, prev = embed) with dictionaries at `layer_sites`, by cases.
    Frozen: the dictionary sites that cut the pair's other paths; a site without a dictionary never is.
    With GPT-NeoX's parallel residual the MLP reads prev, so attn_0 -> mlp_0 is no path at all."""
    have = set(layer_sites) | {"embed"}
    seq = not parallel
    if have == {"embed", "z_0", "attn_0", "resid_mid_0", "mlp_hidden_0", "mlp_0", "resid_0"}:     # every site
        return {("z_0", "attn_0", ()), ("embed", "z_0", ()), ("attn_0", "resid_mid_0", ()),
                ("embed", "resid_mid_0", ("attn_0",)), ("resid_mid_0", "mlp_hidden_0", ()),
                ("mlp_hidden_0", "mlp_0", ()), ("mlp_0", "resid_0", ()), ("resid_mid_0", "resid_0", ("mlp_0",))}
    if have - {"z_0"} == {"embed", "attn_0", "mlp_hidden_0", "mlp_0", "resid_0"}:   # the MLP's neurons before its output
        into_attn = {("embed", "z_0", ()), ("z_0", "attn_0", ())} if "z_0" in have else {("embed", "attn_0", ())}
        out = into_attn | {("embed", "mlp_hidden_0", ("attn_0",) * seq), ("mlp_hidden_0", "mlp_0", ()),
                           ("mlp_0", "resid_0", ()), ("attn_0", "resid_0", ("mlp_0",) * seq),
                           ("embed", "resid_0", ("attn_0", "mlp_0"))}
        return out | {("attn_0", "mlp_hidden_0", ())} if seq else out
    if have == {"embed", "mlp_hidden_0", "resid_0"}:       # the neurons stand in for mlp_0; attention computed
        return {("embed", "mlp_hidden_0", ()), ("mlp_hidden_0", "resid_0", ()), ("embed", "resid_0", ("mlp_hidden_0",))}
    if have == {"embed", "z_0", "attn_0", "resid_mid_0", "mlp_0", "resid_0"}:    # two half-layers
        return {("z_0", "attn_0", ()), ("embed", "z_0", ()), ("attn_0", "resid_mid_0", ()),
                ("embed", "resid_mid_0", ("attn_0",)), ("resid_mid_0", "mlp_0", ()), ("mlp_0", "resid_0", ()),
                ("resid_mid_0", "resid_0", ("mlp_0",))}
    if have == {"embed", "z_0", "attn_0", "mlp_0", "resid_0"}:               # z before attn, no resid_mid
        out = {("z_0", "attn_0", ()), ("embed", "z_0", ()), ("mlp_0", "resid_0", ()),
               ("attn_0", "resid_0", ("mlp_0",) * seq), ("embed", "mlp_0", ("attn_0",) * seq),
               ("embed", "resid_0", ("attn_0", "mlp_0"))}
        return out | {("attn_0", "mlp_0", ())} if seq else out
    if have == {"embed", "z_0", "mlp_0", "resid_0"}:                         # z stands in for attn
        out = {("embed", "z_0", ()), ("mlp_0", "resid_0", ()), ("z_0", "resid_0", ("mlp_0",) * seq),
               ("embed", "mlp_0", ("z_0",) * seq), ("embed", "resid_0", ("z_0", "mlp_0"))}
        return out | {("z_0", "mlp_0", ())} if seq else out
    if have == {"embed", "z_0", "resid_mid_0", "resid_0"}:                   # z into resid_mid, mlp_0 computed
        return {("embed", "z_0", ()), ("z_0", "resid_mid_0", ()), ("embed", "resid_mid_0", ("z_0",)),
                ("resid_mid_0", "resid_0", ())}
    if have == {"embed", "resid_mid_0", "resid_0"}:                          # attn_0 and mlp_0 computed
        return {("embed", "resid_mid_0", ()), ("resid_mid_0", "resid_0", ())}
    raise AssertionError(f"no hand-written case for {sorted(have)}")


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("layer_sites", [("z_0", "attn_0", "resid_mid_0", "mlp_0", "resid_0"),
                                         ("z_0", "attn_0", "mlp_0", "resid_0"), ("z_0", "mlp_0", "resid_0"),
                                         ("z_0", "resid_mid_0", "resid_0"), ("resid_mid_0", "resid_0"),
                                         ("z_0", "attn_0", "resid_mid_0", "mlp_hidden_0", "mlp_0", "resid_0"),
                                         ("attn_0", "mlp_hidden_0", "mlp_0", "resid_0"), ("mlp_hidden_0", "resid_0")])
def test_edge_pairs_follow_the_table(parallel, layer_sites):
    model = TA.make_model(1, parallel, n_layers=1)
    if parallel and "resid_mid_0" in layer_sites:
        assert "resid_mid_0" not in model.all_sites       # GPT-NeoX's MLP never reads it
        layer_sites = tuple(s for s in layer_sites if s != "resid_mid_0")
        if "mlp_hidden_0" not in layer_sites:
            return
    sites = A.site_order(model, {s: None for s in ("embed",) + layer_sites})
    assert sites == [s for s in model.all_sites if s in ("embed",) + layer_sites]
    got = A.edge_pairs(model, sites)
    assert len(got) == len(set(got))
    assert set((u, d, tuple(fr)) for u, d, fr in got) == hand_table(layer_sites, parallel)


def test_edge_pairs_without_optional_sites_are_the_per_layer_table():
    """No dictionary at z or resid_mid: the original table (test_attribution.design_pairs), each pair once,
    by upstream then downstream site in model order."""
    for parallel in (True, False):
        model = TA.make_model(1, parallel)
        got = [(u, d, set(fr)) for u, d, fr in A.edge_pairs(model, model.sites)]
        rank = model.sites.index
        assert got == sorted(TA.design_pairs(2, parallel), key=lambda p: (rank(p[0]), rank(p[1])))


# --- site states and node effects ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["neox sequential", "neox parallel", "qwen3"])
def test_node_effects_at_optional_sites(name, request):
    model = model_for(name, request)
    saes = dicts_at(model, model.all_sites, 5)
    batch = TA.make_batch(7, B=2, T=4)
    # Site states: the clean and patch values are those of plain forward passes that ask for every site.
    states = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    assert list(states) == model.all_sites
    for tokens, key in [(batch.clean, "x_c"), (batch.patch, "x_p")]:
        cache = {}
        with torch.no_grad():
            model(tokens, cache=cache, extra=model.all_sites)
        for s in model.all_sites:
            assert torch.equal(getattr(states[s], key), cache[s]), s
            assert cache[s].shape[-1] == model.site_width(s)
    if name == "qwen3":
        assert model.site_width("z_1") == 48 != model.cfg.d_model
    defs = {"attrib": A.attrib_effects(model, saes, TA.ref_logit_diff, batch, states),
            "ig": A.ig_effects(model, saes, TA.ref_logit_diff, batch, states, 3),
            "exact": A.exact_effects(model, saes, TA.ref_logit_diff, batch, states)}
    for method, ref in defs.items():
        fast = AN.node_effects(model, saes, A.logit_diff, batch, method, steps=3)
        assert set(fast.effects) == set(model.all_sites)
        TA.assert_effects_equal(TA.dense_effects(fast), ref, **tolerance(name))
        for s in [s for s in ("z_1", "resid_mid_1", "mlp_hidden_1") if s in model.all_sites]:
            assert ref[s].abs().max() > 1e-4, (method, s)      # the optional sites carry effects


# --- edges ---------------------------------------------------------------------------------------------

EDGE_CASES = [("neox sequential", "all", "sum"), ("neox sequential", "all", "none"), ("neox parallel", "all", "sum"),
              ("neox sequential", "z for attn", "none"), ("qwen3", "all", "sum"), ("qwen3", "mid only", "sum"),
              ("neox parallel", "hidden for mlp", "none"), ("qwen3", "hidden for mlp", "sum")]
OPTIONAL = ("z_", "resid_mid", "mlp_hidden")


def sites_for(model, which):
    """The dictionary sites of an EDGE_CASES entry: every site; z_l instead of attn_l; resid sites only;
    mlp_hidden_l instead of mlp_l."""
    return {"all": model.all_sites,
            "z for attn": [s for s in model.all_sites if site_kind(s) != "attn"],
            "mid only": [s for s in model.all_sites if site_kind(s) in ("embed", "resid", "resid_mid")],
            "hidden for mlp": [s for s in model.all_sites if site_kind(s) != "mlp"]}[which]


@pytest.mark.parametrize("name,which,aggregation", EDGE_CASES)
def test_batched_edges_equal_definition_at_optional_sites(name, which, aggregation, request):
    model = model_for(name, request)
    saes = dicts_at(model, sites_for(model, which), 9)
    batch = TA.make_batch(11, B=2, T=4)
    st = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    L = A.ig_gradients(model, saes, TA.ref_logit_diff, batch, st, 3)
    ref_eff = TA.effects_from(L, st)
    node = AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=3)
    TA.assert_effects_equal(TA.dense_effects(node), ref_eff, **tolerance(name))
    tau = TA.threshold_for(ref_eff)
    pairs = A.edge_pairs(model, A.site_order(model, saes))
    optional = [(u, d) for u, d, _ in pairs if u.startswith(OPTIONAL) or d.startswith(OPTIONAL)]
    assert optional
    ref = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), ref_eff, tau, aggregation, pairs))
    fast = AE.edge_effects(model, saes, batch, node.states, node.grads, node.effects, tau, aggregation)
    TA.assert_edges_equal(TA.as_dict(fast), ref, **tolerance(name))
    # every pair touching an optional site has edges, and some are far from zero
    for pair in optional:
        assert pair in ref and max(v.abs().max() for v in ref[pair].values()) > 1e-6, pair


# --- evaluation ----------------------------------------------------------------------------------------

def every_node(saes):
    return [{"site": s, "feature": f} for s, sae in saes.items() for f in list(range(sae.n_features)) + ["err"]]


@pytest.mark.parametrize("name", ["neox sequential", "qwen3"])
@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_evaluation_at_optional_sites(name, ablation, request):
    """An empty circuit at z_0, resid_mid_0, z_1 and mlp_hidden_1 sets each site to its ablation value: with
    mean ablation the per-position mean of the site over the patch inputs (decode(mean f) + mean err = mean x),
    with resample ablation the donor's own site value. A circuit of every node is the unedited model."""
    model = model_for(name, request)
    sites = ["z_0", "resid_mid_0", "z_1", "mlp_hidden_1"]
    saes = dicts_at(model, sites, 13)
    batch = TA.make_batch(17, B=5, T=4)
    plain = {}
    with torch.no_grad():
        model(batch.patch, cache=plain, extra=sites)
        if ablation == "mean":
            values = {s: plain[s].mean(0) for s in sites}
        else:
            donors = E.resample_order(batch, seed=3)
            values = {s: plain[s][donors] for s in sites}
        want_empty = TA.ref_logit_diff(model, batch, batch.clean, {s: (lambda x, v=values[s]: v.expand_as(x)) for s in sites})
        want_full = TA.ref_logit_diff(model, batch, batch.clean, {})
    tol = tolerance(name)["atol"]
    r = E.faithfulness(model, saes, batch, [], ablation=ablation, batch_size=2, seed=3)
    assert r["m_empty"] == pytest.approx(want_empty.mean().item(), abs=tol)
    assert r["m_circuit"] == pytest.approx(want_empty.mean().item(), abs=tol)
    assert r["m_full"] == pytest.approx(want_full.mean().item(), abs=tol)
    assert abs(r["m_full"] - r["m_empty"]) > 1e-3
    whole = E.faithfulness(model, saes, batch, every_node(saes), ablation=ablation, batch_size=2, seed=3)
    assert whole["m_circuit"] == pytest.approx(want_full.mean().item(), abs=tol)
    assert whole["faithfulness"] == pytest.approx(1.0, abs=1e3 * tol)


def test_find_circuit_checks_each_site_width(request):
    model = request.getfixturevalue("qwen3")
    saes = dicts_at(model, ["resid_0"], 1)
    gen = torch.Generator().manual_seed(2)
    saes["z_1"] = TA.make_sae(gen, "relu", d=model.cfg.d_model).to(F64)     # d_model wide, z_1 is 48 wide
    with pytest.raises(minicirc.MinicircError, match=r"dictionary for z_1 has width 32, the model's n_heads x head_dim is 48"):
        minicirc.find_circuit(model, saes, TA.make_batch(1, B=2, T=3), progress=False)


# Reference: central finite differences in float64 (test_attribution.check_edges_by_finite_differences) for
# the pairs that touch an optional site, the frozen sites held at their clean values.
@pytest.mark.parametrize("which", ["all", "z for attn", "hidden for mlp"])
def test_optional_site_edges_finite_differences(which):
    model = TA.make_model(43, parallel=False)
    sites = sites_for(model, which)
    saes = dicts_at(model, sites, 19)
    batch = TA.make_batch(23, B=2, T=4)
    st = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    L = A.ig_gradients(model, saes, TA.ref_logit_diff, batch, st, 3)
    node = AN.node_effects(model, saes, A.logit_diff, batch, "ig", steps=3)
    pairs = [p for p in A.edge_pairs(model, sites) if any(s.startswith(OPTIONAL) for s in p[:2])]
    TA.check_edges_by_finite_differences(model, saes, batch, st, L, TA.effects_from(L, st), node, pairs, 29)


@pytest.mark.parametrize("case", ["gpt2", "qwen2 biases", "llama mha biases", "gpt_neox"])
def test_value_bias_is_what_z_carries_of_the_value_projections_bias(tmp_path, case):
    """Attention weights sum to one, so z_l = sum_j a_ij (v_j + b_V) = (z_l without the value bias) + b_V:
    zeroing the value projection's bias must move z_l by exactly model.value_bias(l) at every token (the
    shift a TransformerLens-trained z dictionary reads, sae.shift_input)."""
    from test_families import CASES, V, write_hf
    from conftest import write_hf_model
    if case == "gpt_neox":
        write_hf_model(tmp_path / "m", seed=5, parallel=False)
        vocab = 61
    else:
        kind, kw = CASES[case]
        write_hf(tmp_path / "m", kind, seed=14, **kw)
        vocab = V
    model = minicirc.load_model(tmp_path / "m").double()
    tokens = torch.randint(0, vocab, (2, 7))
    zs = [f"z_{l}" for l in range(model.cfg.n_layers)]
    with_bias, without = {}, {}
    with torch.no_grad():
        model(tokens, cache=with_bias, extra=zs)
        for l in range(model.cfg.n_layers):
            b_V = model.value_bias(l).clone()
            assert b_V.shape == (model.site_width(f"z_{l}"),) and b_V.abs().max() > 0.05
            layer = model.layers[l]
            if case == "gpt2":
                layer.attn.c_attn.bias[2 * model.cfg.d_model:] = 0
            elif case == "gpt_neox":
                layer.attention.query_key_value.bias.view(model.cfg.n_heads, 3, -1)[:, 2] = 0
            else:
                layer.self_attn.v_proj.bias.zero_()
            assert model.value_bias(l).abs().max() == 0
            # only this layer's bias removed so far: z_l moves by b_V (layers below are unchanged)
            model(tokens, cache=without, extra=zs)
            # llama.py takes the softmax in float32 even in a float64 model: its weights sum to 1 within ~1e-7
            tol = 1e-6 if case in ("qwen2 biases", "llama mha biases") else 1e-9
            torch.testing.assert_close(with_bias[f"z_{l}"] - without[f"z_{l}"], b_V.expand_as(without[f"z_{l}"]),
                                       rtol=tol, atol=tol)
            model(tokens, cache=with_bias, extra=zs)   # the next layer's reference, this layer's bias now gone


# --- the MLP's neurons: mlp_hidden_l ----------------------------------------------------------------------

def hidden_sites(model):
    return [f"mlp_hidden_{l}" for l in range(model.cfg.n_layers)]


# Reference: central finite differences of m[b] along one node's delta (f_c + eps * delta_i e_i, or
# err_c + eps * delta_err at one position) with the site spliced as decode(f) + err; equals the attrib effect.
@pytest.mark.parametrize("parallel", [True, False])
def test_node_effects_at_mlp_hidden_finite_differences(parallel):
    model = TA.make_model(61 + parallel, parallel)
    sites = hidden_sites(model)
    saes = dicts_at(model, sites, 62)
    assert all(saes[s].d_in == model.cfg.d_mlp != model.cfg.d_model for s in sites)
    batch = TA.make_batch(63, B=3, T=4)
    attrib = TA.dense_effects(AN.node_effects(model, saes, A.logit_diff, batch, "attrib"))
    st = A.site_states(model, saes, TA.ref_logit_diff, batch, sites)[2]
    g = torch.Generator().manual_seed(64)
    eps, checked = 1e-4, 0
    for s in sites:
        nz = torch.nonzero(st[s].delta_f)
        last = nz[nz[:, 1] == 3]      # the metric reads position 3: there every node moves it
        chosen = torch.cat([last[torch.randperm(len(last), generator=g)[:3]], nz[-1:]])
        picks = [tuple(v.tolist()) for v in chosen]
        picks += [(b, t, None) for b, t in [(0, 3), (2, 1)]]
        for b, t, i in picks:
            def m_at(e):
                f, err = st[s].f_c.clone(), st[s].err_c.clone()
                if i is None:
                    err[b, t] += e * st[s].delta_err[b, t]
                else:
                    f[b, t, i] += e * st[s].delta_f[b, t, i]
                with torch.no_grad():
                    return TA.ref_logit_diff(model, batch, batch.clean, {s: lambda x: saes[s].decode(f) + err})[b]
            fd = (m_at(eps) - m_at(-eps)) / (2 * eps)
            assert t != 3 or fd.abs() > 1e-6, (s, b, t, i)
            torch.testing.assert_close(attrib[s][b, t, -1 if i is None else i], fd, rtol=1e-6, atol=1e-9)
            checked += 1
    assert checked == 6 * len(sites)


# Reference: exact = a loop patching one neuron h[:, t, k] := h_patch[:, t, k] at a time through `edit`;
# attrib and ig = autograd on a leaf replacing the whole site, times delta h (f = h, W_dec = I)
# (test_attribution.check_neuron_node_effects, the checks of the output-neuron baseline).
@pytest.mark.parametrize("parallel", [True, False])
def test_mlp_neurons_node_effects(parallel):
    model = TA.make_model(71 + parallel, parallel)
    saes = {s: d.to(F64) for s, d in minicirc.identity_saes(model, "mlp").items()}
    assert list(saes) == hidden_sites(model) and all(d.n_features == model.cfg.d_mlp for d in saes.values())
    refs = TA.check_neuron_node_effects(model, saes, TA.make_batch(72, B=2, T=3))
    assert all(ref.abs().max() > 1e-3 for ref in refs.values())


@pytest.mark.parametrize("name", ["neox parallel", "qwen3"])
def test_find_circuit_over_mlp_neurons(name, request):
    """find_circuit with identity dictionaries at every mlp_hidden_l (the MLP-neuron baseline): nodes of
    d_mlp neurons a site, the edge mlp_hidden_0 -> mlp_hidden_1 through layer 0's down projection and layer 1's
    MLP input, its values the definition's averaged over examples; a circuit of every node is the whole model."""
    model = model_for(name, request)
    saes = {s: d.to(F64) for s, d in minicirc.identity_saes(model, "mlp").items()}
    batch = TA.make_batch(81, B=3, T=4)
    c = minicirc.find_circuit(model, saes, batch, method="ig", steps=3, node_threshold=0.0, edge_threshold=0.0,
                              progress=False)
    assert set(c.edges) == {("mlp_hidden_0", "mlp_hidden_1")}
    assert all(c.nodes[s].shape == (model.cfg.d_mlp + 1,) for s in saes)
    st = A.site_states(model, saes, TA.ref_logit_diff, batch, list(saes))[2]
    L = A.ig_gradients(model, saes, TA.ref_logit_diff, batch, st, 3)
    eff = TA.effects_from(L, st)
    for s in saes:
        torch.testing.assert_close(c.nodes[s].double(), eff[s].sum((0, 1)) / len(batch), **tolerance(name))
    ref = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), eff, 0.0, "sum",
                                    [("mlp_hidden_0", "mlp_hidden_1", ())]))[("mlp_hidden_0", "mlp_hidden_1")]
    got = TA.as_dict(c.edges)[("mlp_hidden_0", "mlp_hidden_1")]
    assert set(got) == set(ref) and max(v.abs().max() for v in ref.values()) > 1e-4
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k] / len(batch), **tolerance(name))
    whole = E.faithfulness(model, saes, batch, every_node(saes), batch_size=2)
    assert whole["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    assert abs(whole["m_full"] - whole["m_empty"]) > 1e-3


def test_identity_saes_bases(request):
    model = request.getfixturevalue("qwen3")
    out, mlp = minicirc.identity_saes(model), minicirc.identity_saes(model, "mlp")
    assert list(out) == model.sites and all(d.d_in == model.cfg.d_model for d in out.values())
    assert list(mlp) == ["mlp_hidden_0", "mlp_hidden_1"] and all(d.d_in == model.cfg.d_mlp == 48 for d in mlp.values())
    with pytest.raises(minicirc.MinicircError, match="unknown neuron basis 'hidden'"):
        minicirc.identity_saes(model, "hidden")
    gen = torch.Generator().manual_seed(3)
    saes = {"mlp_hidden_1": TA.make_sae(gen, "relu", d=model.cfg.d_model).to(F64)}
    with pytest.raises(minicirc.MinicircError, match=r"dictionary for mlp_hidden_1 has width 32, the model's d_mlp is 48"):
        minicirc.find_circuit(model, saes, TA.make_batch(1, B=2, T=3), progress=False)
