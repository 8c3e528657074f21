"""Transcoders in the method (docs/method.md, Transcoders): a dictionary at mlp_l whose features read the MLP's
input u (reads "mlp_in": after the MLP's norm; "resid_mid": before it) and whose splice keeps the model's value,
y = decode(f) + skip(u) + err with f = encode(u), err = y - decode(f) - skip(u).

References: the MLP's own module applied to u (the input the method reads is the one the MLP reads); the
definitions in minicirc.attribution.reference (one backward per site, IG step and downstream node; one forward
per patched node) for the batched code; central finite differences of the metric along one node's delta on the
spliced model for attrib, and along one upstream node's delta for edges, with the frozen sites' nodes held at
their clean values and a frozen transcoder's skip term following u; ablations written out by hand for
evaluation. u is written out by hand in these references from the family's own modules
(post_attention_layernorm, ln_2), not through SiteModel.mlp_input. Models: tiny random Llama (float64, its
RMSNorm's mean square in float32 as transformers does) and GPT-2 (float64 throughout), sequential residual.
"""
import os

import pytest
import torch

import minicirc
from minicirc.attribution import reference as A
from minicirc.attribution import edges as AE
from minicirc.attribution import nodes as AN
from minicirc import evaluation as E
from minicirc.model.gpt2 import GPT2, Config as GPT2Config
from minicirc.model.llama import Llama, Config as LlamaConfig
from minicirc.sae import Dictionary, load_saes
import test_attribution as TA

F64 = torch.float64
D = TA.D_MODEL
DATA = os.path.join(os.path.dirname(__file__), "data")


