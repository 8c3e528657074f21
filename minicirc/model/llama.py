"""Llama, Qwen2, Qwen3 and Gemma-2 in plain torch: one decoder, because the four differ in a handful of
switches (which projections have biases, a norm on q and k, Gemma-2's extra norms and soft-caps) and not in
how data flows. Every difference is a field of `Config`, set in one place: `config_from_hf`.

The shared shape: token embedding; per layer x + attn(norm(x)), then + mlp(norm(.)) (sequential residual);
RMSNorm; rotary embeddings on the whole head ("rotate half" layout); grouped-query attention (n_kv_heads
key/value heads, each shared by n_heads / n_kv_heads query heads); a gated MLP down(act(gate(x)) * up(x)).

Sites are those of sites.py: embed, attn_l, mlp_l, resid_l and the optional ones. For Gemma-2, attn_l and
mlp_l are the values after their post-norms, i.e. what is added to the residual stream; mlp_hidden_l is
act(gate(x)) * up(x), the down projection's input.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MinicircError
from .layers import ACTIVATIONS, held, rotate_half
from .sites import SiteConfig, SiteModel, site_kind, site_layer

MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2")


@dataclass
class Config(SiteConfig):
    n_kv_heads: int
    head_dim: int
    max_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_llama3: dict = None       # llama3 scaling: factor, low/high_freq_factor, original_max_position_embeddings
    rope_freq_factors: tuple = None  # GGUF's rope_freqs tensor: each frequency divided by its factor
    tied_embeddings: bool = False
    act: str = "silu"
    qkv_bias: bool = False         # Qwen2: biases on q, k, v; Llama attention_bias: on q, k, v and o
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False          # Qwen3: RMSNorm over each head's q and k before rotary
    gemma: bool = False            # Gemma-2: norms x_hat * (1 + w), post-norms, embedding * sqrt(d_model)
    attn_scale: float = None       # 1/sqrt(query_pre_attn_scalar) for Gemma-2, else 1/sqrt(head_dim)
    attn_softcap: float = None     # Gemma-2: attention logits c * tanh(logits / c) before the mask
    final_softcap: float = None    # Gemma-2: the same on the output logits
    sliding_window: int = None     # Gemma-2: layers marked "sliding_attention" see only the last w tokens
    sliding_layers: tuple = ()
    hf: dict = field(default=None, repr=False)   # the config.json read, written back by save_model
    parallel_residual = False      # class constant: all four are sequential

    def to_hf(self):
        if self.rope_freq_factors is not None:
            raise MinicircError("this model's rotary frequencies come from a GGUF rope_freqs tensor, which a "
                                "Hugging Face config.json cannot express; it cannot be saved")
        return self.hf


def _rope(hf):
    """(rope_theta, llama3 scaling or None) from `rope_parameters` (transformers 5) or `rope_scaling` +
    `rope_theta` (older configs); other rope types are refused."""
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        absent = [k for k in keys if k not in rope]
        if absent:
            raise MinicircError(f"config.json: llama3 rope scaling lacks {absent[0]!r}")
        return theta, {k: float(rope[k]) for k in keys}
    raise MinicircError(f"config.json: rope type {kind!r} is not supported (only default and llama3)")


def config_from_hf(hf):
    """Map a llama / qwen2 / qwen3 / gemma2 config.json dict to Config: the family differences, in one place."""
    kind = hf.get("model_type")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise MinicircError(f"config.json: required field {key!r} is missing")
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hf.get(key):
            raise MinicircError(f"config.json: {key} = {hf[key]}: mixture of experts is not supported")
    if hf.get("use_sliding_window") and kind != "gemma2":
        raise MinicircError("config.json: use_sliding_window is not supported for " + kind)
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise MinicircError(f"config.json: hidden_act {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or h
    if h % kv:
        raise MinicircError(f"config.json: num_attention_heads {h} is not a multiple of num_key_value_heads {kv}")
    head_dim = hf.get("head_dim") or d // h
    if not hf.get("head_dim") and d % h:
        raise MinicircError(f"config.json: hidden_size {d} is not divisible by num_attention_heads {h}")
    theta, llama3 = _rope(hf)
    if hf.get("pretraining_tp", 1) != 1:
        raise MinicircError(f"config.json: pretraining_tp {hf['pretraining_tp']} is not supported (only 1)")
    cfg = Config(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h, n_kv_heads=kv,
        head_dim=head_dim, d_mlp=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_llama3=llama3,
        tied_embeddings=hf.get("tie_word_embeddings", kind == "gemma2"), act=act, hf=hf)
    if kind == "llama":
        cfg.qkv_bias = cfg.o_bias = bool(hf.get("attention_bias", False))
        cfg.mlp_bias = bool(hf.get("mlp_bias", False))
    elif kind == "qwen2":
        cfg.qkv_bias = True
    elif kind == "qwen3":
        cfg.qkv_bias = cfg.o_bias = bool(hf.get("attention_bias", False))
        cfg.qk_norm = True
    elif kind == "gemma2":
        cfg.gemma = True
        cfg.qkv_bias = cfg.o_bias = bool(hf.get("attention_bias", False))
        cfg.attn_scale = hf.get("query_pre_attn_scalar", head_dim) ** -0.5
        cfg.attn_softcap = hf.get("attn_logit_softcapping")
        cfg.final_softcap = hf.get("final_logit_softcapping")
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if l % 2 == 0 else "full_attention" for l in range(cfg.n_layers)]
        cfg.sliding_window = hf.get("sliding_window")
        cfg.sliding_layers = tuple(l for l, t in enumerate(layer_types) if t == "sliding_attention")
        if cfg.sliding_layers and not cfg.sliding_window:
            raise MinicircError("config.json: layer_types marks sliding_attention layers but sliding_window is not set")
    return cfg


class RMSNorm(nn.Module):
    frozen = None   # see SiteModel.frozen_statistics

    def __init__(self, d, eps, gemma=False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        # Gemma-2 stores w and scales by (1 + w), so its weights start at zero.
        self.weight = nn.Parameter(torch.zeros(d) if gemma else torch.ones(d))

    def forward(self, x):
        xf = x.float()   # the mean square in float32 whatever the model's dtype, as transformers does
        xf = xf * held(self, "scale", torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))
        if self.gemma:   # Gemma-2 multiplies before rounding back; Llama rounds, then multiplies
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


def rotary_inv_freq(cfg):
    """The rotary frequencies, with Llama 3's rescaling: wavelengths longer than the original context over
    low_freq_factor are slowed by `factor`, shorter than it over high_freq_factor kept, and smoothly mixed
    between (given as parameters in config.json, or as the per-frequency factors a GGUF file stores)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_freq_factors is not None:   # llama.cpp stores llama 3's rescaling as one factor per frequency
        return inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    s = cfg.rope_llama3
    if s is None:
        return inv_freq
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Attention(nn.Module):
    frozen = None   # see SiteModel.frozen_statistics

    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)
        self.window = cfg.sliding_window if layer in cfg.sliding_layers else None
        self.register_buffer("inv_freq", rotary_inv_freq(cfg), persistent=False)

    def forward(self, x, z_site=None):
        B, T, _ = x.shape
        H, KV, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, hd)
        k = self.k_proj(x).view(B, T, KV, hd)
        v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        # Rotary on the whole head, "rotate half" layout.
        pos = torch.arange(T, device=x.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(x.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # Grouped-query attention: each key/value head serves H / KV consecutive query heads.
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        scale = self.cfg.attn_scale or hd ** -0.5
        scores = (q @ k.transpose(-1, -2)) * scale
        if self.cfg.attn_softcap is not None:   # Gemma-2 caps the logits before the mask
            c = self.cfg.attn_softcap
            scores = c * torch.tanh(scores / c)
        # Causal (padding is on the right, so real tokens never attend to it), and on sliding-window layers
        # a query sees only keys less than `window` positions back.
        i = torch.arange(T, device=x.device)
        allowed = i[None, :] <= i[:, None]
        if self.window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < self.window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = held(self, "pattern", F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)) @ v
        z = y.transpose(1, 2).reshape(B, T, H * hd)   # the concatenated head outputs: site z_l
        return self.o_proj(z if z_site is None else z_site(z))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x, hidden_site=None):
        h = self.act(self.gate_proj(x)) * self.up_proj(x)     # the MLP's neurons, gate product included: mlp_hidden_l
        return self.down_proj(h if hidden_site is None else hidden_site(h))


