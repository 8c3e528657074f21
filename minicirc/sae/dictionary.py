"""Dictionaries (sparse autoencoders) over a site, and loaders for the files real SAEs come in.

Every dictionary computes `f = encode(x)` and `x_hat = decode(f) = f @ W_dec + b_dec`, the error being
err = x - x_hat, from the SAE input s = n(x) - b_dec (the `- b_dec` only where the file format says so;
n is the input normalisation, the identity unless stated) and `pre = s @ W_enc + b_enc`:
- relu:     f = relu(pre)
- jumprelu: f = pre * (pre > threshold), strict, threshold per feature
- topk:     the k largest entries of pre per row, then relu; all others 0
- gated:    f = relu(pre) * (s @ W_gate + b_gate > 0), W_enc and b_enc being the magnitude path's
            (the gate path shares the file's encoder; the magnitude path scales its columns by exp(r_mag))
- identity: f = x (W_dec = I): the neuron baseline runs through exactly the same code.
Orientation is SAELens': W_enc (d_in, n_features), W_dec (n_features, d_in).

Derivatives (edges need dd_i/dy of a downstream feature d_i = f_i(y)): for relu, jumprelu, topk and gated
without input normalisation, df_i/dx = 1[f_i != 0] W_enc[:, i] almost everywhere (a jumprelu threshold, the
top-k cut and the gate are steps, whose derivative is 0 away from the jump). Centring (TransformerLens'
center_writing_weights) and a constant scaling factor are linear maps of x folded into W_enc and b_enc at
load time, so they keep that form; so does the constant shift of a z dictionary trained through
TransformerLens, which saw z - b_V (`shift_input`, applied by load_saes). The two per-token normalisations do
not (see `input_norm`): `Dictionary.edge_form_error` says so, and edges refuse such a dictionary instead of
computing them wrong.

input_norm (SAELens normalize_activations), with a per-token scale sigma(x) > 0:
- layer_norm: n(x) = (x - mean(x)) / (std(x) + 1e-5) with the unbiased std; the library decodes
  (f_lib @ W_dec + b_dec) * std(x) + mean(x). Here f = std(x) * f_lib and decode(f) = f @ W_dec, so
  x = decode(f) + err holds with the per-token offset std(x) * b_dec + mean(x) in the error term.
- constant_norm_rescale: n(x) = x * sqrt(d_in) / |x|, the library decodes (f_lib @ W_dec + b_dec) * |x| / sqrt(d_in);
  likewise f = f_lib * |x| / sqrt(d_in), decode(f) = f @ W_dec, and b_dec * |x| / sqrt(d_in) joins the error.
Feature values are the library's times that positive per-token factor: which features are active is the same,
and the splice stays affine in f (dx/df_i = W_dec[i]), which node effects need. df_i/dx also holds the
derivative of sigma(x) and of n(x), so it is not of the form above.

Loaders (dictionary_learning `ae.pt` (+ config.json), SAELens folders (cfg.json + sae_weights.safetensors),
Gemma Scope `params.npz`) validate what they read: shapes and finite values; the constructor only checks
shapes, so building a Dictionary costs no pass over its weights. Files are read with safetensors,
`torch.load(weights_only=True)` or numpy with allow_pickle=False: never unpickled as code. Per-feature
positive rescalings that a format applies (dictionary_learning's unit-norm decoder, SAELens'
rescale_acts_by_decoder_norm) are folded into the weights at load time; reconstructions are unchanged and
feature values differ only by that positive factor, which leaves attribution effects (gradient x delta)
unchanged.
"""
import json
import math
import os
import re

import torch
import torch.nn as nn

from ..errors import MinicircError, read_json
from ..model.sites import site_kind, site_layer

KINDS = ("relu", "jumprelu", "topk", "gated", "identity")
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")
LAYER_NORM_EPS = 1e-5   # SAELens' layer_norm: x / (std + 1e-5) on the way in, x * std on the way out