def make_model(name, seed):
    if name == "neox parallel":
        return TA.make_model(seed, True)
    torch.manual_seed(seed)
    if name == "llama":
        cfg = LlamaConfig(vocab_size=TA.VOCAB, d_model=D, n_layers=2, n_heads=2, d_mlp=20, n_kv_heads=1,
                          head_dim=D // 2, max_len=16)
        model = Llama(cfg)
    else:
        model = GPT2(GPT2Config(vocab_size=TA.VOCAB, d_model=D, n_layers=2, n_heads=2, d_mlp=20, max_len=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.to(F64).eval()


def make_transcoder(gen, kind, reads, skip):
    s = TA.make_sae(gen, kind)
    W_skip = 0.4 * torch.randn(D, D, generator=gen) if skip else None
    return Dictionary(s.W_enc, s.b_enc, s.W_dec, s.b_dec, kind, threshold=s.threshold if kind == "jumprelu" else None,
                      k=s.k, subtract_b_dec=False, W_skip=W_skip, reads=reads).to(F64)


# The dictionary sets: transcoders at every mlp_l, alone; with SAEs at embed, attn_l and resid_l; and with SAEs at
# resid_mid_l too (the site whose value a transcoder's input comes from carries a dictionary of its own).
TRANSCODERS = [("relu", "mlp_in", True), ("jumprelu", "resid_mid", True), ("topk", "mlp_in", False)]


def make_saes(model, which, seed):
    gen = torch.Generator().manual_seed(seed)
    saes = {}
    for l in range(model.cfg.n_layers):
        kind, reads, skip = TRANSCODERS[(l + seed) % len(TRANSCODERS)]
        reads = "mlp_in" if model.cfg.parallel_residual else reads      # no resid_mid there
        saes[f"mlp_{l}"] = make_transcoder(gen, kind, reads, skip)
    if which != "alone":
        others = [s for s in model.sites if not s.startswith("mlp")]
        if which == "with resid_mid":
            others += [f"resid_mid_{l}" for l in range(model.cfg.n_layers)]
        kinds = ("relu", "jumprelu", "topk")
        saes.update({s: TA.make_sae(gen, kinds[i % 3]).to(F64) for i, s in enumerate(others)})
    return saes


def tolerance(name):
    """Llama takes its RMSNorm's mean square in float32: two orders of the same sums differ by float32 rounding."""
    return dict(rtol=1e-4, atol=1e-6) if name == "llama" else dict(rtol=1e-8, atol=1e-10)


MODELS = ["llama", "gpt2", "neox parallel"]


def mlp_norm(model, l):
    """The norm before layer l's MLP, by the family's own module name."""
    layer = model.layers[l]
    return layer.post_attention_layernorm if hasattr(layer, "post_attention_layernorm") else layer.ln_2


def mlp_reads(model, l):
    """The site whose value layer l's MLP reads: resid_mid_l, or with the parallel residual the layer's input."""
    return f"resid_mid_{l}" if not model.cfg.parallel_residual else f"resid_{l - 1}" if l else "embed"


def hand_input(model, site, sae, values):
    """A transcoder's input u from recorded values holding mlp_reads: the norm's output or its input."""
    l = int(site.rsplit("_", 1)[1])
    r = values[mlp_reads(model, l)]
    return mlp_norm(model, l)(r) if sae.reads == "mlp_in" else r


def derivative(S, name):
    """dS/de at 0 by finite differences: central (step 1e-5) in float64; for Llama, whose RMSNorm mean square and
    attention softmax are float32 (rounding about 1e-7 of S, divided by the step), the fourth-order stencil with
    step 1e-2 (truncation about 1e-8 of the derivative), compared at FD_TOL."""
    if name == "llama":
        h = 1e-2
        return (-S(2 * h) + 8 * S(h) - 8 * S(-h) + S(-2 * h)) / (12 * h)
    h = 1e-5
    return (S(h) - S(-h)) / (2 * h)


FD_TOL = {"llama": dict(rtol=2e-3, atol=5e-5), "gpt2": dict(rtol=1e-6, atol=1e-8),
          "neox parallel": dict(rtol=1e-6, atol=1e-8)}


def plain(model, tokens):
    cache = {}
    with torch.no_grad():
        model(tokens, cache=cache, extra=model.all_sites)
    return cache


# --- the input and the splice ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_the_input_is_what_the_mlp_reads_and_the_splice_keeps_the_value(name):
    model = make_model(name, 3)
    saes = make_saes(model, "alone", 1)
    tokens = TA.make_batch(2).clean
    cache = plain(model, tokens)
    for s, sae in saes.items():
        l = int(s[-1])
        u = hand_input(model, s, sae, cache)
        src, fn = model.mlp_input(l, sae.reads)
        assert torch.equal(fn(cache[src]), u)
        if sae.reads == "mlp_in":   # the MLP module on u is the site's value
            torch.testing.assert_close(model.layers[l].mlp(u), cache[s], rtol=1e-12, atol=1e-12)
        f, err = sae.split(cache[s], u)
        assert torch.equal(f, sae.encode(u)) and (f != 0).any()
        torch.testing.assert_close(sae.splice(f, err, u), cache[s], rtol=1e-12, atol=1e-12)
        if sae.has_skip:
            assert sae.skip(u).abs().max() > 0.1
    # the spliced forward pass (every transcoder split with its input from the same run) gives the same logits
    inputs = {}
    resplit = {s: (lambda x, s=s: saes[s].splice(*saes[s].split(x, inputs[s]), inputs[s])) for s in saes}
    edit = A.recording_inputs(model, saes, list(saes), resplit, inputs)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, edit=edit), model(tokens), rtol=1e-12, atol=1e-12)


# --- node effects ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,which", [(n, w) for n in MODELS for w in ("alone", "with saes", "with resid_mid")
                                        if not (n == "neox parallel" and w == "with resid_mid")])
