"""GPT-2 in plain torch, with the sites of sites.py (embed, attn_l, mlp_l, resid_l and the optional ones).

Its own file because it shares little with the rotary families: learned position embeddings added to the
token embedding (so `embed` is their sum), LayerNorm with biases, one fused q|k|v projection, a plain
4x MLP, sequential residual, unembedding tied to the token embedding. Checkpoints store the projections
as Conv1D weights of shape (in, out): the name table marks them, and loading transposes them to Linear's
(out, in), as nanoGPT's from_pretrained does.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MinicircError
from .layers import ACTIVATIONS, LayerNorm, causal_pattern, held
from .sites import SiteConfig, SiteModel, site_kind, site_layer


@dataclass
class Config(SiteConfig):
    max_len: int = 1024
    layer_norm_eps: float = 1e-5
    act: str = "gelu_new"
    hf: dict = field(default=None, repr=False)   # the config.json read, written back by save_model
    parallel_residual = False    # class constants: GPT-2 is sequential and never soft-caps
    final_softcap = None

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def to_hf(self):
        return self.hf


def config_from_hf(hf):
    """Map a GPT-2 config.json dict to Config, refusing what this model does not implement."""
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if key not in hf:
            raise MinicircError(f"config.json: required field {key!r} is missing")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(key):
            raise MinicircError(f"config.json: {key} is not supported")
    if hf.get("scale_attn_weights", True) is not True:
        raise MinicircError("config.json: scale_attn_weights false is not supported")
    if hf.get("tie_word_embeddings", True) is not True:
        raise MinicircError("config.json: tie_word_embeddings false is not supported for gpt2")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise MinicircError(f"config.json: activation_function {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    d, h = hf["n_embd"], hf["n_head"]
    if d % h:
        raise MinicircError(f"config.json: n_embd {d} is not divisible by n_head {h}")
    return Config(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=h,
                  d_mlp=hf.get("n_inner") or 4 * d, max_len=hf.get("n_positions", 1024),
                  layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), act=act, hf=hf)


class Attention(nn.Module):
    frozen = None   # see SiteModel.frozen_statistics

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, z_site=None):
        B, T, D = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        # The fused projection is laid out [q | k | v], each (H, hd) head-major.
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in self.c_attn(x).split(D, dim=-1))
        # Causal mask only: padding is on the right, so real tokens never attend to it.
        if self.frozen is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        else:   # the pattern held (SiteModel.frozen_statistics)
            y = held(self, "pattern", causal_pattern(q, k, 1.0 / math.sqrt(hd))) @ v
        z = y.transpose(1, 2).reshape(B, T, D)   # the concatenated head outputs: site z_l
        return self.c_proj(z if z_site is None else z_site(z))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x, hidden_site=None):
        h = self.act(self.c_fc(x))     # the MLP's neurons: site mlp_hidden_l
        return self.c_proj(h if hidden_site is None else hidden_site(h))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def attn_block(self, resid, z_site=None):
        return self.attn(self.ln_1(resid), z_site)

    def mlp_norm(self, x):
        return self.ln_2(x)

    def mlp_block(self, x, hidden_site=None):
        return self.mlp(self.mlp_norm(x), hidden_site)


class GPT2(SiteModel):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def embed(self, tokens):
        return self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))

    def final_norm(self, h):
        return self.ln_f(h)

    @property
    def unembedding(self):
        return self.wte.weight   # tied

    def projection(self, site):
        """The linear map after an inner site: attn.c_proj after z_l, mlp.c_proj after mlp_hidden_l."""
        layer = self.layers[site_layer(site)]
        return layer.attn.c_proj if site_kind(site) == "z" else layer.mlp.c_proj

    def value_bias(self, layer):
        """The value projection's bias in z_layer's layout (see gpt_neox.GPTNeoX.value_bias): c_attn is [q | k | v]."""
        D = self.cfg.d_model
        return self.layers[layer].attn.c_attn.bias[2 * D:]


# Conv1D weights, stored (in, out).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_names(cfg, keys=None):
    """minicirc name -> checkpoint name. GPT2LMHeadModel writes `transformer.`-prefixed keys, GPT2Model
    (and the original OpenAI conversion) none; the attn.bias / masked_bias mask buffers are not read."""
    prefix = "" if keys is not None and "wte.weight" in keys else "transformer."
    names = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
             "ln_f.bias": "ln_f.bias"}
    for l in range(cfg.n_layers):
        for p in ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias"]:
            names[f"layers.{l}.{p}"] = f"h.{l}.{p}"
    return {own: prefix + hf for own, hf in names.items()}
