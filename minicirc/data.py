"""Examples: the records a task or a data file provides, and their tokenized batch form.

A record follows the original code's data format: `clean_prefix`, `patch_prefix`, `clean_answer`,
`patch_answer` (answers carry their leading space and must be exactly one token), optional `case`.
Tasks may attach `latents` (known latent variables, e.g. subject number, role of each token) that the
interpretability scores use; data files never need them.
"""
import json
import os
from dataclasses import dataclass, field

import torch

from .errors import MinicircError


@dataclass
class Example:
    clean_prefix: str
    patch_prefix: str | None
    clean_answer: str
    patch_answer: str | None
    case: str | None = None
    latents: dict = field(default_factory=dict)


FIELDS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")


def load_examples(path, limit=None):
    """Records from a JSON-lines file or a JSON list of objects, in the original code's format."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MinicircError(f"data file {path} does not exist")
    if not os.path.isfile(path):
        raise MinicircError(f"data file {path} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise MinicircError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise MinicircError(f"{path}: not JSON lines or a JSON list ({e})") from None
    if not rows:
        raise MinicircError(f"{path}: the dataset is empty")
    examples = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if not isinstance(row, dict):
            raise MinicircError(f"{path}: record {i} is not an object")
        missing = [k for k in ("clean_prefix", "clean_answer") if k not in row]
        if missing or (("patch_prefix" in row) != ("patch_answer" in row)):
            raise MinicircError(f"{path}: record {i} lacks {missing or ['patch_prefix/patch_answer pair']} "
                                f"(needs {', '.join(FIELDS)})")
        for k in FIELDS:
            if (row.get(k) is not None or k.startswith("clean")) and not isinstance(row.get(k), str):
                raise MinicircError(f"{path}: record {i} field {k} must be a string, got {row[k]!r}")
        examples.append(Example(row["clean_prefix"], row.get("patch_prefix"), row["clean_answer"],
                                row.get("patch_answer"), row.get("case")))
    return examples


@dataclass
class Batch:
    """Tokenized examples, right-padded. The metric is read at `last` (each example's last real token)."""
    clean: torch.Tensor              # (n, pos) long
    patch: torch.Tensor | None       # (n, pos) long, or None for zero ablation
    clean_answer: torch.Tensor       # (n,) long
    patch_answer: torch.Tensor | None
    last: torch.Tensor               # (n,) long
    examples: list

    def __len__(self):
        return self.clean.shape[0]

    def __getitem__(self, s):
        """A slice of examples as a Batch (pos trimmed to the longest example in the slice)."""
        last = self.last[s]
        T = int(last.max()) + 1 if len(last) else 0
        cut = lambda t: None if t is None else t[s][:, :T]
        return Batch(cut(self.clean), cut(self.patch), self.clean_answer[s],
                     None if self.patch_answer is None else self.patch_answer[s], last, self.examples[s])

    def to(self, device):
        mv = lambda t: None if t is None else t.to(device)
        return Batch(mv(self.clean), mv(self.patch), mv(self.clean_answer), mv(self.patch_answer),
                     mv(self.last), self.examples)


def pad_right(rows, pad=0, device="cpu"):
    """Lists of token ids -> (n, longest) long tensor, each row right-padded with `pad`. Batches are made on
    the CPU by default; find_circuit and friends move each batch to the model's device."""
    T = max(map(len, rows))
    return torch.tensor([r + [pad] * (T - len(r)) for r in rows], dtype=torch.long, device=device)


def _ids(tokenizer, text, what):
    enc = tokenizer.encode(text, add_special_tokens=False)
    unk = tokenizer.token_to_id("<unk>")
    if unk is None:
        unk = tokenizer.token_to_id("[UNK]")
    if unk is not None and unk in enc.ids:
        j = enc.ids.index(unk)
        lo, hi = enc.offsets[j] if enc.offsets else (0, 0)
        word = text[lo:hi] or (enc.tokens[j] if enc.tokens else "?")   # the input's own word, not '<unk>'
        raise MinicircError(f"{what} {text!r}: token {word!r} is out of the tokenizer's vocabulary")
    return enc.ids


def tokenize(examples, tokenizer, vocab_size=None):
    """Examples -> Batch. Answers must be one token; clean and patch prefixes of an example must have the
    same number of tokens; examples of different lengths are right-padded."""
    if not examples:
        raise MinicircError("the dataset is empty")
    has_patch = examples[0].patch_prefix is not None
    pad = tokenizer.token_to_id("<pad>") or 0
    rows_c, rows_p, ans_c, ans_p = [], [], [], []
    for i, ex in enumerate(examples):
        if (ex.patch_prefix is not None) != has_patch:
            raise MinicircError(f"example {i}: either every example has a patch prefix or none does")
        c = _ids(tokenizer, ex.clean_prefix, f"example {i} clean_prefix")
        if not c:
            raise MinicircError(f"example {i}: empty clean_prefix")
        rows_c.append(c)
        answers = [("clean_answer", ex.clean_answer, ans_c)]
        if has_patch:
            p = _ids(tokenizer, ex.patch_prefix, f"example {i} patch_prefix")
            if len(p) != len(c):
                raise MinicircError(f"example {i}: clean_prefix has {len(c)} tokens but patch_prefix has {len(p)}; "
                                    "they must be the same length")
            rows_p.append(p)
            answers.append(("patch_answer", ex.patch_answer, ans_p))
        for name, text, out in answers:
            ids = _ids(tokenizer, text, f"example {i} {name}")
            if len(ids) != 1:
                raise MinicircError(f"example {i}: {name} {text!r} is {len(ids)} tokens; answers must be exactly one")
            out.append(ids[0])
    ids = lambda values: torch.tensor(values, dtype=torch.long, device="cpu")
    batch = Batch(pad_right(rows_c, pad), pad_right(rows_p, pad) if has_patch else None, ids(ans_c),
                  ids(ans_p) if has_patch else None, ids([len(r) - 1 for r in rows_c]), list(examples))
    if vocab_size is not None:
        for name, t in [("clean", batch.clean), ("patch", batch.patch), ("answer", batch.clean_answer),
                        ("patch answer", batch.patch_answer)]:
            if t is not None and t.numel() and int(t.max()) >= vocab_size:
                raise MinicircError(f"{name} token id {int(t.max())} is out of the model's vocabulary ({vocab_size})")
    return batch
