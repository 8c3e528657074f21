"""minicirc: sparse feature circuits (Marks et al. 2024), a minimal reference implementation.

    model = minicirc.load_model(model_dir)
    saes = minicirc.load_saes(sae_dir, model)        # or minicirc.identity_saes(model): neurons
    circuit = minicirc.find_circuit(model, saes, examples)
    graph = minicirc.attribution_graph(model, transcoders, token_ids)   # one prompt, transcoders at every MLP
"""
from .attribution.find import find_circuit
from .attribution.graph import attribution_graph
from .attribution.graph_file import Graph, prune_graph
from .circuit import Circuit
from .data import Example, load_examples, tokenize
from .errors import MinicircError
from .evaluation import faithfulness
from .model import Config, GPTNeoX, load_model, load_tokenizer, save_model
from .sae import Dictionary, IdentityDictionary, identity_saes, load_sae, load_saes, save_saes
