"""The synthetic biographies of tasks/bios.py written as English, for SHIFT on a pretrained model
(`minicirc shift --model smollm2`):

    "mary lives in the city . she works at the hospital . she likes her garden ."
 -> "Bio: Mary lives in the city. She works at the hospital. She likes her garden."

Same generator, same draws, same labels and the same train/test split (the split is the hash of the
generator's text, which the rendering maps one to one): only the surface changes. Names are capitalised,
every sentence starts with a capital, the full stop joins its word.

The header: "Bio:" opens every bio, so the name is never the first token. A pretrained model writes a
vector of very large norm at the first position (SmolLM2's resid_15 at position 0 has norm ~2e4 against
~2e2 elsewhere) that depends on that token only; SAEs trained without the first position cannot read it, and
under mean pooling it would outweigh the whole bio. The header's positions are the same in every bio, so
the SHIFT pipeline leaves them out of pooling, ablation and attribution (`header_length`) and nothing
about the bio is lost with them.

One token where it matters: the gender carriers (first names and pronouns) are one token each in
SmolLM2's tokenizer, so a feature that fires on a name fires on one token and the report can call it
token-level (`gender_words`, `token_counts`). The profession is still carried only by its context
sentence ("works at the hospital", "teaches at the university"), never by the profession's name, with two
professions (professor, nurse) as in the original's Bias in Bios subset.
"""
from dataclasses import replace

from . import bios

HEADER = "Bio:"


def english(text):
    """The generator's lowercase text as English prose, header first (see the module docstring)."""
    names = set(bios.NAMES[0]) | set(bios.NAMES[1])
    sentences = [s.split() for s in text.split(" .") if s.strip()]
    out = []
    for words in sentences:
        words = [w.capitalize() if w in names or j == 0 else w for j, w in enumerate(words)]
        out.append(" ".join(words) + ".")
    return HEADER + " " + " ".join(out)


def as_english(records):
    """Bio records with their text rendered by `english` (labels unchanged)."""
    return [replace(b, text=english(b.text)) for b in records]


def ambiguous_split(n, seed=0, split="train"):
    """bios.ambiguous_split in English: n/2 male professors and n/2 female nurses."""
    return as_english(bios.ambiguous_split(n, seed=seed, split=split))


def balanced_split(n, seed=0, split="train"):
    """bios.balanced_split in English: all four (profession, gender) groups, n/4 each."""
    return as_english(bios.balanced_split(n, seed=seed, split=split))


def gender_words():
    """The words that carry gender, lowercase: every first name and pronoun a bio can contain."""
    return {*bios.NAMES[0], *bios.NAMES[1], *bios.SUBJECT_PRONOUN, *bios.POSSESSIVE}


def token_counts(tokenizer):
    """{word: number of tokens} of each gender word as a bio writes it (after a space; names and the
    sentence-initial pronouns capitalised, the possessives both ways)."""
    forms = [w.capitalize() for w in (*bios.NAMES[0], *bios.NAMES[1], *bios.SUBJECT_PRONOUN, *bios.POSSESSIVE)]
    forms += list(bios.POSSESSIVE)
    return {w: len(tokenizer.encode(" " + w, add_special_tokens=False).ids) for w in forms}


def header_length(tokenizer):
    """How many tokens the header is: the positions the pipeline leaves out (the same in every bio)."""
    return len(tokenizer.encode(HEADER, add_special_tokens=False).ids)
