"""minicirc.explain: top contexts equal a brute-force scan, the cache (explain_cache) returns the same thing
without a new pass, circuit_contexts covers every feature node in one pass per batch, and `minicirc explain`
prints them."""

import json
import re

import pytest
import torch

import minicirc
from minicirc import explain, explain_cache, viz
from minicirc.cli import main
from minicirc.model import Config, GPTNeoX
from minicirc.sae import Dictionary

from test_cli import ROWS, write_data, write_tokenizer, write_tree
from test_viewer import embedded_data
from test_viz import dot_label
from conftest import write_hf_model


def random_setup(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cfg = Config(vocab_size=23, d_model=16, n_layers=2, n_heads=4, d_mlp=24, max_len=32)
    torch.manual_seed(seed)
    model = GPTNeoX(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    F = 12
    saes = {s: Dictionary(torch.randn(16, F, generator=g), torch.randn(F, generator=g) - 1.0,
                          torch.randn(F, 16, generator=g), torch.randn(16, generator=g) * 0.1, "relu")
            for s in model.sites}
    model, saes = model.to(dtype), {s: d.to(dtype) for s, d in saes.items()}
    lengths = torch.randint(1, 9, (17,), generator=g).tolist()
    sample = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    sample[5] = list(sample[2])  # a repeated sentence: equal values, sample order decides
    return model, saes, sample


def site_values(model, site, sample):
    """The site's value for every sentence run alone (batch of one, no padding), as python floats."""
    out = []
    for ids in sample:
        cache = {}
        with torch.no_grad():
            model(torch.tensor([ids]), cache=cache, stop_at=site)
        out.append(cache[site][0].tolist())
    return out


def brute_force(sae, xs, feature, k):
    """Every sentence, every position, the relu SAE formula written out; ties in sample order."""
    W, b_enc, b_dec = sae.W_enc[:, feature].tolist(), float(sae.b_enc[feature]), sae.b_dec.tolist()
    found = []
    for s, x in enumerate(xs):
        for p in range(len(x)):
            pre = b_enc
            for j in range(len(W)):
                pre += (x[p][j] - b_dec[j]) * W[j]
            found.append((max(pre, 0.0), s, p))
    # Equal prefixes (equal tokens at embed) have equal activations; computed alone at different lengths they
    # may differ in the last bits (float64 here), so compare values rounded far below any real gap.
    found.sort(key=lambda t: (-round(t[0], 9), t[1], t[2]))
    return found[:k]


@pytest.mark.parametrize("site", ["embed", "attn_0", "mlp_1", "resid_1"])
def test_top_contexts_equal_brute_force(site):
    seed = int(torch.randint(0, 10**6, ()).item())
    model, saes, sample = random_setup(seed)
    explain_cache.clear_cache()
    xs = site_values(model, site, sample)
    n_tokens = sum(map(len, sample))
    for feature in range(saes[site].n_features):
        for k in (3, n_tokens):  # k = every position: the zero activations' order is checked too
            got = explain.top_contexts(model, saes[site], site, sample, feature, k=k, batch_size=4)
            want = brute_force(saes[site], xs, feature, k)
            assert [(c["index"], c["tokens"]) for c in got] == [(p, [str(t) for t in sample[s]]) for _, s, p in want], seed
            assert [c["value"] for c in got] == pytest.approx([v for v, _, _ in want], abs=1e-9)
    # (sentence, position) identity, not just the tokens: repeated sentences must come in sample order
    rows = explain.top_activations(model, saes, {site: list(range(12))}, sample, k=n_tokens, batch_size=5)[site]
    for feature, got in rows.items():
        assert [(s, p) for s, p, _ in got] == [(s, p) for _, s, p in brute_force(saes[site], xs, feature, n_tokens)], seed


def test_cache_memory_and_disk(tmp_path, monkeypatch):
    model, saes, sample = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float32)
    explain_cache.clear_cache()
    monkeypatch.setenv("MINICIRC_CACHE", str(tmp_path))
    first = explain.top_contexts(model, saes["resid_0"], "resid_0", sample, 3, k=4)
    assert list((tmp_path / "explain").glob("*.safetensors"))

    def no_scan(*a, **kw):
        raise AssertionError("the cache should have answered")
    monkeypatch.setattr(explain, "_scan", no_scan)
    assert explain.top_contexts(model, saes["resid_0"], "resid_0", sample, 3, k=4) == first  # memory
    explain_cache.clear_cache()
    assert explain.top_contexts(model, saes["resid_0"], "resid_0", sample, 3, k=4) == first  # disk
    # Another sample, other dictionary weights or another model are other keys.
    with pytest.raises(AssertionError, match="cache"):
        explain.top_contexts(model, saes["resid_0"], "resid_0", sample[:-1], 3, k=4)
    with pytest.raises(AssertionError, match="cache"):
        explain.top_contexts(model, saes["resid_1"], "resid_0", sample, 3, k=4)
    with torch.no_grad():
        model.embed_in.weight.add_(1.0)
    with pytest.raises(AssertionError, match="cache"):
        explain.top_contexts(model, saes["resid_0"], "resid_0", sample, 3, k=4)


def test_logit_effects_and_errors():
    model, saes, _ = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float32)
    sae = saes["mlp_0"]
    eff = explain.logit_effects(model, sae, 5, n=3)
    scores = sae.W_dec[5] @ model.embed_out.weight.T
    assert [int(t) for t, _ in eff["promoted"]] == scores.argsort(descending=True)[:3].tolist()
    assert [int(t) for t, _ in eff["suppressed"]] == scores.argsort()[:3].tolist()
    assert [v for _, v in eff["promoted"]] == pytest.approx(scores.sort(descending=True).values[:3].tolist(), rel=1e-5)
    with pytest.raises(minicirc.MinicircError, match="out of range"):
        explain.logit_effects(model, sae, sae.n_features)
    with pytest.raises(minicirc.MinicircError, match="out of range"):
        explain.top_contexts(model, sae, "mlp_0", [[1, 2]], -1)
    with pytest.raises(minicirc.MinicircError, match="unknown site"):
        explain.top_contexts(model, sae, "mlp_7", [[1, 2]], 0)