class Layer(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.gemma)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm()   # Llama: before the MLP; Gemma-2: after attention
        self.mlp = MLP(cfg)
        if cfg.gemma:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.gemma = cfg.gemma

    def attn_block(self, resid, z_site=None):
        out = self.self_attn(self.input_layernorm(resid), z_site)
        return self.post_attention_layernorm(out) if self.gemma else out

    def mlp_norm(self, x):
        """What the MLP's first projections read: the pre-feedforward norm (Gemma-2) or post-attention norm of x."""
        return self.pre_feedforward_layernorm(x) if self.gemma else self.post_attention_layernorm(x)

    def mlp_block(self, x, hidden_site=None):
        out = self.mlp(self.mlp_norm(x), hidden_site)
        return self.post_feedforward_layernorm(out) if self.gemma else out


class Llama(SiteModel):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg, l) for l in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.gemma)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, tokens):
        x = self.embed_tokens(tokens)
        if self.cfg.gemma:   # sqrt(d_model), rounded to the model's dtype first as transformers does
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        return x

    def final_norm(self, h):
        return self.norm(h)

    @property
    def unembedding(self):
        return self.lm_head.weight

    def projection(self, site):
        """The linear map after an inner site: self_attn.o_proj after z_l, mlp.down_proj after mlp_hidden_l."""
        layer = self.layers[site_layer(site)]
        return layer.self_attn.o_proj if site_kind(site) == "z" else layer.mlp.down_proj

    def value_bias(self, layer):
        """The value projection's bias in z_layer's layout (see model.GPTNeoX.value_bias): each of the n_kv_heads
        biases repeated for the query heads that share it (query head h reads key/value head h // group)."""
        cfg, v_proj = self.cfg, self.layers[layer].self_attn.v_proj
        if v_proj.bias is None:
            return torch.zeros(cfg.n_heads * cfg.head_dim, device=v_proj.weight.device)
        return v_proj.bias.view(cfg.n_kv_heads, cfg.head_dim).repeat_interleave(cfg.n_heads // cfg.n_kv_heads, 0).reshape(-1)


def hf_names(cfg, keys=None):
    """minicirc parameter name -> Hugging Face *ForCausalLM name (same names under `model.`, no transposes)."""
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tied_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    with torch.device("meta"):   # the parameter names of one layer, without allocating it
        layer = Layer(cfg, 0)
    for l in range(cfg.n_layers):
        for p, _ in layer.named_parameters():
            names[f"layers.{l}.{p}"] = f"model.layers.{l}.{p}"
    return names
