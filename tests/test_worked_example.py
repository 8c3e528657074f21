"""docs/method.md §14's worked example: the numbers printed there are what minicirc computes.

The fixture (weights, vocabulary, examples) is the NumPy block of §14, executed here as it is printed; the
numbers are the text block after it ("key value ..." lines). Each number is recomputed through the public
API (minicirc.find_circuit, minicirc.tokenize, the model's forward and attribution.reference) and compared to
about 1e-4 relative, so the page cannot drift from the code; the other tests check what the page says about
the numbers. After a deliberate change of the method, `python tests/test_worked_example.py` prints the
block to paste into the page.
"""
import math
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import minicirc
from minicirc.attribution import reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "method.md"
IG_STEPS = (10, 100, 1000)      # the IG columns of the example; 10 is find_circuit's default
NODES = ["embed/16", "embed/20", "embed/err", "attn_0/2", "mlp_0/4", "mlp_0/err", "resid_0/2", "resid_0/err"]
# (upstream site, downstream site, downstream node, upstream nodes): one row through LayerNorm and the MLP, one
# through the identity path with attn_0 and mlp_0 frozen, and a selected row that is all zeros.
EDGES = [("embed", "mlp_0", "mlp_0/4", ["embed/3", "embed/20", "embed/err"]),
         ("embed", "resid_0", "resid_0/2", ["embed/3", "embed/20", "embed/err"]),
         ("embed", "resid_0", "resid_0/1", ["embed/err"])]


def doc_block(marker, lang):
    """The fenced block that follows `<!-- worked-example: marker -->` in docs/method.md."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"<!-- worked-example: {marker} -->\s*```{lang}\n(.*?)\n```", text, re.S)
    assert m, f"docs/method.md has no worked-example block {marker!r}"
    return m.group(1)


def fixture():
    """(model, saes, batch) of the example, float64, from the page's NumPy block (run as printed)."""
    ns = {}
    exec(doc_block("fixture", "python"), ns)
    model = minicirc.GPTNeoX(minicirc.Config(vocab_size=ns["V"], d_model=ns["d"], n_layers=1, n_heads=ns["H"],
                                             d_mlp=ns["d_mlp"]))
    w = {k: torch.from_numpy(v) for k, v in ns["weights"].items()}
    model.load_state_dict({k: v for k, v in w.items() if not k.startswith("sae.")}, strict=True)
    model = model.double().eval()
    saes = {s: minicirc.Dictionary(*(w[f"sae.{s}.{k}"] for k in ("W_enc", "b_enc", "W_dec", "b_dec")), "relu",
                                   subtract_b_dec=True).double()
            for s in model.sites}
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(ns["vocab"])}))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    batch = minicirc.tokenize([minicirc.Example(*e) for e in ns["examples"]], tokenizer, vocab_size=ns["V"])
    return model, saes, batch


def column(saes, node):
    """("site", column of the site's node tensor) of a node name: "resid_0/2", or "resid_0/err" (column F)."""
    site, feature = node.split("/")
    return site, saes[site].n_features if feature == "err" else int(feature)


def edge_value(circuit, saes, up, down, d_node, u_node):
    rows, vals = circuit.edges[(up, down)]
    r = rows.tolist().index(column(saes, d_node)[1])
    return vals.to_dense()[r, column(saes, u_node)[1]].item()


def site_patched(model, batch, site):
    """m(clean input with `site` set to its value on the patch input), per example."""
    patch = {}
    with torch.no_grad():
        model(batch.patch, cache=patch)
        return reference.logit_diff(model, batch, batch.clean, {site: lambda x: patch[site]})


def computed():
    """{key: [numbers]} in the page's order, each line as the page prints it."""
    model, saes, batch = fixture()
    out = {}
    for name in ("clean", "patch"):
        out[f"{name}_tokens"] = getattr(batch, name).flatten().tolist()
    out["last"] = batch.last.tolist()
    out["clean_answer"], out["patch_answer"] = batch.clean_answer.tolist(), batch.patch_answer.tolist()
    with torch.no_grad():
        m_c = reference.logit_diff(model, batch, batch.clean, {})
        m_p = reference.logit_diff(model, batch, batch.patch, {})
    out["m(clean)"] = m_c.tolist() + [m_c.mean().item()]
    out["m(patch)"] = m_p.tolist() + [m_p.mean().item()]
    find = lambda method, steps=10: minicirc.find_circuit(model, saes, batch, method=method, steps=steps,
                                                          nodes_only=method == "exact", progress=False)
    circuits = {"attrib": find("attrib"), **{f"ig{n}": find("ig", n) for n in IG_STEPS}, "exact": find("exact")}
    ig = circuits["ig10"]
    assert ig.metric_values == pytest.approx({"clean": out["m(clean)"][-1], "patch": out["m(patch)"][-1]})
    for node in NODES:
        site, col = column(saes, node)
        out[node] = [circuits[k].nodes[site][col].item() for k in ("attrib", "ig10", "ig100", "ig1000", "exact")]
    for site in model.sites:
        out[f"Σ({site})"] = ([circuits[f"ig{n}"].nodes[site].sum().item() for n in IG_STEPS]
                             + [(site_patched(model, batch, site) - m_c).mean().item()])
    total = out["m(patch)"][-1] - out["m(clean)"][-1]
    for site in ("embed", "resid_0"):   # the sites every path crosses
        out[f"|Σ({site})-total|"] = [abs(v - total) for v in out[f"Σ({site})"][:-1]]
    for up, down, d_node, u_nodes in EDGES:
        for u_node in u_nodes:
            out[f"{d_node}<-{u_node}"] = [edge_value(ig, saes, up, down, d_node, u_node)]
    return out


