"""Subject-verb agreement in a tiny English-like language: the four templates of Marks et al. (2024).

    simple     "the author"                        -> " is"     (patch: "the authors" -> " are")
    nounpp     "the author near the guards"        -> " is"     (patch flips the subject)
    within_rc  "the author that the guards"        -> " like"   (verb of the relative clause agrees with
                                                                  "guards"; patch flips "guards")
    rc         "the author that the guards like"   -> " is"     (main verb agrees with "author";
                                                                  patch flips the subject)

Everything is lowercase and space separated, so every word is one token of the word-level tokenizer in
`corpus.py`. The language never breaks agreement: every present/past verb form agrees with its own
subject, and the number of the second noun (the PP object, or the relative clause's subject) is drawn
independently of the subject's, so a model can only get agreement right by tracking the right noun.

Nouns come in three classes: people and animals (animate: they are the subjects, the relative clauses'
subjects and the objects of transitive verbs) and things (only after a preposition: "the author near the
tables"). `token_latents(example)` gives the ground truth of every prefix token: 455 binary latents
(`latent_names()`: word identity, lemma, role, word class, number, class, the subject's and the second
noun's number, inside a relative clause or a PP, the number the next verb needs), many more than the
default model's 48 dimensions, so that its neurons must be polysemantic.

Held-out split. A sentence's *frame* is the tuple of lemmas that fixes its prefix, numbers ignored:
(subject, verb) for simple, (subject, preposition, second noun) for nounpp, (subject, second noun) for
within_rc and rc (the two share frames: an rc sentence contains a within_rc one). A stable hash sends each frame to "test" (TEST_PERCENT of frames) or "train". `make_examples(...,
split)` and the language-model corpus (`sentence(..., split="train")`) only use frames of their split, so
for nounpp, within_rc and rc no held-out prefix (clean or patch: numbers do not change the frame) occurs
anywhere in the training corpus. For simple the prefix is just "the <noun>", which every template starts
with; there held-out means an unseen (subject, verb) combination, i.e. a disjoint sentence, not an unseen
prefix.
"""
import hashlib
import random
from typing import NamedTuple

from ...data import Example

# Nouns in three semantic classes, singular -> plural. No gendered nouns (SHIFT reads gender from the
# biographies) and none of the professions or their context words in `bios.py`. The vocabulary is large on
# purpose: word identity, lemma, number, class, role and clause are far more binary latents than the
# default model has dimensions (see `token_latents`), so its neurons cannot all be monosemantic.
PEOPLE = {
    "author": "authors", "guard": "guards", "pilot": "pilots", "farmer": "farmers",
    "senator": "senators", "manager": "managers", "athlete": "athletes", "dancer": "dancers",
    "singer": "singers", "painter": "painters", "officer": "officers", "lawyer": "lawyers",
    "customer": "customers", "banker": "bankers", "minister": "ministers", "baker": "bakers",
    "driver": "drivers", "sailor": "sailors", "actor": "actors", "writer": "writers",
    "judge": "judges", "clerk": "clerks", "chef": "chefs", "poet": "poets", "artist": "artists",
    "player": "players", "mayor": "mayors", "builder": "builders", "hunter": "hunters", "miner": "miners",
    "soldier": "soldiers", "captain": "captains", "trader": "traders", "waiter": "waiters",
    "tailor": "tailors", "runner": "runners", "cook": "cooks", "gardener": "gardeners",
    "plumber": "plumbers", "porter": "porters", "ranger": "rangers", "scout": "scouts", "rider": "riders",
    "swimmer": "swimmers", "climber": "climbers", "boxer": "boxers", "golfer": "golfers",
    "skater": "skaters", "pianist": "pianists", "drummer": "drummers", "sculptor": "sculptors",
    "butcher": "butchers", "grocer": "grocers", "merchant": "merchants", "editor": "editors",
    "reporter": "reporters", "critic": "critics", "tourist": "tourists", "pilgrim": "pilgrims",
    "warden": "wardens", "sheriff": "sheriffs",
    # Irregular plurals, so number is not just a trailing "s".
    "child": "children", "person": "people", "thief": "thieves", "fisherman": "fishermen",
}
ANIMALS = {
    "cat": "cats", "horse": "horses", "rabbit": "rabbits", "lion": "lions", "tiger": "tigers",
    "bear": "bears", "monkey": "monkeys", "donkey": "donkeys", "camel": "camels", "eagle": "eagles",
    "parrot": "parrots", "snake": "snakes", "frog": "frogs", "duck": "ducks", "goat": "goats",
    "pig": "pigs", "cow": "cows", "owl": "owls", "hawk": "hawks", "fox": "foxes",
    "mouse": "mice", "goose": "geese", "wolf": "wolves", "ox": "oxen",
}
OBJECTS = {
    "table": "tables", "box": "boxes", "tree": "trees", "wall": "walls", "door": "doors",
    "window": "windows", "river": "rivers", "bridge": "bridges", "tower": "towers", "statue": "statues",
    "fence": "fences", "lamp": "lamps", "chair": "chairs", "rock": "rocks", "bench": "benches",
    "gate": "gates", "barrel": "barrels", "cart": "carts", "tent": "tents", "fountain": "fountains",
    "pillar": "pillars", "shelf": "shelves", "leaf": "leaves", "flag": "flags",
}
NOUNS = {**PEOPLE, **ANIMALS, **OBJECTS}
NOUN_CLASS = {**{n: "person" for n in PEOPLE}, **{n: "animal" for n in ANIMALS}, **{n: "object" for n in OBJECTS}}
# Who can act: subjects, relative-clause subjects and objects of transitive verbs are animate; a
# prepositional phrase may name anything ("the author near the tables").
ANIMATE = [n for n in NOUNS if NOUN_CLASS[n] != "object"]

