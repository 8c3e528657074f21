"""The cache of explain's activation scans: per feature, its top-k (values, flat indices) over a token sample.

An entry's key is (model weights sha, token sample sha, k, site, dictionary weights sha): any change to the
weights, the sample or k is another key, so a cached answer is always the scan's answer. Entries live in
memory; with $MINICIRC_CACHE set they also go to $MINICIRC_CACHE/explain/<key>.safetensors and later
processes read them back.

    entry = cached(key)            # {feature: (values (k,), flat indices (k,))}, from memory or disk
    store(key, {feature: ...})     # add scan results to the entry and write it to disk
"""
import hashlib
import json
import os

from safetensors.torch import load_file, save

from .files import write_atomic
from .hashing import sha256_of
from .model import model_hash

_MEMORY = {}     # cache key -> {feature: (values (k,), flat indices (k,))}
_MODEL_SHA = {}  # (id(model), weight versions) -> model_hash(model), for the one model last asked about


def sae_sha(sae):
    tensors = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold]
    return sha256_of([f"{sae.kind}|{sae.k}|{sae.subtract_b_dec}"]
                     + [part for t in tensors for part in (str(tuple(t.shape)), t)])


def sample_sha(ids):
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def model_sha(model):
    # Hashing every weight costs a pass over them; remember it per model object and weight versions.
    key = (id(model), tuple(p._version for p in model.parameters()))
    if key not in _MODEL_SHA:
        _MODEL_SHA.clear()
        _MODEL_SHA[key] = model_hash(model)
    return _MODEL_SHA[key]


def clear_cache():
    """Forget every entry held in memory (the files on disk stay)."""
    _MEMORY.clear()
    _MODEL_SHA.clear()


def cached(key):
    """The entry for `key`: {feature: (values, flat indices)} for the features scanned so far (read from
    disk on first use in this process; empty when nothing is cached)."""
    if key not in _MEMORY:
        _MEMORY[key] = _disk_load(key)
    return _MEMORY[key]


def store(key, found):
    """Add `found` ({feature: (values, flat indices)}) to the entry for `key` and write the entry to disk."""
    _MEMORY.setdefault(key, {}).update(found)
    _disk_save(key, _MEMORY[key])


def _disk_path(key):
    root = os.environ.get("MINICIRC_CACHE")
    if not root:
        return None
    return os.path.join(root, "explain", hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()[:32]
                        + ".safetensors")


def _disk_load(key):
    path = _disk_path(key)
    if not path or not os.path.exists(path):
        return {}
    try:
        t = load_file(path)
    except Exception:
        return {}  # a damaged cache file is recomputed, never trusted
    return {int(n.split(".")[0][1:]): (t[n], t[n.replace(".values", ".index")])
            for n in t if n.endswith(".values") and n.replace(".values", ".index") in t}


def _disk_save(key, entry):
    path = _disk_path(key)
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {}
        for f, (v, i) in entry.items():
            tensors[f"f{f}.values"], tensors[f"f{f}.index"] = v.contiguous(), i.contiguous()
        write_atomic(path, save(tensors))
    except OSError:
        pass  # the cache is an optimisation; an unwritable cache directory is not an error
