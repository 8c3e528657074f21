"""circuit.html: the file itself (pure Python) and the page as a browser runs it (headless Chromium).

The browser tests skip, saying why, where no Chromium is installed (scripts/install_browser.sh installs
Debian's). Circuits are random, drawn from the session seed (tests/conftest.py: fixed by default,
MINICIRC_TEST_SEED=<int> or =random to vary it).
"""
from __future__ import annotations

import json
import math
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
# A short label as explain.context_label would make it from a hostile token.
HOSTILE_LABEL = '"</script><b>" 40%'


def _seed() -> int:
    # `random` is seeded before every test from the session seed and the test's name (tests/conftest.py),
    # so this draw is fixed by default and MINICIRC_TEST_SEED replays or varies it.
    seed = random.randrange(10**9)
    print(f"viewer circuit seed: {seed}")
    return seed


def _rank(site: str) -> int:
    if site == "y":
        return 10**9
    if site == "embed":
        return 0
    kind, layer = site.rsplit("_", 1)
    return 1 + 6 * int(layer) + ("z", "attn", "resid_mid", "mlp_hidden", "mlp", "resid").index(kind)


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
    chosen = rng.sample(pairs, min(n_edges, len(pairs)))
    if chosen and not any(d == "y" for _, d in chosen):   # as in a real circuit, something reaches the metric
        chosen[0] = rng.choice([p for p in pairs if p[1] == "y"])
    edges = [{"source": u, "target": d, "effect": effect()} for u, d in chosen]
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
        long = [f" w{i}" for i in range(40)]
        out[n["id"].split("@")[0]] = {
            "label": f"feature {n['feature']}",
            "contexts": [{"tokens": toks, "index": 5, "value": 3.25}, {"tokens": toks[:4], "index": 1, "value": 1.5},
                         {"tokens": long, "index": 25, "value": -0.5}],
            "logits": {"promoted": [[" mat", 0.8], [" rug", 0.5]], "suppressed": [[" dog", -0.7]]},
        }
    return out


def all_ids(circuit: dict) -> set[str]:
    """Node ids the page must draw: every listed node, plus "y" when edges name it."""
    ids = {n["id"] for n in circuit["nodes"]}
    if any("y" in (e["source"], e["target"]) for e in circuit.get("edges", [])):
        ids.add("y")
    return ids


def expected_visible(circuit: dict, threshold: float) -> tuple[set[str], set[tuple[str, str]]]:
    """The nodes and edges the slider should leave visible: |effect| >= threshold, edges also need both
    ends visible, and the metric node "y" always stays."""
    eff = {}
    for n in circuit["nodes"]:
        eff.setdefault(n["id"], n["effect"])     # a repeated id: the page keeps the first
    nodes = {i for i in all_ids(circuit) if i == "y" or abs(eff[i] or 0) >= threshold}
    edges = {(e["source"], e["target"]) for e in circuit["edges"]
             if e["source"] in nodes and e["target"] in nodes and abs(e["effect"]) >= threshold}
    return nodes, edges


def js_fmt(v) -> str:
    """How the page prints a number: sign always, 3 significant digits in [1e-3, 1e3), else x.xxe±n (what
    JavaScript's toPrecision(3) / toExponential(2) write, done with Python's formatting)."""
    if not isinstance(v, (int, float)):
        return "—"
    if 1e-3 <= abs(v) < 1e3:
        s = f"{v:#.3g}"
        s = s[:-1] if s.endswith(".") else s
    else:
        s = f"{v:.2e}"
    return ("+" if v >= 0 else "") + re.sub(r"e([+-])0*(\d)", r"e\1\2", s)


def embedded_data(page: str) -> str:
    return re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', page, re.S).group(1)


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


@pytest.mark.parametrize("bad", [{"edges": []}, {"nodes": {"embed/1": 0.5}, "edges": []}, {"nodes": None},
                                 [{"id": "embed/1"}], "circuit.json"], ids=["no-nodes", "nodes-dict", "nodes-none",
                                                                            "a-list", "a-string"])
