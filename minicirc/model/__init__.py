"""Language models with named activation sites, in plain torch: one file per family and the site mechanism
they share (sites.py), the checkpoint loaders apart (checkpoints.py, gguf.py)."""
from .checkpoints import (
                          FAMILIES,
                          Family,
                          build_model,
                          family,
                          load_gguf,
                          load_model,
                          load_tokenizer,
                          model_hash,
                          read_state_dict,
                          save_model,
)
from .gpt_neox import Config, GPTNeoX, config_from_hf
from .sites import SiteModel, check_tokens, site_kind, site_layer, sites_from_layer
