"""circuit.dot (minicirc.viz.to_dot) read back with a small parser: every node in its site's cluster with the
documented shape and colour (blue positive, red negative, intensity |effect| / max |effect|), every edge from
source to target with its sign's colour and a width growing with |effect|, bottom-to-top layout."""
import random
import re

import pytest
import torch

from minicirc import viz


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
