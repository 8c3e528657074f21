"""minicirc.data: tokenize (right padding, `last`, vocabulary checks), Batch slicing, load_examples' limit;
a mixed-length batch gives the same circuit as its examples one at a time."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import minicirc
from minicirc.data import Example, load_examples, pad_right, tokenize
from minicirc.errors import MinicircError
from minicirc.model import Config, GPTNeoX
from minicirc.sae import Dictionary

# <pad> deliberately at neither 0 nor 1, so the padding value is the tokenizer's own pad id.
WORDS = ["<unk>", "the", "cat", "<pad>", "dog", "near", "is", "are", "big", "small", "and", "red", "old"]
CONTENT = [w for w in WORDS if not w.startswith("<")]
PAD = WORDS.index("<pad>")


def word_tokenizer(words=WORDS):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def fresh_generator():
    return torch.Generator().manual_seed(int(torch.randint(0, 10**9, ()).item()))


def random_examples(g, lengths):
    """Examples with the given prefix lengths (in words); each patch prefix differs from its clean prefix in one
    word, so clean and patch have the same number of tokens."""
    pick = lambda: CONTENT[int(torch.randint(0, len(CONTENT), (), generator=g))]
    out = []
    for n in lengths:
        clean = [pick() for _ in range(n)]
        patch = list(clean)
        j = int(torch.randint(0, n, (), generator=g))
        patch[j] = next(w for w in CONTENT[int(torch.randint(0, len(CONTENT), (), generator=g)):] + CONTENT
                        if w != clean[j])
        out.append(Example(" ".join(clean), " ".join(patch), " " + pick(), " " + pick()))
    return out


def distinct_lengths(g, n):
    """n distinct lengths in 1..8, in random order."""
    return [int(v) + 1 for v in torch.randperm(8, generator=g)[:n]]


def test_tokenize_pads_mixed_lengths_on_the_right():
    g = fresh_generator()
    tok = word_tokenizer()
    examples = random_examples(g, distinct_lengths(g, 3))
    batch = tokenize(examples, tok)
    T = max(len(ex.clean_prefix.split()) for ex in examples)
    assert batch.clean.shape == batch.patch.shape == (3, T)
    for i, ex in enumerate(examples):
        words_c, words_p = ex.clean_prefix.split(), ex.patch_prefix.split()
        ids_c, ids_p = [WORDS.index(w) for w in words_c], [WORDS.index(w) for w in words_p]
        alone = tokenize([ex], tok)
        last = int(batch.last[i])
        assert last == len(words_c) - 1 == int(alone.last[0])
        # Trimmed to last + 1 the row is the example tokenized alone, and the word-level ids written out here.
        assert batch.clean[i, :last + 1].tolist() == alone.clean[0].tolist() == ids_c
        assert batch.patch[i, :last + 1].tolist() == alone.patch[0].tolist() == ids_p
        assert int(batch.clean[i, last]) == WORDS.index(words_c[-1])      # the real last token
        # Everything after it is padding, with the tokenizer's <pad> id.
        assert batch.clean[i, last + 1:].tolist() == [PAD] * (T - last - 1)
        assert batch.patch[i, last + 1:].tolist() == [PAD] * (T - last - 1)
        assert int(batch.clean_answer[i]) == WORDS.index(ex.clean_answer.strip())
        assert int(batch.patch_answer[i]) == WORDS.index(ex.patch_answer.strip())


def random_model_and_saes(g, vocab):
    cfg = Config(vocab_size=vocab, d_model=16, n_layers=2, n_heads=4, d_mlp=24, max_len=16)
    torch.manual_seed(int(torch.randint(0, 10**6, (), generator=g)))
    model = GPTNeoX(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    F = 10
    saes = {s: Dictionary(torch.randn(16, F, generator=g), torch.randn(F, generator=g) * 0.5,
                          torch.randn(F, 16, generator=g) / 4, torch.randn(16, generator=g) * 0.1, "relu")
            for s in model.sites}
    return model.double(), {s: d.double() for s, d in saes.items()}


def test_pad_right_is_the_one_padder():
    """pad_right against rows padded by hand, and the padders that use it: the bios batch (pad 0) and the
    corpus's training rows (PAD_ID) hold exactly their rows' ids, then padding."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    rows = [torch.randint(0, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (6,), generator=g)]
    T = max(len(r) for r in rows)
    got = pad_right(rows, pad=7)
    assert got.dtype == torch.long and got.device.type == "cpu" and got.shape == (len(rows), T)
    for row, r in zip(got.tolist(), rows):
        assert row == r + [7] * (T - len(r))
    assert pad_right(rows).tolist() == [r + [0] * (T - len(r)) for r in rows]
    from minicirc.experiments.tasks import corpus
    tok = corpus.build_tokenizer()
    seqs = corpus.training_sequences(tok, 5, seed=int(torch.randint(0, 10**6, ()).item()))
    docs = [row[:row.index(corpus.SEP_ID) + 1] for row in seqs.tolist()]
    assert seqs.tolist() == [d + [corpus.PAD_ID] * (seqs.shape[1] - len(d)) for d in docs]
    assert seqs.shape[1] == max(map(len, docs))


