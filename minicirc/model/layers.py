"""Pieces more than one model family uses: the MLP activations by their config.json names, and the
"rotate half" step of rotary embeddings."""
import math

import torch
import torch.nn.functional as F


def gelu_new(x):
    # GPT-2's tanh approximation exactly as transformers writes it; torch's approximate="tanh" rounds
    # differently (about 1e-7), which would show up in the logits.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# config.json's hidden_act / activation_function / hidden_activation -> the function. Every family reads
# this one table.
ACTIVATIONS = {
    "gelu": F.gelu,            # exact (erf) GELU
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves: rotary embeddings' "rotate half" layout
    (GPT-NeoX, Llama), where channel i pairs with channel i + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