def test_rejects_a_dict_that_is_not_a_circuit(bad):
    with pytest.raises(ValueError, match="circuit.json dict with a 'nodes' list"):
        render_html(bad)


def test_embedded_data_round_trips_and_cannot_be_read_as_markup():
    """Whatever its strings hold (markup, comment openers, the page's own placeholder names, line separators),
    the embedded JSON holds no '<', '>', '&' or U+2028/9 character, and parses back to exactly the circuit and
    contexts given."""
    rng = random.Random(_seed())
    circuit = random_circuit(rng, aggregation=rng.choice(["sum", "none"]), with_y_node=rng.random() < 0.5)
    contexts = random_contexts(rng, circuit)
    hostile = ["<!--<script ", "__DATA__", "__JS__", "__CSS__", "__TITLE__", "a\u2028b\u2029c", EVIL, "&lt;", "é✓"]
    rng.shuffle(hostile)
    key = next(iter(contexts))
    contexts[key]["contexts"].append({"tokens": hostile, "index": rng.randrange(len(hostile)), "value": 0.25})
    contexts[key]["label"] = rng.choice(hostile)
    page = render_html(circuit, contexts)
    data = embedded_data(page)
    for ch in "<>&\u2028\u2029":
        assert ch not in data, repr(ch)
    got = json.loads(data)
    assert got["nodes"] == circuit["nodes"] and got["edges"] == circuit["edges"]
    assert got["contexts"] == contexts and got["metric"] == circuit["metric"]
    assert got["sites"] == circuit.get("sites", [])
    # Every placeholder of the template was filled, once, outside the data.
    rest = page.replace(data, "")
    assert not re.search(r"__[A-Z]+__", rest)
    assert rest.count("<script") == 2 and rest.count("</script>") == 2


def test_title_shows_every_setting_escaped_and_long_strings_cut():
    """Settings appear as key=value in the tab title and the header; strings longer than 16 characters are cut
    to their first 10 and an ellipsis; markup in a setting stays text."""
    import html as html_lib
    rng = random.Random(_seed())
    alphabet = "0123456789abcdef"
    settings = {"markup": "<b>&x</b>", "steps": rng.randrange(1, 100), "threshold": rng.random()}
    for n in (16, 17, rng.randrange(1, 16), rng.randrange(18, 80)):
        settings[f"hash{n}"] = "".join(rng.choice(alphabet) for _ in range(n))
    keys = list(settings)
    rng.shuffle(keys)
    circuit = {"settings": {k: settings[k] for k in keys}, "nodes": [], "edges": []}
    page = render_html(circuit)
    raw_title = re.search(r"<title>(.*?)</title>", page).group(1)
    raw_header = re.search(r'<div class="title">(.*?)</div>', page).group(1)
    assert raw_title == raw_header
    assert "<b>" not in raw_title and "</b>" not in raw_title
    title = html_lib.unescape(raw_title)
    for k, v in settings.items():
        if isinstance(v, str) and len(v) > 16:
            assert f"{k}={v[:10]}…" in title and v[:11] not in title, (k, v, title)
        else:
            assert f"{k}={v}," in title + ",", (k, v, title)
    # Without settings there is nothing to list: no dangling separator.
    bare = html_lib.unescape(re.search(r"<title>(.*?)</title>", render_html({"nodes": []})).group(1))
    assert bare.strip() and not bare.rstrip().endswith(("—", "-", ","))


# ---- in headless Chromium --------------------------------------------------------------------------