@pytest.fixture
def files(tmp_path):
    write_hf_model(tmp_path / "model", seed=int(torch.randint(0, 1000, ()).item()), vocab=40)
    write_tokenizer(tmp_path / "model", 40)
    model = minicirc.load_model(tmp_path / "model")
    write_tree(tmp_path / "saes", model, seed=int(torch.randint(0, 1000, ()).item()))
    write_data(tmp_path / "data.jsonl", ROWS)
    (tmp_path / "texts.txt").write_text("the cat is big\n\nthe dogs near the cat are small\ncats and dogs\n")
    return tmp_path


def test_circuit_contexts_cover_every_feature_node(files, monkeypatch):
    t = files
    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    tok = minicirc.load_tokenizer(t / "model")
    batch = minicirc.tokenize(minicirc.load_examples(t / "data.jsonl"), tok)[0:3:2]  # equal lengths
    circuit = minicirc.find_circuit(model, saes, batch, method="attrib", node_threshold=0.0, nodes_only=True,
                                    aggregation="none", progress=False).to_json()
    texts = explain.load_texts(t / "data.jsonl")
    assert texts == list(dict.fromkeys(x for r in ROWS for x in (r["clean_prefix"], r["patch_prefix"])))
    texts = texts + explain.load_texts(t / "texts.txt")
    explain_cache.clear_cache()
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    ctx = explain.circuit_contexts(model, saes, tok, circuit, texts, k=3, batch_size=4)
    assert len(calls) == -(-len(texts) // 4)  # one pass per batch, every site at once
    feature_nodes = {n["id"].split("@")[0] for n in circuit["nodes"] if n["feature"] != "err"}
    assert feature_nodes and set(ctx) == feature_nodes
    sample = explain.tokenize_texts(texts, tok, model)
    for nid, entry in ctx.items():
        site, f = nid.split("/")
        assert entry["contexts"] == explain.top_contexts(model, saes[site], site, sample, int(f), k=3)
        assert entry.get("label") == explain.context_label(entry) and entry["label"]   # stored beside them
        assert len(entry["logits"]["promoted"]) == 5 and len(entry["logits"]["suppressed"]) == 5
        for c in entry["contexts"]:
            assert "".join(c["tokens"]) in texts
    from minicirc.viewer import write_html
    html = write_html(circuit, t / "c.html", ctx).read_text()
    assert next(iter(ctx)) in html
    # The same short label in circuit.html's data and after the index in circuit.dot, on every feature node
    # (positional ids through their feature's entry); the error nodes keep their plain id.
    assert json.loads(embedded_data(html))["contexts"] == ctx
    dot = {re.match(r'\s*"(.+?)" \[label=', ln).group(1): dot_label(ln)[0]
           for ln in viz.to_dot(circuit, ctx).splitlines() if "[label=" in ln}
    for n in circuit["nodes"]:
        index = f"{n['feature']}@{n['pos']}"
        assert dot[n["id"]] == (index if n["feature"] == "err" else f"{index} {ctx[n['id'].split('@')[0]]['label']}")


def test_cli_explain(files, capsys):
    t = files
    base = ["explain", "--model", t / "model", "--saes", t / "saes", "--site", "resid_1"]
    assert main([str(a) for a in base + ["--feature", 3, "--data", t / "texts.txt", "--k", 4]]) == 0
    out = capsys.readouterr().out
    model = minicirc.load_model(t / "model")
    sae = minicirc.load_saes(t / "saes", model)["resid_1"]
    sample = explain.tokenize_texts(explain.load_texts(t / "texts.txt"), minicirc.load_tokenizer(t / "model"), model)
    want = explain.top_contexts(model, sae, "resid_1", sample, 3, k=4)
    lines = [l for l in out.splitlines() if "[[" in l]
    assert len(lines) == 4
    for line, c in zip(lines, want):
        assert f"{c['value']:.4f}" in line and f"[[{c['tokens'][c['index']].strip()}]]" in line
    assert "promoted" in out and "suppressed" in out
    assert main([str(a) for a in ["explain", "--model", t / "model", "--saes", "neurons", "--site", "embed",
                                  "--feature", 0, "--data", t / "data.jsonl"]]) == 0
    capsys.readouterr()
    for extra, expect in [(["--feature", 24, "--data", t / "texts.txt"], "out of range"),
                          (["--feature", 0, "--data", t / "nope.txt"], "does not exist")]:
        assert main([str(a) for a in base + extra]) == 2
        assert expect in capsys.readouterr().err
    bad_site = ["explain", "--model", t / "model", "--saes", t / "saes", "--site", "resid_5", "--feature", 0,
                "--data", t / "texts.txt"]
    assert main([str(a) for a in bad_site]) == 2
    assert "unknown site" in capsys.readouterr().err


def test_cli_without_data_uses_held_out_corpus_sentences(tmp_path, monkeypatch, capsys):
    from minicirc.experiments import default
    from minicirc.experiments.tasks.corpus import corpus_documents
    monkeypatch.setenv("MINICIRC_CACHE", str(tmp_path / "cache"))
    *_, folder = default.get_default("quick", progress=False)
    assert main(["explain", "--model", f"{folder}/model", "--saes", f"{folder}/saes", "--site", "resid_1",
                 "--feature", "3", "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert "500 held-out sentences" in out
    model = minicirc.load_model(f"{folder}/model")
    tok = minicirc.load_tokenizer(f"{folder}/model")
    sae = minicirc.load_saes(f"{folder}/saes", model)["resid_1"]
    sample = explain.tokenize_texts(corpus_documents(500, seed=0, split="test"), tok, model)
    want = [explain.format_context(c) for c in explain.top_contexts(model, sae, "resid_1", sample, 3, k=4)]
    assert [line for line in out.splitlines() if "[[" in line] == want


def test_load_texts_keeps_each_distinct_prefix_once_in_file_order(tmp_path):
    import json
    import random
    rng = random.Random(int(torch.randint(0, 10**9, ()).item()))
    words = ["the", "cat", "cats", "dog", "dogs", "near", "big", "small"]
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
    rows = [{"clean_prefix": sentence(), "patch_prefix": sentence(), "clean_answer": " is", "patch_answer": " are"}
            for _ in range(6)]
    rows.append(dict(rows[1], patch_prefix=sentence()))          # a clean_prefix repeated in another record
    rows.append(dict(rows[3], clean_prefix=sentence(), patch_prefix=rows[0]["clean_prefix"]))  # patch == a clean
    rows.append({"clean_prefix": rows[2]["patch_prefix"], "clean_answer": " is"})               # clean == a patch
    rng.shuffle(rows)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    every = []
    for r in rows:
        every.append(r["clean_prefix"])
        if "patch_prefix" in r:
            every.append(r["patch_prefix"])
    expected = list(dict.fromkeys(every))
    assert len(expected) < len(every)
    assert explain.load_texts(path) == expected
    # One text a line: blank lines skipped, repeats kept once.
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(every[:4] + ["", every[0]] + every[4:]) + "\n")
    assert explain.load_texts(lines) == expected


# --- gaps found by mutation testing ---------------------------------------------------------------------

class _Enc:
    def __init__(self, ids, offsets):
        self.ids, self.offsets = ids, offsets


class _CharTokenizer:
    """One token per character (id = its position in `alphabet`), or a fixed encoding per text."""
    def __init__(self, alphabet, fixed=None):
        self.alphabet, self.fixed = alphabet, fixed or {}

    def encode(self, text, add_special_tokens=False):
        if text in self.fixed:
            return _Enc(*self.fixed[text])
        return _Enc([self.alphabet.index(c) for c in text], [(i, i + 1) for i in range(len(text))])

    def id_to_token(self, i):
        return f"<t{i}>"


def test_tokenize_texts_truncates_checks_the_vocabulary_and_keeps_surface_strings():
    model, _, _ = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float32)
    V, L = model.cfg.vocab_size, model.cfg.max_len
    alphabet = "".join(chr(ord("a") + i) for i in range(V))            # ids 0..V-1, all in the vocabulary
    n = L + int(torch.randint(1, 10, ()))
    long = "".join(alphabet[int(i)] for i in torch.randint(0, V, (n,)))
    tok = _CharTokenizer(alphabet + "!")                                 # "!" is id V: outside the vocabulary
    got = explain.tokenize_texts(["", long, "ab"], tok, model)          # the empty text is skipped
    assert [ids for ids, _ in got] == [[alphabet.index(c) for c in long[:L]], [0, 1]]
    assert [strs for _, strs in got] == [list(long[:L]), ["a", "b"]]
    assert len(explain.tokenize_texts([long], tok)[0][0]) == n           # no model: nothing to truncate to
    with pytest.raises(minicirc.MinicircError, match="out of the model's vocabulary"):
        explain.tokenize_texts(["ab!"], tok, model)
    with pytest.raises(minicirc.MinicircError, match="empty"):
        explain.tokenize_texts(["", ""], tok, model)
    # Overlapping offsets (byte-level pieces of one character, then a token ending earlier): the strings still
    # concatenate back to the text, and an empty piece shows the token's name.
    text = "xéyz"
    fixed = _CharTokenizer(alphabet, {text: ([3, 4, 5, 6, 7], [(0, 1), (1, 2), (1, 2), (1, 2), (2, 4)])})
    (ids, strs), = explain.tokenize_texts([text], fixed, model)
    assert "".join(strs).replace("<t5>", "").replace("<t6>", "") == text
    assert strs == ["x", "é", "<t5>", "<t6>", "yz"]
    fixed = _CharTokenizer(alphabet, {text: ([3, 4, 5], [(0, 3), (1, 2), (3, 4)])})
    assert explain.tokenize_texts([text], fixed, model)[0][1] == ["xéy", "<t4>", "z"]


def test_features_must_be_plain_integers():
    model, saes, sample = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float32)
    for bad in (True, 2.0, "3"):
        with pytest.raises(minicirc.MinicircError, match="not an integer"):
            explain.top_contexts(model, saes["resid_0"], "resid_0", sample, bad)
        with pytest.raises(minicirc.MinicircError, match="not an integer"):
            explain.logit_effects(model, saes["resid_0"], bad)


