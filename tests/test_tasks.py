"""The synthetic language: agreement labels, matched pairs, splits, biographies, tokenizer, corpus.

Grammatical number is checked against tables written here, independently of the grammar's own lists.
"""
import collections

import pytest
import torch

from minicirc.experiments.tasks import bios, corpus
from minicirc.experiments.tasks import TEMPLATES, ambiguous_split, balanced_split, build_tokenizer, make_examples

# Independent number tables: plural nouns are "singular + s" except the irregulars listed here.
IRREGULAR_PLURALS = {"children", "people", "thieves", "fishermen", "mice", "geese", "wolves", "oxen", "shelves",
                     "leaves"}
IRREGULAR_SINGULARS = {"child", "person", "thief", "fisherman", "mouse", "goose", "wolf", "ox", "shelf", "leaf"}
SINGULAR_VERBS = {"is", "was", "has", "likes", "admires", "hates", "loves", "knows", "sees", "helps", "meets",
                  "follows", "trusts", "watches", "thanks", "visits", "fears", "praises", "greets", "calls",
                  "chases", "feeds", "hears", "joins", "remembers", "blames", "respects", "avoids", "warns",
                  "invites"}
PLURAL_VERBS = {"are", "were", "have", "like", "admire", "hate", "love", "know", "see", "help", "meet",
                "follow", "trust", "watch", "thank", "visit", "fear", "praise", "greet", "call", "chase", "feed",
                "hear", "join", "remember", "blame", "respect", "avoid", "warn", "invite"}
# Inanimate nouns (singular and plural): they may only follow a preposition.
OBJECT_NOUNS = {"table", "box", "tree", "wall", "door", "window", "river", "bridge", "tower", "statue", "fence",
                "lamp", "chair", "rock", "bench", "gate", "barrel", "cart", "tent", "fountain", "pillar", "shelf",
                "leaf", "flag"}
OBJECT_NOUNS |= {w + ("es" if w.endswith(("x", "ch")) else "s") for w in OBJECT_NOUNS - {"shelf", "leaf"}}
OBJECT_NOUNS |= {"shelves", "leaves"}
ANIMAL_NOUNS = {"cat", "horse", "rabbit", "lion", "tiger", "bear", "monkey", "donkey", "camel", "eagle", "parrot",
                "snake", "frog", "duck", "goat", "pig", "cow", "owl", "hawk", "fox"}
ANIMAL_NOUNS |= {w + ("es" if w == "fox" else "s") for w in ANIMAL_NOUNS} | {"mouse", "mice", "goose", "geese",
                                                                            "wolf", "wolves", "ox", "oxen"}


def noun_is_plural(word):
    if word in IRREGULAR_PLURALS:
        return True
    if word in IRREGULAR_SINGULARS:
        return False
    assert word.isalpha(), word
    return word.endswith("s")


def verb_is_plural(word):
    assert word in SINGULAR_VERBS | PLURAL_VERBS, f"{word!r} is not a present/past verb form"
    return word in PLURAL_VERBS


# Position (word index) of the noun that the answer must agree with.
CONTROLLER = {"simple": 1, "nounpp": 1, "within_rc": 4, "rc": 1}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_agree_with_the_controlling_noun(template, split):
    for ex in make_examples(template, 100, seed=0, split=split):
        words = ex.clean_prefix.split()
        controller_pl = noun_is_plural(words[CONTROLLER[template]])
        assert ex.clean_answer.startswith(" ") and ex.patch_answer.startswith(" ")
        assert verb_is_plural(ex.clean_answer[1:]) == controller_pl, ex
        assert verb_is_plural(ex.patch_answer[1:]) != controller_pl, ex
        if template == "rc":   # the clause's own verb agrees with the clause's subject
            assert verb_is_plural(words[5]) == noun_is_plural(words[4]), ex
        assert ex.case == template
        assert ex.latents["answer_plural"] == controller_pl


@pytest.mark.parametrize("template", TEMPLATES)
def test_pairs_flip_only_the_controlling_noun(template, tokenizer):
    for ex in make_examples(template, 100, seed=1):
        clean, patch = ex.clean_prefix.split(), ex.patch_prefix.split()
        assert len(clean) == len(patch)
        assert len(tokenizer.encode(ex.clean_prefix).ids) == len(tokenizer.encode(ex.patch_prefix).ids)
        differ = [i for i, (a, b) in enumerate(zip(clean, patch)) if a != b]
        assert differ == [CONTROLLER[template]], ex
        assert noun_is_plural(clean[differ[0]]) != noun_is_plural(patch[differ[0]])
        # Same verb lemma, other number: the answers are swapped.
        assert verb_is_plural(ex.clean_answer[1:]) != verb_is_plural(ex.patch_answer[1:])


