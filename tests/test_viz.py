"""circuit.dot (minicirc.viz.to_dot) read back with a small parser: every node in its site's cluster with the
documented shape and colour (blue positive, red negative, intensity |effect| / max |effect|), every edge from
source to target with its sign's colour and a width growing with |effect|, bottom-to-top layout."""
import html
import io
import math
import random
import re

import pytest
import torch

from minicirc.experiments import demo_report

from minicirc import explain, viz


def random_circuit(rng):
    sites = ["embed", "attn_0", "mlp_0", "resid_0", "attn_1"]
    nodes = []
    for s in sites[:-1]:     # attn_1 stays empty: no cluster for it
        for f in rng.sample(range(50), rng.randint(1, 4)) + ["err"]:
            n = {"id": f"{s}/{f}", "site": s, "feature": f, "effect": rng.uniform(-2, 2)}
            if rng.random() < 0.5:
                n["pos"] = rng.randrange(6)
                n["id"] += f"@{n['pos']}"
            nodes.append(n)
    edges = [{"source": a["id"], "target": b["id"], "effect": rng.uniform(-1, 1)}
             for a in nodes for b in nodes if sites.index(a["site"]) < sites.index(b["site"]) and rng.random() < 0.4]
    edges.append({"source": nodes[0]["id"], "target": "y", "effect": -3.0})
    return {"sites": sites, "nodes": nodes, "edges": edges}


