"""circuit.html: one self-contained file to explore a circuit in a browser.

    from minicirc.viewer import write_html
    write_html(circuit_dict, "out/circuit.html", contexts=None)

`circuit_dict` is the parsed circuit.json (docs/method.md §11); an optional "sites" list gives every site
a row even where no node was kept, and a node's optional "label" is shown under it and in its panel. `contexts`
optionally maps a node id to what explains that node:

    {"resid_1/37": {"label": '"cats" 60%',                        # optional: explain.context_label's
                    "contexts": [{"tokens": ["The", " cats"], "index": 1, "value": 3.2}, ...],
                    "logits": {"promoted": [[" are", 0.8], ...], "suppressed": [[" is", -0.7], ...]}}}

A node id with a position ("resid_1/37@5", aggregation "none") falls back to the entry of its feature
("resid_1/37"), since top contexts belong to the feature, not to one position. A feature node's label (its
own, else its entry's) is drawn under its index, cut to the node spacing (the whole of it in the panel and
the tooltip); an entry without one (a contexts.json older than the labels) leaves the plain index.

The page is plain SVG + JS with the data embedded as JSON: no network access, no libraries, so it opens
from a file:// URL on a machine with no internet. Layers run bottom (embed) to top (the metric node "y");
positions run left to right when the circuit keeps them. A log-scale slider hides nodes and edges whose
|effect| is below it; the metric node "y" is the circuit's output and is never hidden by it.

The page's files are package data in viewer_files/: page.html (the skeleton, shared with graph.html),
circuit_header.html, circuit.css and circuit.js (the page script), errors.js. Everything the script shows
comes from the embedded JSON; it sets text with textContent, so token strings can never inject markup.
"""
from __future__ import annotations

import argparse
import html
import json
import math
from importlib import resources
from pathlib import Path

__all__ = ["render_graph_html", "render_html", "write_html"]


def _read(name: str) -> str:
    """A file of the pages (package data beside this module): page.html, the skeleton both pages share, with
    the placeholders __TITLE__, __CSS__, __HEADER__, __HINT__, __JS__, __DATA_ID__ and __DATA__; each page's
    header (circuit_header.html, graph_header.html), CSS and script (circuit.*, graph.*); errors.js, the
    script both pages start with (uncaught errors shown in the page)."""
    return (resources.files(__package__) / "viewer_files" / name).read_text(encoding="utf-8")


def _page(name: str, title: str, hint: str, data) -> str:
    """The page `name` (circuit or graph) with `data` embedded as JSON."""
    return (_read("page.html").replace("__TITLE__", html.escape(title)).replace("__CSS__", _read(f"{name}.css"))
            .replace("__HEADER__", _read(f"{name}_header.html")).replace("__HINT__", hint)
            .replace("__JS__", _read("errors.js") + _read(f"{name}.js")).replace("__DATA_ID__", f"{name}-data")
            # Data last, so no placeholder text inside the data can be substituted by mistake.
            .replace("__DATA__", _embed_json(data)))


def _finite(obj):
    """Replace NaN/inf by None: JSON.parse rejects the NaN/Infinity that json.dumps writes by default."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _embed_json(obj) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' survive, so neither '</script>' nor
    '<!--' in a token string can end or confuse the element. JSON.parse turns the escapes back."""
    text = json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, sort_keys=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _title(circuit: dict) -> str:
    settings = circuit.get("settings") or {}
    # Hashes of model and SAE weights are long and say little in a tab title: shorten them.
    parts = []
    for key, value in settings.items():
        if isinstance(value, str) and len(value) > 16:
            value = value[:10] + "…"
        parts.append(f"{key}={value}")
    return "minicirc circuit" + (" — " + ", ".join(parts) if parts else "")


def render_html(circuit: dict, contexts: dict | None = None) -> str:
    """The whole circuit.html page as a string."""
    if not isinstance(circuit, dict) or not isinstance(circuit.get("nodes"), list):
        raise ValueError("circuit must be a circuit.json dict with a 'nodes' list")
    data = {
        "settings": circuit.get("settings") or {},
        "metric": circuit.get("metric") or {},
        "sites": circuit.get("sites") or [],  # when given, every site gets a row, kept nodes or not
        "nodes": circuit["nodes"],
        "edges": circuit.get("edges") or [],
        "contexts": contexts or {},
    }
    return _page("circuit", _title(circuit), "Hover over a node to inspect it; click to pin it.", data)


def render_graph_html(graph: dict, title: str = "minicirc attribution graph") -> str:
    """graph.html: a pruned attribution graph (attribution.graph_file.graph_json's dict) as one page, the
    prompt's tokens along the bottom, layers upwards, the logits at the top; hover a node for its label and
    connections (viewer_files/page.html, graph_header.html, graph.css, graph.js)."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ValueError("graph must be a dict with a 'nodes' list (graph_file.graph_json)")
    return _page("graph", title, "Hover over a node for its label and edges; click to pin it.", graph)


def write_html(circuit: dict, path, contexts: dict | None = None) -> Path:
    """Write circuit.html to `path` (its folder is created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(circuit, contexts), encoding="utf-8")
    return path


def main(argv=None):
    """python -m minicirc.viewer CIRCUIT_JSON [--contexts FILE] [-o OUT]: write circuit.html."""
    ap = argparse.ArgumentParser(prog="python -m minicirc.viewer", description=main.__doc__)
    ap.add_argument("circuit", help="circuit.json")
    ap.add_argument("--contexts", help="JSON file: node id -> contexts/logits/label")
    ap.add_argument("-o", "--out", help="output file (default: circuit.html beside the circuit)")
    args = ap.parse_args(argv)
    circuit = json.loads(Path(args.circuit).read_text(encoding="utf-8"))
    contexts = json.loads(Path(args.contexts).read_text(encoding="utf-8")) if args.contexts else None
    out = write_html(circuit, args.out or Path(args.circuit).with_name("circuit.html"), contexts)
    print(out)


if __name__ == "__main__":
    main()
