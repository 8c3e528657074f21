"""A folder of task data in the original feature-circuits layout, as `minicirc compare --data DIR` reads it:
`<template>_train.json` (discovery) and `<template>_test.json` (held out), JSON lines with clean_prefix,
patch_prefix, clean_answer, patch_answer (data.load_examples reads each file).

The original's filter and sample (its loading_utils.load_examples): the lines shuffled with Python's random
at seed 12, pairs whose clean and patch prefixes tokenize to different lengths set aside, pairs whose answers
are not one token each set aside, the first n that remain kept. Positions are kept in the paper's protocol,
so a template's pairs must share one length (the original's `length` argument): the most common length of
the train file's remaining pairs, and pairs of other lengths are set aside too. Every pair set aside is
counted, by reason, for the report.
"""
import glob
import os
import random
from collections import Counter

from ..data import _ids, load_examples
from ..errors import MinicircError

SEED = 12   # the original's load_examples(seed=12)
REASONS = ("prefix lengths differ", "answer not one token", "other prompt length")


def templates_in(folder):
    """The templates of a data folder, sorted: every `<template>_train.json` that has its `_test.json`."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise MinicircError(f"--data {folder}: not a folder (it must hold <template>_train.json and _test.json files)")
    names = sorted(os.path.basename(p)[:-len("_train.json")] for p in glob.glob(os.path.join(folder, "*_train.json")))
    if not names:
        raise MinicircError(f"{folder}: no <template>_train.json file (the original's data layout: "
                            "<template>_train.json and <template>_test.json, JSON lines)")
    for t in names:
        if not os.path.isfile(os.path.join(folder, f"{t}_test.json")):
            raise MinicircError(f"{os.path.join(folder, f'{t}_test.json')}: missing (the held-out pairs of {t}_train.json)")
    return names


def screened(path, tokenizer, vocab_size):
    """(pairs, {reason: count}, {pair index: clean length}): the file's pairs in the original's shuffled order,
    each with the reason it is set aside (None: kept)."""
    examples = load_examples(path)
    for i, ex in enumerate(examples):
        if ex.patch_prefix is None:
            raise MinicircError(f"{path}: record {i} lacks patch_prefix and patch_answer (a comparison needs "
                                "clean_prefix, patch_prefix, clean_answer, patch_answer)")
    random.Random(SEED).shuffle(examples)
    out = []
    for ex in examples:
        try:
            c, p = (_ids(tokenizer, x, "prefix") for x in (ex.clean_prefix, ex.patch_prefix))
            answers = [_ids(tokenizer, x, "answer") for x in (ex.clean_answer, ex.patch_answer)]
        except MinicircError as e:
            raise MinicircError(f"{path}: {e}") from None
        if not c:
            raise MinicircError(f"{path}: empty clean_prefix")
        if len(c) != len(p):
            out.append((ex, len(c), REASONS[0]))
        elif any(len(a) != 1 for a in answers):
            out.append((ex, len(c), REASONS[1]))
        else:
            if max(max(ids) for ids in answers + [c, p]) >= vocab_size:
                raise MinicircError(f"{path}: {ex.clean_prefix!r} has a token id beyond the model's vocabulary "
                                    f"({vocab_size})")
            out.append((ex, len(c), None))
    return out


def read_templates(folder, tokenizer, n_train, n_test, vocab_size):
    """({template: {"train": [Example], "test": [Example]}}, {template: counts}): the first n_train and n_test
    pairs left after the filter (see the module's docstring); counts per file: pairs, set aside by reason,
    kept (passed the filter) and used, and the prompt length chosen."""
    pairs, counts = {}, {}
    for t in templates_in(folder):
        screens = {split: screened(os.path.join(folder, f"{t}_{split}.json"), tokenizer, vocab_size)
                   for split in ("train", "test")}
        lengths = Counter(n for _, n, why in screens["train"] if why is None)
        # The most common length (the shorter one on a tie), so the kept pairs share one length.
        length = min(lengths, key=lambda n: (-lengths[n], n)) if lengths else None
        pairs[t], counts[t] = {}, {"length": length}
        for split, n in (("train", n_train), ("test", n_test)):
            path = os.path.join(folder, f"{t}_{split}.json")
            reasons = [why or (REASONS[2] if n_tok != length else None) for _, n_tok, why in screens[split]]
            kept = [ex for (ex, _, _), why in zip(screens[split], reasons) if why is None]
            if not kept:
                set_aside = Counter(reasons)
                raise MinicircError(f"{path}: no pair left after the filter ({len(reasons)} pairs: "
                                    + ", ".join(f"{set_aside[r]} {r}" for r in REASONS if set_aside[r]) + ")")
            pairs[t][split] = kept[:n]
            counts[t][split] = {"pairs": len(reasons), **{r: reasons.count(r) for r in REASONS},
                                "kept": len(kept), "used": len(pairs[t][split])}
    return pairs, counts