def test_transcoder_node_effects_equal_definition(name, which):
    model = make_model(name, 5)
    saes = make_saes(model, which, 7)
    batch = TA.make_batch(9, B=2, T=4)
    states = A.site_states(model, saes, TA.ref_logit_diff, batch, A.site_order(model, saes))[2]
    # the states: features of the MLP's input from plain runs, and the error that completes the splice
    for tokens, f_key, e_key in [(batch.clean, "f_c", "err_c"), (batch.patch, "f_p", "err_p")]:
        cache = plain(model, tokens)
        for s in [s for s in saes if s.startswith("mlp")]:
            u = hand_input(model, s, saes[s], cache)
            f = getattr(states[s], f_key)
            torch.testing.assert_close(f, saes[s].encode(u), rtol=0, atol=0)
            torch.testing.assert_close(saes[s].decode(f) + saes[s].skip(u) + getattr(states[s], e_key), cache[s],
                                       rtol=1e-12, atol=1e-12)
    defs = {"attrib": A.attrib_effects(model, saes, TA.ref_logit_diff, batch, states),
            "ig": A.ig_effects(model, saes, TA.ref_logit_diff, batch, states, 3),
            "exact": A.exact_effects(model, saes, TA.ref_logit_diff, batch, states)}
    for method, ref in defs.items():
        fast = AN.node_effects(model, saes, A.logit_diff, batch, method, steps=3)
        TA.assert_effects_equal(TA.dense_effects(fast), ref, **tolerance(name))
        for s in ("mlp_0", "mlp_1"):
            assert ref[s][..., :-1].abs().max() > 1e-3 and ref[s][..., -1].abs().max() > 1e-3, (method, s)
    # attrib with a metric linear in mlp_1 is exact for mlp_1's nodes (the skip term is no node: it stays)
    metric = TA.linear_metric("mlp_1", 4)
    fast = AN.node_effects(model, saes, metric, batch, "attrib")
    TA.assert_effects_equal(TA.dense_effects(fast), A.exact_effects(model, saes, metric, batch, states),
                            sites=["mlp_1"], **tolerance(name))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transcoder_node_effects_under_zero_ablation(name):
    """Without patch inputs the nodes' patch values are 0: f_p = 0, err_p = 0, and the state's x_p is
    decode(0) + skip(u_c) = b_dec + skip(u_c); fast equals the definitions."""
    model = make_model(name, 8)
    saes = make_saes(model, "with saes", 9)
    batch = TA.make_batch(10, B=2, T=4, patch=False)
    metric = TA.probe_metric(11)
    states = A.site_states(model, saes, metric, batch, A.site_order(model, saes))[2]
    clean = plain(model, batch.clean)
    for s in ("mlp_0", "mlp_1"):
        u = hand_input(model, s, saes[s], clean)
        torch.testing.assert_close(states[s].x_p, (saes[s].b_dec + saes[s].skip(u)).expand_as(u), rtol=0, atol=1e-12)
    defs = {"attrib": A.attrib_effects(model, saes, metric, batch, states),
            "ig": A.ig_effects(model, saes, metric, batch, states, 3),
            "exact": A.exact_effects(model, saes, metric, batch, states)}
    for method, ref in defs.items():
        fast = AN.node_effects(model, saes, metric, batch, method, steps=3)
        TA.assert_effects_equal(TA.dense_effects(fast), ref, **tolerance(name))
        assert ref["mlp_1"].abs().max() > 1e-3, method


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transcoder_attrib_finite_differences(name):
    """attrib's effect of a node = central finite difference of m along its delta on the spliced model:
    mlp_l := decode(f) + skip(u_c) + err, f and err moved at one (example, position, node)."""
    model = make_model(name, 11)
    saes = make_saes(model, "with saes", 12)
    batch = TA.make_batch(13)
    r = AN.node_effects(model, saes, A.logit_diff, batch, "attrib")
    attrib = TA.dense_effects(r)
    clean = plain(model, batch.clean)
    g = torch.Generator().manual_seed(14)
    nonzero = 0
    for s in ("mlp_0", "mlp_1"):
        st, sae = TA.dense_state(r.states[s]), saes[s]
        u = hand_input(model, s, sae, clean)
        nz = torch.nonzero(st.delta_f)
        picks = [tuple(nz[j].tolist()) for j in torch.randperm(len(nz), generator=g)[:4].tolist()]
        picks += [(b, int(torch.randint(0, 4, (), generator=g)), None) for b in range(2)]
        for b, t, i in picks:
            def m_at(e):
                f, err = TA.moved_node(st, b, t, i, e)
                with torch.no_grad():
                    return TA.ref_logit_diff(model, batch, batch.clean,
                                             {s: lambda x: sae.decode(f) + sae.skip(u) + err})[b]
            fd = derivative(m_at, name)
            nonzero += bool(abs(fd) > 1e-4)
            torch.testing.assert_close(attrib[s][b, t, -1 if i is None else i], fd, **FD_TOL[name],
                                       msg=lambda m: f"{s} {(b, t, i)}: {m}")
    assert nonzero >= 8, nonzero


