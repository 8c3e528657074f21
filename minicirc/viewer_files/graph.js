(function () {
  const svg = document.getElementById("svg");
  const SVGNS = svg.namespaceURI;   // read from the page: the file holds no URL
  const DATA = JSON.parse(document.getElementById("graph-data").textContent);
  const L = DATA.n_layers, T = DATA.prompt.length;
  const nodes = DATA.nodes, byId = new Map(nodes.map((n) => [n.id, n]));
  const edges = DATA.edges.filter((e) => byId.has(e.source) && byId.has(e.target));
  document.getElementById("counts").textContent = `${nodes.length} nodes, ${edges.length} edges`;

  // Rows bottom to top: tokens (layer -1), layers 0..L-1, logits (layer L). Columns: positions; a column is
  // as wide as its most crowded cell, and a cell's nodes sit side by side, errors last.
  const SP = 26, ROW = 70, LEFT = 60, TOP = 30;
  const cells = new Map();
  const order = { token: 0, feature: 1, error: 2, logit: 3 };
  for (const n of [...nodes].sort((a, b) => order[a.kind] - order[b.kind] || (a.feature || 0) - (b.feature || 0))) {
    const key = `${n.layer}/${n.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const width = new Array(T).fill(1);
  for (const [key, list] of cells) width[Number(key.split("/")[1])] = Math.max(width[Number(key.split("/")[1])], list.length);
  const x0 = [LEFT];
  for (let p = 0; p < T; p++) x0.push(x0[p] + width[p] * SP + 20);
  const rowY = (layer) => TOP + (L - layer) * ROW;
  for (const [key, list] of cells) {
    const [layer, pos] = key.split("/").map(Number);
    const span = width[pos] * SP, start = x0[pos] + (span - list.length * SP) / 2 + SP / 2;
    list.forEach((n, i) => { n.x = start + i * SP; n.y = rowY(layer); });
  }
  svg.setAttribute("width", x0[T] + 20);
  svg.setAttribute("height", rowY(-1) + 60);

  function el(name, attrs, parent) {
    const e = document.createElementNS(SVGNS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    (parent || svg).appendChild(e);
    return e;
  }
  for (let layer = -1; layer <= L; layer++) {
    el("line", { class: "row-line", x1: LEFT, x2: x0[T], y1: rowY(layer), y2: rowY(layer) });
    el("text", { class: "row-label", x: 4, y: rowY(layer) + 4 }).textContent =
      layer < 0 ? "tokens" : layer === L ? "logits" : `layer ${layer}`;
  }
  DATA.prompt.forEach((tok, p) => {
    el("text", { class: "pos-label", x: (x0[p] + x0[p + 1] - 20) / 2, y: rowY(-1) + 34, "text-anchor": "middle" })
      .textContent = String(tok).replace(/\n/g, "↵");
  });

  const maxW = Math.max(1e-12, ...edges.map((e) => Math.abs(e.weight)));
  const edgeEls = edges.map((e) => {
    const s = byId.get(e.source), t = byId.get(e.target);
    const line = el("path", {
      class: "edge", d: `M${s.x},${s.y} C${s.x},${(s.y + t.y) / 2} ${t.x},${(s.y + t.y) / 2} ${t.x},${t.y}`,
      stroke: e.weight >= 0 ? "#2b6cb0" : "#c53030", "stroke-width": 0.5 + 4 * Math.abs(e.weight) / maxW,
    });
    return { e, line };
  });
  const fmt = (v) => (typeof v === "number" ? (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(3) : v.toExponential(2)) : "");
  const describe = (n) => n.kind === "feature" ? `feature ${n.label} (act ${fmt(n.activation)})`
    : n.kind === "logit" ? `logit ${JSON.stringify(n.label)} (p ${fmt(n.probability)})`
    : n.kind === "token" ? `token ${JSON.stringify(n.label)} @${n.pos}` : n.label;

  const panel = document.getElementById("panel");
  let pinned = null;
  function show(n) {
    svg.classList.toggle("focusing", !!n);
    for (const { e, line } of edgeEls) line.classList.toggle("focus", !!n && (e.source === n.id || e.target === n.id));
    panel.replaceChildren();
    if (!n) return;
    const h = document.createElement("h2");
    h.textContent = describe(n);
    panel.appendChild(h);
    const info = document.createElement("p");
    info.textContent = `cumulative influence ${fmt(n.influence)}`;
    panel.appendChild(info);
    for (const [title, list, other] of [["inputs", edges.filter((e) => e.target === n.id), "source"],
                                        ["outputs", edges.filter((e) => e.source === n.id), "target"]]) {
      const h3 = document.createElement("h3");
      h3.textContent = `${title} (${list.length})`;
      panel.appendChild(h3);
      const table = document.createElement("table");
      for (const e of list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 30)) {
        const tr = table.insertRow();
        tr.insertCell().textContent = describe(byId.get(e[other]));
        const c = tr.insertCell();
        c.className = "num";
        c.textContent = fmt(e.weight);
      }
      panel.appendChild(table);
    }
  }
  const nodeEls = nodes.map((n) => {
    const g = el("g", { class: `node ${n.kind}`, transform: `translate(${n.x},${n.y})` });
    if (n.kind === "feature") el("circle", { class: "shape", r: 8 }, g);
    else el("rect", { class: "shape", x: -8, y: -8, width: 16, height: 16, rx: n.kind === "error" ? 0 : 3 }, g);
    const title = el("title", {}, g);
    title.textContent = describe(n);
    if (n.kind === "logit") el("text", { y: -12 }, g).textContent = String(n.label).slice(0, 10);
    else if (n.kind === "feature") el("text", { y: 3 }, g).textContent = String(n.feature);
    g.addEventListener("mouseenter", () => { if (pinned === null) show(n); });
    g.addEventListener("mouseleave", () => { if (pinned === null) show(null); });
    g.addEventListener("click", () => {
      pinned = pinned === n ? null : n;
      for (const o of nodeEls) o.g.classList.toggle("selected", pinned !== null && o.n === pinned);
      show(pinned || n);
    });
    return { n, g };
  });
})();