PANEL = """(() => {
    const p = document.getElementById('panel');
    const tables = {};
    for (const h of p.querySelectorAll('h3')) {
      const t = h.nextElementSibling;
      if (t && t.tagName === 'TABLE') tables[h.textContent] = [...t.rows].map(r => [...r.cells].map(c => c.textContent));
    }
    const first = p.querySelector('table');
    return {node: p.dataset.node, text: p.textContent, tables,
            rows: first ? Object.fromEntries([...first.rows].map(r => [r.cells[0].textContent, r.cells[1].textContent])) : {},
            label: (p.querySelector('p.label') || {}).textContent || null,
            hint: !!p.querySelector('p.hint'),
            ctx: [...p.querySelectorAll('.ctx')].map(d => ({value: d.firstChild.textContent,
                    text: [...d.childNodes].slice(1).map(c => c.textContent).join(''),
                    marks: [...d.querySelectorAll('mark')].map(m => m.textContent)})),
            marks: [...p.querySelectorAll('mark')].map(m => m.textContent),
            scripts: p.querySelectorAll('script, b').length}; })()"""
FOCUSED = "[...document.querySelectorAll('.edge.focus')].map(e => [e.dataset.source, e.dataset.target])"


def node_event(browser: Browser, node_id: str, kind: str):
    browser.evaluate(f"document.querySelector('.node[data-id=\"{node_id}\"]')"
                     f".dispatchEvent(new MouseEvent('{kind}', {{bubbles: {'true' if kind == 'click' else 'false'}}}))")


def rgb(colour: str) -> tuple[int, ...]:
    if colour.startswith("#"):
        return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return tuple(int(v) for v in re.findall(r"\d+", colour))


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
    lo, hi = float(browser.evaluate("threshold.min")), float(browser.evaluate("threshold.max"))
    assert 10 ** lo < mags[0] and 10 ** hi > mags[-1], "the slider cannot reach every effect"
    for t in picks + [mags[-1] * 5]:
        applied = set_slider(browser, math.log10(t))
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


def short_label(node: dict, contexts: dict) -> str | None:
    """The label a feature node shows under its index: its own, else its contexts entry's (a positional id
    falling back to its feature's); none for the error node."""
    if node["feature"] == "err" or node["id"] == "y":
        return None
    entry = contexts.get(node["id"]) or contexts.get(node["id"].split("@")[0]) or {}
    label = node.get("label") or entry.get("label")
    return str(label).replace("\n", "↵") if label else None


def check_layout(browser: Browser, circuit: dict, contexts: dict | None = None):
    """Layers run bottom to top, positions left to right, and no two nodes overlap; under a node its index,
    then its short label (whole, or cut with an ellipsis), no two texts overlapping."""
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
    # Inside a row (and a position), read line by line: features by number, the error node last.
    cells: dict[tuple, list] = {}
    for n in circuit["nodes"]:
        if n["id"] != "y":
            cells.setdefault((n["site"], n.get("pos")), []).append(n)
    for key, members in cells.items():
        drawn = [n["id"] for n in sorted(members, key=lambda n: (round(centers[n["id"]][1]), centers[n["id"]][0]))]
        want = [n["id"] for n in sorted(members, key=lambda n: (n["feature"] == "err",
                                                                  -1 if n["feature"] == "err" else n["feature"]))]
        assert drawn == want, f"cell {key}: nodes out of order"
    # Labels under nodes name the feature ("err" for the error), then give its short label, and never
    # overlap one another.
    texts = browser.evaluate("[...document.querySelectorAll('.node:not(.metric)')].flatMap(g => "
                             "[...g.querySelectorAll(':scope > text')].map(t => { const r = t.getBoundingClientRect();"
                             " return [g.dataset.id, t.textContent, t.getAttribute('class'), r.x, r.y, r.width, r.height]; }))")
    node = {}
    for n in circuit["nodes"]:
        node.setdefault(n["id"], n)                 # a repeated id: the page keeps the first
    labels = [t[:2] + t[3:] for t in texts if t[2] is None]
    short = {t[0]: t[1] for t in texts if t[2] == "flabel"}
    assert len(short) == sum(t[2] == "flabel" for t in texts) and {t[2] for t in texts} <= {None, "flabel"}
    for i, text, *_ in labels:
        assert text == str(node[i]["feature"]), (i, text)
    want = {i: short_label(node[i], contexts or {}) for i, *_ in labels}
    assert set(short) == {i for i, w in want.items() if w}, "a labelled node without its short label, or the reverse"
    for i, text in short.items():
        assert text == want[i] or (text.endswith("…") and len(text) > 1 and want[i].startswith(text[:-1])), (i, text)
    labels += [t[:2] + t[3:] for t in texts if t[2] == "flabel"]
    for j, (_, _, x1, y1, w1, h1) in enumerate(labels):
        for _, _, x2, y2, w2, h2 in labels[j + 1:]:
            assert x1 + w1 <= x2 + 0.5 or x2 + w2 <= x1 + 0.5 or y1 + h1 <= y2 + 0.5 or y2 + h2 <= y1 + 0.5, \
                "labels overlap"
    return labels, short


