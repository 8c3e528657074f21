(function () {
  // An <svg> parsed from HTML is already in the SVG namespace; reading it here keeps the file free of URLs.
  const SVGNS = document.getElementById("svg").namespaceURI;
  const DATA = JSON.parse(document.getElementById("circuit-data").textContent);
  const contexts = DATA.contexts || {};

  // ---- nodes -------------------------------------------------------------------------------------
  const abs = (v) => (typeof v === "number" ? Math.abs(v) : 0);
  function siteOf(n) {
    if (n.site) return String(n.site);
    const id = String(n.id);
    return id === "y" ? "y" : id.split("/")[0];
  }
  // Layer rank, bottom to top: embed, then per layer the sites in computing order (z_l, attn_l, resid_mid_l,
  // mlp_hidden_l, mlp_l, resid_l; the optional ones where a circuit has them), the metric "y" last.
  const KIND_RANK = { z: 0, attn: 1, resid_mid: 2, mlp_hidden: 3, mlp: 4, resid: 5 };
  function siteRank(site) {
    if (site === "y") return 1e9;
    if (site === "embed") return 0;
    const m = /^(z|attn|resid_mid|mlp_hidden|mlp|resid)_(\d+)$/.exec(site);
    if (m) return 1 + 6 * Number(m[2]) + KIND_RANK[m[1]];
    return 1e8;  // an unknown site: below the metric, above every known one
  }

  const showTok = (s) => String(s).replace(/\n/g, "↵");
  function contextEntry(n) {
    return contexts[n.id] || contexts[n.id.split("@")[0]] || null;
  }

  const nodes = [];
  const byId = new Map();
  for (const raw of DATA.nodes) {
    const id = String(raw.id);
    if (byId.has(id)) continue;
    const site = siteOf(raw);
    const n = {
      id, site, rank: siteRank(site), raw,
      feature: raw.feature !== undefined ? raw.feature : (id.includes("/") ? id.split("/")[1].split("@")[0] : null),
      pos: typeof raw.pos === "number" ? raw.pos : null,
      effect: typeof raw.effect === "number" ? raw.effect : null,
    };
    n.isMetric = id === "y" || site === "y";
    n.isError = !n.isMetric && String(n.feature) === "err";
    nodes.push(n);
    byId.set(id, n);
  }
  // The metric node is the circuit's output: draw it even when circuit.json lists it only in edges.
  if (!byId.has("y") && DATA.edges.some((e) => String(e.target) === "y" || String(e.source) === "y")) {
    const n = { id: "y", site: "y", rank: siteRank("y"), raw: {}, feature: null, pos: null,
                effect: null, isMetric: true, isError: false };
    nodes.push(n);
    byId.set("y", n);
  }

  const edges = [];
  let skippedEdges = 0;
  for (const raw of DATA.edges) {
    const s = byId.get(String(raw.source)), t = byId.get(String(raw.target));
    if (!s || !t) { skippedEdges++; continue; }  // an endpoint that is not a node cannot be placed
    edges.push({ s, t, effect: typeof raw.effect === "number" ? raw.effect : null, raw });
  }

  // A feature's short label: its own, else its contexts entry's (explain.context_label's '"the" 80%').
  for (const n of nodes) {
    const info = contextEntry(n);
    const label = n.isMetric || n.isError ? null : n.raw.label || (info && info.label);
    n.label = label ? String(label) : null;
  }
  const labelled = nodes.some((n) => n.label);

  // ---- layout ------------------------------------------------------------------------------------
  const keepsPositions = nodes.some((n) => n.pos !== null);
  // Few nodes in a cell spread at most MAX_SP apart: wider with short labels, so that they fit whole.
  const LEFT = 80, RIGHT = 20, TOP = 28, BOTTOM = 36, MIN_SP = 18, MAX_SP = labelled ? 96 : 64;

  const rowsBySite = new Map();
  for (const n of nodes) {
    if (!rowsBySite.has(n.site)) rowsBySite.set(n.site, { site: n.site, rank: n.rank, nodes: [] });
    rowsBySite.get(n.site).nodes.push(n);
  }
  for (const site of DATA.sites) {
    if (!rowsBySite.has(site)) rowsBySite.set(site, { site, rank: siteRank(site), nodes: [] });
  }
  // Top of the picture first: highest rank first.
  const rows = [...rowsBySite.values()].sort((a, b) => b.rank - a.rank || (a.site < b.site ? -1 : 1));
  const byFeature = (a, b) => {
    if (a.isError !== b.isError) return a.isError ? 1 : -1;  // error node last in its group
    const fa = Number(a.feature), fb = Number(b.feature);
    return (isNaN(fa) || isNaN(fb)) ? String(a.feature).localeCompare(String(b.feature)) : fa - fb;
  };

  // Cells: one per row without positions; one per (row, position) with them. Each cell wraps its nodes
  // into lines of at most `perLine` so a crowded row grows taller instead of overlapping.
  const positions = [...new Set(nodes.filter((n) => n.pos !== null).map((n) => n.pos))].sort((a, b) => a - b);
  const colIndex = new Map(positions.map((p, i) => [p, i]));
  const maxCell = Math.max(1, ...rows.map((r) => {
    if (!keepsPositions) return 1;
    const counts = new Map();
    for (const n of r.nodes) counts.set(n.pos, (counts.get(n.pos) || 0) + 1);
    return Math.max(...counts.values());
  }));
  // Fill the visible width; with many positions keep a minimum column width and let the page scroll.
  const viewW = Math.max(900, (document.getElementById("graph").clientWidth || 1000) - 4);
  const minColW = Math.max(56, Math.min(160, MIN_SP * Math.min(maxCell, 4) + 8));
  const colW = keepsPositions ? Math.max(minColW, (viewW - LEFT - RIGHT) / Math.max(positions.length, 1)) : 0;
  const W = keepsPositions ? LEFT + RIGHT + colW * Math.max(positions.length, 1) : viewW;
  const avail = W - LEFT - RIGHT;

  function cellsOf(row) {
    if (!keepsPositions || row.nodes.every((n) => n.pos === null)) {
      return [{ x0: LEFT, width: avail, nodes: row.nodes.slice().sort(byFeature) }];
    }
    const cells = new Map();
    for (const n of row.nodes) {
      const c = n.pos === null ? 0 : colIndex.get(n.pos);
      if (!cells.has(c)) cells.set(c, { x0: LEFT + c * colW, width: colW, nodes: [] });
      cells.get(c).nodes.push(n);
    }
    for (const c of cells.values()) c.nodes.sort(byFeature);
    return [...cells.values()];
  }

  // Spacing of a cell's nodes: as wide as fits, capped so that a few nodes stay close together.
  function cellGeometry(cell) {
    const k = cell.nodes.length;
    const perLine = Math.max(1, Math.min(k, Math.floor(cell.width / MIN_SP)));
    const lines = Math.ceil(k / perLine);
    const sp = Math.min(MAX_SP, cell.width / perLine);
    return { perLine, lines, sp };
  }

  // One node radius for the whole picture, from the tightest spacing: nodes shrink when crowded.
  let tightest = MAX_SP;
  for (const row of rows) for (const cell of cellsOf(row)) tightest = Math.min(tightest, cellGeometry(cell).sp);
  const R = Math.max(3, Math.min(11, tightest * 0.36));
  // Feature numbers under the nodes only where they fit (about 4 digits at 9px); hover tells the rest.
  // A feature's short label goes on a second line, so lines of a wrapped row sit further apart with labels.
  const LABEL_SP = 30;
  const LINE_H = Math.max(2 * R + (labelled ? 24 : 14), 16);
  const ROW_GAP = 34;

  let y = TOP;
  for (const row of rows) {
    const cells = cellsOf(row);
    const lines = Math.max(1, ...cells.map((c) => cellGeometry(c).lines));
    row.y0 = y;
    row.height = lines * LINE_H;
    for (const cell of cells) {
      const { perLine, sp } = cellGeometry(cell);
      cell.nodes.forEach((n, i) => {
        const line = Math.floor(i / perLine), col = i % perLine;
        const inLine = Math.min(perLine, cell.nodes.length - line * perLine);
        n.x = cell.x0 + cell.width / 2 + (col - (inLine - 1) / 2) * sp;
        n.labelled = sp >= LABEL_SP;
        n.labelWidth = sp - 4;
        // Wrapped lines stack downwards inside the row.
        n.y = row.y0 + R + 2 + line * LINE_H;
      });
    }
    y += row.height + ROW_GAP;
  }
  const H = y - ROW_GAP + BOTTOM;

  // ---- drawing -----------------------------------------------------------------------------------
  const svg = document.getElementById("svg");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  // Text cut (with an ellipsis) until it is at most `width` pixels wide, so neighbouring labels never meet.
  function fitText(t, text, width) {
    const chars = Array.from(text);   // whole characters, never half a surrogate pair
    t.textContent = text;
    for (let n = chars.length - 1; n > 0 && t.getComputedTextLength() > width; n--) {
      t.textContent = chars.slice(0, n).join("") + "…";
    }
  }
  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  const gRows = el("g", {}, svg), gEdges = el("g", {}, svg), gNodes = el("g", {}, svg);
  for (const row of rows) {
    const mid = row.y0 + R + 2;
    el("line", { class: "row-line", x1: LEFT - 6, x2: W - RIGHT, y1: mid, y2: mid }, gRows);
    const t = el("text", { class: "row-label", x: 6, y: mid + 4 }, gRows);
    t.textContent = row.site === "y" ? "metric" : row.site;
  }
  if (keepsPositions) {
    positions.forEach((p, i) => {
      const x = LEFT + (i + 0.5) * colW;
      const t = el("text", { class: "pos-label", x, y: H - 12, "text-anchor": "middle" }, gRows);
      t.textContent = "pos " + p;
    });
  }

  // Colour: blue for a positive effect, red for a negative one; intensity by |effect| relative to the
  // largest node (sqrt, so mid-sized effects stay visible).
  const maxNode = Math.max(1e-30, ...nodes.filter((n) => !n.isMetric).map((n) => abs(n.effect)));
  const maxEdge = Math.max(1e-30, ...edges.map((e) => abs(e.effect)));
  function mix(rgb, t) {
    const c = rgb.map((v) => Math.round(255 + (v - 255) * t));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }
  const BLUE = [43, 108, 176], RED = [197, 48, 48];
  const signColor = (v) => (v === null ? [150, 150, 150] : v >= 0 ? BLUE : RED);

  for (const e of edges) {
    const sy = e.s.y, ty = e.t.y, my = (sy + ty) / 2;
    // A vertical S-curve: edges leave the top of the source and enter the bottom of the target.
    const d = `M${e.s.x},${sy} C${e.s.x},${my} ${e.t.x},${my} ${e.t.x},${ty}`;
    const w = 0.8 + 4.2 * Math.sqrt(abs(e.effect) / maxEdge);
    e.el = el("path", { class: "edge", d, stroke: mix(signColor(e.effect), 1), "stroke-width": w.toFixed(2),
                         "data-source": e.s.id, "data-target": e.t.id }, gEdges);
    const tip = el("title", {}, e.el);
    tip.textContent = `${e.s.id} → ${e.t.id}: ${fmt(e.effect)}`;
  }

  for (const n of nodes) {
    const g = el("g", { class: "node" + (n.isError ? " error" : "") + (n.isMetric ? " metric" : ""),
                        "data-id": n.id, transform: `translate(${n.x},${n.y})` }, gNodes);
    const t = n.isMetric ? 1 : 0.15 + 0.85 * Math.sqrt(abs(n.effect) / maxNode);
    const fill = n.isMetric ? "#e2e8f0" : mix(signColor(n.effect), t);
    if (n.isError) {
      el("rect", { class: "shape", x: -R, y: -R, width: 2 * R, height: 2 * R, fill }, g);
    } else if (n.isMetric) {
      const r = Math.max(R, 10);
      el("circle", { class: "shape", r, fill, "stroke-width": 1.5 }, g);
      el("text", { y: 4 }, g).textContent = "y";
    } else {
      el("circle", { class: "shape", r: R, fill }, g);
    }
    if (n.labelled && !n.isMetric) el("text", { y: R + 10 }, g).textContent = n.isError ? "err" : String(n.feature);
    if (n.labelled && n.label) fitText(el("text", { class: "flabel", y: R + 20 }, g), showTok(n.label), n.labelWidth);
    el("title", {}, g).textContent = `${n.id}${n.label ? "  " + showTok(n.label) : ""}  effect ${fmt(n.effect)}`;
    n.el = g;
  }

  // ---- incident edges, for the panel and for highlighting ----------------------------------------
  for (const n of nodes) { n.inEdges = []; n.outEdges = []; }
  for (const e of edges) { e.s.outEdges.push(e); e.t.inEdges.push(e); }

  // ---- threshold ---------------------------------------------------------------------------------
  // The slider's value is log10 of the threshold; its leftmost end means "no threshold".
  const mags = nodes.filter((n) => !n.isMetric).map((n) => abs(n.effect))
    .concat(edges.map((e) => abs(e.effect))).filter((v) => v > 0);
  // Round ends: a range input re-serialises its value, so an end like -4.0917... may read back a hair off.
  const lo = mags.length ? Math.floor((Math.log10(Math.min(...mags)) - 0.1) * 100) / 100 : -6;
  const hi = mags.length ? Math.ceil((Math.log10(Math.max(...mags)) + 0.1) * 100) / 100 : 0;
  const slider = document.getElementById("threshold");
  slider.min = lo; slider.max = hi; slider.value = lo;
  let threshold = 0;

  function apply() {
    const v = Number(slider.value);
    threshold = v <= lo + 1e-9 ? 0 : Math.pow(10, v);
    slider.dataset.threshold = String(threshold);  // full precision, for tests and for copying
    document.getElementById("threshold-value").textContent = threshold === 0 ? "0 (all)" : threshold.toPrecision(3);
    let shownNodes = 0, shownEdges = 0;
    for (const n of nodes) {
      // The metric node stays: hiding the circuit's output would hide what every path leads to.
      n.visible = n.isMetric || abs(n.effect) >= threshold;
      n.el.style.display = n.visible ? "" : "none";
      if (n.visible) shownNodes++;
    }
    for (const e of edges) {
      e.visible = e.s.visible && e.t.visible && abs(e.effect) >= threshold;
      e.el.style.display = e.visible ? "" : "none";
      if (e.visible) shownEdges++;
    }
    document.getElementById("counter").textContent = `${shownNodes} nodes, ${shownEdges} edges shown`;
  }
  slider.addEventListener("input", apply);
  slider.addEventListener("change", apply);
  document.getElementById("totals").textContent =
    `(of ${nodes.length} nodes, ${edges.length} edges` +
    (skippedEdges ? `; ${skippedEdges} edges name unknown nodes` : "") + ")";
  apply();

  // ---- side panel --------------------------------------------------------------------------------
  function fmt(v) {
    if (typeof v !== "number") return "—";
    return (v >= 0 ? "+" : "") + (Math.abs(v) >= 1e-3 && Math.abs(v) < 1e3 ? v.toPrecision(3) : v.toExponential(2));
  }
  function h(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function renderPanel(n) {
    const panel = document.getElementById("panel");
    panel.replaceChildren();
    panel.dataset.node = n.id;
    const info = contextEntry(n);
    panel.appendChild(h("h2", n.id));
    const label = n.raw.label || (info && info.label);
    if (label) panel.appendChild(h("p", String(label), "label"));
    const table = h("table");
    const feature = n.isMetric ? "metric" : n.isError ? "err (SAE error)" : String(n.feature);
    const rowsInfo = [["site", n.site], ["feature", feature]];
    if (n.pos !== null) rowsInfo.push(["position", String(n.pos)]);
    rowsInfo.push(["effect", fmt(n.effect)]);
    if (n.isMetric && DATA.metric) {
      for (const k of Object.keys(DATA.metric)) rowsInfo.push(["metric " + k, fmt(DATA.metric[k])]);
    }
    for (const [k, v] of rowsInfo) {
      const tr = h("tr");
      tr.appendChild(h("td", k));
      tr.appendChild(h("td", v, "num"));
      table.appendChild(tr);
    }
    panel.appendChild(table);

    if (info && Array.isArray(info.contexts) && info.contexts.length) {
      panel.appendChild(h("h3", "Top contexts"));
      for (const c of info.contexts) {
        const div = h("div", undefined, "ctx");
        div.appendChild(h("span", fmt(c.value), "val"));
        const toks = c.tokens || [];
        // A window around the activating token keeps long contexts readable.
        const a = Math.max(0, (c.index || 0) - 16), b = Math.min(toks.length, (c.index || 0) + 5);
        if (a > 0) div.appendChild(document.createTextNode("…"));
        for (let i = a; i < b; i++) {
          div.appendChild(i === c.index ? h("mark", showTok(toks[i])) : document.createTextNode(showTok(toks[i])));
        }
        if (b < toks.length) div.appendChild(document.createTextNode("…"));
        panel.appendChild(div);
      }
    }
    if (info && info.logits) {
      for (const kind of ["promoted", "suppressed"]) {
        const list = info.logits[kind];
        if (!Array.isArray(list) || !list.length) continue;
        panel.appendChild(h("h3", kind + " logits"));
        const t = h("table", undefined, "logits " + kind);
        for (const [tok, val] of list) {
          const tr = h("tr");
          tr.appendChild(h("td", showTok(tok), "tok"));
          tr.appendChild(h("td", fmt(val), "num"));
          t.appendChild(tr);
        }
        panel.appendChild(t);
      }
    }
    if (!info && !n.isMetric) panel.appendChild(h("p", "No contexts recorded for this node.", "hint"));

    const neighbours = [["Strongest inputs", n.inEdges, (e) => e.s], ["Strongest outputs", n.outEdges, (e) => e.t]];
    for (const [title, list, other] of neighbours) {
      if (!list.length) continue;
      panel.appendChild(h("h3", title));
      const t = h("table");
      for (const e of list.slice().sort((a, b) => abs(b.effect) - abs(a.effect)).slice(0, 8)) {
        const tr = h("tr");
        tr.appendChild(h("td", other(e).id, "tok"));
        tr.appendChild(h("td", fmt(e.effect), "num"));
        t.appendChild(tr);
      }
      panel.appendChild(t);
    }
  }

  let pinned = null;
  function focus(n) {
    svg.classList.toggle("focusing", !!n);
    for (const e of edges) e.el.classList.toggle("focus", !!n && (e.s === n || e.t === n));
  }
  for (const n of nodes) {
    n.el.addEventListener("mouseenter", () => { if (!pinned) { renderPanel(n); focus(n); } });
    n.el.addEventListener("mouseleave", () => { if (!pinned) focus(null); });
    n.el.addEventListener("click", (ev) => {
      ev.stopPropagation();
      if (pinned) pinned.el.classList.remove("selected");
      pinned = pinned === n ? null : n;
      if (pinned) { n.el.classList.add("selected"); renderPanel(n); }
      focus(pinned);
    });
  }
  svg.addEventListener("click", () => {
    if (pinned) pinned.el.classList.remove("selected");
    pinned = null;
    focus(null);
  });
  document.body.dataset.ready = "1";  // scripts finished: tests wait for this
})();
