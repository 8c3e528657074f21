"""What a feature means: its top-activating contexts over a text sample, and the tokens its decoder
direction promotes or suppresses.

    texts = load_texts("data.jsonl")                 # data file (clean + patch prefixes) or one text a line
    sample = tokenize_texts(texts, tokenizer, model)  # [(token ids, token strings)]
    top_contexts(model, sae, "resid_1", sample, 37, k=10)
    logit_effects(model, sae, 37, n=5)
    contexts = circuit_contexts(model, saes, tokenizer, circuit_json, texts, k=5)
    viz.save_circuit(circuit, out_dir, contexts)   # or viewer.write_html(circuit_json, path, contexts)

A feature's activation at (sentence, position) is `sae.encode(x)[feature]` where x is the site's value
in an unedited forward pass over that sentence alone (sentences are right-padded in batches; the model is
causal, so padding never changes a real position). "Top" means the k highest activations over every
(sentence, position) of the sample; equal values keep sample order (earlier sentence, then earlier
position first), so the result is deterministic.

Activations are computed for every requested (site, feature) in one forward pass per batch of texts.
Results are cached per feature (explain_cache.py), keyed by (model weights sha, token sample sha, k, site,
dictionary weights sha), in memory and, with $MINICIRC_CACHE set, in $MINICIRC_CACHE/explain/.
"""
import bisect
import os
from collections import Counter

import torch

from . import explain_cache
from .attribution.common import inputs_from, with_sources
from .circuit import parse_node_id
from .data import load_examples, pad_right
from .errors import MinicircError
from .sae.clt import is_clt
from .sae.sparse import features_at

# --- text samples ----------------------------------------------------------------------------------