@pytest.mark.parametrize("aggregation,with_y_node", [("sum", True), ("none", True), ("sum", False)])
def test_page_in_browser(browser, tmp_path, aggregation, with_y_node):
    rng = random.Random(_seed())
    circuit = random_circuit(rng, aggregation=aggregation, with_y_node=with_y_node)
    if with_y_node:   # the metric's own effect, far above every node's, must not set the colour scale
        next(n for n in circuit["nodes"] if n["id"] == "y")["effect"] = 10 * max(abs(n["effect"]) for n in circuit["nodes"])
    contexts = random_contexts(rng, circuit)
    if aggregation == "none":   # an entry for the exact positional id wins over its feature's
        exact = [n["id"] for n in circuit["nodes"] if n["id"].split("@")[0] in contexts][-1]   # not node_id below
        contexts[exact] = {"label": f"only at {exact}", "contexts": [{"tokens": [" at", EVIL], "index": 1, "value": 2.5}],
                           "logits": {"promoted": [[" here", 0.25]], "suppressed": []}}
    # A hostile short label on an entry whose panel is not checked below (neither the first node's nor `exact`).
    entry_of = [n["id"].split("@")[0] for n in circuit["nodes"] if n["id"].split("@")[0] in contexts]
    hostile = next(n["id"] for n in circuit["nodes"] if n["id"].split("@")[0] in contexts
                   and n["id"].split("@")[0] != entry_of[0] and ("@" not in n["id"] or n["id"] not in contexts))
    contexts[hostile.split("@")[0]]["label"] = HOSTILE_LABEL
    path = write_html(circuit, tmp_path / "circuit.html", contexts)
    load(browser, path)
    # As loaded: no threshold, everything shown.
    assert float(browser.evaluate("document.getElementById('threshold').dataset.threshold")) == 0
    assert "all" in browser.evaluate("document.getElementById('threshold-value').textContent")
    assert set(browser.evaluate(VISIBLE_IDS)) == all_ids(circuit)
    assert len(browser.evaluate(VISIBLE_EDGES)) == len(circuit["edges"])
    check_colours(browser, circuit)

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
    labels, short = check_layout(browser, circuit, contexts)
    if aggregation == "sum":    # few nodes per row: every one is labelled, and short labels fit whole
        assert {i for i, *_ in labels} == {n["id"] for n in circuit["nodes"] if n["id"] != "y"}
        assert short and all(text == short_label(next(n for n in circuit["nodes"] if n["id"] == i), contexts)
                             for i, text in short.items() if i != hostile)
    # The hostile label is text under its node (whole or cut), never markup.
    assert hostile not in short or HOSTILE_LABEL.startswith(short[hostile].rstrip("…"))
    assert browser.evaluate("document.querySelectorAll('#svg b, #svg script, text.flabel *').length") == 0
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
    assert "promoted logits" in panel["text"]     # each context and logit row: check_panel
    assert browser.evaluate("window.__pwned === undefined")
    check_panel(browser, circuit, contexts, node_id)
    if aggregation == "none":
        assert node_id not in contexts       # its panel came from its feature's entry
        node_event(browser, exact, "click")
        check_panel(browser, circuit, contexts, exact)
    check_interaction(browser, circuit, contexts, rng)

    # The artifact: a typical threshold, the panel still showing the node, nothing pinned.
    browser.evaluate("document.getElementById('svg').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    assert not browser.evaluate("document.querySelector('svg.focusing, .node.selected')")
    set_slider(browser, math.log10(0.01))
    shot = browser.screenshot(tmp_path / f"circuit_{aggregation}{'' if with_y_node else '_no_y'}.png")
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 5000
    assert not browser.errors, browser.errors


def check_colours(browser: Browser, circuit: dict):
    """Node fill: the legend's blue for a positive effect, its red for a negative one, paler as |effect| falls
    (full colour at the largest node); edges in the sign's full colour, wider as |effect| grows."""
    legend = [rgb(c) for c in browser.evaluate("[...document.querySelectorAll('.legend circle')]"
                                               ".map(c => c.getAttribute('fill'))")[:2]]   # + effect, − effect
    colour = {1: legend[0], -1: legend[1]}
    fills = browser.evaluate("Object.fromEntries([...document.querySelectorAll('.node:not(.metric)')].map(g => "
                             "[g.dataset.id, g.querySelector('.shape').getAttribute('fill')]))")
    nodes = sorted((n for n in circuit["nodes"] if n["id"] != "y"), key=lambda n: abs(n["effect"]))
    strength = []
    for n in nodes:
        full, got = colour[1 if n["effect"] >= 0 else -1], rgb(fills[n["id"]])
        c = max(range(3), key=lambda k: 255 - full[k])                 # the channel with the widest range
        t = (255 - got[c]) / (255 - full[c])                            # 0 = white, 1 = the full colour
        for k in range(3):
            assert abs(got[k] - (255 + (full[k] - 255) * t)) <= 1.01, (n["id"], got, full)
        strength.append(t)
    assert rgb(fills[nodes[-1]["id"]]) == colour[1 if nodes[-1]["effect"] >= 0 else -1]
    assert all(b >= a - 0.02 for a, b in zip(strength, strength[1:])), "fill is not monotone in |effect|"
    assert strength[-1] - strength[0] > 0.2
    strokes = browser.evaluate("[...document.querySelectorAll('.edge')].map(e => [e.dataset.source, e.dataset.target,"
                               " e.getAttribute('stroke'), Number(e.getAttribute('stroke-width'))])")
    eff = {(e["source"], e["target"]): e["effect"] for e in circuit["edges"]}
    ranked = sorted(strokes, key=lambda r: abs(eff[(r[0], r[1])]))
    for s_, t_, stroke, _ in ranked:
        assert rgb(stroke) == colour[1 if eff[(s_, t_)] >= 0 else -1], (s_, t_, stroke)
    widths = [w for *_, w in ranked]
    assert all(b >= a for a, b in zip(widths, widths[1:])) and widths[-1] - widths[0] > 1, widths


def check_panel(browser: Browser, circuit: dict, contexts: dict, node_id: str):
    """The pinned node's panel against circuit.json and its contexts entry: label, every context (the
    activating token marked, short ones whole, long ones a window with ellipses, newlines as ↵), both logit
    tables, the position, and the strongest neighbours."""
    node = next(n for n in circuit["nodes"] if n["id"] == node_id)
    info = contexts.get(node_id) or contexts[node_id.split("@")[0]]
    panel = browser.evaluate(PANEL)
    assert panel["label"] == info["label"] and not panel["hint"]
    assert panel["rows"]["effect"] == js_fmt(node["effect"])
    if "pos" in node:
        assert panel["rows"]["position"] == str(node["pos"])
    else:
        assert "position" not in panel["rows"]
    assert len(panel["ctx"]) == len(info["contexts"])
    for shown, c in zip(panel["ctx"], info["contexts"]):
        toks = [t.replace("\n", "↵") for t in c["tokens"]]
        assert shown["value"] == js_fmt(c["value"]) and shown["marks"] == [toks[c["index"]]]
        if len(toks) <= 12:
            assert shown["text"] == "".join(toks)
        else:
            assert shown["text"].startswith("…") and shown["text"].endswith("…")
            inner = shown["text"][1:-1]
            assert inner in "".join(toks) and inner != "".join(toks) and toks[c["index"]] in inner
    for kind in ("promoted", "suppressed"):
        want = [[t.replace("\n", "↵"), js_fmt(v)] for t, v in info["logits"][kind]]
        assert panel["tables"].get(f"{kind} logits", []) == want
    check_neighbours(panel, circuit, node_id)


def check_neighbours(panel: dict, circuit: dict, node_id: str):
    """Strongest inputs / outputs: the node's (at most 8) edges of largest |effect|, largest first."""
    for title, end, other in (("Strongest inputs", "target", "source"), ("Strongest outputs", "source", "target")):
        mine = sorted((e for e in circuit["edges"] if e[end] == node_id), key=lambda e: -abs(e["effect"]))[:8]
        if mine:
            assert panel["tables"][title] == [[e[other], js_fmt(e["effect"])] for e in mine], title
        else:
            assert title not in panel["tables"]


def check_interaction(browser: Browser, circuit: dict, contexts: dict, rng: random.Random):
    """Pinning focuses the node's edges; a second click unpins; hovering shows a node only while none is pinned;
    the metric node lists the metric; a node without contexts says so."""
    incident = lambda i: {(e["source"], e["target"]) for e in circuit["edges"] if i in (e["source"], e["target"])}  # noqa: E731
    ids = sorted(all_ids(circuit))
    busiest = max((i for i in ids if i != "y"), key=lambda i: len(incident(i)))
    browser.evaluate("document.getElementById('svg').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    node_event(browser, busiest, "click")
    assert {tuple(e) for e in browser.evaluate(FOCUSED)} == incident(busiest)
    assert browser.evaluate("document.querySelector('.node.selected').dataset.id") == busiest
    panel = browser.evaluate(PANEL)
    check_neighbours(panel, circuit, busiest)
    assert panel["hint"] == (busiest.split("@")[0] not in contexts)
    other = rng.choice([i for i in ids if i != busiest])
    node_event(browser, other, "mouseenter")
    assert browser.evaluate(PANEL)["node"] == busiest, "hovering replaced the pinned node"
    node_event(browser, other, "click")          # pinning another moves the selection
    assert browser.evaluate("[...document.querySelectorAll('.node.selected')].map(g => g.dataset.id)") == [other]
    node_event(browser, other, "click")          # a second click unpins
    assert not browser.evaluate("document.querySelector('svg.focusing, .node.selected')")
    node_event(browser, busiest, "mouseenter")
    assert browser.evaluate(PANEL)["node"] == busiest
    assert {tuple(e) for e in browser.evaluate(FOCUSED)} == incident(busiest)
    node_event(browser, busiest, "mouseleave")
    assert not browser.evaluate(FOCUSED)
    node_event(browser, "y", "mouseenter")
    panel = browser.evaluate(PANEL)
    assert panel["node"] == "y" and not panel["hint"]
    for k, v in circuit["metric"].items():
        assert panel["rows"][f"metric {k}"] == js_fmt(v)
    check_neighbours(panel, circuit, "y")
    node_event(browser, "y", "mouseleave")


def test_hand_built_circuit_ids_sites_ties_and_unknown_edges(browser, tmp_path):
    """Site and feature read from an id when not given, a repeated id drawn once (the first), an unknown site
    between the known ones and the metric, edges naming unknown nodes counted, and effects exactly at the
    threshold kept (|effect| >= threshold)."""
    rng = random.Random(_seed())
    small = lambda: rng.choice((-1, 1)) * 10 ** rng.uniform(-3, -0.3)  # noqa: E731
    big = lambda: rng.choice((-1, 1)) * 10 ** rng.uniform(0.3, 1)  # noqa: E731
    f1, f2, f3 = rng.sample(range(4096), 3)
    nodes = [{"id": f"embed/{f1}", "effect": 1.0},
             {"id": "resid_0/err", "effect": -1.0},
             {"id": f"resid_0/{f2}", "site": "resid_0", "feature": f2, "effect": small()},
             {"id": f"resid_0/{f2}", "site": "resid_0", "feature": f2, "effect": big()},
             {"id": f"mystery/{f3}", "site": "mystery", "feature": f3, "effect": big()},
             {"id": f"embed/{f3}", "site": "embed", "feature": f3, "effect": 0.0}]
    edges = [{"source": f"embed/{f1}", "target": "resid_0/err", "effect": rng.choice((-1.0, 1.0))},
             {"source": f"embed/{f1}", "target": f"resid_0/{f2}", "effect": big()},
             {"source": "resid_0/err", "target": "y", "effect": small()},
             {"source": "resid_0/err", "target": f"mystery/{f3}", "effect": 1.0},
             {"source": f"mystery/{f3}", "target": "y", "effect": big()},
             {"source": "ghost/1", "target": "y", "effect": big()},
             {"source": f"embed/{f1}", "target": "nowhere/2", "effect": small()}]
    nodes[2]["label"] = "named in circuit.json"     # a node's own label wins over its contexts' label
    contexts = {f"resid_0/{f2}": {"label": "named in contexts", "contexts": []},
                f"mystery/{f3}": {"label": "named in contexts", "contexts": []}}
    circuit = {"nodes": nodes, "edges": edges, "metric": {"clean": small()}}
    load(browser, write_html(circuit, tmp_path / "c.html", contexts))
    ids = all_ids(circuit)
    known = [e for e in edges if e["source"] in ids and e["target"] in ids]
    assert sorted(browser.evaluate("[...document.querySelectorAll('.node')].map(e => e.dataset.id)")) == sorted(ids)
    assert browser.evaluate("[...document.querySelectorAll('.node')].filter(e => e.querySelector('rect'))"
                            ".map(e => e.dataset.id)") == ["resid_0/err"]
    rows = browser.evaluate("[...document.querySelectorAll('.row-label')].map(t => [t.textContent, t.getBoundingClientRect().y])")
    assert [r for r, _ in sorted(rows, key=lambda r: r[1])] == ["metric", "mystery", "resid_0", "embed"]
    totals = browser.evaluate("document.getElementById('totals').textContent")
    assert [int(v) for v in re.findall(r"\d+", totals)] == [len(ids), len(known), len(edges) - len(known)], totals
    applied = set_slider(browser, 0.0)
    assert applied == 1.0
    want_nodes, want_edges = expected_visible(circuit, 1.0)
    assert set(browser.evaluate(VISIBLE_IDS)) == want_nodes
    assert {tuple(e) for e in browser.evaluate(VISIBLE_EDGES)} == want_edges
    assert {f"embed/{f1}", "resid_0/err"} <= want_nodes and (f"embed/{f1}", "resid_0/err") in want_edges
    node_event(browser, f"embed/{f1}", "click")
    panel = browser.evaluate(PANEL)
    assert panel["rows"]["site"] == "embed" and panel["rows"]["feature"] == str(f1) and panel["hint"]
    assert panel["rows"]["effect"] == js_fmt(1.0)
    node_event(browser, f"resid_0/{f2}", "click")
    panel = browser.evaluate(PANEL)
    assert panel["rows"]["effect"] == js_fmt(nodes[2]["effect"]) and panel["label"] == "named in circuit.json"
    node_event(browser, f"mystery/{f3}", "click")
    assert browser.evaluate(PANEL)["label"] == "named in contexts"
    # Under the node the same label as in the panel (cut to the spacing); none under the error node.
    short = dict(browser.evaluate("[...document.querySelectorAll('.node')].flatMap(g => "
                                  "[...g.querySelectorAll('text.flabel')].map(t => [g.dataset.id, t.textContent]))"))
    assert set(short) == {f"resid_0/{f2}", f"mystery/{f3}"}
    for i, want in ((f"resid_0/{f2}", "named in circuit.json"), (f"mystery/{f3}", "named in contexts")):
        assert short[i] == want or (short[i].endswith("…") and want.startswith(short[i][:-1])), (i, short[i])
    node_event(browser, f"embed/{f3}", "click")
    assert browser.evaluate(PANEL)["rows"]["effect"] == js_fmt(0.0)
    assert not browser.errors, browser.errors


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_500_nodes_stay_usable(browser, tmp_path, aggregation):
    """A crowded circuit: every node drawn, none overlapping, short labels cut to fit, no errors, and the
    slider still exact."""
    rng = random.Random(_seed())
    circuit = random_circuit(rng, n_nodes=500, n_edges=1500, n_layers=3, aggregation=aggregation, n_pos=12)
    hub = rng.choice([n for n in circuit["nodes"] if n["site"] == "embed"])["id"]   # a node with 12+ outputs
    linked = {e["target"] for e in circuit["edges"] if e["source"] == hub}
    for target in rng.sample([n["id"] for n in circuit["nodes"] if n["site"] != "embed" and n["id"] not in linked], 12):
        circuit["edges"].append({"source": hub, "target": target, "effect": rng.choice((-1, 1)) * 10 ** rng.uniform(-4, 0)})
    # Short labels on most features, some far wider than the spacing: each is cut to fit.
    words = ['"the" 80%', '→"are"', HOSTILE_LABEL, '"internationalization" 100%', "plural nouns after a verb"]
    contexts = {n["id"].split("@")[0]: {"label": rng.choice(words)} for n in circuit["nodes"]
                if n["feature"] != "err" and rng.random() < 0.8}
    path = write_html(circuit, tmp_path / "big.html", contexts)
    load(browser, path)
    assert browser.evaluate("document.querySelectorAll('.node').length") == len(all_ids(circuit))
    check_layout(browser, circuit, contexts)
    check_slider(browser, circuit)
    # The panel lists only the 8 strongest of a busy node's edges (each direction).
    busiest = max(all_ids(circuit), key=lambda i: max(sum(e[end] == i for e in circuit["edges"])
                                                      for end in ("source", "target")))
    node_event(browser, busiest, "click")
    panel = browser.evaluate(PANEL)
    assert panel["node"] == busiest
    check_neighbours(panel, circuit, busiest)
    shot = browser.screenshot(tmp_path / f"big_{aggregation}.png")
    print(f"screenshot: {shot}")


@pytest.mark.parametrize("circuit", [
    {"nodes": [], "edges": []},
    {"sites": ["embed", "resid_0"], "nodes": [], "edges": []},
    {"nodes": [{"id": "resid_0/err", "site": "resid_0", "feature": "err", "effect": None},
               {"id": "weird_site/3", "site": "weird_site", "feature": 3, "effect": 0.5}],
     "edges": [{"source": "resid_0/err", "target": "y", "effect": 0.1},
               {"source": "nowhere/1", "target": "y", "effect": 0.2}]},
    {"nodes": [{"id": "embed/4", "site": "embed", "feature": 4, "effect": -0.3}]},
], ids=["empty", "empty-with-sites", "odd", "no-edges-key"])
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
    rng = random.Random(_seed())
    circuit = random_circuit(rng)
    (tmp_path / "circuit.json").write_text(json.dumps(circuit))
    main([str(tmp_path / "circuit.json")])
    assert (tmp_path / "circuit.html").read_text(encoding="utf-8") == render_html(circuit)
    # Any name: the page is still circuit.html beside it. --contexts and -o are used.
    contexts = random_contexts(rng, circuit)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my.json").write_text(json.dumps(circuit))
    (tmp_path / "ctx.json").write_text(json.dumps(contexts))
    main([str(tmp_path / "sub" / "my.json")])
    assert (tmp_path / "sub" / "circuit.html").read_text(encoding="utf-8") == render_html(circuit)
    main([str(tmp_path / "sub" / "my.json"), "--contexts", str(tmp_path / "ctx.json"),
          "-o", str(tmp_path / "elsewhere" / "page.html")])
    assert (tmp_path / "elsewhere" / "page.html").read_text(encoding="utf-8") == render_html(circuit, contexts)
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "elsewhere" / "page.html")
