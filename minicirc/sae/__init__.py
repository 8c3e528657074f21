"""Dictionaries (SAEs and their kinds), their sparse view, the file formats they come in, and a model's set
of them."""
from .dictionary import (INPUT_NORMS, KINDS, Dictionary, IdentityDictionary, checked, hook_site, identity_saes,
                         load_dictionary_learning, load_gemma_scope, load_sae, load_saelens, load_saes,
                         save_dictionary_learning, save_saelens, save_saes, saes_hash, shift_input, site_folder,
                         site_hook)
