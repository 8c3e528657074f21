"""Dictionaries (SAEs and their kinds), their sparse view, the file formats they come in, and a model's set
of them.

    dictionary.py  Dictionary (relu, jumprelu, topk, groupmax, gated, identity; skip terms, transcoders), identity_saes, shift_input
    sparse.py      the sparse view: encode_rows, decode_rows, features_at, error_of
    formats.py     dictionary_learning, SAELens and Gemma Scope files; TransformerLens hook names both ways
    sparsify.py    EleutherAI sparsify folders (SAEs, transcoders, skip terms; topk, groupmax); hookpoints
    circuit_tracer.py  circuit-tracer transcoder sets (config.yaml + layer_<i>.safetensors) and cross-layer transcoders
    clt.py         cross-layer transcoders in the method: a CrossLayerDictionary per layer, the earlier layers' writes
    tree.py        load_sae, load_saes, save_saes, saes_hash
"""
from .circuit_tracer import load_clt, load_transcoder_set
from .clt import CrossLayerDictionary
from .dictionary import INPUT_NORMS, KINDS, READS, Dictionary, IdentityDictionary, checked, identity_saes, shift_input
from .formats import (
                      hook_site,
                      load_dictionary_learning,
                      load_gemma_scope,
                      load_saelens,
                      save_dictionary_learning,
                      save_saelens,
                      site_hook,
)
from .sparsify import hookpoint_site, load_sparsify
from .tree import load_sae, load_saes, saes_hash, save_saes, site_folder
