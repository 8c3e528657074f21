"""Pieces more than one model family uses: the MLP activations by their config.json names, the "rotate half"
step of rotary embeddings, and what freezing a model's statistics needs (held, LayerNorm, causal_pattern)."""
import math

import torch
import torch.nn as nn
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


def held(module, name, value):
    """`value`, or, while the model's statistics are frozen (SiteModel.frozen_statistics), the value `module`
    computed under `name` on the first forward pass inside, detached: a norm's scale or an attention pattern held
    at its value on one input, a constant of autograd, so that the model is linear in its residual stream."""
    store = module.frozen
    if store is None:
        return value
    key = (module, name)
    if key not in store:
        store[key] = value.detach()
    return store[key]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same numbers) whose scale sqrt(var(x) + eps) can be held (`held`): then
    (x - mean(x)) / scale * weight + bias, written out, the centring staying live as TransformerLens writes it."""
    frozen = None

    def forward(self, x):
        if self.frozen is None:
            return super().forward(x)
        xc = x - x.mean(-1, keepdim=True)
        scale = held(self, "scale", (xc.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return xc / scale * self.weight + self.bias


def causal_pattern(q, k, scale):
    """softmax(q kᵀ * scale) over the keys at or before each query (B, H, T, T): what
    F.scaled_dot_product_attention(is_causal=True) multiplies v by, written out where the pattern is held."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