def test_format_context_window_and_marks():
    for _ in range(20):
        n = int(torch.randint(1, 40, ()))
        i = int(torch.randint(0, n, ()))
        toks = [f" w{j}" if j % 3 else f"\nw{j}" for j in range(n)]
        value = float(torch.randn(()))
        line = explain.format_context({"tokens": toks, "index": i, "value": value})
        head, body = line[:10], line[12:]
        assert float(head) == pytest.approx(value, abs=1e-4) and line[10:12] == "  "
        lo, hi = max(0, i - 16), min(n, i + 6)                   # 16 tokens before, the token and 5 after
        assert body.startswith("…") == (lo > 0) and body.endswith("…") == (hi < n)
        words = body.strip("…").replace("↵", " ").split()
        assert words == [f"[[w{j}]]" if j == i else f"w{j}" for j in range(lo, hi)]
        assert "\n" not in line and ("↵" in line) == any(j % 3 == 0 for j in range(lo, hi))


def test_node_ids_and_unknown_sites():
    from minicirc.circuit import parse_node_id
    assert parse_node_id("resid_1/37@5") == ("resid_1", 37, 5)
    assert parse_node_id("embed/4") == ("embed", 4, None)
    assert parse_node_id("resid_1/err") == ("resid_1", None, None)     # error nodes: no feature
    assert parse_node_id("resid_1/err@2") == ("resid_1", None, 2)
    for nid in ("y", "metric"):
        assert parse_node_id(nid) is None
    model, saes, sample = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float32)
    with pytest.raises(minicirc.MinicircError, match="unknown site"):
        explain.top_activations(model, {"resid_0": saes["resid_0"]}, {"mlp_0": [0]}, sample)


