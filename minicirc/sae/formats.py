"""The files real SAEs come in, read into (and written from) Dictionary, and TransformerLens hook names
both ways (hook_site, site_hook).

Formats: dictionary_learning `ae.pt` (+ config.json), SAELens folders (cfg.json + sae_weights.safetensors),
Gemma Scope `params.npz`. The loaders validate what they read: shapes and finite values (`checked`). Files are
read with safetensors, `torch.load(weights_only=True)` or numpy with allow_pickle=False: never unpickled as
code. Per-feature positive rescalings that a format applies (dictionary_learning's unit-norm decoder, SAELens'
rescale_acts_by_decoder_norm) are folded into the weights at load time; reconstructions are unchanged and
feature values differ only by that positive factor, which leaves attribution effects (gradient x delta)
unchanged.
"""
import json
import math
import os
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import MinicircError, read_json
from ..files import write_atomic
from ..model.sites import site_kind, site_layer
from .dictionary import INPUT_NORMS, Dictionary, checked


def _need(state, keys, path, cls):
    """state[k] for each of keys, or an error naming what the file lacks and what it has."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise MinicircError(f"{path}: {cls} file lacks {missing} (has {sorted(state)})")
    return [state[k] for k in keys]


def _unit_decoder(W_enc, b_enc, W_dec, path):
    """Decoder rows scaled to unit norm, the encoder's columns by the same positive factor: f * |W_dec[i]| is
    decoded by W_dec[i] / |W_dec[i]|, so reconstructions are unchanged."""
    norms = W_dec.norm(dim=1)
    if torch.any(norms == 0):
        raise MinicircError(f"{path}: decoder has an all-zero feature direction")
    return W_enc * norms, b_enc * norms, W_dec / norms[:, None]


# --- TransformerLens hook names ---------------------------------------------------------------------

# The hook of each per-layer site kind, blocks.L.<hook> reading site <kind>_L (resid_L is also read by
# blocks.{L+1}.hook_resid_pre, and embed by blocks.0.hook_resid_pre).
KIND_HOOKS = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out", "resid_mid": "hook_resid_mid",
              "z": "attn.hook_z", "mlp_hidden": "mlp.hook_post"}
HOOK_KINDS = {hook: kind for kind, hook in KIND_HOOKS.items()}
HOOK = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|hook_resid_mid|attn\.hook_z"
                  r"|mlp\.hook_post)")


def hook_site(hook_name):
    """The minicirc site a TransformerLens hook name reads: blocks.L.hook_resid_pre is resid_{L-1} (embed for
    L = 0), hook_resid_post resid_L, hook_attn_out attn_L, hook_mlp_out mlp_L, hook_resid_mid resid_mid_L,
    attn.hook_z z_L (the concatenated head outputs before the output projection), mlp.hook_post mlp_hidden_L
    (the MLP's neurons: after the activation, and the gate product in TransformerLens' gated MLP)."""
    m = HOOK.fullmatch(str(hook_name))
    if not m:
        raise MinicircError(f"hook {hook_name!r} is not a site minicirc knows (blocks.L. followed by hook_resid_pre, "
                            "hook_resid_post, hook_attn_out, hook_mlp_out, hook_resid_mid, attn.hook_z or mlp.hook_post)")
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        return "embed" if layer == 0 else f"resid_{layer - 1}"
    return f"{HOOK_KINDS[hook]}_{layer}"


def site_hook(site):
    """The TransformerLens hook name of a site, the inverse of hook_site: embed is blocks.0.hook_resid_pre,
    resid_L blocks.L.hook_resid_post (not blocks.{L+1}.hook_resid_pre, its other name)."""
    if site == "embed":
        return "blocks.0.hook_resid_pre"
    return f"blocks.{site_layer(site)}.{KIND_HOOKS[site_kind(site)]}"


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
        # dictionary_learning's from_pretrained (used by the original code) normalises decoder rows to unit
        # norm; fold that positive scale into the encoder so f is what the original sees.
        W_enc, b_enc, W_dec = _unit_decoder(enc_w.T.float(), enc_b.float(), dec_w.T.float(), path)
        return checked(Dictionary(W_enc, b_enc, W_dec, bias, "relu", subtract_b_dec=True, source=path))
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

def read_safetensors(path):
    """{name: tensor} of a safetensors file, each tensor owning its memory. load_file's tensors are views of
    the file mapped into memory, and a dictionary keeps some of them as they are (float32 biases, thresholds):
    the whole mapping, every page of it read, then stayed resident (RSS) as long as the dictionary lived, a
    second copy of the weights it had converted or transposed (about 0.3 GB for 30 layers of 4608-feature
    transcoders, scripts/bench_graph.py)."""
    try:
        return {k: v.clone() for k, v in load_file(path).items()}
    except Exception as e:
        raise MinicircError(f"{path}: cannot read safetensors file ({e})") from None


def read_folder(folder, weights_name, library):
    """(cfg path, weights path, cfg, {name: tensor}) of a folder holding cfg.json and `weights_name`
    (SAELens and sparsify folders), each missing file named."""
    cfg_path, w_path = os.path.join(folder, "cfg.json"), os.path.join(folder, weights_name)
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise MinicircError(f"{folder}: {library} folder lacks {os.path.basename(p)}")
    return cfg_path, w_path, read_json(cfg_path), read_safetensors(w_path)


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


def cfg_hook_site(cfg, cfg_path):
    """(hook, site) a SAELens cfg names: hook_name, or hook_point as configs before 3.0 called it, and the
    site it reads (hook_site); (None, None) where the cfg names no hook."""
    hook = _cfg_field(cfg, "hook_name")
    hook = hook if hook is not None else _cfg_field(cfg, "hook_point")
    if hook is None:
        return None, None
    try:
        return hook, hook_site(hook)
    except MinicircError as e:
        raise MinicircError(f"{cfg_path}: {e}") from None


def _centred(W_enc, b_enc, b_dec, subtract):
    """Fold TransformerLens' centring (the encoder sees x - mean(x)) into the encoder: with P = I - 11^T/d,
    (P x - b_dec) @ W_enc = (x - b_dec) @ (P W_enc) - mean(b_dec) * sum_r W_enc[r]. Exact, and linear in x."""
    W_enc, b_enc = W_enc.float(), b_enc.float()
    W_c = W_enc - W_enc.mean(dim=0, keepdim=True)
    if subtract:
        b_enc = b_enc - b_dec.float().mean() * W_enc.sum(dim=0)
    return W_c, b_enc


def _centred_input(tl_kwargs, cfg_path, site, norm):
    """Whether the SAE saw TransformerLens-centred activations (model_from_pretrained_kwargs
    center_writing_weights: true; SAELens' own default is false) that minicirc must centre. Centring writes
    x - mean(x) into the residual stream, so it reaches embed, attn, mlp, resid and resid_mid values, not z
    (before W_O) nor mlp_hidden (before W_out); layer_norm subtracts the mean itself, so centring first
    changes nothing there."""
    centre = (bool(tl_kwargs.get("center_writing_weights", False))
              and (site is None or site_kind(site) not in ("z", "mlp_hidden")))
    if centre and norm == "constant_norm_rescale":
        raise MinicircError(f"{cfg_path}: center_writing_weights with constant_norm_rescale divides by the norm of "
                            "the centred activation, which does not fold into the weights; not supported")
    return centre and norm != "layer_norm"


def load_saelens(folder, norm_scaling_factor=None):
    """A SAELens folder: cfg.json + sae_weights.safetensors (architectures standard, jumprelu, topk, gated).

    norm_scaling_factor: the factor of normalize_activations = expected_average_only_in, which SAELens keeps
    outside the folder (its pretrained_saes.yaml `norm_scaling_factor`); a cfg field of that name is used
    when no argument is given. The SAE was trained on x * factor: the factor is folded into the weights as
    SAELens' fold_activation_norm_scaling_factor does (W_enc * c, W_dec / c, b_dec / c)."""
    cfg_path, w_path, cfg, w = read_folder(folder, "sae_weights.safetensors", "SAELens")

    site = cfg_hook_site(cfg, cfg_path)[1]
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
                W_enc, b_enc, W_dec = _unit_decoder(W_enc, b_enc, W_dec, w_path)
        if centre:
            W_enc, b_enc = _centred(W_enc, b_enc, b_dec, subtract)
        thr = _need(w, ["threshold"], w_path, "SAELens jumprelu")[0] if arch == "jumprelu" else None
        kind = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
        sae = Dictionary(W_enc, b_enc, W_dec, b_dec, kind, threshold=thr, k=k, **common)
    # TransformerLens' from_pretrained folds the value biases into b_O by default (fold_value_biases=True), so
    # a z dictionary trained through it saw z - b_V; load_saes, which knows the model, shifts it back.
    sae.reads_z_minus_value_bias = (site or "").startswith("z_") and bool(tl_kwargs.get("fold_value_biases", True))
    return checked(sae)


def save_saelens(sae, folder, hook_name):
    """Write a relu or topk Dictionary with no input normalisation as a SAELens folder (cfg.json,
    sae_weights.safetensors) that load_saelens reads back to the same encoding."""
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
