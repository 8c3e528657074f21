"""circuit.html: the file itself (pure Python) and the page as a browser runs it (headless Chromium).

The browser tests skip, saying why, where no Chromium is installed (scripts/install_browser.sh installs
Debian's). Circuits are random on every run; the seed is printed, and MINICIRC_TEST_SEED replays one.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from pathlib import Path

import pytest

from minicirc.viewer import render_html, write_html

sys.path.insert(0, str(Path(__file__).parent))
from browser import Browser, find_chromium  # noqa: E402

# A token that would break out of the embedded JSON or inject markup if escaping were wrong.
EVIL = "</script><script>window.__pwned=1</script><b>&amp;"


def _seed() -> int:
    seed = int(os.environ.get("MINICIRC_TEST_SEED", random.SystemRandom().randrange(10**9)))
    print(f"viewer test seed: {seed} (MINICIRC_TEST_SEED={seed} replays it)")
    return seed


def _rank(site: str) -> int:
    if site == "y":
        return 10**9
    if site == "embed":
        return 0
    kind, layer = site.split("_")
    return 1 + 3 * int(layer) + ("attn", "mlp", "resid").index(kind)


def random_circuit(rng: random.Random, n_nodes=37, n_edges=60, n_layers=2, aggregation="sum", n_pos=6,
                   with_y_node=True) -> dict:
    """A circuit.json dict with random log-uniform effects of random sign: one error node per site, the
    rest features, edges only upwards. Without `with_y_node` it looks like what Circuit.to_json writes:
    "y" only in edges, a "sites" list, and one site (mlp_0) with no kept node."""
    all_sites = ["embed"] + [f"{k}_{layer}" for layer in range(n_layers) for k in ("attn", "mlp", "resid")]
    sites = all_sites if with_y_node else [s for s in all_sites if s != "mlp_0"]
    effect = lambda: rng.choice((-1, 1)) * 10 ** rng.uniform(-4, 0)  # noqa: E731
    keys = set()
    for site in sites:  # an error node at every site
        keys.add((site, "err", rng.randrange(n_pos) if aggregation == "none" else None))
    while len(keys) < n_nodes - (1 if with_y_node else 0):
        keys.add((rng.choice(sites), rng.randrange(4096), rng.randrange(n_pos) if aggregation == "none" else None))
    nodes = []
    for site, feat, pos in sorted(keys, key=lambda k: (_rank(k[0]), str(k[1]), k[2] or 0)):
        node = {"id": f"{site}/{feat}" + (f"@{pos}" if pos is not None else ""), "site": site,
                "feature": feat, "effect": effect()}
        if pos is not None:
            node["pos"] = pos
        nodes.append(node)
    if with_y_node:
        nodes.append({"id": "y", "site": "y", "feature": None, "effect": effect()})
    ranked = [(n["id"], _rank(n["site"])) for n in nodes if n["id"] != "y"] + [("y", _rank("y"))]
    pairs = [(u, d) for u, ru in ranked for d, rd in ranked if ru < rd]
    edges = [{"source": u, "target": d, "effect": effect()} for u, d in rng.sample(pairs, min(n_edges, len(pairs)))]
    extra = {} if with_y_node else {"sites": all_sites}
    return {"version": 1, **extra,
            "settings": {"method": "ig", "steps": 10, "node_threshold": 0.1, "edge_threshold": 0.01,
                         "aggregation": aggregation, "n_examples": 40, "model": "ab" * 32, "saes": "cd" * 32},
            "metric": {"clean": 1.5, "patch": -0.5},
            "nodes": nodes, "edges": edges}


def random_contexts(rng: random.Random, circuit: dict, k=4) -> dict:
    """Contexts for a few feature nodes, keyed by feature id (without "@pos") to exercise the fallback."""
    feats = [n for n in circuit["nodes"] if n["id"] != "y" and n["feature"] != "err"]
    out = {}
    for n in rng.sample(feats, min(k, len(feats))):
        toks = ["The", " cat", " sat", " on", " the", EVIL, " mat", ".\n"]
        out[n["id"].split("@")[0]] = {
            "label": f"feature {n['feature']}",
            "contexts": [{"tokens": toks, "index": 5, "value": 3.25}, {"tokens": toks[:4], "index": 1, "value": 1.5}],
            "logits": {"promoted": [[" mat", 0.8], [" rug", 0.5]], "suppressed": [[" dog", -0.7]]},
        }
    return out


def all_ids(circuit: dict) -> set[str]:
    """Node ids the page must draw: every listed node, plus "y" when edges name it."""
    ids = {n["id"] for n in circuit["nodes"]}
    if any("y" in (e["source"], e["target"]) for e in circuit["edges"]):
        ids.add("y")
    return ids


def expected_visible(circuit: dict, threshold: float) -> tuple[set[str], set[tuple[str, str]]]:
    """The nodes and edges the slider should leave visible: |effect| >= threshold, edges also need both
    ends visible, and the metric node "y" always stays."""
    eff = {n["id"]: n["effect"] for n in circuit["nodes"]}
    nodes = {i for i in all_ids(circuit) if i == "y" or abs(eff[i]) >= threshold}
    edges = {(e["source"], e["target"]) for e in circuit["edges"]
             if e["source"] in nodes and e["target"] in nodes and abs(e["effect"]) >= threshold}
    return nodes, edges


# ---- without a browser -----------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_html_is_self_contained_and_embeds_every_node(aggregation, tmp_path):
    rng = random.Random(_seed())
    circuit = random_circuit(rng, aggregation=aggregation)
    page = render_html(circuit, random_contexts(rng, circuit))
    for node in circuit["nodes"]:
        assert json.dumps(node["id"]) in page, node["id"]
    # Nothing is fetched from anywhere: no URL at all, no external script, stylesheet or image.
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|img|iframe)[^>]*\bsrc=|<link\b|@import|url\(", page, re.I)
    # The data cannot close its <script> element, whatever its strings hold.
    assert "</script><script>window.__pwned" not in page
    assert page.count("</script>") == 2
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert f"aggregation={aggregation}" in title and "method=ig" in title
    out = write_html(circuit, tmp_path / "sub" / "circuit.html")
    assert out.read_text(encoding="utf-8") == render_html(circuit)


def test_non_finite_effects_are_embedded_as_null():
    circuit = {"nodes": [{"id": "embed/1", "site": "embed", "feature": 1, "effect": float("nan")}], "edges": []}
    data = re.search(r'id="circuit-data">(.*?)</script>', render_html(circuit), re.S).group(1)
    assert json.loads(data)["nodes"][0]["effect"] is None  # strict JSON, as JSON.parse needs


def test_rejects_a_dict_that_is_not_a_circuit():
    with pytest.raises(ValueError):
        render_html({"edges": []})


# ---- in headless Chromium --------------------------------------------------------------------------

VISIBLE_IDS = ("[...document.querySelectorAll('.node')].filter(e => getComputedStyle(e).display !== 'none')"
               ".map(e => e.dataset.id)")
VISIBLE_EDGES = ("[...document.querySelectorAll('.edge')].filter(e => getComputedStyle(e).display !== 'none')"
                 ".map(e => [e.dataset.source, e.dataset.target])")
CENTERS = ("Object.fromEntries([...document.querySelectorAll('.node')].map(e => {"
           " const r = e.querySelector('.shape').getBoundingClientRect();"
           " return [e.dataset.id, [r.x + r.width / 2, r.y + r.height / 2, r.width, r.height]]; }))")


@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found (/usr/bin/chromium): run scripts/install_browser.sh to run the "
                    "browser tests of circuit.html")
    with Browser(exe) as b:
        yield b


def load(browser: Browser, path: Path):
    browser.errors.clear()
    browser.open(path, ready="document.body.dataset.ready === '1' || !document.getElementById('errors').hidden")
    errors = browser.errors + [browser.evaluate("document.getElementById('errors').textContent")]
    assert not any(errors), f"page errors: {errors}"


def set_slider(browser: Browser, log10_value: float) -> float:
    """Move the slider as a user would (value + input event); return the threshold the page applied."""
    browser.evaluate(f"(() => {{ const s = document.getElementById('threshold'); s.value = {log10_value!r};"
                     " s.dispatchEvent(new Event('input', {bubbles: true})); })()")
    return float(browser.evaluate("document.getElementById('threshold').dataset.threshold"))


def check_slider(browser: Browser, circuit: dict):
    """At several thresholds between the effects, exactly the expected nodes and edges stay visible."""
    mags = sorted({abs(n["effect"]) for n in circuit["nodes"] if n["id"] != "y"}
                  | {abs(e["effect"]) for e in circuit["edges"]})
    # Geometric midpoints between neighbouring magnitudes: no effect sits on a threshold.
    picks = [math.sqrt(mags[int(q * (len(mags) - 1))] * mags[int(q * (len(mags) - 1)) + 1]) for q in (0.1, 0.5, 0.9)]
    for t in picks + [mags[-1] * 5]:
        applied = set_slider(browser, math.log10(t))
        lo, hi = float(browser.evaluate("threshold.min")), float(browser.evaluate("threshold.max"))
        assert math.isclose(applied, 10 ** min(max(math.log10(t), lo), hi), rel_tol=1e-9), (t, applied)
        want_nodes, want_edges = expected_visible(circuit, applied)
        got_nodes = set(browser.evaluate(VISIBLE_IDS))
        got_edges = {tuple(e) for e in browser.evaluate(VISIBLE_EDGES)}
        assert got_nodes == want_nodes, f"threshold {applied}: nodes differ"
        assert got_edges == want_edges, f"threshold {applied}: edges differ"
        counter = browser.evaluate("document.getElementById('counter').textContent")
        assert counter == f"{len(want_nodes)} nodes, {len(want_edges)} edges shown"
    # The leftmost position means no threshold at all.
    assert set_slider(browser, -1e9) == 0.0
    assert set(browser.evaluate(VISIBLE_IDS)) == all_ids(circuit)
    assert len(browser.evaluate(VISIBLE_EDGES)) == len(circuit["edges"])


def check_layout(browser: Browser, circuit: dict):
    """Layers run bottom to top, positions left to right, and no two nodes overlap."""
    centers = browser.evaluate(CENTERS)
    site = {n["id"]: n["site"] for n in circuit["nodes"]} | {"y": "y"}
    by_rank: dict[int, list[float]] = {}
    for i, (x, y, w, h) in centers.items():
        by_rank.setdefault(_rank(site[i]), []).append(y)
    ranks = sorted(by_rank)
    for lower, upper in zip(ranks, ranks[1:]):
        assert max(by_rank[upper]) < min(by_rank[lower]), f"row of rank {upper} is not above rank {lower}"
    pos = {n["id"]: n["pos"] for n in circuit["nodes"] if "pos" in n}
    if pos:
        xs: dict[int, list[float]] = {}
        for i, p in pos.items():
            xs.setdefault(p, []).append(centers[i][0])
        ps = sorted(xs)
        for a, b in zip(ps, ps[1:]):
            assert max(xs[a]) < min(xs[b]), f"position {a} is not left of position {b}"
    boxes = list(centers.values())
    for i, (x1, y1, w1, h1) in enumerate(boxes):
        assert w1 >= 5, "nodes shrank below 5 px"
        for x2, y2, w2, h2 in boxes[i + 1:]:
            assert abs(x1 - x2) * 2 >= (w1 + w2) - 0.5 or abs(y1 - y2) * 2 >= (h1 + h2) - 0.5, "nodes overlap"


@pytest.mark.parametrize("aggregation,with_y_node", [("sum", True), ("none", True), ("sum", False)])
def test_page_in_browser(browser, tmp_path, aggregation, with_y_node):
    rng = random.Random(_seed())
    circuit = random_circuit(rng, aggregation=aggregation, with_y_node=with_y_node)
    contexts = random_contexts(rng, circuit)
    path = write_html(circuit, tmp_path / "circuit.html", contexts)
    load(browser, path)

    assert f"aggregation={aggregation}" in browser.evaluate("document.title")
    ids = browser.evaluate("[...document.querySelectorAll('.node')].map(e => e.dataset.id)")
    assert len(ids) == len(all_ids(circuit)) and set(ids) == all_ids(circuit)
    assert browser.evaluate("document.querySelectorAll('.edge').length") == len(circuit["edges"])
    # Error nodes are squares, features circles.
    err_ids = {n["id"] for n in circuit["nodes"] if n["feature"] == "err"}
    squares = set(browser.evaluate("[...document.querySelectorAll('.node')].filter(e => e.querySelector('rect'))"
                                   ".map(e => e.dataset.id)"))
    assert squares == err_ids
    rows = browser.evaluate("[...document.querySelectorAll('.row-label')].map(t => t.textContent)")
    want_rows = {n["site"] for n in circuit["nodes"]} | set(circuit.get("sites", [])) | {"y"}
    assert sorted(rows) == sorted(s if s != "y" else "metric" for s in want_rows)
    check_layout(browser, circuit)
    check_slider(browser, circuit)

    # Clicking a feature with contexts pins it in the panel: site, feature, effect, the activating token
    # highlighted (as text: the hostile token must not become markup), and its logit effects.
    node_id = next(n["id"] for n in circuit["nodes"] if n["id"].split("@")[0] in contexts)
    browser.evaluate(f"document.querySelector('.node[data-id=\"{node_id}\"]')"
                     ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    panel = browser.evaluate("""(() => {
        const p = document.getElementById('panel');
        return {node: p.dataset.node, text: p.textContent,
                rows: Object.fromEntries([...p.querySelector('table').rows]
                                         .map(r => [r.cells[0].textContent, r.cells[1].textContent])),
                marks: [...p.querySelectorAll('mark')].map(m => m.textContent),
                scripts: p.querySelectorAll('script, b').length}; })()""")
    node = next(n for n in circuit["nodes"] if n["id"] == node_id)
    assert panel["node"] == node_id
    assert node["site"] in panel["text"] and str(node["feature"]) in panel["text"]
    assert panel["rows"]["site"] == node["site"] and panel["rows"]["feature"] == str(node["feature"])
    assert math.isclose(float(panel["rows"]["effect"]), node["effect"], rel_tol=6e-3)
    assert panel["marks"][0] == EVIL and panel["scripts"] == 0
    assert "promoted logits" in panel["text"] and " rug" in panel["text"] and "+3.25" in panel["text"]
    assert browser.evaluate("window.__pwned === undefined")

    # The artifact: a typical threshold, the panel still showing the node, nothing pinned.
    browser.evaluate("document.getElementById('svg').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    assert not browser.evaluate("document.querySelector('svg.focusing, .node.selected')")
    set_slider(browser, math.log10(0.01))
    shot = browser.screenshot(tmp_path / f"circuit_{aggregation}{'' if with_y_node else '_no_y'}.png")
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 5000
    assert not browser.errors, browser.errors


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_500_nodes_stay_usable(browser, tmp_path, aggregation):
    """A crowded circuit: every node drawn, none overlapping, no errors, and the slider still exact."""
    rng = random.Random(_seed())
    circuit = random_circuit(rng, n_nodes=500, n_edges=1500, n_layers=3, aggregation=aggregation, n_pos=12)
    path = write_html(circuit, tmp_path / "big.html")
    load(browser, path)
    assert browser.evaluate("document.querySelectorAll('.node').length") == len(all_ids(circuit))
    check_layout(browser, circuit)
    check_slider(browser, circuit)
    shot = browser.screenshot(tmp_path / f"big_{aggregation}.png")
    print(f"screenshot: {shot}")


@pytest.mark.parametrize("circuit", [
    {"nodes": [], "edges": []},
    {"sites": ["embed", "resid_0"], "nodes": [], "edges": []},
    {"nodes": [{"id": "resid_0/err", "site": "resid_0", "feature": "err", "effect": None},
               {"id": "weird_site/3", "site": "weird_site", "feature": 3, "effect": 0.5}],
     "edges": [{"source": "resid_0/err", "target": "y", "effect": 0.1},
               {"source": "nowhere/1", "target": "y", "effect": 0.2}]},
], ids=["empty", "empty-with-sites", "odd"])
def test_degenerate_circuits_load_cleanly(browser, tmp_path, circuit):
    """Nothing kept, a missing effect, an unknown site, an edge naming an unknown node: no script error."""
    load(browser, write_html(circuit, tmp_path / "c.html"))
    n_nodes = browser.evaluate("document.querySelectorAll('.node').length")
    assert n_nodes == len(all_ids(circuit))
    set_slider(browser, 0.0)
    assert not browser.errors, browser.errors
    assert browser.evaluate("document.getElementById('counter').textContent").endswith("edges shown")


def test_command_line_writes_beside_the_circuit(tmp_path, capsys):
    from minicirc.viewer import main
    circuit = random_circuit(random.Random(0))
    (tmp_path / "circuit.json").write_text(json.dumps(circuit))
    main([str(tmp_path / "circuit.json")])
    assert (tmp_path / "circuit.html").read_text(encoding="utf-8") == render_html(circuit)