def test_cache_keys_cover_every_dictionary_field_and_damaged_files_are_recomputed(tmp_path, monkeypatch):
    model, saes, sample = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float32)
    sae = saes["resid_0"]
    base = explain_cache.sae_sha(sae)
    fields = dict(W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=sae.b_dec)
    for name in fields:
        changed = {k: (v + 0.5 * torch.randn_like(v) if k == name else v) for k, v in fields.items()}
        other = Dictionary(changed["W_enc"], changed["b_enc"], changed["W_dec"], changed["b_dec"], "relu")
        assert explain_cache.sae_sha(other) != base, name
    same = Dictionary(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, "relu")
    assert explain_cache.sae_sha(same) == base
    assert explain_cache.sae_sha(Dictionary(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, "relu",
                                            subtract_b_dec=False)) != base
    # Shapes are part of the key: zero dictionaries 2 -> 3 and 3 -> 2 have the same bytes (2dF + F + d zeros).
    zeros = lambda d, n: Dictionary(torch.zeros(d, n), torch.zeros(n), torch.zeros(n, d), torch.zeros(d), "relu")
    assert explain_cache.sae_sha(zeros(2, 3)) != explain_cache.sae_sha(zeros(3, 2))
    # A damaged cache file is recomputed, not trusted (nor an error).
    explain_cache.clear_cache()
    monkeypatch.setenv("MINICIRC_CACHE", str(tmp_path))
    first = explain.top_contexts(model, sae, "resid_0", sample, 2, k=5)
    files = list((tmp_path / "explain").glob("*.safetensors"))
    assert files
    for f in files:
        f.write_bytes(b"not a safetensors file" * 3)
    explain_cache.clear_cache()
    assert explain.top_contexts(model, sae, "resid_0", sample, 2, k=5) == first


