"""The language-model training corpus of the embedded default model, and its word-level tokenizer.

Tokenizer conventions:
- `tokenizers` WordLevel model over every word the language can produce (so nothing is ever <unk>),
  WhitespaceSplit pre-tokenizer (one token per space-separated word; " is" -> ["is"]), no normalizer and
  no post-processor: encoding adds no tokens.
- Special tokens: "<pad>" = 0, "<unk>" = 1, "<sep>" = 2. The other words follow in sorted order.
- "<sep>" *ends* every document (a sentence, or a whole biography); nothing marks a start. Evaluation
  prompts ("the author near the guards") carry no special token either, so training rows should start
  at a document start. `training_sequences` gives one document per row (padded), so every document
  looks exactly like a prompt at position 0; `packed_sequences` packs several documents per row, the
  first at position 0 (no padding: about 3x the tokens per step, and the faster way to train);
  `corpus_token_stream` is the same documents concatenated into one stream (windows taken from it
  should also start at a document start).

Corpus mix (by document): SENTENCE_MIX below. Agreement sentences and biographies come from their
"train" splits only, so the held-out examples (`agreement.make_examples(..., split="test")`,
`bios.*_split(..., split="test")`) never occur in training. Profession and gender are independent in
the corpus biographies (all four groups equally likely), so the model has no reason to fuse them.
"""
import random

import torch

from ...data import pad_right
from . import agreement, bios

PAD, UNK, SEP = "<pad>", "<unk>", "<sep>"
SPECIAL_TOKENS = (PAD, UNK, SEP)
PAD_ID, UNK_ID, SEP_ID = 0, 1, 2

# Share of documents per family. rc sentences teach both within_rc (the clause verb) and rc (the main
# verb), the hardest agreements, so they get the largest share.
SENTENCE_MIX = {"simple": 0.15, "nounpp": 0.25, "rc": 0.30, "question": 0.10, "bio": 0.20}


def vocabulary():
    """All words of the language, sorted (special tokens excluded)."""
    return sorted(agreement.vocabulary() | bios.vocabulary())


def build_tokenizer():
    """The word-level `tokenizers.Tokenizer` of the language (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def corpus_documents(n, seed=0, split="train"):
    """`n` documents (strings without "<sep>"), drawn from SENTENCE_MIX; the same list for the same seed."""
    agreement.check_split(split)
    rng = random.Random(f"corpus/{split}/{seed}")
    families, weights = list(SENTENCE_MIX), list(SENTENCE_MIX.values())
    docs = []
    for family in rng.choices(families, weights, k=n):
        if family == "bio":
            profession, gender = rng.randrange(2), rng.randrange(2)
            while True:
                text = bios.make_bio(profession, gender, rng)
                if bios.split_of(text) == split:
                    break
            docs.append(text)
        else:
            docs.append(" ".join(agreement.sentence(family, rng, split)))
    return docs


def _encoded_documents(n, seed, tokenizer):
    tokenizer = tokenizer or build_tokenizer()
    sep = tokenizer.token_to_id(SEP)
    return [enc.ids + [sep] for enc in tokenizer.encode_batch(corpus_documents(n, seed))]


def corpus_token_stream(n_tokens, seed=0, tokenizer=None):
    """A 1-D LongTensor of `n_tokens` ids: train-split documents, each followed by "<sep>", starting at a
    document start (the last document may be cut)."""
    ids, chunk = [], 0
    while len(ids) < n_tokens:
        # Documents average ~10 tokens; draw in chunks with their own seeds so the stream is
        # deterministic however many chunks a length needs.
        for doc in _encoded_documents(max(64, n_tokens // 8), f"{seed}/{chunk}", tokenizer):
            ids += doc
        chunk += 1
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def training_sequences(tokenizer, n_sentences, seed=0, split="train"):
    """A (n_sentences, T) LongTensor, one document per row: its ids, then "<sep>", then "<pad>" up to T,
    the longest row's length. Every document starts at position 0, exactly like an evaluation prompt;
    exclude PAD_ID from the loss (the "<sep>" target teaches where a document ends)."""
    sep = tokenizer.token_to_id(SEP)
    rows = [enc.ids + [sep] for enc in tokenizer.encode_batch(corpus_documents(n_sentences, seed, split))]
    return pad_right(rows, PAD_ID)


def packed_sequences(tokenizer, n_rows, seq_len=32, seed=0, split="train"):
    """A (n_rows, seq_len) LongTensor without padding: each row starts at a document start and holds
    whole documents, each followed by "<sep>", the last one cut at the row's end. About three times the
    real tokens per row of `training_sequences`; measured on the first default (d_model 64, 3 layers,
    batch 64, the 221-word language), 400 steps on rows of 32 reached 100% held-out agreement on every
    template where 400 steps on `training_sequences` reached 75-87% on within_rc and nounpp. The current
    default (d_model 48, 394 tokens) reaches 100% on every template with 800 steps on packed rows."""
    rows, row, chunk = [], [], 0
    while len(rows) < n_rows:
        # Documents average ~11 tokens + "<sep>"; draw in chunks with their own seeds so the result is
        # the same however many chunks are needed.
        docs = corpus_documents(max(64, n_rows * seq_len // 10), f"{seed}/{chunk}", split)
        for enc in tokenizer.encode_batch(docs):
            row += enc.ids + [SEP_ID]
            if len(row) >= seq_len:
                rows.append(row[:seq_len])
                row = []
                if len(rows) == n_rows:
                    break
        chunk += 1
    return torch.tensor(rows, dtype=torch.long)
