"""minicirc: sparse feature circuits (Marks et al. 2024), a minimal reference implementation.

    model = minicirc.load_model(model_dir)
    saes = minicirc.load_saes(sae_dir, model)        # or minicirc.identity_saes(model): neurons
    circuit = minicirc.find_circuit(model, saes, examples)
"""
from .errors import MinicircError
from .model import GPTNeoX, Config, load_model, load_tokenizer, save_model
from .sae import Dictionary, IdentityDictionary, identity_saes, load_sae, load_saes, save_saes
from .data import Example
from .data import load_examples, tokenize
from .circuit import Circuit
from .attribution.find import find_circuit
from .evaluation import faithfulness
