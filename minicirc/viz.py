"""Pictures of circuits (DOT text and a matplotlib PNG) and the files of a found circuit.

Layout: one row per site, bottom to top in the order the model computes them (embed at the bottom, the
metric node y on top); colour = sign of the effect (blue positive, red negative), line width and colour
intensity = |effect|; error nodes are squares, features circles. With contexts (explain.circuit_contexts),
a feature's index carries its short label ('37 "the" 80%', explain.context_label), so a reader can scan the
picture and still look the feature up.
"""
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from .files import staged_files  # noqa: E402
from .viewer import write_html  # noqa: E402


def _rows(data):
    sites = data.get("sites") or sorted({n["site"] for n in data["nodes"]})
    rows = {s: [] for s in sites}
    for n in data["nodes"]:
        rows.setdefault(n["site"], []).append(n)
    return rows


def _colour(effect, scale):
    a = min(1.0, abs(effect) / scale) if scale > 0 else 0.0
    return (1 - 0.8 * a, 1 - 0.8 * a, 1.0) if effect >= 0 else (1.0, 1 - 0.8 * a, 1 - 0.8 * a)


def _labels(data, contexts):
    """{feature node id: its short label}: the node's own "label" or its contexts entry's, a positional id
    ("site/f@pos") falling back to its feature's entry, as in circuit.html. Error nodes keep their plain id."""
    contexts = contexts or {}
    out = {}
    for n in data["nodes"]:
        if n["feature"] == "err":
            continue
        entry = contexts.get(n["id"]) or contexts.get(str(n["id"]).split("@")[0]) or {}
        label = n.get("label") or entry.get("label")
        if label:
            out[n["id"]] = str(label)
    return out


def _dot_text(s):
    """s inside a DOT double-quoted label: backslashes and quotes escaped, line breaks made spaces (a token
    cannot end the string or become one of DOT's \\n, \\l, \\N escapes), '&' written &amp; (Graphviz
    decodes entities such as &lt; in labels)."""
    s = s.replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return " ".join(s.splitlines())