def load_texts(path):
    """Texts from a data file (every distinct clean_prefix and patch_prefix, in file order) or, for any other
    file, one text a line (blank lines skipped)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MinicircError(f"text file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()[:1]
    if head in ("{", "["):
        texts = []
        for ex in load_examples(path):
            texts += [ex.clean_prefix] + ([ex.patch_prefix] if ex.patch_prefix is not None else [])
    else:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise MinicircError(f"{path}: no texts in it")
    return texts


def tokenize_texts(texts, tokenizer, model=None):
    """[(ids, token strings)] for each non-empty text. A token's string is its surface text (from the
    encoding's offsets, so it keeps its leading space and the strings concatenate back to the text); where
    that is empty (a byte-level token inside one character) it is tokenizer.id_to_token(id)."""
    out = []
    for text in texts:
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        if not ids:
            continue
        if model is not None:
            ids = ids[:model.cfg.max_len]
            bad = [i for i in ids if i >= model.cfg.vocab_size]
            if bad:
                raise MinicircError(f"text {text!r}: token id {bad[0]} is out of the model's vocabulary "
                                    f"({model.cfg.vocab_size}); tokenizer and model do not belong together")
        strs, prev = [], 0
        for i, (a, b) in zip(ids, enc.offsets):
            s = text[prev:b] if b > prev else ""
            prev = max(prev, b)
            strs.append(s or tokenizer.id_to_token(i) or f"<{i}>")
        out.append((ids, strs))
    if not out:
        raise MinicircError("the text sample is empty")
    return out


def _as_ids(sample):
    """Accept [(ids, strs)] or [ids]; return ([ids], [strs or None])."""
    ids, strs = [], []
    for row in sample:
        if isinstance(row, tuple) and len(row) == 2 and isinstance(row[1], (list, tuple)) \
                and row[1] and isinstance(row[1][0], str):
            ids.append([int(t) for t in row[0]])
            strs.append(list(row[1]))
        else:
            ids.append([int(t) for t in row])
            strs.append(None)
    return ids, strs


# --- the activation scan -------------------------------------------------------------------------------

def check_feature(site, sae, feature):
    if not isinstance(feature, int) or isinstance(feature, bool):
        raise MinicircError(f"feature {feature!r} of {site} is not an integer")
    if not 0 <= feature < sae.n_features:
        raise MinicircError(f"feature {feature} is out of range for {site}: its dictionary has "
                            f"{sae.n_features} features (0..{sae.n_features - 1})")


def _prefix_groups(ids, token_only=False):
    """{flat index of the first occurrence of a token prefix: [flat indices of its later occurrences]}.

    A position's activation depends only on the tokens up to it, so equal prefixes have mathematically equal
    activations; computed in different batches (other padding) they can differ in the last bits, which would
    let rounding decide their order. Only first occurrences are scanned and the repeats take their value, so
    equal prefixes are exact ties and sample order ranks them. A leading run of one token counts as that
    token alone (same activations at every site). token_only: group by the token alone (the
    embed site, whose value depends on nothing else)."""
    trie, groups, flat = {}, {}, 0   # trie: (parent node, token) -> flat index of that prefix's first occurrence
    for row in ids:
        node, run = -1, True
        for p, t in enumerate(row):
            run = run and t == row[0]
            node = trie.setdefault((-1 if token_only else node, t), flat)
            # A leading run t t ... t holds at every site the value of t alone (attention averages equal
            # values): its canonical position is the first occurrence of the prefix [t].
            canon = trie[(-1, t)] if (run and not token_only) else node
            if canon == flat:
                groups[flat] = []
            else:
                groups[canon].append(flat)
            flat += 1
    return groups


def _offsets(ids):
    """(flat index of each sentence's first position, total positions): (sentence s, position p) is flat
    index offsets[s] + p in the sample's positions laid end to end."""
    offsets, total = [], 0
    for row in ids:
        offsets.append(total)
        total += len(row)
    return offsets, total


@torch.no_grad()
def _scan(model, saes, wanted, ids, k, batch_size):
    """wanted: {site: [features]} -> {site: {feature: (values (<=k,), flat indices (<=k,))}}, the top-k
    (value descending, sample order among equals) over every real (sentence, position), in one forward pass
    per batch for all sites. The flat index of (sentence s, position p) is offsets[s] + p. Only the first
    occurrence of each token prefix is a candidate (see _prefix_groups)."""
    device = next(model.parameters()).device
    sites = [s for s in wanted if wanted[s]]
    last = max(sites, key=model.all_sites.index)
    cols = {s: torch.tensor(wanted[s], dtype=torch.long, device=device) for s in sites}
    best = {s: (torch.empty(0, len(wanted[s]), device=device, dtype=saes[s].W_enc.dtype),
                torch.empty(0, len(wanted[s]), dtype=torch.long, device=device)) for s in sites}
    offsets, total = _offsets(ids)
    first = {}
    for s in sites:
        first[s] = torch.zeros(total + 1, dtype=torch.bool, device=device)  # the last entry: padding
        first[s][list(_prefix_groups(ids, token_only=s == "embed"))] = True
    for b0 in range(0, len(ids), batch_size):
        rows = ids[b0:b0 + batch_size]
        T = max(map(len, rows))
        if T == 0:
            continue
        tokens = pad_right(rows, 0, device)
        flat_all = torch.tensor([offsets[b0 + i] + p if p < len(r) else total for i, r in enumerate(rows)
                                 for p in range(T)], dtype=torch.long, device=device)
        cache = {}
        # Optional sites (z_l, mlp_hidden_l, resid_mid_l) reach the cache only when named.
        extra = [s for s in with_sources(model, saes, sites) if s not in model.sites]
        model(tokens, cache=cache, stop_at=last, extra=extra)
        u = inputs_from(model, saes, sites, cache)     # a transcoder's features read its MLP's input
        for s in sites:
            real = first[s][flat_all]
            flat = flat_all[real]
            x = u.get(s, cache[s]).to(saes[s].W_enc.dtype).flatten(0, 1)[real]
            f = features_at(saes[s], x, cols[s])                     # (n, features), from the sparse rows
            v = torch.cat([best[s][0], f])
            i = torch.cat([best[s][1], flat[:, None].expand_as(f)])
            # Earlier candidates come first and a stable sort keeps them first among equal values.
            order = torch.sort(v, dim=0, descending=True, stable=True).indices[:k]
            best[s] = (v.gather(0, order), i.gather(0, order))
    return {s: {f: (best[s][0][:, j].cpu(), best[s][1][:, j].cpu()) for j, f in enumerate(wanted[s])}
            for s in sites}


def top_activations(model, saes, wanted, sample, k=10, batch_size=64):
    """{site: {feature: [(sentence index, position, value)]}} for the k highest activations of each wanted
    feature over the sample, through the cache."""
    ids, _ = _as_ids(sample)
    for s, feats in wanted.items():
        if s not in saes:
            raise MinicircError(f"unknown site {s!r}; known: {', '.join(saes)}")
        for f in feats:
            check_feature(s, saes[s], f)
    if not ids:
        raise MinicircError("the text sample is empty")
    base = (explain_cache.model_sha(model), explain_cache.sample_sha(ids), int(k))
    keys, todo = {}, {}
    for s, feats in wanted.items():
        keys[s] = base + (s, explain_cache.sae_sha(saes[s]))
        missing = [f for f in dict.fromkeys(feats) if f not in explain_cache.cached(keys[s])]
        if missing:
            todo[s] = missing
    if todo:
        for s, found in _scan(model, saes, todo, ids, k, batch_size).items():
            explain_cache.store(keys[s], found)
    starts, _ = _offsets(ids)
    out = {}
    for s, feats in wanted.items():
        out[s] = {}
        groups = _prefix_groups(ids, token_only=s == "embed")
        for f in feats:
            vals, idx = explain_cache.cached(keys[s])[f]
            # The top k first occurrences hold the first occurrences of the overall top k (each ranks above
            # its repeats); add the repeats with their value and rank again by (value desc, sample order).
            cand = [(v, j) for v, i in zip(vals.tolist(), idx.tolist()) for j in [i] + groups[i]]
            cand.sort(key=lambda c: (-c[0], c[1]))
            rows = []
            for v, i in cand[:k]:
                sent = bisect.bisect_right(starts, i) - 1
                rows.append((sent, i - starts[sent], float(v)))
            out[s][f] = rows
    return out


def top_contexts(model, sae, site, texts_tokens, feature, k=10, batch_size=64, tokenizer=None):
    """The k (sentence, position) pairs of the sample where `feature` of `sae` at `site` is highest, as
    [{"tokens": [str], "index": position, "value": activation}], highest first, ties in sample order.

    texts_tokens: [[token id]] (token strings then come from tokenizer.id_to_token, or are the ids as
    strings without a tokenizer) or [(ids, strs)] as tokenize_texts returns."""
    model.check_sites([site])
    ids, strs = _as_ids(texts_tokens)
    rows = top_activations(model, {site: sae}, {site: [feature]}, texts_tokens, k=k, batch_size=batch_size)
    out = []
    for sent, pos, v in rows[site][feature]:
        toks = strs[sent]
        if toks is None:
            toks = [(tokenizer.id_to_token(t) if tokenizer is not None else None) or str(t) for t in ids[sent]]
        out.append({"tokens": list(toks), "index": pos, "value": v})
    return out


def _token_str(tokenizer, i):
    if tokenizer is None:
        return str(i)
    try:
        s = tokenizer.decode([i], skip_special_tokens=False)
    except Exception:
        s = ""
    return s or tokenizer.id_to_token(i) or f"<{i}>"


@torch.no_grad()
def logit_effects(model, sae, feature, n=5, tokenizer=None, site=None):
    """{"promoted": [[token, value]], "suppressed": [[token, value]]}: the n largest and n smallest entries
    of W_dec[feature] @ the unembedding.T, the direct effect on the logits of adding the feature's decoder
    direction to the residual stream.

    Approximation: the final LayerNorm is skipped (its scale, which depends on the whole residual, and its
    elementwise weight and mean removal), so the values rank tokens rather than give exact logit changes.
    Meaningful for every site (embed, attn_l, mlp_l and resid_l write to the residual stream; z_l and
    mlp_hidden_l through the projection after them, model.write_direction), and only as a direct effect:
    later layers are ignored. A cross-layer transcoder's feature writes into every later MLP output too, each
    straight into the residual stream: its direction is the sum of its writes, W_out[feature].sum(0)."""
    check_feature(site or "this site", sae, feature)
    if sae.kind == "identity":
        direction = torch.zeros(sae.d_in, device=sae.W_dec.device)
        direction[feature] = 1.0
    else:
        direction = sae.W_out[feature].sum(0) if is_clt(sae) else sae.W_dec[feature]
    if site is not None:
        direction = model.write_direction(site, direction)
    W = model.unembedding
    scores = (direction.to(W.device, W.dtype) @ W.T).float().cpu()
    n = min(n, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices
    top, bottom = order[:n].tolist(), order.flip(0)[:n].tolist()
    return {"promoted": [[_token_str(tokenizer, i), float(scores[i])] for i in top],
            "suppressed": [[_token_str(tokenizer, i), float(scores[i])] for i in bottom]}


def _by_site(model, pairs):
    """[(site, feature)] -> {site: [feature]}: each feature once, sites in the model's order."""
    wanted = {}
    for site, feat in pairs:
        wanted.setdefault(site, [])
        if feat not in wanted[site]:
            wanted[site].append(feat)
    return {s: wanted[s] for s in sorted(wanted, key=model.all_sites.index)}


def circuit_contexts(model, saes, tokenizer, circuit, texts, k=5, n_logits=5, batch_size=64):
    """The `contexts` argument of viewer.write_html / Circuit.save for every feature node of `circuit`
    (its circuit.json dict): {"site/feature": {"contexts": [...], "logits": {...}}}. Positional node ids
    ("site/feature@pos") share their feature's entry, which the viewer falls back to. `texts` is a list of
    strings (or a path for load_texts). One forward pass per batch of texts covers every node."""
    if isinstance(texts, (str, os.PathLike)):
        texts = load_texts(texts)
    sample = tokenize_texts(texts, tokenizer, model)
    pairs = []
    for node in circuit.get("nodes", []):
        parsed = parse_node_id(str(node.get("id", "")))
        if parsed is None or parsed[1] is None:     # the metric node y, error nodes
            continue
        if parsed[0] not in saes:
            raise MinicircError(f"circuit node {node['id']}: no dictionary for site {parsed[0]!r}")
        pairs.append(parsed[:2])
    if not pairs:
        return {}
    wanted = _by_site(model, pairs)
    rows = top_activations(model, saes, wanted, sample, k=k, batch_size=batch_size)
    out = {}
    for site, feats in wanted.items():
        for f in feats:
            entry = {
                "contexts": [{"tokens": list(sample[sent][1]), "index": pos, "value": v}
                             for sent, pos, v in rows[site][f]],
                "logits": logit_effects(model, saes[site], f, n=n_logits, tokenizer=tokenizer, site=site),
            }
            label = context_label(entry)
            out[f"{site}/{f}"] = entry | ({"label": label} if label else {})
    return out


def _shown_token(token, width=12):
    """A token as a label shows it: surrounding spaces dropped (" the" and "the" read the same), whitespace
    that is all there is or any control character made visible (↵ for a newline), cut to `width`."""
    visible = {"\n": "↵", "\r": "↵", "\t": "⇥"}
    t = token.strip() or token.replace(" ", "␣")
    t = "".join(visible.get(c) or ("�" if c < " " or c == "\x7f" else c) for c in t)
    return t if len(t) <= width else t[:width - 1] + "…"


def context_label(entry):
    """A short label a reader can scan beside a feature's index: '"the" 80%', the token the feature fires on
    most among its top contexts (those with a positive value) and the share of them at that token, rounded
    half up; equally frequent tokens rank by their highest context. With no positive context, '→"are"': the
    token its decoder direction promotes most (logit_effects). None with neither (an entry of contexts.json,
    as circuit_contexts writes it)."""
    fired = [c for c in entry.get("contexts") or [] if c["value"] > 0]
    if fired:
        counts = Counter(_shown_token(c["tokens"][c["index"]]) for c in fired)   # first seen first among ties
        token, n = counts.most_common(1)[0]
        return f'"{token}" {(200 * n + len(fired)) // (2 * len(fired))}%'
    promoted = (entry.get("logits") or {}).get("promoted")
    return f'→"{_shown_token(promoted[0][0])}"' if promoted else None


def marked_text(tokens, index, start=0, end=None):
    """tokens[start:end] joined, the one at `index` marked [[like this]] (its leading space stays outside)."""
    mark = lambda t: t[:len(t) - len(t.lstrip())] + f"[[{t.lstrip()}]]"
    return "".join(mark(t) if j == index else t for j, t in enumerate(tokens[start:end], start=start))


def format_context(ctx, window=16):
    """One line: the value, then the tokens around the activating one, which is marked [[like this]]."""
    toks, i = ctx["tokens"], ctx["index"]
    a, b = max(0, i - window), min(len(toks), i + 6)
    text = ("…" if a > 0 else "") + marked_text(toks, i, a, b) + ("…" if b < len(toks) else "")
    return f"{ctx['value']:10.4f}  {text}".replace("\n", "↵")


def feature_contexts(model, saes, tokenizer, texts, features, k=5):
    """{(site, feature): [{"text": the whole text with the token marked [[like this]], "token": str, "value":
    float}]}: the k top-activating (text, position) pairs over `texts` of each (site, feature, ...) in
    `features` (the scan of top_activations), for reports that quote whole texts."""
    if not features:
        return {}
    sample = tokenize_texts(texts, tokenizer, model)
    wanted = _by_site(model, [(f[0], f[1]) for f in features])
    rows = top_activations(model, saes, wanted, sample, k=k)
    return {(site, f): [{"text": marked_text(sample[sent][1], pos), "token": sample[sent][1][pos].strip(), "value": v}
                        for sent, pos, v in rows[site][f]]
            for site, feats in wanted.items() for f in feats}


def top_tokens(contexts, n=3):
    """"she ×3, her ×2": the most frequent activating tokens of a feature's top contexts."""
    c = Counter(x["token"] for x in contexts)
    return ", ".join(f"{t} ×{m}" for t, m in c.most_common(n))