HEADINGS = {
    "clean_tokens": "# tokens, example 0 then example 1 (right-padded with 9, the id of <pad>; no BOS)",
    "m(clean)": "# m = logit(patch_answer) - logit(clean_answer) at `last`: example 0, example 1, mean",
    NODES[0]: "# node effects, summed over positions, mean over the 2 examples\n"
              "#                       attrib        ig 10       ig 100      ig 1000        exact",
    "Σ(embed)": "# sum of a site's node effects (features + error), ig 10, 100, 1000 steps;\n"
                "# last: m(clean with the site set to its patch value) - m(clean)",
    "|Σ(embed)-total|": "# |sum - total effect m(patch) - m(clean)|, ig 10, 100, 1000 steps",
    f"{EDGES[0][2]}<-{EDGES[0][3][0]}": "# edges (ig 10 steps, node threshold 0.1, sum): downstream <- upstream",
}


def block(values):
    """The numbers block of the page, from computed()."""
    lines = []
    for key, vals in values.items():
        if key in HEADINGS:
            lines.append(HEADINGS[key])
        if all(isinstance(v, int) for v in vals):
            lines.append(f"{key:<22}" + " ".join(f"{v:>2}" for v in vals))
        else:
            lines.append(f"{key:<22}" + " ".join(f"{v:>12.6g}" for v in vals))
    return "\n".join(lines)


