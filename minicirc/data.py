"""Examples: the records a task or a data file provides, and their tokenized batch form.

A record follows the original code's data format: `clean_prefix`, `patch_prefix`, `clean_answer`,
`patch_answer` (answers carry their leading space and must be exactly one token), optional `case`.
Tasks may attach `latents` (known latent variables, e.g. subject number, role of each token) that the
interpretability scores use; data files never need them.
"""
from dataclasses import dataclass, field


@dataclass
class Example:
    clean_prefix: str
    patch_prefix: str | None
    clean_answer: str
    patch_answer: str | None
    case: str | None = None
    latents: dict = field(default_factory=dict)
