"""The site mechanism every model family shares, and the Pythia / GPT-NeoX decoder, in plain torch.

Sites (docs/method.md §2): `embed` (token embedding output), and per layer l: `attn_l` (attention block
output after its projection), `mlp_l` (MLP output) and `resid_l` (residual stream after layer l).

The site mechanism is a plain argument to `forward`: `edit={site: fn}` replaces the site's value x by
fn(x) for this call only (the function sees the value computed from the already-edited upstream sites),
and `cache={}` is filled with the value that flowed downstream from every site (after any edit). Nothing
outlives the call: there are no module hooks.

The other families (GPT-2 in gpt2.py; Llama, Qwen2, Qwen3 and Gemma-2 in llama.py) subclass `SiteModel`
and only say how a layer computes its attention and MLP outputs; `load_model` picks the family from
config.json's `model_type` (or reads a llama-architecture .gguf file, gguf_file.py).
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


def gelu_new(x):
    # GPT-2's tanh approximation exactly as transformers writes it; torch's approximate="tanh" rounds
    # differently (about 1e-7), which would show up in the logits.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": gelu_new,
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


def check_tokens(tokens, vocab_size):
    """Refuse token ids outside 0..vocab_size-1 with a one-line error. For the places tokens enter (loaders,
    commands, user code holding raw ids); forward does not check, as reading the values is a device sync
    on every call."""
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0].item()
        raise MinicircError(f"token id {bad} is out of the vocabulary (size {vocab_size})")


class SiteModel(nn.Module):
    """What every family shares: the site names, `forward` with its edit / cache / stop_at arguments, and
    the unembedding. A family provides `embed(tokens)`, `layers` whose items have `attn_block(resid)` and
    `mlp_block(x)` (each the value written into the residual stream), `final_norm(h)`, the (vocab, d_model)
    matrix `unembedding`, and a cfg with n_layers, d_model, vocab_size, max_len, parallel_residual and
    final_softcap (None, or Gemma-2's cap c: logits = c * tanh(logits / c))."""

    @property
    def sites(self):
        """The site names every caller gets (dictionaries, node effects, edges), in the order the forward
        pass computes them: embed, then attn_l, mlp_l, resid_l per layer."""
        names = ["embed"]
        for l in range(self.cfg.n_layers):
            names += [f"attn_{l}", f"mlp_{l}", f"resid_{l}"]
        return names

    @property
    def all_sites(self):
        """`sites` plus the optional ones, in computing order: z_l (the concatenated head outputs, before
        the attention output projection) and, where the MLP reads the residual after attention (not with
        GPT-NeoX's parallel residual), resid_mid_l. Optional sites are computed only when asked for (edit,
        stop_at or `extra`), so callers that never name them pay nothing."""
        names = ["embed"]
        for l in range(self.cfg.n_layers):
            names += [f"z_{l}", f"attn_{l}"] + ([] if self.cfg.parallel_residual else [f"resid_mid_{l}"])
            names += [f"mlp_{l}", f"resid_{l}"]
        return names

    def site_graph(self):
        """{site: [the sites its value feeds directly]} over `all_sites`: the computation as a graph whose
        arrows are one block or one sum. Per layer l, with prev = resid_{l-1} (embed for l = 0):
        prev -> z_l -> attn_l (attn_l = W_O z_l + b_O); sequential residual: prev, attn_l -> resid_mid_l
        (their sum), resid_mid_l -> mlp_l, resid_mid_l, mlp_l -> resid_l; parallel residual (GPT-NeoX):
        prev -> mlp_l and prev, attn_l, mlp_l -> resid_l. Edges are defined over it (attribution.edge_pairs)."""
        out = {s: [] for s in self.all_sites}
        for l in range(self.cfg.n_layers):
            prev = f"resid_{l - 1}" if l > 0 else "embed"
            z, a, mid, m, r = f"z_{l}", f"attn_{l}", f"resid_mid_{l}", f"mlp_{l}", f"resid_{l}"
            out[prev].append(z)
            out[z].append(a)
            if self.cfg.parallel_residual:
                out[prev] += [m, r]
                out[a].append(r)
            else:
                out[prev].append(mid)
                out[a].append(mid)
                out[mid] += [m, r]
            out[m].append(r)
        return out

    def site_width(self, name):
        """The width of a site's value: d_model, or n_heads * head_dim for z_l (they differ for Qwen3 and Gemma-2)."""
        return self.cfg.n_heads * self.cfg.head_dim if name.startswith("z_") else self.cfg.d_model

    def check_sites(self, names):
        known = set(self.all_sites)
        for name in names:
            if name not in known:
                mid = "" if self.cfg.parallel_residual else ", resid_mid_l"
                raise MinicircError(f"unknown site {name!r}; this model has sites embed, attn_l, mlp_l, "
                                    f"resid_l{mid} and z_l for l in 0..{self.cfg.n_layers - 1}")

    def forward(self, tokens, edit=None, cache=None, stop_at=None, extra=(), start=None, clean=None):
        """tokens (batch, pos) -> logits (batch, pos, vocab).

        edit: {site: fn(x) -> x'} replaces a site's value for this call.
        cache: a dict to fill with {site: value that flowed downstream}.
        stop_at: a site name; return after computing it (returns None instead of logits), for callers that
        only need sites up to a layer (z_l stops after its attention block).
        extra: optional sites (z_l, resid_mid_l) to put in cache too; those in edit or stop_at are computed anyway.
        start, clean: resume at site `start` (see forward_from): the sites before it are read from `clean`
        instead of computed, and not edited.
        Token ids are not range-checked here (see check_tokens); shapes are, as that costs nothing.
        """
        edit = edit or {}
        self.check_sites(list(edit) + ([stop_at] if stop_at else []) + list(extra) + ([start] if start else []))
        if tokens.dim() != 2:
            raise MinicircError(f"tokens must have shape (batch, pos), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_len:
            raise MinicircError(f"sequence length {tokens.shape[1]} exceeds max_position_embeddings {self.cfg.max_len}")
        order = self.all_sites
        first = order.index(start) if start else 0
        wanted = set(edit) | set(extra) | {stop_at, start}

        def site(name, compute):
            below = order.index(name) < first
            x = None
            if below:
                try:        # `clean` may fill itself on first read (attribution_batched.Tiled): no `in` test
                    x = clean[name]
                except KeyError:
                    if compute is None:
                        raise
            if x is None:   # at or after start, or an optional site the clean run did not keep
                x = compute()
            if name in edit and not below:
                x = edit[name](x)
            if cache is not None:
                cache[name] = x
            return x

        resid = site("embed", lambda: self.embed(tokens))
        if stop_at == "embed":
            return None
        for l, layer in enumerate(self.layers):
            if order.index(f"resid_{l}") < first:      # the whole layer is below start
                site(f"attn_{l}", None), site(f"mlp_{l}", None)
                resid = site(f"resid_{l}", None)
                continue
            z = f"z_{l}"
            z_site = (lambda v: site(z, lambda: v)) if z in wanted and order.index(z) >= first else None
            attn = site(f"attn_{l}", lambda: layer.attn_block(resid, z_site))
            if stop_at in (z, f"attn_{l}"):
                return None
            if self.cfg.parallel_residual:
                # GPT-NeoX: the MLP reads the same input as attention.
                mlp = site(f"mlp_{l}", lambda: layer.mlp_block(resid))
                out = resid + attn + mlp
            else:
                # Sequential: the MLP reads the residual after attention.
                mid = resid + attn
                if f"resid_mid_{l}" in wanted:
                    mid = site(f"resid_mid_{l}", lambda: mid)
                    if stop_at == f"resid_mid_{l}":
                        return None
                mlp = site(f"mlp_{l}", lambda: layer.mlp_block(mid))
                out = mid + mlp
            if stop_at == f"mlp_{l}":
                return None
            resid = site(f"resid_{l}", lambda: out)
            if stop_at == f"resid_{l}":
                return None
        return self.unembed(resid)

    def forward_from(self, start, clean, tokens, edit=None, cache=None, stop_at=None):
        """forward() resumed at site `start`: the sites computed before it are read from `clean` (the cache of
        an earlier unedited run on the same tokens) instead of computed again, and `start` itself is computed
        from the values below it and edited as in forward(). IG runs one input many times with one site
        changed; the layers below that site would give the clean values again each time.
        Sites before `start` are not edited."""
        return self(tokens, edit=edit, cache=cache, stop_at=stop_at, start=start, clean=clean)

    def unembed(self, resid, token_ids=None):
        """Logits from the last residual stream: final norm, unembedding, soft-cap where the family has one.
        token_ids (shape resid.shape[:-1]) computes only the logit of that token at each row (rows, ...)
        instead of the whole vocabulary."""
        h = self.final_norm(resid)
        if token_ids is None:
            logits = F.linear(h, self.unembedding)
        else:
            logits = (h * self.unembedding[token_ids]).sum(-1)
        cap = self.cfg.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def logit_diff(self, resid, a, b):
        """logit(a) - logit(b) at each row of the last residual stream (resid: (rows, d_model))."""
        if self.cfg.final_softcap is not None:
            return self.unembed(resid, a) - self.unembed(resid, b)
        # Without a soft-cap the readout is linear: one dot product with W[a] - W[b] (and the rounding the
        # embedded default's recorded outputs were computed with).
        W = self.unembedding
        return (self.final_norm(resid) * (W[a] - W[b])).sum(-1)


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

    def forward(self, x, z_site=None):
        B, T, D = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        # GPT-NeoX packs q, k, v per head: (B, T, H, 3*hd), not (B, T, 3, H, hd).
        qkv = self.query_key_value(x).view(B, T, H, 3 * hd).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rotary(q, k)
        # Causal mask only: padding is on the right, so real tokens never attend to it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        z = y.transpose(1, 2).reshape(B, T, D)   # the concatenated head outputs: site z_l
        return self.dense(z if z_site is None else z_site(z))


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

    def attn_block(self, resid, z_site=None):
        return self.attention(self.input_layernorm(resid), z_site)

    def mlp_block(self, x):
        return self.mlp(self.post_attention_layernorm(x))


class GPTNeoX(SiteModel):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
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

    def value_bias(self, layer):
        """The value projection's bias in z_layer's layout (n_heads * head_dim): TransformerLens folds it out of
        z (fold_value_biases), so a z dictionary trained there reads z - value_bias (sae.shift_input)."""
        attn = self.layers[layer].attention
        bias = attn.query_key_value.bias
        if bias is None:
            return torch.zeros(self.cfg.d_model, device=attn.query_key_value.weight.device)
        H = self.cfg.n_heads
        return bias.view(H, 3, -1)[:, 2].reshape(-1)    # per head [q | k | v]


# --- loading and saving Hugging Face GPT-NeoX checkpoint directories ---------------------------------

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


@dataclass
class Family:
    """How one config.json model_type is read: its config mapping, its model class, and its weight-name
    table (cfg, checkpoint keys) -> {minicirc name: checkpoint name}. Weights whose minicirc name ends in
    one of `transposed` are stored the other way round (GPT-2's Conv1D keeps (in, out))."""
    config_from_hf: object
    model: type
    hf_names: object
    transposed: tuple = ()


def family(model_type):
    """The Family for a config.json model_type; the one place that lists the supported families."""
    if model_type in (None, "gpt_neox"):
        return Family(config_from_hf, GPTNeoX, hf_names)
    if model_type == "gpt2":
        from . import gpt2
        return gpt2.FAMILY
    from . import llama
    if model_type in llama.MODEL_TYPES:
        return llama.FAMILY
    raise MinicircError(f"config.json: model_type {model_type!r} is not supported "
                        f"(supported: gpt_neox, gpt2, {', '.join(llama.MODEL_TYPES)})")


def _read_file(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise MinicircError(f"{path}: cannot read safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MinicircError(f"{path}: cannot load with weights_only=True ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); refusing to unpickle arbitrary code") from None


def read_state_dict(model_dir):
    """All tensors of a checkpoint directory: model.safetensors, pytorch_model.bin, or shards listed by
    model.safetensors.index.json / pytorch_model.bin.index.json (every shard it names must be there)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(model_dir, name)):
            return _read_file(os.path.join(model_dir, name))
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(model_dir, name)
        if not os.path.exists(index):
            continue
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MinicircError(f"{index}: no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [f for f in shards if not os.path.exists(os.path.join(model_dir, f))]
        if missing:
            raise MinicircError(f"{index} names {len(missing)} shard files that are not there, e.g. {missing[0]}")
        state = {}
        for f in shards:
            state.update(_read_file(os.path.join(model_dir, f)))
        return state
    raise MinicircError(f"{model_dir}: no model.safetensors or pytorch_model.bin")


def build_model(fam, cfg, state, where):
    """A model of family `fam` holding the checkpoint tensors `state` (Hugging Face names), after checking
    that every tensor the name table wants is there, has the shape cfg implies and is finite."""
    with torch.device("cpu"):   # weights are read and checked on the CPU, then moved in one go
        model = fam.model(cfg)
    names = fam.hf_names(cfg, set(state))
    missing = [hf_name for hf_name in names.values() if hf_name not in state]
    if missing:
        raise MinicircError(f"{where}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    own = model.state_dict()
    new = {}
    for name, hf_name in names.items():
        t = state[hf_name]
        if name.endswith(fam.transposed):
            t = t.t()
        if t.shape != own[name].shape:
            raise MinicircError(f"{where}: {hf_name} has shape {tuple(t.shape)}, config implies {tuple(own[name].shape)}")
        if not torch.isfinite(t).all():
            raise MinicircError(f"{where}: {hf_name} contains NaN or inf")
        new[name] = t.float()
    model.load_state_dict(new, strict=False)  # strict=False: non-persistent buffers and tied unembeddings
    return model


def load_model(path, device="cpu", dtype=torch.float32):
    """Read a Hugging Face checkpoint directory (family from config.json's model_type) or a llama-
    architecture .gguf file into a model in eval mode."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from .gguf_file import load_gguf
        return load_gguf(path).to(device=device, dtype=dtype).eval()
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise MinicircError(f"model directory {path} does not exist")
    if not os.path.exists(cfg_path):
        raise MinicircError(f"{path}: config.json is missing")
    hf = read_json(cfg_path)
    fam = family(hf.get("model_type"))
    cfg = fam.config_from_hf(hf)
    model = build_model(fam, cfg, read_state_dict(path), path)
    return model.to(device=device, dtype=dtype).eval()


def save_model(model, model_dir):
    """Write config.json + model.safetensors in the Hugging Face layout of the model's family."""
    from safetensors.torch import save_file
    hf = model.cfg.to_hf()
    os.makedirs(model_dir, exist_ok=True)
    fam = family(hf.get("model_type"))
    own = model.state_dict()
    tensors = {}
    for name, hf_name in fam.hf_names(model.cfg).items():
        t = own[name].detach().cpu()
        tensors[hf_name] = (t.t() if name.endswith(fam.transposed) else t).contiguous()
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)


def load_tokenizer(model_dir):
    """The `tokenizers.Tokenizer` stored as model_dir/tokenizer.json, or built from a .gguf file's metadata."""
    from tokenizers import Tokenizer
    if os.fspath(model_dir).endswith(".gguf"):
        from .gguf_file import load_gguf_tokenizer
        return load_gguf_tokenizer(model_dir)
    path = os.path.join(os.fspath(model_dir), "tokenizer.json")
    if not os.path.exists(path):
        raise MinicircError(f"{model_dir}: tokenizer.json is missing")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise MinicircError(f"{path}: cannot read tokenizer ({e})") from None


def model_hash(model):
    """sha256 over the weights, recorded in circuit.json so a circuit is never applied to another model."""
    from .hashing import sha256_of
    return sha256_of(part for name, t in sorted(model.state_dict().items()) for part in (name, t))