def parse(text):
    """{key: [numbers]} from the page's block: '#' lines are headings; on other lines the first word is the key
    and every later word that reads as a number is a value."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        vals = []
        for w in words[1:]:
            try:
                vals.append(float(w))
            except ValueError:
                pass
        out[words[0]] = vals
    return out


@pytest.fixture(scope="module")
def numbers():
    return computed()


@pytest.fixture(scope="module")
def example():
    return fixture()


def test_page_prints_what_minicirc_computes(numbers):
    page = parse(doc_block("numbers", "text"))
    assert list(page) == list(numbers), "the page's keys differ from the computed ones"
    for key, vals in numbers.items():
        assert len(page[key]) == len(vals), key
        for printed, value in zip(page[key], vals):
            assert math.isclose(printed, value, rel_tol=1e-4, abs_tol=1e-7), (key, printed, value)


def test_ig_sums_approach_the_site_patch(numbers):
    """The example's claim: a site's IG effects sum to m(site patched) - m(clean) up to the Riemann sum's
    error, which shrinks about as 1/steps; at embed and resid_0 (every path crosses them) that is the total
    effect m(patch) - m(clean)."""
    total = numbers["m(patch)"][-1] - numbers["m(clean)"][-1]
    for site in ("embed", "attn_0", "mlp_0", "resid_0"):
        *ig, target = numbers[f"Σ({site})"]
        errors = [abs(v - target) for v in ig]
        assert errors[1] < 0.2 * errors[0] and errors[2] < 0.2 * errors[1] and errors[2] < 2e-3, (site, ig, target)
        if site in ("embed", "resid_0"):
            assert target == pytest.approx(total, rel=1e-9, abs=1e-12)
    # the page: with 10 steps (find_circuit's default) the gap at embed exceeds the total effect itself
    assert numbers["|Σ(embed)-total|"][0] > abs(total)


def per_example(model, saes, batch, steps=10):
    """The definitions on one Batch: (states, IG gradients dm/dx per site, IG node effects (B, T, F + 1))."""
    sites = reference.site_order(model, saes)
    _, _, states = reference.site_states(model, saes, reference.logit_diff, batch, sites)
    g = reference.ig_gradients(model, saes, reference.logit_diff, batch, states, steps)
    effects = {s: reference.effects_from_gradients(*g[s], states[s]) for s in sites}
    return states, {s: g_err for s, (_, g_err) in g.items()}, effects


def test_padding_and_unchanged_nodes(example):
    """Per example, before aggregation (attribution.reference): every method gives 0 at example 1's padded
    positions; position 0 holds the same token ("the") in clean and patch, so its features, active there,
    are unchanged, their effects 0, and at node threshold 0 no downstream node at position 0 gets edges."""
    model, saes, batch = example
    states, grads, ig = per_example(model, saes, batch)
    effects = {"attrib": reference.attrib_effects(model, saes, reference.logit_diff, batch, states), "ig": ig,
               "exact": reference.exact_effects(model, saes, reference.logit_diff, batch, states)}
    n = int(batch.last[1]) + 1
    for method, eff in effects.items():
        for s, st in states.items():
            assert (eff[s][1, n:].abs() < 1e-12).all(), (method, s)
            assert (st.f_c[:, 0] != 0).any() and (st.delta_f[:, 0] == 0).all() and (st.delta_err[:, 0] == 0).all()
            assert (eff[s][:, 0].abs() < 1e-12).all(), (method, s)
    edges = reference.edge_effects(model, saes, batch, states, grads, ig, 0.0, aggregation="none")
    assert edges
    for (u, d), (rows, _) in edges.items():
        assert (rows // (saes[d].n_features + 1) != 0).all(), (u, d, rows)


def test_summed_edges_divide_by_every_example(example, numbers):
    """A circuit's edge row is its sum over the examples where the downstream node was selected, divided by
    all the examples (2): the definition run on each example alone, summed, halved. mlp_0/4 is selected in
    example 1 only (|IE| > 0.1 at some position there, at none in example 0); resid_0/1 is selected in
    example 1 only, where it is inactive on the clean input, so its edges are 0."""
    model, saes, batch = example
    total, selected = {}, {}
    for b in range(len(batch)):
        one = batch[b:b + 1]
        states, grads, eff = per_example(model, saes, one)
        for node in ("mlp_0/4", "resid_0/1"):
            site, col = column(saes, node)
            chosen = eff[site][0, :, col].abs() > 0.1
            selected.setdefault(node, []).append(bool(chosen.any()))
            if node == "resid_0/1":
                assert (states[site].f_c[0, chosen, col] == 0).all()
        for pair, (rows, vals) in reference.edge_effects(model, saes, one, states, grads, eff, 0.1).items():
            for r, v in zip(rows.tolist(), vals):
                total[(pair, r)] = total[(pair, r)] + v if (pair, r) in total else v
    assert selected == {"mlp_0/4": [False, True], "resid_0/1": [False, True]}
    for up, down, d_node, u_nodes in EDGES:
        r = column(saes, d_node)[1]
        for u_node in u_nodes:
            value = total[((up, down), r)][column(saes, u_node)[1]].item() / len(batch)
            assert value == pytest.approx(numbers[f"{d_node}<-{u_node}"][0], rel=1e-6, abs=1e-12), (d_node, u_node)
    assert numbers["resid_0/1<-embed/err"] == [0.0]


def test_identity_edge_by_hand(example, numbers):
    """resid_0/2 <- embed from §14's formulas with no autograd: with attn_0 and mlp_0 frozen, resid_0 =
    embed + attn_0 + mlp_0 passes the cotangent v unchanged (G = v), so for each selected (b, t)
    e[j] = (v[b, t] . W_dec_embed[j]) * delta_f_embed[b, t, j], v[b, t] = (g[b, t] . W_dec[2]) W_enc[:, 2]
    where feature 2 is active on the clean input; summed and divided by the 2 examples."""
    model, saes, batch = example
    states, grads, eff = per_example(model, saes, batch)
    D, U = saes["resid_0"], saes["embed"]
    up = states["embed"]
    edge = torch.zeros(U.n_features + 1, dtype=torch.float64)
    for b, t in torch.nonzero(eff["resid_0"][:, :, 2].abs() > 0.1).tolist():
        if states["resid_0"].f_c[b, t, 2] == 0:
            continue
        v = (grads["resid_0"][b, t] @ D.W_dec[2]) * D.W_enc[:, 2]
        edge[:-1] += (U.W_dec @ v) * up.delta_f[b, t]
        edge[-1] += v @ up.delta_err[b, t]
    edge /= len(batch)
    for u_node in EDGES[1][3]:
        assert edge[column(saes, u_node)[1]].item() == pytest.approx(numbers[f"resid_0/2<-{u_node}"][0], rel=1e-6)


if __name__ == "__main__":
    torch.set_num_threads(1)        # as tests/conftest.py sets it for the tests
    print(block(computed()))