# --- edges -----------------------------------------------------------------------------------------------

def edge_setup(name, which, seed):
    """model, dictionaries, batch, the definitions' states, IG gradients (3 steps) and effects, the fast
    node effects, and a node threshold between effects."""
    model = make_model(name, seed)
    saes = make_saes(model, which, seed + 1)
    batch = TA.make_batch(seed + 2, B=2, T=4)
    st, L, ref_eff, node = TA.ig_reference_and_fast(model, saes, batch)
    return model, saes, batch, st, L, ref_eff, node, TA.threshold_for(ref_eff)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("which,aggregation", [("alone", "sum"), ("with saes", "none"), ("with saes", "sum"),
                                               ("with resid_mid", "sum")])
def test_transcoder_edges_equal_definition(name, which, aggregation):
    if name == "neox parallel" and which == "with resid_mid":
        pytest.skip("GPT-NeoX's parallel residual has no resid_mid_l")
    model, saes, batch, st, L, ref_eff, node, tau = edge_setup(name, which, 15)
    ref = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), ref_eff, tau, aggregation))
    fast = AE.edge_effects(model, saes, batch, node.states, node.grads, node.effects, tau, aggregation)
    TA.assert_edges_equal(TA.as_dict(fast), ref, **tolerance(name))
    into = [p for p in ref if p[1].startswith("mlp")]
    out_of = [p for p in ref if p[0].startswith("mlp")]
    assert into and out_of
    for pair in into + out_of:
        assert max(v.abs().max() for v in ref[pair].values()) > 1e-6, pair
    # one backward per downstream row gives the same
    rows = AE.edge_effects(model, saes, batch, node.states, node.grads, node.effects, tau, aggregation, use_vmap=False)
    TA.assert_edges_equal(TA.as_dict(rows), ref, **tolerance(name))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("which", ["alone", "with saes"])
