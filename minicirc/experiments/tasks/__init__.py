"""The synthetic language of the embedded default model: agreement templates, biographies, LM corpus.

    from minicirc.experiments.tasks import make_examples, ambiguous_split, balanced_split, build_tokenizer
    examples = make_examples("rc", 100, seed=0, split="train")   # list[minicirc.Example]
"""
from .agreement import TEMPLATES, make_examples
from .bios import Bio, ambiguous_split, balanced_split
from .corpus import (
                     SEP,
                     build_tokenizer,
                     corpus_documents,
                     corpus_token_stream,
                     packed_sequences,
                     training_sequences,
                     vocabulary,
)