# Transitive verbs, lemma -> (singular form, plural form). They head relative clauses (whose object is
# the gap: "the author that the guards like") and also serve as main verbs.
TRANSITIVE = {
    "like": ("likes", "like"), "admire": ("admires", "admire"), "hate": ("hates", "hate"),
    "love": ("loves", "love"), "know": ("knows", "know"), "see": ("sees", "see"),
    "help": ("helps", "help"), "meet": ("meets", "meet"), "follow": ("follows", "follow"),
    "trust": ("trusts", "trust"), "watch": ("watches", "watch"), "thank": ("thanks", "thank"),
    "visit": ("visits", "visit"), "fear": ("fears", "fear"), "praise": ("praises", "praise"),
    "greet": ("greets", "greet"), "call": ("calls", "call"), "chase": ("chases", "chase"),
    "feed": ("feeds", "feed"), "hear": ("hears", "hear"), "join": ("joins", "join"),
    "remember": ("remembers", "remember"), "blame": ("blames", "blame"), "respect": ("respects", "respect"),
    "avoid": ("avoids", "avoid"), "warn": ("warns", "warn"), "invite": ("invites", "invite"),
}

# Verbs that only appear as main verbs, with what may follow them in a full sentence.
COPULAS = {"be": ("is", "are"), "be_past": ("was", "were")}   # + adjective
POSSESSION = {"have": ("has", "have")}                         # + "a" + thing
MAIN_VERBS = {**COPULAS, **POSSESSION, **TRANSITIVE}           # + "the" + animate noun for transitives

PREPOSITIONS = ("near", "behind", "beside", "with", "around", "under", "above", "past")
ADJECTIVES = ("happy", "tall", "young", "old", "busy", "tired", "kind", "brave", "quiet", "smart",
              "rich", "late")
THINGS = ("dog", "car", "book", "house", "garden", "hat", "boat", "bike")

TEMPLATES = ("simple", "nounpp", "within_rc", "rc")
TEST_PERCENT = 20


