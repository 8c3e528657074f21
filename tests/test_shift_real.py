"""`minicirc shift --model PATH` on tiny Llamas written by transformers (no download): the whole pipeline on a
random one (SAEs trained on agreement sentences and English bios, cached), and on one made so that the
confound sits in known features, the judge's choice and what retraining with the ablation does."""
import json
import math

import pytest
import torch

from minicirc.data import Batch
from minicirc.experiments import real_lm, shift, shift_run
from minicirc.experiments.tasks import agreement, bios, english_bios
from minicirc.model import load_model, load_tokenizer
from minicirc.sae import Dictionary

N_LAYERS = 4


def word_tokenizer():
    """One token per word of the grammar and of the English bios, the capitalised words too; punctuation
    split off ("Bio:" is "Bio" ":", "city." is "city" ".")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = (agreement.vocabulary() | bios.vocabulary() | {"The", "Is", "Are", "Was", "Were", "Bio", ":"}
             | {w.capitalize() for w in (*bios.NAMES[0], *bios.NAMES[1], *bios.SUBJECT_PRONOUN, *bios.POSSESSIVE)})
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(sorted(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def write_llama(folder, tok, edit=None):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("tiny-llama"), word_tokenizer())


# The made model: no block writes anything (attention and MLP outputs zeroed), so every residual stream is
# the token's embedding. Gender words point along e0 (female) or e1 (male), words of one profession's
# phrases only along e2 (nurse) or e3 (professor), every other word is small noise on the other axes.
FEMALE, MALE, NURSE, PROFESSOR = 0, 1, 2, 3


def profession_words():
    """Words in one profession's phrases and nowhere else in a bio."""
    words = [{w for p in bios.PROFESSION_PHRASES[i] for w in p.split()} for i in (0, 1)]
    rest = {w for p in (*bios.INTRO_PHRASES, *bios.FILLER_SENTENCES) for w in p.format(pron="", poss="").split()}
    return words[1] - words[0] - rest, words[0] - words[1] - rest      # nurse, professor


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tok = word_tokenizer()
    vocab = tok.get_vocab()
    nurse, professor = profession_words()
    axis = {}
    for g, axis_id in ((1, FEMALE), (0, MALE)):
        for w in (*bios.NAMES[g], bios.SUBJECT_PRONOUN[g], bios.POSSESSIVE[g]):
            axis[w] = axis[w.capitalize()] = axis_id
    axis.update({w: NURSE for w in nurse} | {w: PROFESSOR for w in professor})

    def edit(model):
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        E = model.model.embed_tokens.weight
        g = torch.Generator().manual_seed(1)
        E.copy_(0.3 * torch.randn(E.shape, generator=g))
        E[:, :4] = 0
        for w, i in vocab.items():
            if w in axis:
                E[i] = 0
                E[i, axis[w]] = 3.0

    folder = write_llama(tmp_path_factory.mktemp("made-llama"), tok, edit)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    # One dictionary for both sites: features 0-3 read and write the four axes, 4-7 random directions.
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(2)
    W = torch.cat([torch.eye(d)[:4], torch.nn.functional.normalize(torch.randn(4, d, generator=g), dim=1)])
    saes = {s: Dictionary(W.T.clone(), torch.zeros(8), W.clone(), torch.zeros(d), kind="relu")
            for s in ("resid_1", "resid_2")}
    cfg = dict(shift_run.REAL_SETTINGS["quick"], n_train=96, n_val=80, n_test=96, n_circuit=32, threshold=0.0,
               top_k=None, probe_layer=2)
    data = shift_run.make_data(tokenizer, cfg, source=english_bios)
    return model, tokenizer, saes, cfg, data


def test_english_bios_keep_the_generator_labels_and_split():
    raw, eng = bios.balanced_split(40, seed=5, split="test"), english_bios.balanced_split(40, seed=5, split="test")
    assert [(b.profession, b.gender) for b in raw] == [(b.profession, b.gender) for b in eng]
    for r, e in zip(raw, eng):
        assert e.text.startswith("Bio: ") and bios.split_of(r.text) == "test"
        # Lowercased, with the full stops spaced again and the header gone, it is the generator's text.
        assert e.text[len("Bio: "):].lower().replace(".", " .") == r.text