@pytest.mark.parametrize("template", TEMPLATES)
def test_answers_one_token_and_prefixes_one_token_per_word(template, tokenizer):
    unk = tokenizer.token_to_id(corpus.UNK)
    for split in ("train", "test"):
        for ex in make_examples(template, 100, seed=2, split=split):
            for answer in (ex.clean_answer, ex.patch_answer):
                ids = tokenizer.encode(answer).ids
                assert len(ids) == 1 and ids[0] != unk, answer
                assert tokenizer.decode(ids) == answer[1:]
            for prefix in (ex.clean_prefix, ex.patch_prefix):
                ids = tokenizer.encode(prefix).ids
                assert len(ids) == len(prefix.split()) and unk not in ids, prefix


@pytest.mark.parametrize("template", TEMPLATES)
def test_balanced_numbers_and_latents(template):
    exs = make_examples(template, 80, seed=3, split="test")
    assert len({(e.clean_prefix, e.clean_answer) for e in exs}) == 80   # distinct
    subj = collections.Counter(e.latents["subject_plural"] for e in exs)
    assert subj == {0: 40, 1: 40}
    for n in (2, 6, 10):   # both directions of the flip, equally, for any even n
        counts = collections.Counter(e.latents["subject_plural"] for e in make_examples(template, n, seed=0))
        assert counts == {0: n // 2, 1: n // 2}
    if template != "simple":
        cells = collections.Counter((e.latents["subject_plural"], e.latents["distractor_plural"]) for e in exs)
        assert cells == {(0, 0): 20, (0, 1): 20, (1, 0): 20, (1, 1): 20}
    for e in exs:
        words, patch_words = e.clean_prefix.split(), e.patch_prefix.split()
        roles, numbers = e.latents["role"], e.latents["number"]
        assert len(roles) == len(numbers) == len(e.latents["patch_number"]) == len(words)
        assert roles[:2] == ["det", "subj"]
        assert e.latents["subject_plural"] == noun_is_plural(words[1])
        if template != "simple":
            assert roles[4] == "distractor" and e.latents["distractor_plural"] == noun_is_plural(words[4])
        for word, role, num in zip(words, roles, numbers):
            if role in ("subj", "distractor"):
                assert num == noun_is_plural(word)
            elif role == "rc_verb":
                assert num == verb_is_plural(word)
            else:
                assert num is None
        for word, role, num in zip(patch_words, roles, e.latents["patch_number"]):
            if role in ("subj", "distractor"):
                assert num == noun_is_plural(word)


@pytest.mark.parametrize("template", TEMPLATES)
def test_deterministic_per_seed(template):
    a = make_examples(template, 30, seed=5)
    assert a == make_examples(template, 30, seed=5)
    assert a != make_examples(template, 30, seed=6)
    assert make_examples(template, 30, seed=5, split="test") != a


@pytest.mark.parametrize("template", TEMPLATES)
def test_held_out_split_is_disjoint(template):
    train = make_examples(template, 400, seed=0, split="train")
    test = make_examples(template, 150, seed=0, split="test")
    if template == "simple":   # prefixes are shared by construction; the (subject, verb) sentence is not
        key = lambda e: {(e.latents["subject"], e.latents["verb"])}
    else:                      # no prefix of a test example, clean or patch, is a train prefix
        key = lambda e: {e.clean_prefix, e.patch_prefix}
    assert not set().union(*map(key, train)) & set().union(*map(key, test))


def held_out_prefixes_in(docs, examples):
    prefixes = {p for e in examples for p in (e.clean_prefix, e.patch_prefix)}
    found = set()
    for doc in docs:
        words = doc.split()
        for n in (5, 6):   # nounpp and within_rc prefixes have 5 words, rc prefixes 6
            found |= {" ".join(words[i:i + n]) for i in range(len(words))} & prefixes
    return found


def test_training_corpus_never_contains_held_out_prefixes():
    docs = corpus.corpus_documents(20000, seed=0)
    for template in ("nounpp", "within_rc", "rc"):
        assert not held_out_prefixes_in(docs, make_examples(template, 1000, seed=0, split="test"))
        # The check can fail: train prefixes do occur in the corpus (the language has ~10^5-10^6 prefixes
        # per template, so it takes a couple of thousand to meet some).
        assert held_out_prefixes_in(docs, make_examples(template, 2000, seed=0, split="train"))


def test_bios_splits():
    amb = ambiguous_split(100, seed=0)
    assert all(b.profession == b.gender for b in amb)
    assert collections.Counter((b.profession, b.gender) for b in amb) == {(0, 0): 50, (1, 1): 50}
    bal = balanced_split(100, seed=0)
    assert collections.Counter((b.profession, b.gender) for b in bal) == {(0, 0): 25, (0, 1): 25,
                                                                           (1, 0): 25, (1, 1): 25}
    assert balanced_split(100, seed=0) == bal and balanced_split(100, seed=1) != bal
    test = balanced_split(100, seed=0, split="test")
    assert not {b.text for b in bal} & {b.text for b in test}
    assert len({b.text for b in bal}) == 100
    with pytest.raises(ValueError):
        balanced_split(10, seed=0)


def test_bios_carry_their_labels_in_context_not_profession_words():
    for b in balanced_split(200, seed=4):
        words = b.text.split()
        assert "professor" not in words and "nurse" not in words
        female, male = {"she", "her"} & set(words), {"he", "his"} & set(words)
        assert (female and not male) if b.gender == 1 else (male and not female), b
        hospital = {"hospital", "patients", "ward", "clinic"} & set(words)
        university = {"university", "students", "exams", "lectures", "research", "lab", "campus"} & set(words)
        assert (hospital and not university) if b.profession == 1 else (university and not hospital), b


def test_tokenizer_conventions(tokenizer):
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<unk>", "<sep>")] == [0, 1, 2]
    assert (corpus.PAD_ID, corpus.UNK_ID, corpus.SEP_ID) == (0, 1, 2)
    assert tokenizer.get_vocab_size() < 500
    assert tokenizer.encode("the author is").ids == [tokenizer.token_to_id(w) for w in ("the", "author", "is")]
    assert tokenizer.encode("the authorz").ids[-1] == 1   # unknown words do map to <unk>
    # The saved form round-trips (the default model ships it as tokenizer.json).
    from tokenizers import Tokenizer
    again = Tokenizer.from_str(tokenizer.to_str())
    assert again.encode("the author near the guards").ids == tokenizer.encode("the author near the guards").ids


def test_corpus_words_are_all_in_the_vocabulary(tokenizer):
    vocab = set(corpus.vocabulary())
    docs = corpus.corpus_documents(5000, seed=1)
    docs += [b.text for b in balanced_split(400, seed=1)]
    assert {w for d in docs for w in d.split()} <= vocab
    names = set(bios.NAMES[0]) | set(bios.NAMES[1])
    families = collections.Counter("bio" if d.split()[0] in names else "agreement" for d in docs[:5000])
    assert 700 < families["bio"] < 1300   # about 20% of documents


def test_training_sequences(tokenizer):
    seqs = corpus.training_sequences(tokenizer, 300, seed=0)
    assert seqs.dtype == torch.long and seqs.shape[0] == 300
    assert torch.equal(seqs, corpus.training_sequences(tokenizer, 300, seed=0))
    for row in seqs.tolist():
        n = row.index(corpus.SEP_ID) + 1
        assert row.count(corpus.SEP_ID) == 1 and all(t == corpus.PAD_ID for t in row[n:])
        assert corpus.PAD_ID not in row[:n] and corpus.UNK_ID not in row
    stream = corpus.corpus_token_stream(1000, seed=0, tokenizer=tokenizer)
    assert stream.shape == (1000,) and torch.equal(stream, corpus.corpus_token_stream(1000, 0, tokenizer))
    assert (stream == corpus.SEP_ID).sum() > 50


def test_packed_sequences(tokenizer):
    rows = corpus.packed_sequences(tokenizer, 200, seq_len=32, seed=0)
    assert rows.shape == (200, 32) and torch.equal(rows, corpus.packed_sequences(tokenizer, 200, 32, seed=0))
    assert corpus.PAD_ID not in rows and corpus.UNK_ID not in rows
    starts = {tokenizer.id_to_token(t) for t in rows[:, 0].tolist()}
    first_words = {d.split()[0] for d in corpus.corpus_documents(2000, seed=0)}
    assert starts <= first_words   # every row begins where a document begins
    assert (rows == corpus.SEP_ID).sum(1).min() >= 1


# --- the corpus, parsed back with the grammar written here ------------------------------------------

COPULA_FORMS = {"is", "are", "was", "were"}
PREPOSITIONS = {"near", "behind", "beside", "with", "around", "under", "above", "past"}
MALE_NAMES = {"john", "david", "peter", "james", "mark", "paul", "tom", "george"}
FEMALE_NAMES = {"mary", "anna", "emma", "julia", "sarah", "linda", "alice", "rose"}
# The module docstring's mix of document families.
DOCUMENTED_MIX = {"simple": 0.15, "nounpp": 0.25, "rc": 0.30, "question": 0.10, "bio": 0.20}


def noun_lemma(word):
    from minicirc.experiments.tasks import agreement
    singular = {pl: sg for sg, pl in agreement.NOUNS.items()}
    return singular.get(word, word)


def verb_lemma(word):
    from minicirc.experiments.tasks import agreement
    return next(lemma for lemma, forms in agreement.MAIN_VERBS.items() if word in forms)


def parse_document(doc):
    """(family, frame or None) of one corpus document; asserts every agreement in it."""
    words = doc.split()
    if words[0] in MALE_NAMES | FEMALE_NAMES:
        return "bio", None
    if words[0] in COPULA_FORMS:   # "are the authors [near the guard] happy ?"
        assert words[1] == "the" and words[-1] == "?" and len(words) in (5, 8), doc
        assert verb_is_plural(words[0]) == noun_is_plural(words[2]), doc
        if len(words) == 8:
            assert words[3] in PREPOSITIONS and words[4] == "the", doc
            noun_is_plural(words[5])
            return "question", ("nounpp", noun_lemma(words[2]), words[3], noun_lemma(words[5]))
        return "question", None
    assert words[0] == "the" and words[-1] == ".", doc
    assert words[1] not in OBJECT_NOUNS, doc   # subjects are animate
    subj_pl = noun_is_plural(words[1])
    if words[2] == "that":
        assert words[3] == "the" and verb_is_plural(words[5]) == noun_is_plural(words[4]), doc
        assert words[4] not in OBJECT_NOUNS, doc   # so are the relative clause's
        family, frame, v = "rc", ("rc", noun_lemma(words[1]), noun_lemma(words[4])), 6
    elif words[2] in PREPOSITIONS:
        assert words[3] == "the", doc
        family, frame, v = "nounpp", ("nounpp", noun_lemma(words[1]), words[2], noun_lemma(words[4])), 5
    else:
        family, v = "simple", 2
        frame = ("simple", noun_lemma(words[1]), verb_lemma(words[2]))
    assert verb_is_plural(words[v]) == subj_pl, doc   # the main verb agrees with the subject
    rest = words[v + 1:]
    if words[v] in COPULA_FORMS:
        assert len(rest) == 2 and rest[0].isalpha(), doc          # adjective, "."
    elif words[v] in ("has", "have"):
        assert len(rest) == 3 and rest[0] == "a", doc             # "a" thing "."
    else:
        assert len(rest) == 3 and rest[0] == "the", doc           # "the" person or animal "."
        noun_is_plural(rest[1])
        assert rest[1] not in OBJECT_NOUNS, doc
    return family, frame


def check_documents(docs, split):
    from minicirc.experiments.tasks import agreement
    families = collections.Counter()
    for doc in docs:
        family, frame = parse_document(doc)
        families[family] += 1
        if family == "bio":
            assert bios.split_of(doc) == split, doc
        elif frame is not None:
            assert agreement.split_of(frame) == split, doc
    return families


@pytest.mark.parametrize("split", ["train", "test"])
def test_corpus_documents_are_grammatical_and_in_their_split(split):
    n = 10000
    docs = corpus.corpus_documents(n, seed=int(torch.randint(0, 1000, ()).item()), split=split)
    families = check_documents(docs, split)
    for family, p in DOCUMENTED_MIX.items():   # within 5 sigma of the documented mix
        assert abs(families[family] - n * p) < 5 * (n * p * (1 - p)) ** 0.5, families


def segments(row):
    """Complete documents of a token row: the words before each "<sep>"."""
    out, cur = [], []
    for t in row:
        if t == corpus.SEP_ID:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_sequences_and_stream_hold_whole_documents_of_their_split(tokenizer, split):
    seed = int(torch.randint(0, 1000, ()).item())
    decode = lambda ids: " ".join(tokenizer.id_to_token(i) for i in ids)
    rows = corpus.packed_sequences(tokenizer, 50, seq_len=32, seed=seed, split=split).tolist()
    rows += [r for r in corpus.training_sequences(tokenizer, 100, seed=seed, split=split).tolist()]
    docs = [decode(seg) for row in rows for seg in segments(row)]
    assert len(docs) > 150
    check_documents(docs, split)
    if split == "train":
        stream = corpus.corpus_token_stream(500, seed=seed, tokenizer=tokenizer).tolist()
        check_documents([decode(seg) for seg in segments(stream)], "train")


def test_tokenizer_round_trips_documents(tokenizer):
    docs = corpus.corpus_documents(300, seed=int(torch.randint(0, 1000, ()).item()))
    for doc in docs:
        ids = tokenizer.encode(doc).ids
        assert len(ids) == len(doc.split()) and corpus.UNK_ID not in ids
        # Special tokens are special: decoding skips them.
        assert tokenizer.decode(ids + [corpus.SEP_ID, corpus.PAD_ID]) == doc


@pytest.mark.parametrize("template", TEMPLATES)
def test_latents_name_the_words(template):
    from minicirc.experiments.tasks import agreement
    for ex in make_examples(template, 60, seed=int(torch.randint(0, 1000, ()).item()), split="test"):
        words, lat = ex.clean_prefix.split(), ex.latents
        assert lat["subject"] == noun_lemma(words[1]) and lat["subject"] in agreement.NOUNS
        assert {ex.clean_answer[1:], ex.patch_answer[1:]} == set(agreement.MAIN_VERBS[lat["verb"]])
        if template != "simple":
            assert lat["distractor"] == noun_lemma(words[4]) != lat["subject"]


def test_unknown_split_is_refused():
    for make in (lambda: make_examples("nounpp", 4, split="dev"), lambda: ambiguous_split(4, split="dev"),
                 lambda: balanced_split(4, split="valid"), lambda: corpus.corpus_documents(4, split="dev")):
        with pytest.raises(ValueError, match="split"):
            make()


def test_bios_distinct_named_shuffled_and_in_both_orders():
    seed = int(torch.randint(0, 1000, ()).item())
    bal = balanced_split(2000, seed=seed)
    assert len({b.text for b in bal}) == 2000   # ~500 per group from a few thousand possible bios
    labels = [(b.profession, b.gender) for b in bal]
    assert labels[:8] != [(0, 0), (0, 1), (1, 0), (1, 1)] * 2   # shuffled, not in group order
    job_second = collections.Counter()
    for b in bal:
        words = b.text.split()
        assert words[0] in (FEMALE_NAMES if b.gender == 1 else MALE_NAMES), b
        sentences = b.text.split(" . ")
        assert len(sentences) == 3
        job_words = {"university", "students", "exams", "lectures", "research", "lab", "campus",
                     "hospital", "patients", "ward", "clinic"}
        job_second[bool(job_words & set(sentences[1].split()))] += 1
    assert job_second[True] > 800 and job_second[False] > 800   # both orders, about equally


def test_semantic_classes_of_nouns():
    """Subjects and relative-clause subjects are people or animals; PP objects may be things, and are."""
    from minicirc.experiments.tasks import agreement
    pp_objects = collections.Counter()
    for template in TEMPLATES:
        for ex in make_examples(template, 400, seed=7, split="train"):
            words = ex.clean_prefix.split()
            assert words[1] not in OBJECT_NOUNS, ex
            if template in ("within_rc", "rc"):
                assert words[4] not in OBJECT_NOUNS, ex
            if template == "nounpp":
                pp_objects[words[4] in OBJECT_NOUNS] += 1
                pp_objects["animal"] += words[4] in ANIMAL_NOUNS
    assert pp_objects[True] > 50 and pp_objects[False] > 150 and pp_objects["animal"] > 30
    # The grammar's classes agree with the tables written here.
    for lemma, plural in agreement.NOUNS.items():
        cls = "object" if lemma in OBJECT_NOUNS else "animal" if lemma in ANIMAL_NOUNS else "person"
        assert agreement.NOUN_CLASS[lemma] == cls and (plural in OBJECT_NOUNS) == (cls == "object"), lemma
        assert noun_is_plural(plural) and not noun_is_plural(lemma), lemma


def expected_latents(template, words):
    """The latents of one clean prefix, parsed from its words with the tables written here (not the
    grammar's): {name: [0/1 per word]} for the names that hold somewhere."""
    T = len(words)
    roles = {"simple": ["det", "subj"], "nounpp": ["det", "subj", "prep", "det", "distractor"],
             "within_rc": ["det", "subj", "that", "det", "distractor"],
             "rc": ["det", "subj", "that", "det", "distractor", "rc_verb"]}[template]
    assert len(roles) == T
    out = collections.defaultdict(lambda: [0] * T)
    klass = lambda w: "object" if w in OBJECT_NOUNS else "animal" if w in ANIMAL_NOUNS else "person"
    subj_pl = noun_is_plural(words[1])
    controller = noun_is_plural(words[CONTROLLER[template]])
    for t, (w, role) in enumerate(zip(words, roles)):
        out[f"word is {w}"][t] = 1
        out[f"role is {role}"][t] = 1
        if role in ("subj", "distractor"):
            out[f"lemma is {noun_lemma(w)}"][t] = 1
            out["token is a noun"][t] = 1
            out[{"person": "token is a person", "animal": "token is an animal", "object": "token is an object"}[klass(w)]][t] = 1
            if klass(w) != "object":
                out["token is animate"][t] = 1
            out["token is plural" if noun_is_plural(w) else "token is singular"][t] = 1
        if role == "rc_verb":
            out[f"lemma is {verb_lemma(w)}"][t] = 1
            out["token is a verb"][t] = 1
            out["token is plural" if verb_is_plural(w) else "token is singular"][t] = 1
        if t >= 1:
            out["subject is plural" if subj_pl else "subject is singular"][t] = 1
            out["subject is a person" if klass(words[1]) == "person" else "subject is an animal"][t] = 1
        if template != "simple" and t >= 4:
            out["second noun is plural" if noun_is_plural(words[4]) else "second noun is singular"][t] = 1
            if klass(words[4]) != "object":
                out["second noun is animate"][t] = 1
        if template in ("within_rc", "rc") and t >= 2:
            out["inside a relative clause"][t] = 1
        if template == "nounpp" and t >= 2:
            out["inside a prepositional phrase"][t] = 1
    out["next verb must be plural" if controller else "next verb must be singular"][T - 1] = 1
    return dict(out)


@pytest.mark.parametrize("template", TEMPLATES)
def test_token_latents_parsed_back(template):
    from minicirc.experiments.tasks import agreement
    names = agreement.latent_names()
    assert len(names) == len(set(names)) >= 4 * 48   # far more latents than the default's d_model
    for ex in make_examples(template, 80, seed=int(torch.randint(0, 1000, ()).item()), split="test"):
        words = ex.clean_prefix.split()
        got = agreement.token_latents(ex)
        assert list(got) == names   # every latent, at every token, 0 or 1
        assert all(len(v) == len(words) and set(v) <= {0, 1} for v in got.values())
        assert {k: v for k, v in got.items() if any(v)} == expected_latents(template, words), ex


@pytest.mark.parametrize("template", TEMPLATES)
def test_content_words_are_the_prompt_nouns_and_verbs(template):
    """content_words read back the lemmas make_examples drew: every noun and verb form of the prefix and
    the answer, each reduced to its lemma (the main verbs by name)."""
    from minicirc.experiments.tasks import agreement
    names = {forms: name for name, forms in agreement.MAIN_VERBS.items()}
    for ex in make_examples(template, 24, seed=5):
        nouns, verbs = agreement.content_words(ex)
        words = ex.clean_prefix.split() + ex.patch_prefix.split()
        assert nouns == {agreement.lemma(w) for w in words if agreement.lemma(w) in agreement.NOUNS}
        answer = names[next(f for f in agreement.MAIN_VERBS.values() if ex.clean_answer.strip() in f)]
        rc = {agreement.lemma(w) for w in words if agreement.lemma(w) in agreement.TRANSITIVE}
        assert verbs == rc | {answer} and len(nouns) == (1 if template == "simple" else 2)