def test_transcoder_edges_finite_differences(name, which):
    """Random (downstream node, upstream node) entries, fast and definition, against central finite differences
    of the downstream node's L_d * value along the upstream node's delta: U spliced with its nodes moved (a
    transcoder's skip(u_c) kept), frozen sites' nodes at their clean values (a frozen transcoder's value
    clean - skip(u_c) + skip(u) with u of the same run), and a transcoder downstream re-split from its input u
    of the same run. Until every combination of feature / error at each end was seen non-zero three times
    with a transcoder at one end, and a frozen transcoder with a skip term was crossed."""
    model, saes, batch, st, L, ref_eff, node, tau = edge_setup(name, which, 19)
    sel = TA.selection(ref_eff, tau)
    fast = TA.as_dict(AE.edge_effects(model, saes, batch, node.states, node.grads, node.effects, tau, "none"))
    defn = TA.as_dict(A.edge_effects(model, saes, batch, st, TA.site_grads(L), ref_eff, tau, "none"))
    pairs = [p for p in A.edge_pairs(model, A.site_order(model, saes))
             if any(s.startswith("mlp") for s in (p[0], p[1], *p[2]))]
    clean = plain(model, batch.clean)
    u_c = {s: hand_input(model, s, sae, clean) for s, sae in saes.items() if sae.reads}
    g = torch.Generator().manual_seed(22)
    seen, crossed = {}, 0
    for trial in range(600):
        if len(seen) == 4 and min(seen.values()) >= 3 and (crossed >= 3 or which == "alone"):
            break
        drawn = TA.draw_edge(pairs, fast, saes, g, trial)
        if drawn is None:
            continue
        U, Dn, frozen, t, j, up_err = drawn
        F_d = saes[Dn].n_features
        sU = st[U]
        t_u = int(torch.randint(0, t + 1, (), generator=g))
        if up_err:
            i = sU.f_c.shape[-1]
        else:
            active = torch.nonzero(sU.delta_f[:, t_u].abs().sum(0)).flatten()
            if not len(active):
                continue
            i = int(active[int(torch.randint(0, len(active), (), generator=g))])
        sae_u, sae_d = saes[U], saes[Dn]
        rows = [b for b in range(len(batch)) if sel[Dn][b, t, j]]
        layers = {int(s[-1]) for s in (Dn, *frozen) if saes[s].reads}

        def S(e):
            f, err = sU.f_c.clone(), sU.err_c.clone()
            if up_err:
                err[:, t_u] += e * sU.delta_err[:, t_u]
            else:
                f[:, t_u, i] += e * sU.delta_f[:, t_u, i]
            rec = {}
            edit = {}
            edit[U] = lambda x: sae_u.decode(f) + err + (sae_u.skip(u_c[U]) if sae_u.reads else 0)
            for fr in frozen:
                if saes[fr].reads and saes[fr].has_skip:
                    edit[fr] = lambda x, fr=fr: (clean[fr] - saes[fr].skip(u_c[fr])
                                                 + saes[fr].skip(hand_input(model, fr, saes[fr], rec)))
                else:
                    edit[fr] = lambda x, v=clean[fr]: v
            edit[Dn] = lambda x: rec.setdefault("y", x)
            for src in {mlp_reads(model, l) for l in layers}:     # record what flows out of it (after its edit)
                edit[src] = lambda x, src=src, then=edit.get(src): rec.setdefault(src, x if then is None else then(x))
            with torch.no_grad():
                model(batch.clean, edit=edit, stop_at=Dn)
                y = rec["y"]
                if sae_d.reads:
                    u = hand_input(model, Dn, sae_d, rec)
                    f_d = sae_d.encode(u)
                    err_d = y - sae_d.decode(f_d) - sae_d.skip(u)
                else:
                    f_d = sae_d.encode(y)
                    err_d = y - sae_d.decode(f_d)
                L_e = L[Dn][1]
                return sum(L[Dn][0][b, t, j] * f_d[b, t, j] if j < F_d else (L_e[b, t] * err_d[b, t]).sum()
                           for b in rows)
        fd = derivative(S, name)
        val = fast[(U, Dn)][t * (F_d + 1) + j][t_u, i]
        torch.testing.assert_close(val, fd, **FD_TOL[name], msg=lambda m: f"{U}->{Dn} {(t, j, t_u, i)}: {m}")
        torch.testing.assert_close(defn[(U, Dn)][t * (F_d + 1) + j][t_u, i], fd, **FD_TOL[name])
        if abs(fd) > 1e-5:
            if sae_u.reads or sae_d.reads:
                seen[(up_err, j == F_d)] = seen.get((up_err, j == F_d), 0) + 1
            crossed += any(saes[fr].reads and saes[fr].has_skip for fr in frozen)
    assert len(seen) == 4 and min(seen.values()) >= 3, seen
    assert crossed >= 3 or which == "alone", crossed