class Dictionary(nn.Module):
    def __init__(self, W_enc, b_enc, W_dec, b_dec, kind="relu", threshold=None, k=None,
                 subtract_b_dec=True, source="", W_gate=None, b_gate=None, input_norm="none", site=None):
        super().__init__()
        name = source or "dictionary"
        if kind not in KINDS:
            raise MinicircError(f"unknown dictionary kind {kind!r} (known: {', '.join(KINDS)})")
        if input_norm not in INPUT_NORMS:
            raise MinicircError(f"{name}: unknown input normalisation {input_norm!r} (known: {', '.join(INPUT_NORMS)})")
        d_in, n = W_enc.shape
        if W_dec.shape != (n, d_in) or b_enc.shape != (n,) or b_dec.shape != (d_in,):
            raise MinicircError(f"{name}: inconsistent shapes W_enc {tuple(W_enc.shape)}, "
                                f"b_enc {tuple(b_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}")
        if kind == "jumprelu":
            if threshold is None or threshold.shape != (n,):
                raise MinicircError(f"{name}: jumprelu needs a threshold of shape ({n},)")
        if kind == "topk" and (k is None or int(k) < 1):
            raise MinicircError(f"{name}: topk needs k >= 1, got {k}")
        if kind == "gated" and (W_gate is None or b_gate is None or W_gate.shape != (d_in, n) or b_gate.shape != (n,)):
            raise MinicircError(f"{name}: gated needs W_gate ({d_in}, {n}) and b_gate ({n},)")
        self.kind, self.k, self.subtract_b_dec, self.source = kind, (int(k) if k is not None else None), subtract_b_dec, source
        self.input_norm = input_norm
        self.site = site   # the site the file says it was trained on (SAELens hook_name), None if it does not say
        # A z dictionary trained through TransformerLens with fold_value_biases reads z - b_V: set by the
        # loader, resolved by load_saes, which knows the model (see shift_input).
        self.reads_z_minus_value_bias = False
        self.W_enc = nn.Parameter(W_enc.float().contiguous(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.float().contiguous(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.float().contiguous(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.float().contiguous(), requires_grad=False)
        # Thresholds below 0 behave like 0 in every library (they apply relu first); clamping keeps
        # `pre * (pre > threshold)` equal to the libraries' output for any stored value.
        empty = torch.zeros(0, device=W_enc.device)
        thr = threshold.float().clamp(min=0) if threshold is not None else empty
        self.threshold = nn.Parameter(thr.contiguous(), requires_grad=False)
        self.W_gate = nn.Parameter(W_gate.float().contiguous() if kind == "gated" else empty.clone(), requires_grad=False)
        self.b_gate = nn.Parameter(b_gate.float().contiguous() if kind == "gated" else empty.clone(), requires_grad=False)

    @property
    def d_in(self):
        return self.W_enc.shape[0]

    @property
    def n_features(self):
        return self.W_enc.shape[1]

    @property
    def edge_form_error(self):
        """None when df_i/dx = 1[f_i != 0] W_enc[:, i] (what edge effects assume), else why not."""
        if self.input_norm == "none":
            return None
        return (f"{self.source or 'dictionary'}: its input normalisation {self.input_norm} scales each token by "
                "a statistic of the token itself, so df/dx is not 1[f != 0] W_enc and edge effects into this "
                "dictionary would be wrong; compute nodes only (--nodes-only)")

    def _check_input(self, x):
        if x.shape[-1] != self.d_in:
            raise MinicircError(f"dictionary {self.source or ''} expects inputs of width {self.d_in}, got {x.shape[-1]}")

    def _sae_input(self, x):
        """(s, sigma): the SAE input s = n(x) - b_dec and the per-token scale (None without normalisation)."""
        self._check_input(x)
        sigma = None
        if self.input_norm == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            sigma = (x - mean).std(dim=-1, keepdim=True)
            x = (x - mean) / (sigma + LAYER_NORM_EPS)
        elif self.input_norm == "constant_norm_rescale":
            # An all-zero token would divide 0 by 0 (NaN in SAELens); clamped, its features are ~0 instead.
            sigma = (x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in)).clamp(min=torch.finfo(x.dtype).tiny)
            x = x / sigma
        return (x - self.b_dec if self.subtract_b_dec else x), sigma

    def pre_activation(self, x):
        return self._sae_input(x)[0] @ self.W_enc + self.b_enc

    def encode(self, x):
        if self.kind == "identity":
            self._check_input(x)
            return x
        s, sigma = self._sae_input(x)
        pre = s @ self.W_enc + self.b_enc
        if self.kind == "relu":
            f = torch.relu(pre)
        elif self.kind == "jumprelu":
            f = pre * (pre > self.threshold)
        elif self.kind == "gated":
            f = torch.relu(pre) * (s @ self.W_gate + self.b_gate > 0)
        else:
            top = pre.topk(min(self.k, self.n_features), dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return f if sigma is None else f * sigma

    def decode(self, f):
        if self.kind == "identity":
            return f
        if self.input_norm != "none":   # the per-token offset sigma(x) * b_dec (+ mean) is in the error term
            return f @ self.W_dec
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        """(f, err) with x == decode(f) + err exactly (up to rounding)."""
        f = self.encode(x)
        return f, x - self.decode(f)


class IdentityDictionary(Dictionary):
    """The neuron baseline: features are the site's own coordinates."""

    def __init__(self, d_in, device="cpu"):
        eye = torch.eye(d_in, device=device)
        zeros = torch.zeros(d_in, device=device)
        super().__init__(eye, zeros, eye.clone(), zeros.clone(), kind="identity",
                         subtract_b_dec=False, source="identity")


def identity_saes(model):
    """{site: IdentityDictionary} for every site of the model (the neuron baseline)."""
    device = next(model.parameters()).device
    return {site: IdentityDictionary(model.cfg.d_model, device) for site in model.sites}


def checked(sae):
    """`sae` after a pass over its weights: every loader returns through here (the constructor does not scan)."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_gate", "b_gate"):
        if not torch.isfinite(getattr(sae, name)).all():
            raise MinicircError(f"{sae.source or 'dictionary'}: {name} contains NaN or inf")
    return sae


# --- dictionary_learning ae.pt -------------------------------------------------------------------

def _load_pt_state(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise MinicircError(f"{path}: cannot load with weights_only=True ({type(e).__name__}: {first}). "
                            "The file is corrupt, truncated, or holds pickled code, which minicirc refuses "
                            "to run") from None
    if not isinstance(state, dict):
        raise MinicircError(f"{path}: expected a state dict, found {type(state).__name__}")
    if "ae" in state and ("optimizer" in state or "step" in state):
        raise MinicircError(f"{path}: this is a dictionary_learning training checkpoint "
                            "({'step', 'ae', 'optimizer', ...}), not a saved dictionary; "
                            "save checkpoint['ae'] as ae.pt")
    return state


def _dl_config(path):
    cfg_path = os.path.join(os.path.dirname(path), "config.json")
    if not os.path.exists(cfg_path):
        return None
    return read_json(cfg_path)


def _need(state, keys, path, cls):
    missing = [k for k in keys if k not in state]
    if missing:
        raise MinicircError(f"{path}: {cls} file lacks {missing} (has {sorted(state)})")
    return [state[k] for k in keys]


DL_CLASSES = ("AutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder",
              "MatryoshkaBatchTopKSAE")


def _scalar_threshold(state, path, cls, n):
    """BatchTopK-style files store one threshold for every feature (Matryoshka's -1 means unset: 0 after clamping)."""
    if "threshold" not in state:
        raise MinicircError(f"{path}: {cls} file lacks its threshold")
    return torch.full((n,), float(state["threshold"].reshape(-1)[0]))


def load_dictionary_learning(path):
    """An `ae.pt` written by saprmarks/dictionary_learning (state dict; class from config.json if present)."""
    state = _load_pt_state(path)
    cfg = _dl_config(path)
    dict_class = ((cfg or {}).get("trainer") or {}).get("dict_class")
    keys = set(state)
    if dict_class is not None and dict_class not in DL_CLASSES:
        raise MinicircError(f"{path}: dictionary class {dict_class} is not supported (supported: {', '.join(DL_CLASSES)})")

    if dict_class == "GatedAutoEncoder" or (dict_class is None and "r_mag" in keys):
        enc_w, dec_w, bias, r_mag, gate_bias, mag_bias = _need(
            state, ["encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"], path,
            "GatedAutoEncoder")
        # e = (x - decoder_bias) @ encoder.weight.T; f = (e + gate_bias > 0) * relu(exp(r_mag) * e + mag_bias).
        # The library's from_pretrained does not renormalise the decoder of this class.
        W = enc_w.T.float()
        return checked(Dictionary(W * r_mag.float().exp(), mag_bias, dec_w.T, bias, "gated", W_gate=W,
                                  b_gate=gate_bias, subtract_b_dec=True, source=path))
    if dict_class == "MatryoshkaBatchTopKSAE" or (dict_class is None and "group_sizes" in keys):
        W_enc, b_enc, W_dec, b_dec = _need(state, ["W_enc", "b_enc", "W_dec", "b_dec"], path, "MatryoshkaBatchTopKSAE")
        # Inference encode: post = relu((x - b_dec) @ W_enc + b_enc); post * (post > threshold). Every group is
        # active in a loaded file (active_groups is not saved and defaults to all), so no feature is cut off.
        thr = _scalar_threshold(state, path, "MatryoshkaBatchTopKSAE", W_enc.shape[1])
        return checked(Dictionary(W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=thr, subtract_b_dec=True, source=path))
    if dict_class == "AutoEncoder" or (dict_class is None and {"encoder.weight", "bias"} <= keys):
        enc_w, enc_b, dec_w, bias = _need(state, ["encoder.weight", "encoder.bias", "decoder.weight", "bias"], path, "AutoEncoder")
        W_enc, W_dec = enc_w.T.float(), dec_w.T.float()
        # dictionary_learning's from_pretrained (used by the original code) normalises decoder rows to unit
        # norm; fold that positive scale into the encoder so f is what the original sees.
        norms = W_dec.norm(dim=1)
        if torch.any(norms == 0):
            raise MinicircError(f"{path}: decoder has an all-zero feature direction")
        return checked(Dictionary(W_enc * norms, enc_b.float() * norms, W_dec / norms[:, None], bias, "relu",
                                  subtract_b_dec=True, source=path))
    if dict_class == "JumpReluAutoEncoder" or (dict_class is None and {"W_enc", "threshold"} <= keys and "k" not in keys):
        W_enc, b_enc, W_dec, b_dec, thr = _need(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], path, "JumpReluAutoEncoder")
        # dictionary_learning's JumpReLU does not subtract b_dec before encoding.
        return checked(Dictionary(W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=thr, subtract_b_dec=False, source=path))
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE") or {"encoder.weight", "k"} <= keys:
        enc_w, enc_b, dec_w, b_dec = _need(state, ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"], path, dict_class or "TopK")
        if dict_class is None:
            raise MinicircError(f"{path}: AutoEncoderTopK and BatchTopKSAE files hold the same keys and no "
                                "config.json says which this is; put the training config.json beside ae.pt")
        W_enc, W_dec = enc_w.T, dec_w.T
        if dict_class == "AutoEncoderTopK":
            k = int(state["k"]) if "k" in state else ((cfg or {}).get("trainer") or {}).get("k")
            return checked(Dictionary(W_enc, enc_b, W_dec, b_dec, "topk", k=k, subtract_b_dec=True, source=path))
        thr = _scalar_threshold(state, path, "BatchTopKSAE", W_enc.shape[1])
        return checked(Dictionary(W_enc, enc_b, W_dec, b_dec, "jumprelu", threshold=thr, subtract_b_dec=True, source=path))
    raise MinicircError(f"{path}: not a dictionary_learning file minicirc knows (dict_class {dict_class!r}, "
                        f"keys {sorted(keys)})")


def save_dictionary_learning(sae, folder):
    """Write a relu Dictionary as dictionary_learning's AutoEncoder (ae.pt + config.json)."""
    if sae.kind != "relu" or not sae.subtract_b_dec or sae.input_norm != "none":
        raise MinicircError("only relu dictionaries that subtract b_dec can be saved as an AutoEncoder")
    os.makedirs(folder, exist_ok=True)
    state = {"encoder.weight": sae.W_enc.detach().T.contiguous().cpu(),
             "encoder.bias": sae.b_enc.detach().cpu().clone(),
             "decoder.weight": sae.W_dec.detach().T.contiguous().cpu(),
             "bias": sae.b_dec.detach().cpu().clone()}
    torch.save(state, os.path.join(folder, "ae.pt"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"trainer": {"dict_class": "AutoEncoder", "activation_dim": sae.d_in,
                               "dict_size": sae.n_features}}, f, indent=2)


# --- Gemma Scope params.npz ------------------------------------------------------------------------

def load_gemma_scope(path):
    """A Gemma Scope `params.npz`: JumpReLU, f = relu(pre) * (pre > threshold) with pre = x @ W_enc + b_enc
    (the input is not centred on b_dec). The file does not name its site: the folder it sits in does."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise MinicircError(f"{path}: cannot read as a numpy .npz without pickles ({type(e).__name__}: {e})") from None
    W_enc, W_dec, b_enc, b_dec, thr = _need(arrays, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path, "Gemma Scope")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return checked(Dictionary(t(W_enc), t(b_enc), t(W_dec), t(b_dec), "jumprelu", threshold=t(thr),
                              subtract_b_dec=False, source=path))


# --- SAELens folders -------------------------------------------------------------------------------

def _version_below_6(cfg):
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if v is None:
        return "metadata" not in cfg
    try:
        return int(str(v).split(".")[0]) < 6
    except ValueError:
        return False


def _cfg_field(cfg, name):
    """A field of a SAELens cfg: top level (pre-6.0 and training layouts), else the 6.x metadata block."""
    return cfg[name] if cfg.get(name) is not None else (cfg.get("metadata") or {}).get(name)


def _hook_name(cfg):
    """hook_name, or hook_point as SAELens configs before 3.0 called it."""
    hook = _cfg_field(cfg, "hook_name")
    return hook if hook is not None else _cfg_field(cfg, "hook_point")


HOOK = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|hook_resid_mid|attn\.hook_z)")


def hook_site(hook_name):
    """The minicirc site a TransformerLens hook name reads: blocks.L.hook_resid_pre is resid_{L-1} (embed for
    L = 0), hook_resid_post resid_L, hook_attn_out attn_L, hook_mlp_out mlp_L, hook_resid_mid resid_mid_L,
    attn.hook_z z_L (the concatenated head outputs before the output projection)."""
    m = HOOK.fullmatch(str(hook_name))
    if not m:
        raise MinicircError(f"hook {hook_name!r} is not a site minicirc knows (blocks.L. followed by hook_resid_pre, "
                            "hook_resid_post, hook_attn_out, hook_mlp_out, hook_resid_mid or attn.hook_z)")
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        return "embed" if layer == 0 else f"resid_{layer - 1}"
    return {"hook_resid_post": "resid", "hook_attn_out": "attn", "hook_mlp_out": "mlp", "hook_resid_mid": "resid_mid",
            "attn.hook_z": "z"}[hook] + f"_{layer}"


def site_hook(site):
    """The TransformerLens hook name of a site, the inverse of hook_site: embed is blocks.0.hook_resid_pre,
    resid_L blocks.L.hook_resid_post (not blocks.{L+1}.hook_resid_pre, its other name)."""
    if site == "embed":
        return "blocks.0.hook_resid_pre"
    hook = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out", "resid_mid": "hook_resid_mid",
            "z": "attn.hook_z"}[site_kind(site)]
    return f"blocks.{site_layer(site)}.{hook}"


def _centred(W_enc, b_enc, b_dec, subtract):
    """Fold TransformerLens' centring (the encoder sees x - mean(x)) into the encoder: with P = I - 11^T/d,
    (P x - b_dec) @ W_enc = (x - b_dec) @ (P W_enc) - mean(b_dec) * sum_r W_enc[r]. Exact, and linear in x."""
    W_enc, b_enc = W_enc.float(), b_enc.float()
    W_c = W_enc - W_enc.mean(dim=0, keepdim=True)
    if subtract:
        b_enc = b_enc - b_dec.float().mean() * W_enc.sum(dim=0)
    return W_c, b_enc


def load_saelens(folder, norm_scaling_factor=None):
    """A SAELens folder: cfg.json + sae_weights.safetensors (architectures standard, jumprelu, topk, gated).

    norm_scaling_factor: the factor of normalize_activations = expected_average_only_in, which SAELens keeps
    outside the folder (its pretrained_saes.yaml `norm_scaling_factor`); a cfg field of that name is used
    when no argument is given. The SAE was trained on x * factor: the factor is folded into the weights as
    SAELens' fold_activation_norm_scaling_factor does (W_enc * c, W_dec / c, b_dec / c)."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(folder, "cfg.json")
    w_path = os.path.join(folder, "sae_weights.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise MinicircError(f"{folder}: SAELens folder lacks {os.path.basename(p)}")
    cfg = read_json(cfg_path)
    try:
        w = load_file(w_path)
    except Exception as e:
        raise MinicircError(f"{w_path}: cannot read safetensors file ({e})") from None

    hook = _hook_name(cfg)
    try:
        site = hook_site(hook) if hook is not None else None
    except MinicircError as e:
        raise MinicircError(f"{cfg_path}: {e}") from None
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch == "standard" and act == "topk":  # pre-6.0 layout: top-k was an activation of "standard"
        arch = "topk"
    if arch not in ("standard", "jumprelu", "topk", "gated"):
        raise MinicircError(f"{cfg_path}: architecture {arch!r} is not supported (standard, jumprelu, topk, gated)")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in ("none", "expected_average_only_in", "layer_norm", "constant_norm_rescale"):
        raise MinicircError(f"{cfg_path}: normalize_activations={norm!r} is not supported "
                            "(none, expected_average_only_in, layer_norm, constant_norm_rescale)")
    scale = None
    if norm == "expected_average_only_in":
        scale = norm_scaling_factor if norm_scaling_factor is not None else _cfg_field(cfg, "norm_scaling_factor")
        if scale is None:
            raise MinicircError(f"{cfg_path}: normalize_activations=expected_average_only_in, and its scaling factor "
                                "is not in the folder (SAELens keeps it in pretrained_saes.yaml as norm_scaling_factor); "
                                "pass norm_scaling_factor= to load_sae/load_saes (--norm-scaling-factor X on the command line) "
                                "or add \"norm_scaling_factor\" to cfg.json")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
            raise MinicircError(f"{cfg_path}: norm_scaling_factor must be a positive number, got {scale!r}")
    if "scaling_factor" in w and not torch.all(w["scaling_factor"] == 1):
        raise MinicircError(f"{w_path}: holds a finetuning scaling_factor that is not all ones; not supported")
    tl_kwargs = _cfg_field(cfg, "model_from_pretrained_kwargs") or {}
    centre = _centred_input(tl_kwargs, cfg_path, site, norm)

    names = ["W_enc", "W_dec", "b_dec"] + (["b_gate", "b_mag", "r_mag"] if arch == "gated" else ["b_enc"])
    tensors = dict(zip(names, _need(w, names, w_path, f"SAELens {arch}")))
    W_enc, W_dec, b_dec = tensors["W_enc"].float(), tensors["W_dec"].float(), tensors["b_dec"].float()
    if scale is not None:
        W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale
    subtract = bool(cfg.get("apply_b_dec_to_input", True))
    common = dict(subtract_b_dec=subtract, source=folder, input_norm=norm if norm in INPUT_NORMS else "none", site=site)

    if arch == "gated":
        # gate: s @ W_enc + b_gate > 0; magnitude: relu(s @ (W_enc * exp(r_mag)) + b_mag).
        W_gate, b_gate = W_enc, tensors["b_gate"].float()
        W_mag, b_mag = W_enc * tensors["r_mag"].float().exp(), tensors["b_mag"].float()
        if centre:
            W_gate, b_gate = _centred(W_enc, b_gate, b_dec, subtract)
            W_mag, b_mag = _centred(W_mag, b_mag, b_dec, subtract)
        sae = Dictionary(W_mag, b_mag, W_dec, b_dec, "gated", W_gate=W_gate, b_gate=b_gate, **common)
    else:
        b_enc = tensors["b_enc"].float()
        k = None
        if arch == "topk":
            k = cfg.get("k")
            if k is None or _version_below_6(cfg):
                k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
            if k is None:
                raise MinicircError(f"{cfg_path}: topk architecture without k")
            if cfg.get("rescale_acts_by_decoder_norm", False):
                # h is multiplied by the decoder row norms before the top-k and f divided by them before decoding:
                # fold both into the weights (f is then what SAELens' encode returns, the top-k of h * norms).
                norms = W_dec.norm(dim=1)
                W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        if centre:
            W_enc, b_enc = _centred(W_enc, b_enc, b_dec, subtract)
        thr = _need(w, ["threshold"], w_path, "SAELens jumprelu")[0] if arch == "jumprelu" else None
        kind = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
        sae = Dictionary(W_enc, b_enc, W_dec, b_dec, kind, threshold=thr, k=k, **common)
    # TransformerLens' from_pretrained folds the value biases into b_O by default (fold_value_biases=True), so
    # a z dictionary trained through it saw z - b_V; load_saes, which knows the model, shifts it back.
    sae.reads_z_minus_value_bias = (site or "").startswith("z_") and bool(tl_kwargs.get("fold_value_biases", True))
    return checked(sae)


def shift_input(sae, delta):
    """The dictionary for x of one trained on x - delta: encode(x - delta), decode(f) + delta. Folded into the
    biases (b_dec + delta where b_dec is subtracted; else b_enc - delta @ W_enc, b_gate - delta @ W_gate), so
    the encode keeps its form and its derivative."""
    if sae.input_norm != "none":
        raise MinicircError(f"{sae.source}: its input is shifted (z - b_V) and normalised ({sae.input_norm}); "
                            "the two do not fold together; not supported")
    delta = delta.to(sae.b_dec)
    b_enc, b_gate = sae.b_enc, sae.b_gate
    if not sae.subtract_b_dec:
        b_enc = b_enc - delta @ sae.W_enc
        b_gate = b_gate - delta @ sae.W_gate if sae.kind == "gated" else b_gate
    return Dictionary(sae.W_enc, b_enc, sae.W_dec, sae.b_dec + delta, sae.kind,
                      threshold=sae.threshold if sae.kind == "jumprelu" else None, k=sae.k,
                      subtract_b_dec=sae.subtract_b_dec, source=sae.source,
                      W_gate=sae.W_gate if sae.kind == "gated" else None, b_gate=b_gate if sae.kind == "gated" else None,
                      input_norm=sae.input_norm, site=sae.site)


def _centred_input(tl_kwargs, cfg_path, site, norm):
    """Whether the SAE saw TransformerLens-centred activations (model_from_pretrained_kwargs
    center_writing_weights: true; SAELens' own default is false) that minicirc must centre. Centring writes
    x - mean(x) into the residual stream, so it reaches embed, attn, mlp, resid and resid_mid values, not z
    (before W_O); layer_norm subtracts the mean itself, so centring first changes nothing there."""
    centre = bool(tl_kwargs.get("center_writing_weights", False)) and not (site or "").startswith("z_")
    if centre and norm == "constant_norm_rescale":
        raise MinicircError(f"{cfg_path}: center_writing_weights with constant_norm_rescale divides by the norm of "
                            "the centred activation, which does not fold into the weights; not supported")
    return centre and norm != "layer_norm"


# --- one dictionary, and a whole tree --------------------------------------------------------------

def _candidates(folder):
    """Dictionary files directly in `folder` or one level deeper."""
    found = []
    for d in [folder] + sorted(os.path.join(folder, s) for s in os.listdir(folder)
                                if os.path.isdir(os.path.join(folder, s))):
        for name in ("ae.pt", "params.npz"):
            if os.path.exists(os.path.join(d, name)):
                found.append(os.path.join(d, name))
        if os.path.exists(os.path.join(d, "cfg.json")):
            found.append(d)
    return found


def load_sae(path, norm_scaling_factor=None):
    """One dictionary: an `ae.pt`, a Gemma Scope `params.npz`, a SAELens folder, or a folder holding exactly
    one of those. norm_scaling_factor: see load_saelens (SAELens expected_average_only_in only)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MinicircError(f"dictionary path {path} does not exist")
    if os.path.isfile(path):
        if os.path.basename(path).endswith(".pt"):
            return load_dictionary_learning(path)
        if os.path.basename(path).endswith(".npz"):
            return load_gemma_scope(path)
        raise MinicircError(f"{path}: expected an ae.pt file, a params.npz file or a SAELens folder")
    found = _candidates(path)
    if not found:
        raise MinicircError(f"{path}: no dictionary here (no ae.pt, params.npz or cfg.json, not even one folder deeper)")
    if len(found) > 1:
        raise MinicircError(f"{path}: ambiguous, several dictionaries: {', '.join(found)}")
    if found[0].endswith(".pt"):
        return load_dictionary_learning(found[0])
    if found[0].endswith(".npz"):
        return load_gemma_scope(found[0])
    return load_saelens(found[0], norm_scaling_factor)


SITE_FOLDERS = {"attn": "attn_out_layer", "mlp": "mlp_out_layer", "resid": "resid_out_layer",
                "resid_mid": "resid_mid_layer", "z": "z_layer"}
SITE_FOLDER = re.compile(r"embed|(attn_out|mlp_out|resid_out|resid_mid|z)_layer\d+")


def site_folder(site):
    """Folder name of a site in the original code's dictionaries/ tree (resid_mid and z: same pattern)."""
    if site == "embed":
        return "embed"
    return SITE_FOLDERS[site_kind(site)] + str(site_layer(site))


def _place(sae, site, model, where):
    """Check that a dictionary found at `where` fits `site` of `model`: the site the file names, the width."""
    if sae.site is not None and sae.site != site:
        why = (" (z is the concatenated head outputs before the output projection, attn the projected output: "
               "widths may agree, the values do not)" if {sae.site.split("_")[0], site.split("_")[0]} == {"z", "attn"} else "")
        raise MinicircError(f"{sae.source}: its hook_name reads site {sae.site}, but it sits in {where} for site {site}{why}")
    if sae.reads_z_minus_value_bias:
        value_bias = getattr(model, "value_bias", None)
        if value_bias is None:
            raise MinicircError(f"{sae.source}: trained through TransformerLens with fold_value_biases (its default), "
                                "this z dictionary reads z - b_V, and this model does not give its value biases "
                                "(model.value_bias(layer)); set fold_value_biases: false in the cfg only if that is "
                                "how it was trained")
        b_V = value_bias(site_layer(site))
        if b_V is not None and bool(b_V.any()):
            sae = shift_input(sae, b_V)
    if sae.d_in != model.site_width(site):
        what = "n_heads x head_dim" if site.startswith("z_") else "d_model"
        raise MinicircError(f"{sae.source}: dictionary width {sae.d_in} does not match the model's {what} "
                            f"{model.site_width(site)} (site {site})")
    return sae


def load_saes(sae_dir, model, norm_scaling_factor=None):
    """{site: dictionary} from a folder of dictionaries, in one of two layouts:
    - the original code's dictionaries/ tree: one folder per site of the model (embed, attn_out_layer0, ...,
      see site_folder), each holding one dictionary; a SAELens cfg's hook_name must agree with its folder.
    - one SAELens folder per hook, named anything: each placed by its cfg's hook_name (see hook_site); sites
      without one get no dictionary.
    norm_scaling_factor: a number, or {site: number}, for SAELens expected_average_only_in dictionaries."""
    sae_dir = os.fspath(sae_dir)
    if not os.path.isdir(sae_dir):
        raise MinicircError(f"SAE directory {sae_dir} does not exist")
    factor = lambda site: norm_scaling_factor.get(site) if isinstance(norm_scaling_factor, dict) else norm_scaling_factor
    present = sorted(d for d in os.listdir(sae_dir) if os.path.isdir(os.path.join(sae_dir, d)))
    if present and not any(SITE_FOLDER.fullmatch(d) for d in present) and \
            all(os.path.exists(os.path.join(sae_dir, d, "cfg.json")) for d in present):
        return _load_hook_tree(sae_dir, present, model, factor)
    # Every site needs its folder; the optional sites (z_layerL, resid_mid_layerL) may have one.
    by_folder = {site_folder(s): s for s in model.all_sites}
    strangers = [d for d in present if d not in by_folder]
    if strangers:
        raise MinicircError(f"{sae_dir}: folders {strangers} match no site of this model "
                            f"({model.cfg.n_layers} layers): SAE tree and model do not belong together")
    missing = [site_folder(s) for s in model.sites if site_folder(s) not in present]
    if missing:
        raise MinicircError(f"{sae_dir}: no dictionary for {missing}")
    return {site: _place(load_sae(os.path.join(sae_dir, folder), factor(site)), site, model, f"folder {folder}")
            for folder, site in by_folder.items() if folder in present}


def _load_hook_tree(sae_dir, folders, model, factor):
    saes, origin = {}, {}
    for d in folders:
        cfg_path = os.path.join(sae_dir, d, "cfg.json")
        hook = _hook_name(read_json(cfg_path))
        if hook is None:
            raise MinicircError(f"{cfg_path}: no hook_name, so the folder names no site")
        try:
            site = hook_site(hook)
        except MinicircError as e:
            raise MinicircError(f"{cfg_path}: {e}") from None
        if site not in model.all_sites:
            kind = site_kind(site)
            has_kind = any(site_kind(s) == kind for s in model.all_sites if s != "embed")
            why = (f"this model has {model.cfg.n_layers} layers" if has_kind or site == "embed"
                   else f"this model has no {kind} sites (sites: {', '.join(model.all_sites)})")
            raise MinicircError(f"{cfg_path}: hook {hook} reads site {site}, and {why}")
        if site in saes:
            raise MinicircError(f"{sae_dir}: two dictionaries for site {site}: {origin[site]} and {d}")
        saes[site] = _place(load_saelens(os.path.join(sae_dir, d), factor(site)), site, model, f"folder {d}")
        origin[site] = d
    return saes


def save_saelens(sae, folder, hook_name):
    """Write a relu or topk Dictionary with no input normalisation as a SAELens folder (cfg.json,
    sae_weights.safetensors) that load_saelens reads back to the same encoding."""
    from safetensors.torch import save_file
    from ..files import write_atomic
    if sae.kind not in ("relu", "topk") or sae.input_norm != "none" or not sae.subtract_b_dec:
        raise MinicircError(f"save_saelens writes relu and topk dictionaries that subtract b_dec and normalise "
                            f"nothing; got kind {sae.kind}, input_norm {sae.input_norm}")
    os.makedirs(folder, exist_ok=True)
    cfg = {"architecture": "standard" if sae.kind == "relu" else "topk", "hook_name": hook_name,
           "d_in": sae.d_in, "d_sae": sae.n_features, "apply_b_dec_to_input": True, "normalize_activations": "none"}
    if sae.kind == "relu":
        cfg["activation_fn"] = "relu"
    else:
        cfg["k"] = sae.k
    tensors = {name: getattr(sae, name).detach().cpu().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(tensors, os.path.join(folder, "sae_weights.safetensors"))
    write_atomic(os.path.join(folder, "cfg.json"), json.dumps(cfg, indent=1, sort_keys=True).encode())


def save_saes(saes, sae_dir):
    """Write {site: relu Dictionary} as a dictionary_learning tree."""
    for site, sae in saes.items():
        save_dictionary_learning(sae, os.path.join(sae_dir, site_folder(site)))


def saes_hash(saes):
    from ..hashing import sha256_of
    parts = []
    for site in sorted(saes):
        sae = saes[site]
        parts += [site, sae.kind, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, str(sae.k)]
        # Whether b_dec is subtracted before encoding changes f unless b_dec is 0 (identity dictionaries).
        # Marked only then, so the hashes of dictionaries that subtract it stay what they were.
        if not sae.subtract_b_dec and bool(sae.b_dec.detach().any()):
            parts.append("|b_dec not subtracted")
        # Likewise what only newer kinds have is hashed only where present.
        if sae.kind == "gated":
            parts += [sae.W_gate, sae.b_gate]
        if sae.input_norm != "none":
            parts.append(f"|input_norm {sae.input_norm}")
    return sha256_of(parts)