def parse_dot(text):
    clusters, nodes, edges, current = {}, {}, [], None
    for line in text.splitlines():
        m = re.match(r'\s*subgraph "cluster_(.+?)" \{ label="(.+?)";', line)
        if m:
            assert m.group(1) == m.group(2)
            current = m.group(1)
            clusters[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        m = re.match(r'\s*"(.+?)" -> "(.+?)" \[penwidth=([\d.]+), color="(#\w+)"\];', line)
        if m:
            edges.append((m.group(1), m.group(2), float(m.group(3)), m.group(4)))
            continue
        m = re.match(r'\s*"(.+?)" \[label="(.+?)\\n(.+?)", shape=(\w+), fillcolor="#(\w\w)(\w\w)(\w\w)"\];', line)
        if m:
            nodes[m.group(1)] = dict(label=m.group(2), effect=float(m.group(3)), shape=m.group(4),
                                     rgb=tuple(int(m.group(i), 16) for i in (5, 6, 7)), cluster=current)
            if current is not None:
                clusters[current].append(m.group(1))
    return clusters, nodes, edges


def test_dot_holds_every_node_and_edge_as_documented():
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    data = random_circuit(rng)
    text = viz.to_dot(data)
    assert text.startswith("digraph circuit {") and "rankdir=BT;" in text
    clusters, nodes, edges = parse_dot(text)
    assert list(clusters) == [s for s in data["sites"] if any(n["site"] == s for n in data["nodes"])]
    top = max(abs(n["effect"]) for n in data["nodes"])
    for n in data["nodes"]:
        got = nodes[n["id"]]
        assert got["cluster"] == n["site"]
        assert got["shape"] == ("box" if n["feature"] == "err" else "ellipse")
        assert got["label"] == str(n["feature"]) + (f"@{n['pos']}" if "pos" in n else "")
        assert got["effect"] == pytest.approx(n["effect"], rel=1e-2)
        light = round(255 * (1 - 0.8 * abs(n["effect"]) / top))
        r, g, b = got["rgb"]
        assert abs(g - light) <= 1
        if n["effect"] >= 0:
            assert b == 255 and abs(r - light) <= 1, n
        else:
            assert r == 255 and abs(b - light) <= 1, n
    assert len(nodes) == len(data["nodes"])
    etop = max(abs(e["effect"]) for e in data["edges"])
    assert [(s, t) for s, t, _, _ in edges] == [(e["source"], e["target"]) for e in data["edges"]]
    for (s, t, width, colour), e in zip(edges, data["edges"]):
        assert colour == ("#1f4fd8" if e["effect"] >= 0 else "#d81f1f")
        assert width == pytest.approx(0.5 + 4 * abs(e["effect"]) / etop, abs=0.006)


HOSTILE = ['a"b', "back\\slash\\n", "two\nlines", "</script><b>", "&lt;", '\\"', "$x^2$", "{x|y}<z>"]


def labelled(rng, data):
    """Contexts for most feature nodes (keyed by feature, as circuit_contexts writes them), their short labels
    made by explain.context_label from hostile tokens; one node with its own multi-line label."""
    contexts = {}
    for n in data["nodes"]:
        key = n["id"].split("@")[0]
        if n["feature"] != "err" and key not in contexts and rng.random() < 0.8:
            tok = rng.choice(HOSTILE)
            entry = {"contexts": [{"tokens": ["x", tok], "index": 1, "value": 2.0}], "logits": {}}
            contexts[key] = entry | {"label": explain.context_label(entry)}
    contexts["embed/err"] = {"label": "never under an error node"}
    own = next(n for n in data["nodes"] if n["feature"] != "err")
    own["label"] = 'own\nlabel "q"'
    return contexts


def expected_short(n, contexts):
    if n["feature"] == "err":
        return None
    return n.get("label") or (contexts.get(n["id"]) or contexts.get(n["id"].split("@")[0]) or {}).get("label")


def dot_label(line):
    """The label string of a DOT node line, read as Graphviz reads it: the quoted string up to its first
    unescaped quote, split at the \\n line breaks, \\\\ and \\" unescaped, entities decoded."""
    i = line.index('label="') + len('label="')
    parts, cur = [], ""
    while line[i] != '"':
        if line[i] == "\\":
            nxt = line[i + 1]
            assert nxt in '\\"n', f"escape \\{nxt} in {line!r}"
            if nxt == "n":
                parts.append(cur)
                cur = ""
            else:
                cur += nxt
            i += 2
        else:
            cur += line[i]
            i += 1
    assert re.match(r'", shape=\w+, fillcolor="#\w{6}"\];$', line[i:]), line[i:]
    return [html.unescape(p) for p in parts + [cur]]


def test_dot_and_png_show_short_labels_escaped(kept_figures):
    """With contexts, every feature node reads '<index> <short label>' in circuit.dot and '<index>\\n<label>'
    in circuit.png; error nodes and features without one keep the plain index; hostile tokens (quotes,
    backslashes, newlines, markup, entities, mathtext) come back as written, one node a line."""
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    data = random_circuit(rng)
    contexts = labelled(rng, data)
    text = viz.to_dot(data, contexts)
    clusters, nodes, edges = parse_dot(text)
    assert set(nodes) == {n["id"] for n in data["nodes"]} and len(edges) == len(data["edges"])
    lines = {re.match(r'\s*"(.+?)" \[label=', ln).group(1): ln for ln in text.splitlines() if "[label=" in ln}
    shown = 0
    for n in data["nodes"]:
        index = str(n["feature"]) + (f"@{n['pos']}" if "pos" in n else "")
        short = expected_short(n, contexts)
        first, effect = dot_label(lines[n["id"]])
        assert first == (f"{index} {' '.join(short.splitlines())}" if short else index), (n["id"], first)
        assert float(effect) == pytest.approx(n["effect"], rel=1e-2)
        shown += bool(short)
    assert shown
    # Contexts without labels (a contexts.json written before them): the plain index, but for a node's own.
    older = {k: {f: v for f, v in e.items() if f != "label"} for k, e in contexts.items()}
    for ln in viz.to_dot(data, older).splitlines():
        m = re.match(r'\s*"(.+?)" \[label=', ln)
        if m:
            n = next(n for n in data["nodes"] if n["id"] == m.group(1))
            index = str(n["feature"]) + (f"@{n['pos']}" if "pos" in n else "")
            assert dot_label(ln)[0] == (index + " own label \"q\"" if "label" in n else index)

    viz.draw_circuit(data, io.BytesIO(), contexts=contexts)
    (fig,) = kept_figures
    texts = sorted(t.get_text() for t in fig.axes[0].texts if t.get_text() != "y (metric)")
    want = sorted(("ε" if n["feature"] == "err" else str(n["feature"])) + (f"@{n['pos']}" if "pos" in n else "")
                  + (f"\n{expected_short(n, contexts)}" if expected_short(n, contexts) else "") for n in data["nodes"])
    assert texts == want
    assert all(not t.get_parse_math() for t in fig.axes[0].texts if "\n" in t.get_text())


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures draw_circuit / plot_faithfulness save, kept open for inspection instead of closed."""
    figs, close = [], viz.plt.close
    monkeypatch.setattr(viz.plt, "close", figs.append)
    yield figs
    for f in figs:
        close(f)


def _expected_rgb(effect, top):
    light = 1 - 0.8 * abs(effect) / top
    return (light, light, 1.0) if effect >= 0 else (1.0, light, light)


@pytest.mark.parametrize("big", [False, True])
def test_png_layout_colours_and_edges(tmp_path, kept_figures, big):
    """circuit.png read back from the figure: one row per site in the given order bottom to top (empty ones too),
    y on top; in a row nodes by position then |effect| descending at x = (j+1)/(n+1); node colour and size by
    effect; error nodes squares; edges weakest first, blue/red by sign, alpha and width by |effect|; edges to
    nodes not drawn are skipped; a big circuit (> 80 nodes) labels only nodes above 0.3 of the top |effect|."""
    import numpy as np
    from matplotlib.collections import LineCollection, PathCollection
    rng = random.Random(int(torch.randint(0, 10**6, ()).item()))
    data = random_circuit(rng)
    if big:
        data["nodes"] += [{"id": f"mlp_0/{100 + i}", "site": "mlp_0", "feature": 100 + i, "effect": rng.uniform(-2, 2)}
                          for i in range(90)]
    data["edges"].append({"source": data["nodes"][1]["id"], "target": "resid_0/ghost", "effect": 5.0})
    viz.draw_circuit(data, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    (fig,) = kept_figures
    ax = fig.axes[0]
    sites = data["sites"]
    assert [t.get_text() for t in ax.get_yticklabels()] == sites + ["y"]
    assert list(ax.get_yticks()) == list(range(len(sites) + 1))
    want = {"y": (0.5, len(sites))}
    for row, site in enumerate(sites):
        ns = [n for n in data["nodes"] if n["site"] == site]
        ns.sort(key=lambda n: abs(n["effect"]), reverse=True)
        ns.sort(key=lambda n: n.get("pos", 0))        # stable: position first, then |effect| descending
        for j, n in enumerate(ns):
            want[n["id"]] = ((j + 1) / (len(ns) + 1), row)
    top = max(abs(n["effect"]) for n in data["nodes"])
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 3                                   # features, errors, the metric star
    for err, sc in zip((False, True), scatters):
        group = [n for n in data["nodes"] if (n["feature"] == "err") == err]
        got = {tuple(np.round(o, 9)) for o in sc.get_offsets()}
        assert got == {tuple(np.round(want[n["id"]], 9)) for n in group}
        by_xy = {tuple(np.round(o, 9)): (fc, s) for o, fc, s in zip(sc.get_offsets(), sc.get_facecolors(), sc.get_sizes())}
        for n in group:
            fc, s = by_xy[tuple(np.round(want[n["id"]], 9))]
            assert tuple(fc[:3]) == pytest.approx(_expected_rgb(n["effect"], top), abs=1e-6), n
            assert s == pytest.approx(60 + 340 * math.sqrt(abs(n["effect"]) / top))
        verts = sc.get_paths()[0].vertices
        assert (len(verts) == 5) == err                          # squares for errors, circles for features
    assert tuple(scatters[2].get_offsets()[0]) == (0.5, len(sites))
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    drawn = [e for e in data["edges"] if e["source"] in want and e["target"] in want]
    assert len(drawn) == len(data["edges"]) - 1
    drawn.sort(key=lambda e: abs(e["effect"]))
    etop = max(abs(e["effect"]) for e in data["edges"])         # the skipped edge still sets the scale
    segs, colours, widths = lines.get_segments(), lines.get_colors(), lines.get_linewidths()
    assert len(segs) == len(drawn)
    for seg, c, w, e in zip(segs, colours, widths, drawn):
        np.testing.assert_allclose(seg, [want[e["source"]], want[e["target"]]], atol=1e-12)
        a = abs(e["effect"]) / etop
        rgb = (0.12, 0.31, 0.85) if e["effect"] >= 0 else (0.85, 0.12, 0.12)
        assert tuple(c) == pytest.approx(rgb + (0.25 + 0.6 * a,), abs=1e-6)
        assert w == pytest.approx(0.3 + 3.5 * a)
    labels = {t.get_text() for t in ax.texts} - {"y (metric)"}
    shown = [n for n in data["nodes"] if not big or abs(n["effect"]) > 0.3 * top]
    assert labels == {("ε" if n["feature"] == "err" else str(n["feature"])) + (f"@{n['pos']}" if "pos" in n else "")
                      for n in shown}
    assert len(shown) < len(data["nodes"]) or not big


def test_faithfulness_plot_curves(tmp_path, kept_figures):
    """One line per curve: points with n > 0 only, sorted by size; neurons dashed, features solid, one colour per
    template (the label's first word); log x axis."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    curves = {}
    for template in ("simple", "rc"):
        for kind in ("features", "neurons"):
            n = torch.randint(0, 60, (7,), generator=g).tolist() + [0]
            curves[f"{template} {kind}"] = list(zip(n, torch.randn(8, generator=g).tolist()))
    curves["empty features"] = [(0, 0.5)]
    demo_report.plot_faithfulness(curves, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    (fig,) = kept_figures
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}
    assert set(lines) == set(curves) - {"empty features"}
    for label, ln in lines.items():
        pts = sorted(p for p in curves[label] if p[0] > 0)
        assert list(ln.get_xdata()) == [p[0] for p in pts] and list(ln.get_ydata()) == [p[1] for p in pts]
        assert ln.get_linestyle() == ("--" if "neurons" in label else "-")
    for t in ("simple", "rc"):
        assert lines[f"{t} features"].get_color() == lines[f"{t} neurons"].get_color()
    assert lines["simple features"].get_color() != lines["rc features"].get_color()
