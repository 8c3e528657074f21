"""A Pythia / GPT-NeoX decoder in plain torch, with named sites that can be read and replaced.

Sites (DESIGN.md section 2): `embed` (token embedding output), and per layer l: `attn_l` (attention block
output after its projection), `mlp_l` (MLP output) and `resid_l` (residual stream after layer l).

The site mechanism is a plain argument to `forward`: `edit={site: fn}` replaces the site's value x by
fn(x) for this call only (the function sees the value computed from the already-edited upstream sites),
and `cache={}` is filled with the value that flowed downstream from every site (after any edit). Nothing
outlives the call: there are no module hooks.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinicircError, read_json


@dataclass
class Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_len: int = 2048
    layer_norm_eps: float = 1e-5
    parallel_residual: bool = True
    tied_embeddings: bool = False
    act: str = "gelu"
    attention_bias: bool = True

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


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
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


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
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

    def forward(self, x):
        B, T, D = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        # GPT-NeoX packs q, k, v per head: (B, T, H, 3*hd), not (B, T, 3, H, hd).
        qkv = self.query_key_value(x).view(B, T, H, 3 * hd).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rotary(q, k)
        # Causal mask only: padding is on the right, so real tokens never attend to it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        return self.dense(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.dense_4h_to_h = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)


class GPTNeoX(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.embed_out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.embed_out.weight = self.embed_in.weight

    @property
    def sites(self):
        """All site names in the order the forward pass computes them."""
        names = ["embed"]
        for l in range(self.cfg.n_layers):
            names += [f"attn_{l}", f"mlp_{l}", f"resid_{l}"]
        return names

    def check_sites(self, names):
        known = set(self.sites)
        for name in names:
            if name not in known:
                raise MinicircError(f"unknown site {name!r}; this model has sites embed, attn_l, mlp_l, "
                                    f"resid_l for l in 0..{self.cfg.n_layers - 1}")

    def forward(self, tokens, edit=None, cache=None, stop_at=None):
        """tokens (batch, pos) -> logits (batch, pos, vocab).

        edit: {site: fn(x) -> x'} replaces a site's value for this call.
        cache: a dict to fill with {site: value that flowed downstream}.
        stop_at: a site name; return after computing it (returns None instead of logits), for callers that
        only need sites up to a layer.
        """
        edit = edit or {}
        self.check_sites(list(edit) + ([stop_at] if stop_at else []))
        if tokens.dim() != 2:
            raise MinicircError(f"tokens must have shape (batch, pos), got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)][0].item()
            raise MinicircError(f"token id {bad} is out of the vocabulary (size {self.cfg.vocab_size})")
        if tokens.shape[1] > self.cfg.max_len:
            raise MinicircError(f"sequence length {tokens.shape[1]} exceeds max_position_embeddings {self.cfg.max_len}")

        def site(name, x):
            if name in edit:
                x = edit[name](x)
            if cache is not None:
                cache[name] = x
            return x

        resid = site("embed", self.embed_in(tokens))
        if stop_at == "embed":
            return None
        for l, layer in enumerate(self.layers):
            attn = site(f"attn_{l}", layer.attention(layer.input_layernorm(resid)))
            if stop_at == f"attn_{l}":
                return None
            if self.cfg.parallel_residual:
                mlp = site(f"mlp_{l}", layer.mlp(layer.post_attention_layernorm(resid)))
            else:
                mlp = site(f"mlp_{l}", layer.mlp(layer.post_attention_layernorm(resid + attn)))
            if stop_at == f"mlp_{l}":
                return None
            resid = site(f"resid_{l}", resid + attn + mlp)
            if stop_at == f"resid_{l}":
                return None
        return self.embed_out(self.final_layer_norm(resid))


    # Resuming a forward pass (issue 14): kept apart from forward() on purpose, for merging.
    def forward_from(self, start, clean, tokens, edit=None, cache=None, stop_at=None):
        """forward() with the sites before `start` not computed but read from `clean` ({site: value} of an
        earlier run on the same tokens, every site, as `cache` fills it). IG re-runs one input many times
        with one site changed; the layers below that site would give the clean values again each time.
        `start` itself is computed from the clean values below it and edited as in forward()."""
        edit = edit or {}
        self.check_sites([start] + list(edit) + ([stop_at] if stop_at else []))
        order = self.sites
        first = order.index(start)

        def site(name, compute):
            x = clean[name] if order.index(name) < first else compute()
            if name in edit and order.index(name) >= first:
                x = edit[name](x)
            if cache is not None:
                cache[name] = x
            return x

        resid = site("embed", lambda: self.embed_in(tokens))
        if stop_at == "embed":
            return None
        for l, layer in enumerate(self.layers):
            if order.index(f"resid_{l}") < first:     # the whole layer is below start
                site(f"attn_{l}", None), site(f"mlp_{l}", None)
                resid = site(f"resid_{l}", None)
                continue
            attn = site(f"attn_{l}", lambda: layer.attention(layer.input_layernorm(resid)))
            if stop_at == f"attn_{l}":
                return None
            mlp_in = resid if self.cfg.parallel_residual else resid + attn
            mlp = site(f"mlp_{l}", lambda: layer.mlp(layer.post_attention_layernorm(mlp_in)))
            if stop_at == f"mlp_{l}":
                return None
            resid = site(f"resid_{l}", lambda: resid + attn + mlp)
            if stop_at == f"resid_{l}":
                return None
        return self.embed_out(self.final_layer_norm(resid))

# --- loading and saving Hugging Face GPT-NeoX checkpoint directories ---------------------------------

def _hf_names(cfg):
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


def _read_state_dict(model_dir):
    st = os.path.join(model_dir, "model.safetensors")
    pt = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except Exception as e:
            raise MinicircError(f"{st}: cannot read safetensors file ({e})") from None
    if os.path.exists(pt):
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MinicircError(f"{pt}: cannot load with weights_only=True ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); refusing to unpickle arbitrary code") from None
    if any(f.endswith(".safetensors.index.json") or f.endswith(".bin.index.json") for f in os.listdir(model_dir)):
        raise MinicircError(f"{model_dir}: sharded checkpoints are not supported; save with one shard")
    raise MinicircError(f"{model_dir}: no model.safetensors or pytorch_model.bin")


def load_model(model_dir, device="cpu", dtype=torch.float32):
    """Read a Hugging Face GPT-NeoX checkpoint directory into a GPTNeoX in eval mode."""
    model_dir = os.fspath(model_dir)
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise MinicircError(f"model directory {model_dir} does not exist")
    if not os.path.exists(cfg_path):
        raise MinicircError(f"{model_dir}: config.json is missing")
    cfg = config_from_hf(read_json(cfg_path))
    state = _read_state_dict(model_dir)
    with torch.device("cpu"):   # weights are read and checked on the CPU, then moved in one go
        model = GPTNeoX(cfg)
    names = _hf_names(cfg)
    missing = [hf_name for hf_name in names.values() if hf_name not in state]
    if missing:
        raise MinicircError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    own = model.state_dict()
    new = {}
    for name, hf_name in names.items():
        t = state[hf_name]
        if t.shape != own[name].shape:
            raise MinicircError(f"{model_dir}: {hf_name} has shape {tuple(t.shape)}, config implies {tuple(own[name].shape)}")
        if not torch.isfinite(t).all():
            raise MinicircError(f"{model_dir}: {hf_name} contains NaN or inf")
        new[name] = t.float()
    model.load_state_dict(new, strict=False)  # strict=False: inv_freq buffers and a tied embed_out
    return model.to(device=device, dtype=dtype).eval()


def save_model(model, model_dir):
    """Write config.json + model.safetensors in the Hugging Face GPT-NeoX layout."""
    from safetensors.torch import save_file
    os.makedirs(model_dir, exist_ok=True)
    own = model.state_dict()
    tensors = {hf: own[name].detach().cpu().contiguous() for name, hf in _hf_names(model.cfg).items()}
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(model.cfg.to_hf(), f, indent=2, sort_keys=True)


def load_tokenizer(model_dir):
    """The `tokenizers.Tokenizer` stored as model_dir/tokenizer.json."""
    from tokenizers import Tokenizer
    path = os.path.join(os.fspath(model_dir), "tokenizer.json")
    if not os.path.exists(path):
        raise MinicircError(f"{model_dir}: tokenizer.json is missing")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise MinicircError(f"{path}: cannot read tokenizer ({e})") from None


def model_hash(model):
    """sha256 over the weights, recorded in circuit.json so a circuit is never applied to another model."""
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()