def test_empty_rows_of_ids_are_skipped_but_keep_their_sentence_index():
    model, saes, sample = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float64)
    explain_cache.clear_cache()
    padded = [[]] + sample[:3] + [[], []] + sample[3:]
    where = [1, 2, 3] + list(range(6, len(padded)))                    # padded index of each sample sentence
    site, k = "resid_1", 8
    got = explain.top_activations(model, saes, {site: [4]}, padded, k=k, batch_size=2)[site][4]
    want = brute_force(saes[site], site_values(model, site, sample), 4, k)
    assert [(s, p) for s, p, _ in got] == [(where[s], p) for _, s, p in want]
    assert [v for *_, v in got] == pytest.approx([v for v, _, _ in want], abs=1e-9)


def test_ties_at_the_kth_place_keep_the_earliest_positions_across_batches():
    """Zero activations tie; with k just past the last positive one, the kept zeros must be the earliest
    (sentence, position) pairs even though they come from different batches."""
    model, saes, sample = random_setup(int(torch.randint(0, 10**6, ()).item()))
    explain_cache.clear_cache()
    site = "mlp_0"
    xs = site_values(model, site, sample)
    n_tokens = sum(map(len, sample))
    checked = 0
    for feature in range(saes[site].n_features):
        every = brute_force(saes[site], xs, feature, n_tokens)
        positive = sum(v > 0 for v, _, _ in every)
        if positive + 3 > n_tokens or any(0 < v < 1e-6 for v, _, _ in every):
            continue   # (a value this close to 0 could be 0 in a batch: skip such a feature)
        k = positive + 3
        got = explain.top_activations(model, saes, {site: [feature]}, sample, k=k, batch_size=3)[site][feature]
        # The positive values (their order can hinge on the last bits between different contexts), then the
        # three earliest exact zeros in sample order.
        assert sorted(v for *_, v in got[:positive]) == pytest.approx(sorted(v for v, _, _ in every[:positive]))
        assert [v for *_, v in got[positive:]] == [0.0] * 3
        assert [(s, p) for s, p, _ in got[positive:]] == [(s, p) for _, s, p in every[positive:k]]
        checked += 1
    assert checked > 0


