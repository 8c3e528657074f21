"""One sha256 for weights: the model's and the dictionaries' hashes in circuit.json and the keys of the
explain cache are all made by `sha256_of`, so two equal sets of weights always hash alike."""
import hashlib

import torch


def sha256_of(parts):
    """Hex sha256 over `parts` in order: a string adds its UTF-8 bytes, a tensor its values as float32 bytes
    (on the CPU, contiguous, whatever its dtype or device: the same weights in bfloat16 or on a GPU hash like
    their float32 copy on the CPU)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().float().contiguous().numpy().tobytes())
        else:
            h.update(p.encode())
    return h.hexdigest()