def to_dot(data, contexts=None):
    """Graphviz DOT for the circuit (render with `dot -Tsvg circuit.dot`); contexts: as for save_circuit."""
    scale = max([abs(n["effect"]) for n in data["nodes"]] + [1e-12])
    escale = max([abs(e["effect"]) for e in data["edges"]] + [1e-12])
    labels = _labels(data, contexts)
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [style=filled, fontname="Helvetica", fontsize=10];']
    for site, nodes in _rows(data).items():
        if not nodes:
            continue
        lines.append(f'  subgraph "cluster_{site}" {{ label="{site}"; rank=same; color=grey90;')
        for n in nodes:
            r, g, b = _colour(n["effect"], scale)
            shape = "box" if n["feature"] == "err" else "ellipse"
            label = f'{n["feature"]}' + (f'@{n["pos"]}' if "pos" in n else "")
            label += f" {_dot_text(labels[n['id']])}" if n["id"] in labels else ""
            lines.append(f'    "{n["id"]}" [label="{label}\\n{n["effect"]:.3g}", shape={shape}, '
                         f'fillcolor="#{int(r*255):02x}{int(g*255):02x}{int(b*255):02x}"];')
        lines.append("  }")
    lines.append('  "y" [shape=doublecircle, fillcolor="#dddddd"];')
    for e in data["edges"]:
        w = 0.5 + 4 * abs(e["effect"]) / escale
        colour = "#1f4fd8" if e["effect"] >= 0 else "#d81f1f"
        lines.append(f'  "{e["source"]}" -> "{e["target"]}" [penwidth={w:.2f}, color="{colour}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_circuit(data, path, title=None, contexts=None):
    """circuit.png: rows = sites bottom to top, nodes spread left to right (by position, then effect); a
    node's short label (contexts: as for save_circuit) on a second line under its index."""
    rows = {s: ns for s, ns in _rows(data).items()}
    order = list(rows)
    widest = max([len(ns) for ns in rows.values()] + [1])
    labels = _labels(data, contexts)
    # About an inch a node with short labels under them (12 characters at 7 pt), half an inch without.
    fig_w = min(40, max(8, (1.0 if labels else 0.45) * widest + 3))
    fig_h = min(30, max(5, 0.7 * (len(order) + 1) + 1.5))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    pos = {}
    for y, site in enumerate(order):
        ns = sorted(rows[site], key=lambda n: (n.get("pos", 0), -abs(n["effect"])))
        for j, n in enumerate(ns):
            pos[n["id"]] = ((j + 1) / (len(ns) + 1), y)
    pos["y"] = (0.5, len(order))
    scale = max([abs(n["effect"]) for n in data["nodes"]] + [1e-12])
    escale = max([abs(e["effect"]) for e in data["edges"]] + [1e-12])
    # One artist for all edges and one per node shape: a few hundred separate artists made drawing the
    # demo's pictures take a third of its run time. Weakest edges first, so strong ones are drawn on top.
    segments, colours, widths = [], [], []
    for e in sorted(data["edges"], key=lambda e: abs(e["effect"])):
        if e["source"] in pos and e["target"] in pos:
            a = abs(e["effect"]) / escale
            segments.append([pos[e["source"]], pos[e["target"]]])
            colours.append((0.12, 0.31, 0.85, 0.25 + 0.6 * a) if e["effect"] >= 0 else (0.85, 0.12, 0.12, 0.25 + 0.6 * a))
            widths.append(0.3 + 3.5 * a)
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=widths, zorder=1))
    small = len(pos) > 80
    nodes = [n for site in order for n in rows[site]]
    for err in (False, True):
        group = [n for n in nodes if (n["feature"] == "err") == err]
        if group:
            ax.scatter([pos[n["id"]][0] for n in group], [pos[n["id"]][1] for n in group],
                       s=[60 + 340 * math.sqrt(abs(n["effect"]) / scale) for n in group], marker="s" if err else "o",
                       c=[_colour(n["effect"], scale) for n in group], edgecolors="#7a5c00" if err else "black",
                       linewidths=1.6 if err else 0.6, zorder=2)
    for n in nodes:
        if not small or abs(n["effect"]) > 0.3 * scale:
            x, y = pos[n["id"]]
            label = ("ε" if n["feature"] == "err" else str(n["feature"])) + (f"@{n['pos']}" if "pos" in n else "")
            label += f"\n{labels[n['id']]}" if n["id"] in labels else ""
            # parse_math=False: a token such as "$x$" is text, not mathtext.
            ax.text(x, y - 0.28, label, ha="center", va="top", fontsize=7, zorder=3, parse_math=False)
    ax.scatter([0.5], [len(order)], s=400, marker="*", c="gold", edgecolors="black", zorder=2)
    ax.text(0.5, len(order) + 0.3, "y (metric)", ha="center", fontsize=9)
    ax.set_yticks(range(len(order) + 1), order + ["y"])
    ax.set_xticks([])
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.8, len(order) + 0.8)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    s = data.get("settings", {})
    ax.set_title(title or f"{len(data['nodes'])} nodes, {len(data['edges'])} edges "
                 f"(method {s.get('method')}, node threshold {s.get('node_threshold')}, "
                 f"edge threshold {s.get('edge_threshold')}); blue +, red −, squares = SAE error", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_circuit(circuit, out_dir, contexts=None, picture=True):
    """Every file of a found circuit, all or none: circuit.json and effects.safetensors (Circuit.save),
    circuit.dot, circuit.png (unless picture=False), circuit.html, and contexts.json when contexts are given
    (kept so that `minicirc view` can redraw circuit.html with them; an earlier run's is removed otherwise).
    contexts: {node id: {"label", "contexts", "logits"}} (explain.circuit_contexts); each entry's short
    "label" follows the node's index in all three pictures, its contexts fill circuit.html's panel.
    Returns the circuit.json data."""
    with staged_files(out_dir) as stage:
        data = circuit.write(stage)
        with open(stage("circuit.dot"), "wb") as f:
            f.write(to_dot(data, contexts).encode())
        if picture:
            draw_circuit(data, stage("circuit.png"), contexts=contexts)
        write_html(data, stage("circuit.html"), contexts)
        if contexts:
            with open(stage("contexts.json"), "wb") as f:
                f.write(json.dumps(contexts, indent=1, default=float).encode())
    stale = os.path.join(out_dir, "contexts.json")
    if not contexts and os.path.exists(stale):
        os.remove(stale)    # an earlier run's, no longer this circuit's
    return data