def test_token_names_without_a_cache_and_text_files(tmp_path, monkeypatch):
    model, saes, sample = random_setup(int(torch.randint(0, 10**6, ()).item()), dtype=torch.float32)
    explain_cache.clear_cache()
    # Without $MINICIRC_CACHE nothing is written anywhere (not even relative to the working directory).
    monkeypatch.delenv("MINICIRC_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    tok = _CharTokenizer("")
    got = explain.top_contexts(model, saes["attn_1"], "attn_1", sample, 5, k=3, tokenizer=tok)
    plain = explain.top_contexts(model, saes["attn_1"], "attn_1", sample, 5, k=3)
    assert list(tmp_path.iterdir()) == []
    # Raw ids: token strings are the tokenizer's names for them, or the ids as strings without one.
    assert [(c["index"], c["value"]) for c in got] == [(c["index"], c["value"]) for c in plain]
    for c, p in zip(got, plain):
        assert c["tokens"] == [f"<t{t}>" for t in map(int, p["tokens"])]
    # A data file written as one JSON array is read as a data file; a file of blank lines holds no texts.
    import json
    rows = [{"clean_prefix": f"the cat {i}", "patch_prefix": f"the cats {i}", "clean_answer": " is",
             "patch_answer": " are"} for i in range(int(torch.randint(1, 4, ())))]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    assert explain.load_texts(tmp_path / "data.json") == [x for r in rows for x in (r["clean_prefix"], r["patch_prefix"])]
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(minicirc.MinicircError, match="no texts"):
        explain.load_texts(tmp_path / "blank.txt")


def test_top_tokens_counts_the_most_frequent():
    words = ["she", "her", "nurse", "he", "his"]
    picks = [words[int(i)] for i in torch.randint(0, 5, (30,))]
    from collections import Counter
    got = explain.top_tokens([{"token": w} for w in picks], n=3)
    parts = [p.rsplit(" ×", 1) for p in got.split(", ")]
    c = Counter(picks)
    assert len(parts) == 3 and all(c[t] == int(m) for t, m in parts)
    assert sorted(c.values(), reverse=True)[:3] == [int(m) for _, m in parts]


def test_sha256_of_is_hashlib_over_float32_bytes():
    """The package's one weight hasher against hashlib written out: strings as UTF-8, tensors as their float32
    values on the CPU; a bfloat16 or non-contiguous copy of the same values hashes alike, order matters."""
    import hashlib
    from minicirc.hashing import sha256_of
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    a = torch.randn(3, 4, generator=g).to(torch.bfloat16).float()      # exactly representable in bfloat16
    b = torch.randn(5, generator=g)
    h = hashlib.sha256()
    for part in (b"W", a.numpy().tobytes(), "é".encode(), b.numpy().tobytes()):
        h.update(part)
    assert sha256_of(["W", a, "é", b]) == h.hexdigest()
    assert sha256_of(["W", a.to(torch.bfloat16), "é", b.double()]) == h.hexdigest()
    assert sha256_of(["W", a.T.contiguous().T, "é", b]) == h.hexdigest()
    assert sha256_of(["é", a, "W", b]) != h.hexdigest()


def _ctx(token, value, before=("x",)):
    return {"tokens": list(before) + [token], "index": len(before), "value": value}


LOGITS = {"promoted": [[" are", 0.8], [" were", 0.5]], "suppressed": [[" is", -0.7]]}


@pytest.mark.parametrize("contexts,logits,want", [
    # The most frequent activating token and its share of the top contexts, rounded half up.
    ([_ctx(" the", 3.0), _ctx(" a", 2.5), _ctx(" the", 2.0), _ctx("the", 1.5), _ctx(" cat", 1.0)], LOGITS, '"the" 60%'),
    ([_ctx(" a", 3), _ctx(" the", 2), _ctx(" the", 1), _ctx(" b", 1), _ctx(" c", 1), _ctx(" d", 1), _ctx(" e", 1),
      _ctx(" f", 1)], LOGITS, '"the" 25%'),
    ([_ctx(" a", 3), _ctx(" b", 2), _ctx(" c", 1), _ctx(" d", 1), _ctx(" e", 1), _ctx(" f", 1), _ctx(" g", 1),
      _ctx(" a", 1)], None, '"a" 25%'),
    ([_ctx("x", 1), _ctx("y", 1), _ctx("z", 1)], None, '"x" 33%'),
    ([_ctx("x", 1), _ctx("y", 1), _ctx("y", 1)], None, '"y" 67%'),
    # Ties: the token of the highest context first, whatever the order of the tokens' names.
    ([_ctx(" zebra", 5.0), _ctx(" apple", 4.0), _ctx(" apple", 3.0), _ctx(" zebra", 2.0)], None, '"zebra" 50%'),
    ([_ctx(" apple", 5.0), _ctx(" zebra", 4.0), _ctx(" zebra", 3.0), _ctx(" apple", 2.0)], None, '"apple" 50%'),
    # Only contexts where the feature fires count; whitespace and control characters stay visible, long cut.
    ([_ctx("\n", 2.0), _ctx(" ", 1.0), _ctx("\n", 0.5), _ctx(" cat", 0.0), _ctx(" cat", -1.0)], LOGITS, '"↵" 67%'),
    ([_ctx(" ", 2.0), _ctx(" \n", 1.0), _ctx("  ", 0.5)], None, '"␣" 33%'),
    ([_ctx(" internationalization", 1.0)], None, '"internation…" 100%'),
    ([_ctx("a\tb\x00", 1.0)], None, '"a⇥b�" 100%'),
    # No context where it fires: the token its decoder direction promotes most.
    ([_ctx(" the", 0.0), _ctx(" the", 0.0)], LOGITS, '→"are"'),
    ([], LOGITS, '→"are"'),
    (None, {"promoted": [["\n\n", 1.0]]}, '→"↵↵"'),
    # Neither: no label, the node keeps its plain index.
    ([], None, None),
    ([_ctx(" the", -2.0)], {"promoted": [], "suppressed": []}, None),
], ids=["frequent", "share-8", "first-of-8", "third", "two-thirds", "tie-first", "tie-second", "fired-only",
        "whitespace", "long", "control", "dead", "no-contexts", "no-contexts-key", "nothing", "empty-logits"])
def test_context_label(contexts, logits, want):
    """context_label on hand-made entries: the token the feature fires on most among its top contexts and that
    token's share of them, ties to the highest context, the top promoted token without contexts, else None."""
    entry = {k: v for k, v in (("contexts", contexts), ("logits", logits)) if v is not None}
    assert explain.context_label(entry) == want
