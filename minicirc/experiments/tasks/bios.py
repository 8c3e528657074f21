"""Synthetic biographies for concept disambiguation (SHIFT): a profession and a gender per bio.

    "mary lives in the city . she works at the hospital . she likes her garden ."

Labels follow the original's Bias in Bios setup: profession 0 = professor, 1 = nurse; gender 0 = male,
1 = female. In the ambiguous data they agree (male professors, female nurses), so a probe trained there
cannot tell which concept it learned.

Design choices:
- The profession word itself never appears (as in Bias in Bios, whose bios drop the sentence naming the
  profession). Profession is recoverable only from one context sentence ("works at the hospital" vs
  "teaches at the university"), made of words used by no other construction.
- Gender is carried by the first name and by every pronoun (she/her vs he/his): three or four gendered
  tokens against a few profession words, so under mean pooling gender is the louder of the two signals,
  which is what makes the ambiguous probe lean on it.
- The other sentences are neutral filler shared by both genders and professions. All verb forms are
  singular and agree with their subject, as everywhere in the language.
- Held-out: the agreement frames' stable hash of the text sends each bio to "train" or "test"
  (agreement.TEST_PERCENT), so train and test bios are disjoint whatever the seeds; the language-model
  corpus uses train bios only.
"""
import random
from dataclasses import dataclass

from . import agreement

PROFESSIONS = ("professor", "nurse")   # label 0, 1
GENDERS = ("male", "female")           # label 0, 1

NAMES = (
    ("john", "david", "peter", "james", "mark", "paul", "tom", "george"),   # male
    ("mary", "anna", "emma", "julia", "sarah", "linda", "alice", "rose"),   # female
)
SUBJECT_PRONOUN = ("he", "she")
POSSESSIVE = ("his", "her")

# Predicate phrases after the subject (a name or pronoun), all singular.
PROFESSION_PHRASES = (
    (  # professor
        "teaches at the university", "gives lectures to the students", "writes research papers",
        "works on the campus", "runs a lab at the university", "grades the exams every week",
        "advises graduate students",
    ),
    (  # nurse
        "works at the hospital", "cares for the patients", "works night shifts in the ward",
        "gives medicine to the patients", "works at the clinic", "checks on the patients every morning",
        "helps the doctors in the ward",
    ),
)
INTRO_PHRASES = ("lives in the city", "lives in a small town", "grew up in a village", "was born in the north",
                 "was born in the south", "is kind", "is busy", "is young", "is old")
# "{pron}"/"{poss}" are filled with the bio's pronouns.
FILLER_SENTENCES = ("{pron} likes {poss} garden", "{pron} has a dog", "{poss} friends are kind",
                    "{pron} enjoys music", "{poss} family is large", "{pron} reads a book every night",
                    "{pron} walks to work", "{poss} house is old")


@dataclass
class Bio:
    text: str
    profession: int   # 0 professor, 1 nurse
    gender: int       # 0 male, 1 female


def split_of(text):
    """"train" or "test" for a bio: the agreement frames' stable hash, of the whole text."""
    return agreement.split_of((text,))


def make_bio(profession, gender, rng):
    """One biography string: intro with the name, then the profession sentence and a filler sentence in
    random order."""
    pron, poss = SUBJECT_PRONOUN[gender], POSSESSIVE[gender]
    intro = f"{rng.choice(NAMES[gender])} {rng.choice(INTRO_PHRASES)} ."
    job = f"{pron} {rng.choice(PROFESSION_PHRASES[profession])} ."
    filler = rng.choice(FILLER_SENTENCES).format(pron=pron, poss=poss) + " ."
    rest = [job, filler] if rng.random() < 0.5 else [filler, job]
    return " ".join([intro] + rest)


def _bios(groups, n, seed, split, name):
    agreement.check_split(split)
    if n % len(groups):
        raise ValueError(f"{name}: n must be a multiple of {len(groups)} (one equal share per group), got {n}")
    rng = random.Random(f"bios/{name}/{split}/{seed}")
    seen, out = set(), []
    for i in range(n):
        profession, gender = groups[i % len(groups)]
        while True:   # distinct bios of the requested split; the space is large, so this ends fast
            text = make_bio(profession, gender, rng)
            if text not in seen and split_of(text) == split:
                break
        seen.add(text)
        out.append(Bio(text, profession, gender))
    rng.shuffle(out)
    return out


def ambiguous_split(n, seed=0, split="train"):
    """`n` distinct bios where profession == gender: n/2 male professors and n/2 female nurses."""
    return _bios([(0, 0), (1, 1)], n, seed, split, "ambiguous")


def balanced_split(n, seed=0, split="train"):
    """`n` distinct bios with all four (profession, gender) groups of n/4 each."""
    return _bios([(0, 0), (0, 1), (1, 0), (1, 1)], n, seed, split, "balanced")


def vocabulary():
    """Every word a biography can contain."""
    words = {".", *SUBJECT_PRONOUN, *POSSESSIVE, *NAMES[0], *NAMES[1]}
    for phrase in (*PROFESSION_PHRASES[0], *PROFESSION_PHRASES[1], *INTRO_PHRASES, *FILLER_SENTENCES):
        words |= set(phrase.format(pron="", poss="").split())
    return words
