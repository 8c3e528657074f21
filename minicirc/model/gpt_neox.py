"""Pythia / GPT-NeoX in plain torch, with the sites of sites.py.

What a porter needs to know, all in this file: the fused query/key/value projection is laid out per head
(B, T, H, 3*head_dim), not [q | k | v]; rotary embeddings act on the first rotary_dim = int(head_dim *
rotary_pct) channels of each head in the "rotate half" layout, with base rotary_emb_base (config.json's
rotary_pct and rotary_emb_base win over rope_parameters' partial_rotary_factor and rope_theta where both
appear; absent both, 0.25 and 10000, transformers' defaults); attention is scaled by 1/sqrt(head_dim); the MLP's activation is exact (erf) GELU unless config.json says otherwise;
the residual is parallel (attention and MLP both read resid_{l-1}); the unembedding is untied.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MinicircError
from .layers import ACTIVATIONS, LayerNorm, causal_pattern, held, rotate_half
from .sites import SiteConfig, SiteModel, site_kind, site_layer


@dataclass
class Config(SiteConfig):
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_len: int = 2048
    layer_norm_eps: float = 1e-5
    parallel_residual: bool = True
    tied_embeddings: bool = False
    act: str = "gelu"
    attention_bias: bool = True
    final_softcap = None   # a class constant, not a field: GPT-NeoX never soft-caps its logits

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self):
        # Same rounding as GPT-NeoX: int() of the fraction of each head that rotates.
        return int(self.head_dim * self.rotary_pct)

    def to_hf(self):
        """The config.json a Hugging Face GPT-NeoX checkpoint directory carries."""
        return {
            "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
            "vocab_size": self.vocab_size, "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "intermediate_size": self.d_mlp, "hidden_act": self.act,
            "rotary_pct": self.rotary_pct, "rotary_emb_base": self.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rotary_base,
                                "partial_rotary_factor": self.rotary_pct},
            "max_position_embeddings": self.max_len, "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.parallel_residual,
            "tie_word_embeddings": self.tied_embeddings, "attention_bias": self.attention_bias,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
            "dtype": "float32",
        }


def config_from_hf(hf):
    """Map a GPT-NeoX config.json dict to Config, refusing what this model does not implement."""
    if hf.get("model_type") not in (None, "gpt_neox"):
        raise MinicircError(f"config.json: model_type {hf.get('model_type')!r} is not supported (only gpt_neox)")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise MinicircError(f"config.json: required field {key!r} is missing")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise MinicircError(f"config.json: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (only default)")
    # Absent from both spellings: transformers' GPT-NeoX default (0.25), not 1.0.
    rotary_pct = hf.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
    rotary_base = hf.get("rotary_emb_base", rope.get("rope_theta", 10000.0))
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise MinicircError(f"config.json: hidden_act {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if d % h:
        raise MinicircError(f"config.json: hidden_size {d} is not divisible by num_attention_heads {h}")
    return Config(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
        d_mlp=hf["intermediate_size"], rotary_pct=float(rotary_pct), rotary_base=float(rotary_base),
        max_len=hf.get("max_position_embeddings", 2048), layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        parallel_residual=hf.get("use_parallel_residual", True),
        tied_embeddings=hf.get("tie_word_embeddings", False), act=act,
        attention_bias=hf.get("attention_bias", True),
    )


class Attention(nn.Module):
    frozen = None   # see SiteModel.frozen_statistics

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.query_key_value = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attention_bias)
        r = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, r, 2, dtype=torch.float32) / r)) if r else torch.zeros(0)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, q, k):
        # Rotary embeddings on the first rotary_dim channels of every head, "rotate half" layout (GPT-NeoX).
        r = self.cfg.rotary_dim
        if r == 0:
            return q, k
        pos = torch.arange(q.shape[2], device=q.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(q.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        r = emb.shape[-1]  # an odd rotary_dim rounds up to even, as in transformers
        def rot(t):
            t_rot, t_pass = t[..., :r], t[..., r:]
            return torch.cat((t_rot * cos + rotate_half(t_rot) * sin, t_pass), dim=-1)
        return rot(q), rot(k)

    def forward(self, x, z_site=None):
        B, T, D = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        # GPT-NeoX packs q, k, v per head: (B, T, H, 3*hd), not (B, T, 3, H, hd).
        qkv = self.query_key_value(x).view(B, T, H, 3 * hd).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rotary(q, k)
        # Causal mask only: padding is on the right, so real tokens never attend to it.
        if self.frozen is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        else:   # the pattern held (SiteModel.frozen_statistics)
            y = held(self, "pattern", causal_pattern(q, k, 1.0 / math.sqrt(hd))) @ v
        z = y.transpose(1, 2).reshape(B, T, D)   # the concatenated head outputs: site z_l
        return self.dense(z if z_site is None else z_site(z))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.dense_4h_to_h = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x, hidden_site=None):
        h = self.act(self.dense_h_to_4h(x))     # the MLP's neurons: site mlp_hidden_l
        return self.dense_4h_to_h(h if hidden_site is None else hidden_site(h))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)

    def attn_block(self, resid, z_site=None):
        return self.attention(self.input_layernorm(resid), z_site)

    def mlp_norm(self, x):
        return self.post_attention_layernorm(x)

    def mlp_block(self, x, hidden_site=None):
        return self.mlp(self.mlp_norm(x), hidden_site)


class GPTNeoX(SiteModel):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.final_layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.embed_out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.embed_out.weight = self.embed_in.weight

    def embed(self, tokens):
        return self.embed_in(tokens)

    def final_norm(self, h):
        return self.final_layer_norm(h)

    @property
    def unembedding(self):
        return self.embed_out.weight

    def projection(self, site):
        """The linear map after an inner site: attention.dense after z_l, mlp.dense_4h_to_h after mlp_hidden_l."""
        layer = self.layers[site_layer(site)]
        return layer.attention.dense if site_kind(site) == "z" else layer.mlp.dense_4h_to_h

    def value_bias(self, layer):
        """The value projection's bias in z_layer's layout (n_heads * head_dim): TransformerLens folds it out of
        z (fold_value_biases), so a z dictionary trained there reads z - value_bias (sae.shift_input)."""
        attn = self.layers[layer].attention
        bias = attn.query_key_value.bias
        if bias is None:
            return torch.zeros(self.cfg.d_model, device=attn.query_key_value.weight.device)
        H = self.cfg.n_heads
        return bias.view(H, 3, -1)[:, 2].reshape(-1)    # per head [q | k | v]


def hf_names(cfg, keys=None):
    """minicirc parameter name -> Hugging Face GPTNeoXForCausalLM name. Same orientation, no transposes."""
    names = {"embed_in.weight": "gpt_neox.embed_in.weight",
             "final_layer_norm.weight": "gpt_neox.final_layer_norm.weight",
             "final_layer_norm.bias": "gpt_neox.final_layer_norm.bias"}
    if not cfg.tied_embeddings:
        names["embed_out.weight"] = "embed_out.weight"
    for l in range(cfg.n_layers):
        for p in ["input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                  "post_attention_layernorm.bias", "attention.query_key_value.weight",
                  "attention.dense.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                  "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"] + (
                  ["attention.query_key_value.bias", "attention.dense.bias"] if cfg.attention_bias else []):
            names[f"layers.{l}.{p}"] = f"gpt_neox.layers.{l}.{p}"
    return names