def test_shift_on_a_tiny_llama_end_to_end(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICIRC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    res = shift_run.run_shift(str(out), quick=True, model=str(tiny_llama), progress=False)
    sub = res["subject"]
    assert sub["kind"] == "real" and sub["start"] == 2
    # SAEs up to the middle layer only: resid_1 from the stride, then the probe's own resid_2.
    assert list(sub["bio_sites"]) == ["resid_1", "resid_2"] == list(res["features"]["sites"])
    for v in sub["bio_sites"].values():
        assert 0 < v["l0"] <= real_lm.RECIPES["bios-quick"]["k"] and math.isfinite(v["variance_explained"])
    for row in res["rows"].values():
        assert all(math.isfinite(row[k]) and 0 <= row[k] <= 1 for k in ("profession", "gender", "worst_group"))
    for kind in ("features", "neurons"):
        assert res[kind]["candidates"] and all(math.isfinite(v["effect"]) for v in res[kind]["candidates"])
        for v in res[kind]["candidates"]:
            assert v["level"] in ("token", "phrase") and 0 <= v["gender_token_share"] <= 1
            # Contexts never at the header ("Bio", ":").
            assert all(not c["text"].startswith(("[[Bio]]", "Bio[[:]]")) for c in v["contexts"])
        saved = json.loads((out / f"circuit_{kind}" / "circuit.json").read_text())
        assert {n["site"] for n in saved["nodes"]} <= {"resid_1", "resid_2"}
    report = (out / "shift_report.md").read_text()
    assert "on biography text" in report and "variance explained, bios" in report and "Bio: Mary" in report
    # A second run reads the SAEs and the results from the cache: nothing is computed again, and the files
    # are the first run's.
    monkeypatch.setattr(real_lm, "train_saes", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(shift_run, "shift_pipeline", lambda *a, **k: pytest.fail("computed again"))
    again = shift_run.run_shift(str(tmp_path / "again"), quick=True, model=str(tiny_llama), progress=False)
    assert again["rows"] == res["rows"] and again["features"] == res["features"]
    for name in ("circuit_features/circuit.json", "circuit_neurons/circuit.json", "bios_sample.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    # Other settings are another key: computed again.
    with pytest.raises(pytest.fail.Exception, match="computed again"):
        shift_run.run_shift(str(tmp_path / "other"), quick=True, model=str(tiny_llama), progress=False, margin=0.3)


def test_header_positions_are_left_alone(tiny_llama):
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    batch = shift.bios_batch(english_bios.balanced_split(8, seed=3), tok)
    sae = Dictionary(torch.eye(32), torch.zeros(32), torch.eye(32), torch.zeros(32), kind="relu")
    cache, edited = {}, {}
    model(batch.clean, cache=cache, stop_at="resid_2")
    model(batch.clean, cache=edited, stop_at="resid_2",
          edit=shift.ablation_edit({"resid_1": sae}, {"resid_1": list(range(32))}, start=2))
    torch.testing.assert_close(edited["resid_2"][:, :2], cache["resid_2"][:, :2])
    assert (edited["resid_1"][:, 2:] != cache["resid_1"][:, 2:]).any()
    # Pooling from the header on: the mean over positions 2..last, written out.
    x = cache["resid_2"]
    want = torch.stack([x[i, 2:int(batch.last[i]) + 1].mean(0) for i in range(len(batch))])
    torch.testing.assert_close(shift.mean_over_tokens(x, batch.last, start=2), want)


def test_the_judge_picks_the_features_built_to_carry_the_confound(made):
    model, tok, saes, cfg, data = made
    probe = shift.train_probe(model, data["train"], 2, l2=cfg["l2"], start=2)
    res = shift_run.shift_pipeline(model, saes, tok, probe, data, cfg, list(saes), progress=False)
    judged = {(v["site"], v["feature"]) for v in res["candidates"] if v["spurious"]}
    kept = {(v["site"], v["feature"]) for v in res["candidates"] if not v["spurious"]}
    # Both gender features are judged spurious (at both sites: every residual stream is the embedding), and
    # no profession feature is.
    assert {f for _, f in judged} == {FEMALE, MALE}
    assert {f for _, f in kept} & {NURSE, PROFESSOR} == {NURSE, PROFESSOR}
    original = shift.evaluate(model, probe, data["test"])
    assert original["worst_group"] < 0.5 < original["gender"]
    assert res["retrain"]["worst_group"] >= 0.95 and res["retrain"]["gender"] < 0.6
    assert shift_run._mean(res["random_retrain_runs"])["worst_group"] < 0.5
    # The gender features are token-level: they fire on names and pronouns only.
    assert all(v["level"] == "token" for v in res["candidates"] if v["feature"] in (FEMALE, MALE) and v["contexts"])


def test_retraining_with_the_ablation_in_place_differs_from_retraining_without(made):
    model, _, saes, cfg, data = made
    probe = shift.train_probe(model, data["train"], 2, l2=cfg["l2"], start=2)
    ablation = {"resid_1": [FEMALE, MALE]}
    _, with_abl, retrained = shift.ablate_and_retrain(model, probe, saes, ablation, data["train"], data["test"])
    _, without, plain = shift.ablate_and_retrain(model, probe, saes, {}, data["train"], data["test"])
    # Without the ablation, retraining on the ambiguous bios gives the original probe back.
    torch.testing.assert_close(plain.weight, probe.weight)
    # With it, the gender axes carry nothing at the probe's layer, so the new probe cannot weigh them.
    assert retrained.weight[[FEMALE, MALE]].abs().max() < 1e-6 < probe.weight[[FEMALE, MALE]].abs().min()
    assert with_abl["worst_group"] >= 0.95 and without["worst_group"] < 0.5
    # And it is the probe train_probe fits from scratch with the ablation in place.
    again = shift.train_probe(model, data["train"], 2, saes=saes, ablation=ablation, l2=cfg["l2"], start=2)
    torch.testing.assert_close(again.weight, retrained.weight)


def test_bio_batches_put_the_header_first(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    batch = shift.bios_batch(english_bios.ambiguous_split(4), tok)
    assert isinstance(batch, Batch)
    head = tok.encode(english_bios.HEADER, add_special_tokens=False).ids
    assert english_bios.header_length(tok) == len(head) == 2
    assert all(batch.clean[i, :2].tolist() == head for i in range(len(batch)))
    assert set(english_bios.token_counts(tok).values()) == {1}