# --- evaluation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_evaluation_with_transcoders(name, ablation):
    """An empty circuit sets a transcoder site to its nodes' ablation value plus the skip term of the run's own
    input: mean ablation, mean over the patch inputs of decode(f) + err = y - skip(u); zero, b_dec; resample, the
    donor's y - skip(u). A circuit of every node is the unedited model."""
    model = make_model(name, 23)
    saes = make_saes(model, "alone", 24)
    batch = TA.make_batch(25, B=5, T=4)
    patch = plain(model, batch.patch)
    nodes = {s: patch[s] - sae.skip(hand_input(model, s, sae, patch)) for s, sae in saes.items()}
    if ablation == "mean":
        values = {s: v.mean(0) for s, v in nodes.items()}
    elif ablation == "zero":
        values = {s: sae.b_dec for s, sae in saes.items()}
    else:
        donors = E.resample_order(batch, seed=3)
        values = {s: v[donors] for s, v in nodes.items()}
    rec = {}
    edit = {f"resid_mid_{l}": (lambda x, l=l: rec.setdefault(l, x)) for l in range(model.cfg.n_layers)}
    for s, sae in saes.items():
        edit[s] = lambda x, s=s, sae=sae: values[s].expand_as(x) + sae.skip(hand_input(model, s, sae, {
            f"resid_mid_{s[-1]}": rec[int(s[-1])]}))
    with torch.no_grad():
        want_empty = TA.ref_logit_diff(model, batch, batch.clean, edit)
        want_full = TA.ref_logit_diff(model, batch, batch.clean, {})
    tol = tolerance(name)["atol"] * 10
    r = E.faithfulness(model, saes, batch, [], ablation=ablation, batch_size=2, seed=3)
    assert r["m_empty"] == pytest.approx(want_empty.mean().item(), abs=tol)
    assert r["m_full"] == pytest.approx(want_full.mean().item(), abs=tol)
    assert abs(r["m_full"] - r["m_empty"]) > 1e-3
    every = [{"site": s, "feature": f} for s, sae in saes.items() for f in list(range(sae.n_features)) + ["err"]]
    whole = E.faithfulness(model, saes, batch, every, ablation=ablation, batch_size=2, seed=3)
    assert whole["m_circuit"] == pytest.approx(want_full.mean().item(), abs=tol)


# --- files the libraries wrote, end to end ---------------------------------------------------------------

def test_find_circuit_with_library_transcoders(tmp_path):
    """circuit-tracer's skip transcoders at mlp_0, mlp_1 and sparsify's top-k SAE at resid_1 (tests/data) on a
    tiny Llama: node effects, edges into and out of the transcoders, and the whole circuit is the model."""
    from test_families import write_hf
    write_hf(tmp_path, "llama", num_attention_heads=2, num_key_value_heads=2, intermediate_size=12, hidden_size=8)
    model = minicirc.load_model(tmp_path, dtype=F64)
    saes = {s: d.to(F64) for s, d in load_saes(os.path.join(DATA, "ct_jumprelu_skip"), model).items()}
    saes["resid_1"] = load_saes(os.path.join(DATA, "sparsify_llama"), model)["resid_1"].to(F64)
    batch = TA.make_batch(27, B=3, T=4)
    circuit = minicirc.find_circuit(model, saes, batch, method="ig", steps=3, node_threshold=0.0, edge_threshold=0.0,
                                    progress=False)
    assert {n.site for n in circuit.kept_nodes()} >= {"mlp_0", "mlp_1"}
    assert any(u == "mlp_0" for u, _ in circuit.edges) and any(d == "mlp_1" for _, d in circuit.edges)
    every = [{"site": s, "feature": f} for s, sae in saes.items() for f in list(range(sae.n_features)) + ["err"]]
    r = E.faithfulness(model, saes, batch, every, batch_size=3)
    assert r["m_circuit"] == pytest.approx(r["m_full"], abs=1e-9)