def split_of(frame):
    """"train" or "test" for a frame (a tuple of strings), by a hash that is stable across runs."""
    digest = hashlib.sha256("|".join(frame).encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT else "train"


def check_split(split):
    """Every maker refuses an unknown split (a draw that waits for a matching split would never end)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _frame_key(template, subj, second, rc_verb, prep, verb):
    """The lemmas that fix a sentence's prefix (see the module docstring); numbers are left out."""
    if template == "simple":
        return ("simple", subj, verb)
    if template == "nounpp":
        return ("nounpp", subj, prep, second)
    # within_rc and rc share frames, and the clause verb is left out so that a held-out within_rc
    # prefix ("the author that the guards") is not the start of any training rc sentence either.
    return ("rc", subj, second)


def _noun(lemma, plural):
    return NOUNS[lemma] if plural else lemma


def _verb(forms, plural):
    return forms[1] if plural else forms[0]


class Lexicon(NamedTuple):
    """The lemmas sentences are drawn from: all of them by default; `lexicon` narrows them (for a real
    model's tokenizer, whose words must each be one token)."""
    animate: tuple
    nouns: tuple
    transitive: tuple
    prepositions: tuple
    main_verbs: tuple


FULL_LEXICON = Lexicon(tuple(ANIMATE), tuple(NOUNS), tuple(TRANSITIVE), PREPOSITIONS, tuple(MAIN_VERBS))


def lexicon(words=None, main_verbs=None):
    """A Lexicon of the lemmas whose every form is in `words` (None: any word), with main verbs limited to
    `main_verbs` (names of MAIN_VERBS, e.g. ("be", "be_past", "have"); None: all). Raises ValueError when a
    class is left empty."""
    ok = (lambda *forms: True) if words is None else (lambda *forms: all(f in words for f in forms))
    lex = Lexicon(tuple(n for n in ANIMATE if ok(n, NOUNS[n])), tuple(n for n in NOUNS if ok(n, NOUNS[n])),
                  tuple(v for v in TRANSITIVE if ok(*TRANSITIVE[v])), tuple(p for p in PREPOSITIONS if ok(p)),
                  tuple(v for v in MAIN_VERBS if (main_verbs is None or v in main_verbs) and ok(*MAIN_VERBS[v])))
    empty = [name for name, lemmas in lex._asdict().items() if len(lemmas) < (2 if name == "animate" else 1)]
    if empty or not ok("the", "that"):
        raise ValueError(f"no sentence can be written with these words: too few {', '.join(empty) or 'function words'}")
    return lex


def _sample_lemmas(template, rng, split, lex=FULL_LEXICON):
    """Random lemmas for one sentence of `template` whose frame lies in `split` (rejection sampling:
    about 1 in 5 frames is held out, so a few draws suffice)."""
    while True:
        subj = rng.choice(lex.animate)
        # The second noun is a PP object (any noun) or a relative clause's subject (animate); never the
        # subject again ("the author near the authors" is dull).
        second = rng.choice([n for n in (lex.nouns if template == "nounpp" else lex.animate) if n != subj])
        rc_verb = rng.choice(lex.transitive)
        prep = rng.choice(lex.prepositions)
        verb = rng.choice(lex.main_verbs)
        if split_of(_frame_key(template, subj, second, rc_verb, prep, verb)) == split:
            return subj, second, rc_verb, prep, verb


def _prefix(template, subj, second, rc_verb, prep, subj_pl, second_pl, noun=None, verb_forms=None):
    """Words, roles and per-word number (0/1 for nouns and verbs, None otherwise) of a prefix. noun(lemma,
    plural) and verb_forms(lemma) -> (singular, plural) write the words (default: this grammar's)."""
    noun = noun or _noun
    verb_forms = verb_forms or TRANSITIVE.__getitem__
    words, roles, numbers = ["the", noun(subj, subj_pl)], ["det", "subj"], [None, subj_pl]
    if template == "nounpp":
        words += [prep, "the", noun(second, second_pl)]
        roles += ["prep", "det", "distractor"]
        numbers += [None, None, second_pl]
    elif template in ("within_rc", "rc"):
        words += ["that", "the", noun(second, second_pl)]
        roles += ["that", "det", "distractor"]
        numbers += [None, None, second_pl]
        if template == "rc":
            words.append(_verb(verb_forms(rc_verb), second_pl))
            roles.append("rc_verb")
            numbers.append(second_pl)
    return words, roles, numbers


def _continuation(verb, rng):
    """What follows a main verb in a full corpus sentence, ending with the full stop."""
    if verb in COPULAS:
        return [rng.choice(ADJECTIVES), "."]
    if verb in POSSESSION:
        return ["a", rng.choice(THINGS), "."]
    return ["the", _noun(rng.choice(ANIMATE), rng.random() < 0.5), "."]


def make_examples(template, n, seed=0, split="train", lex=FULL_LEXICON):
    """`n` distinct clean/patch agreement examples of `template`, the same list for the same arguments.

    Singular and plural clean subjects alternate (so both directions of the flip appear, balanced to
    within one), and for the templates with a second noun the four (subject, second noun) number
    combinations are balanced too. `lex` (see `lexicon`) limits the lemmas drawn. Raises ValueError when the split has fewer than `n` distinct examples
    (only possible for "simple", whose train/test splits hold 4262/1078).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    check_split(split)
    rng = random.Random(f"agreement/{template}/{split}/{seed}")
    # Number cells in an order whose every prefix of even length is balanced in both nouns.
    cells = [(0, 0), (1, 1), (0, 1), (1, 0)]
    seen, examples = set(), []
    for i in range(n):
        subj_pl, second_pl = cells[i % 4]
        if template == "simple":
            second_pl = None
        for _ in range(10_000):
            lemmas = _sample_lemmas(template, rng, split, lex)
            subj, second, rc_verb, prep, verb = lemmas
            # The distinct example is what its strings depend on.
            ident = {"simple": (subj, verb), "nounpp": (subj, prep, second, verb),
                     "within_rc": (subj, second, rc_verb), "rc": (subj, second, rc_verb, verb)}[template]
            if (ident, subj_pl, second_pl) not in seen:
                break
        else:
            raise ValueError(f"split {split!r} of template {template!r} has fewer than {n} distinct examples")
        seen.add((ident, subj_pl, second_pl))
        examples.append(_example(template, subj, second, rc_verb, prep, verb, subj_pl, second_pl))
    return examples


def _example(template, subj, second, rc_verb, prep, verb, subj_pl, second_pl):
    # The controlling noun is flipped in the patch prefix: the subject, except inside the relative
    # clause (within_rc), where the clause's own subject controls the verb.
    if template == "within_rc":
        answer_pl, forms = second_pl, TRANSITIVE[rc_verb]
        patch_args = (subj_pl, 1 - second_pl)
    else:
        answer_pl, forms = subj_pl, MAIN_VERBS[verb]
        patch_args = (1 - subj_pl, second_pl)
    words, roles, numbers = _prefix(template, subj, second, rc_verb, prep, subj_pl, second_pl)
    patch_words, _, patch_numbers = _prefix(template, subj, second, rc_verb, prep, *patch_args)
    latents = {"subject_plural": subj_pl, "answer_plural": answer_pl,
               "role": roles, "number": numbers, "patch_number": patch_numbers,
               "subject": subj, "verb": rc_verb if template == "within_rc" else verb}
    if template != "simple":
        latents["distractor_plural"] = second_pl
        latents["distractor"] = second
    return Example(clean_prefix=" ".join(words), patch_prefix=" ".join(patch_words),
                   clean_answer=" " + _verb(forms, answer_pl), patch_answer=" " + _verb(forms, 1 - answer_pl),
                   case=template, latents=latents)


FAMILIES = ("simple", "nounpp", "rc", "question")


def sentence(family, rng, split="train"):
    """One full sentence (a list of words ending in "." or "?") for the language-model corpus.

    simple:   "the authors like the pilot ."
    nounpp:   "the author near the guards has a dog ."
    rc:       "the author that the guards like is happy ."      (covers within_rc too)
    question: "are the authors near the guard happy ?"          (copula first, agreeing with the subject)
    Only frames of `split` are used, so held-out examples never occur in a "train" corpus.
    """
    if family == "question":
        # A copula question with an optional PP; its PP frame must be in the split like nounpp's.
        subj, second, _, prep, _ = _sample_lemmas("nounpp", rng, split)
        subj_pl = rng.random() < 0.5
        words = ["the", _noun(subj, subj_pl)]
        if rng.random() < 0.5:
            words += [prep, "the", _noun(second, rng.random() < 0.5)]
        copula = _verb(COPULAS[rng.choice(list(COPULAS))], subj_pl)
        return [copula] + words + [rng.choice(ADJECTIVES), "?"]
    subj, second, rc_verb, prep, verb = _sample_lemmas(family, rng, split)
    subj_pl, second_pl = rng.random() < 0.5, rng.random() < 0.5
    words, _, _ = _prefix(family, subj, second, rc_verb, prep, subj_pl, second_pl)
    return words + [_verb(MAIN_VERBS[verb], subj_pl)] + _continuation(verb, rng)


def vocabulary():
    """Every word the agreement grammar can produce."""
    words = {"the", "a", "that", ".", "?"}
    words |= set(NOUNS) | set(NOUNS.values()) | set(PREPOSITIONS) | set(ADJECTIVES) | set(THINGS)
    for forms in MAIN_VERBS.values():
        words |= set(forms)
    return words


# --- ground-truth latents of every token ---------------------------------------------------------

ROLES = ("det", "subj", "prep", "that", "distractor", "rc_verb")


def prefix_words():
    """Every word an agreement prefix can contain, sorted."""
    words = {"the", "that", *PREPOSITIONS, *NOUNS, *NOUNS.values()}
    for forms in TRANSITIVE.values():
        words |= set(forms)
    return sorted(words)


def latent_names():
    """The names of the binary latents `token_latents` gives, in a fixed order: word identity, lemma
    (a noun or verb in either number), role, word class, number, semantic class, and the sentence-level
    variables that hold from the word that sets them on (subject's number and class, second noun's
    number, inside a relative clause / prepositional phrase, the number the next verb must have)."""
    names = [f"word is {w}" for w in prefix_words()]
    names += [f"lemma is {n}" for n in NOUNS] + [f"lemma is {v}" for v in TRANSITIVE]
    names += [f"role is {r}" for r in ROLES]
    names += ["token is a noun", "token is a verb", "token is plural", "token is singular",
              "token is a person", "token is an animal", "token is an object", "token is animate",
              "subject is plural", "subject is singular", "subject is a person", "subject is an animal",
              "second noun is plural", "second noun is singular", "second noun is animate",
              "inside a relative clause", "inside a prepositional phrase",
              "next verb must be plural", "next verb must be singular"]
    return names


_LEMMA = {**{n: n for n in NOUNS}, **{pl: n for n, pl in NOUNS.items()},
          **{form: v for v, forms in TRANSITIVE.items() for form in forms}}


def lemma(word):
    """The lemma of a noun or transitive-verb form ("guards" -> "guard", "likes" -> "like"); other words as
    they are, lowercased."""
    return _LEMMA.get(word.lower(), word.lower())


def content_words(example):
    """(nouns, verbs): the lemmas of the nouns (subject, second noun) and of the verbs (the relative clause's,
    and the main verb's name, e.g. "be" for is/are) of an example of make_examples or of a prompt set written
    like it (its latents name the subject, second noun and answer verb; its roles mark the clause verb)."""
    lat = example.latents
    nouns = {lat["subject"]} | ({lat["distractor"]} if lat.get("distractor") else set())
    words = example.clean_prefix.split()
    verbs = {lat["verb"]} | {lemma(w) for w, r in zip(words, lat["role"]) if r == "rc_verb"}
    return nouns, verbs


def token_latents(example):
    """{latent: [0/1 per token of the clean prefix]} for every name of `latent_names()` (all zero where
    a latent never holds in this example), read off the words and `example.latents`."""
    words = example.clean_prefix.lower().split()   # "The author ..." for a real model's prompts
    lat = example.latents
    roles, numbers = lat["role"], lat["number"]
    T = len(words)
    out = {name: [0] * T for name in latent_names()}

    def on(name, t):
        out[name][t] = 1

    subj_at = roles.index("subj")
    second_at = roles.index("distractor") if "distractor" in roles else None
    subj_class = NOUN_CLASS[_LEMMA[words[subj_at]]]
    for t, (w, role, num) in enumerate(zip(words, roles, numbers)):
        on(f"word is {w}", t)
        on(f"role is {role}", t)
        if w in _LEMMA:
            on(f"lemma is {_LEMMA[w]}", t)
        if role in ("subj", "distractor"):
            on("token is a noun", t)
            cls = NOUN_CLASS[_LEMMA[w]]
            on({"person": "token is a person", "animal": "token is an animal", "object": "token is an object"}[cls], t)
            if cls != "object":
                on("token is animate", t)
        if role == "rc_verb":
            on("token is a verb", t)
        if num is not None:
            on("token is plural" if num else "token is singular", t)
        if t >= subj_at:
            on("subject is plural" if lat["subject_plural"] else "subject is singular", t)
            on("subject is a person" if subj_class == "person" else "subject is an animal", t)
        if second_at is not None and t >= second_at:
            on("second noun is plural" if lat["distractor_plural"] else "second noun is singular", t)
            if NOUN_CLASS[lat["distractor"]] != "object":
                on("second noun is animate", t)
        if "that" in roles and t >= roles.index("that"):
            on("inside a relative clause", t)
        if "prep" in roles and t >= roles.index("prep"):
            on("inside a prepositional phrase", t)
    on("next verb must be plural" if lat["answer_plural"] else "next verb must be singular", T - 1)
    return out