def test_mixed_length_batch_circuit_equals_the_mean_of_single_example_circuits():
    g = fresh_generator()
    tok = word_tokenizer()
    model, saes = random_model_and_saes(g, len(WORDS))
    examples = random_examples(g, distinct_lengths(g, 3))
    run = lambda b: minicirc.find_circuit(model, saes, b, method="attrib", nodes_only=True, node_threshold=0.0,
                                          batch_size=3, progress=False)
    mixed = run(tokenize(examples, tok))
    singles = [run(tokenize([ex], tok)) for ex in examples]
    # Each single circuit averages over one example; the mixed one over three: equal weights.
    for s in model.sites:
        feat, err = mixed.nodes[s][..., :-1], mixed.nodes[s][..., -1]      # column F: the error node
        want_feat = sum(c.nodes[s][..., :-1] for c in singles) / len(singles)
        want_err = sum(c.nodes[s][..., -1] for c in singles) / len(singles)
        torch.testing.assert_close(feat.double(), want_feat.double(), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(err.double(), want_err.double(), rtol=1e-7, atol=1e-9)
    assert any(float(c.nodes[s][..., :-1].abs().max()) > 1e-6 for c in singles for s in model.sites), \
        "the test needs nonzero effects"


def test_batch_slice_trims_positions_to_its_longest_example():
    g = fresh_generator()
    tok = word_tokenizer()
    lengths = distinct_lengths(g, 5)
    lengths.sort()
    lengths = lengths[:-1][::-1] + [lengths[-1]]          # the longest example is the last one
    batch = tokenize(random_examples(g, lengths), tok)
    a = int(torch.randint(0, 2, (), generator=g))
    b = int(torch.randint(a + 1, 4, (), generator=g))     # the slice never holds the longest example
    part = batch[a:b]
    T = max(lengths[a:b])
    assert part.clean.shape == part.patch.shape == (b - a, T) and T < batch.clean.shape[1]
    assert int(part.last.max()) + 1 == T
    assert torch.equal(part.clean, batch.clean[a:b, :T]) and torch.equal(part.patch, batch.patch[a:b, :T])
    assert part.last.tolist() == [n - 1 for n in lengths[a:b]]
    assert part.clean_answer.tolist() == batch.clean_answer[a:b].tolist() and part.examples == batch.examples[a:b]


def test_vocab_check_rejects_an_id_equal_to_the_vocab_size():
    g = fresh_generator()
    tok = word_tokenizer()
    top = len(WORDS) - 1                                   # "old": the tokenizer's largest id
    ex = random_examples(g, [3])[0]
    ex = Example(ex.clean_prefix + " old", ex.patch_prefix + " old", ex.clean_answer, ex.patch_answer)
    tokenize([ex], tok, vocab_size=top + 1)                # every id < vocab_size: accepted
    with pytest.raises(MinicircError, match="out of the model's vocabulary"):
        tokenize([ex], tok, vocab_size=top)                # id == vocab_size: no such embedding row


def test_load_examples_limit(tmp_path):
    g = fresh_generator()
    total = int(torch.randint(3, 8, (), generator=g))
    rows = [{"clean_prefix": f"the cat {i}", "patch_prefix": f"the dog {i}", "clean_answer": " is",
             "patch_answer": " are"} for i in range(total)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for k in range(1, total + 3):
        got = load_examples(path, limit=k)
        assert len(got) == min(k, total)
        assert [e.clean_prefix for e in got] == [r["clean_prefix"] for r in rows[:k]]
    assert len(load_examples(path)) == total


@pytest.mark.parametrize("where", [0, "middle"])
def test_unknown_word_is_reported_at_any_position(where):
    g = fresh_generator()
    tok = word_tokenizer()
    ex = random_examples(g, [4])[0]
    words = ex.clean_prefix.split()
    j = 0 if where == 0 else int(torch.randint(1, 4, (), generator=g))
    words[j] = "zebra"
    bad = Example(" ".join(words), None, ex.clean_answer, None)
    with pytest.raises(MinicircError, match="'zebra' is out of the tokenizer's vocabulary"):
        tokenize([bad], tok)
