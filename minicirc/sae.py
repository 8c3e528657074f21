"""Dictionaries (sparse autoencoders) over a site, and loaders for the files real SAEs come in.

Every dictionary computes `f = encode(x)` and `x_hat = decode(f) = f @ W_dec + b_dec` with
`pre = (x - b_dec) @ W_enc + b_enc` (the `- b_dec` only where the file format says so) and
- relu:     f = relu(pre)
- jumprelu: f = pre * (pre > threshold), strict, threshold per feature
- topk:     the k largest entries of pre per row, then relu; all others 0
- identity: f = x (W_dec = I): the neuron baseline runs through exactly the same code.
Orientation is SAELens': W_enc (d_in, n_features), W_dec (n_features, d_in).

Loaders (facts in shared/notes/sae-formats.md): dictionary_learning `ae.pt` (+ optional config.json) and
SAELens folders (cfg.json + sae_weights.safetensors). Files are read with safetensors or
`torch.load(weights_only=True)`: never unpickled as code. Per-feature positive rescalings that a format
applies (dictionary_learning's unit-norm decoder, SAELens' rescale_acts_by_decoder_norm) are folded into
the weights at load time; reconstructions are unchanged and feature values differ only by that positive
factor, which leaves attribution effects (gradient x delta) unchanged.
"""
import json
import os

import torch
import torch.nn as nn

from .errors import MinicircError, read_json

KINDS = ("relu", "jumprelu", "topk", "identity")


class Dictionary(nn.Module):
    def __init__(self, W_enc, b_enc, W_dec, b_dec, kind="relu", threshold=None, k=None,
                 subtract_b_dec=True, source=""):
        super().__init__()
        if kind not in KINDS:
            raise MinicircError(f"unknown dictionary kind {kind!r} (known: {', '.join(KINDS)})")
        d_in, n = W_enc.shape
        if W_dec.shape != (n, d_in) or b_enc.shape != (n,) or b_dec.shape != (d_in,):
            raise MinicircError(f"{source or 'dictionary'}: inconsistent shapes W_enc {tuple(W_enc.shape)}, "
                                f"b_enc {tuple(b_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}")
        if kind == "jumprelu":
            if threshold is None or threshold.shape != (n,):
                raise MinicircError(f"{source or 'dictionary'}: jumprelu needs a threshold of shape ({n},)")
        if kind == "topk" and (k is None or int(k) < 1):
            raise MinicircError(f"{source or 'dictionary'}: topk needs k >= 1, got {k}")
        for name, t in [("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec),
                        ("threshold", threshold)]:
            if t is not None and not torch.isfinite(t).all():
                raise MinicircError(f"{source or 'dictionary'}: {name} contains NaN or inf")
        self.kind, self.k, self.subtract_b_dec, self.source = kind, (int(k) if k is not None else None), subtract_b_dec, source
        self.W_enc = nn.Parameter(W_enc.float().contiguous(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.float().contiguous(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.float().contiguous(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.float().contiguous(), requires_grad=False)
        # Thresholds below 0 behave like 0 in every library (they apply relu first); clamping keeps
        # `pre * (pre > threshold)` equal to the libraries' output for any stored value.
        thr = threshold.float().clamp(min=0) if threshold is not None else torch.zeros(0, device=W_enc.device)
        self.threshold = nn.Parameter(thr.contiguous(), requires_grad=False)

    @property
    def d_in(self):
        return self.W_enc.shape[0]

    @property
    def n_features(self):
        return self.W_enc.shape[1]

    def _check_input(self, x):
        if x.shape[-1] != self.d_in:
            raise MinicircError(f"dictionary {self.source or ''} expects inputs of width {self.d_in}, got {x.shape[-1]}")

    def pre_activation(self, x):
        self._check_input(x)
        s = x - self.b_dec if self.subtract_b_dec else x
        return s @ self.W_enc + self.b_enc

    def encode(self, x):
        if self.kind == "identity":
            self._check_input(x)
            return x
        pre = self.pre_activation(x)
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "jumprelu":
            return pre * (pre > self.threshold)
        k = min(self.k, self.n_features)
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, f):
        if self.kind == "identity":
            return f
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


def load_dictionary_learning(path):
    """An `ae.pt` written by saprmarks/dictionary_learning (state dict; class from config.json if present)."""
    state = _load_pt_state(path)
    cfg = _dl_config(path)
    dict_class = ((cfg or {}).get("trainer") or {}).get("dict_class")
    keys = set(state)

    if dict_class in ("GatedAutoEncoder", "MatryoshkaBatchTopKSAE") or "r_mag" in keys:
        raise MinicircError(f"{path}: dictionary class {dict_class or 'GatedAutoEncoder'} is not supported "
                            "(supported: AutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE)")
    if dict_class == "AutoEncoder" or (dict_class is None and {"encoder.weight", "bias"} <= keys):
        enc_w, enc_b, dec_w, bias = _need(state, ["encoder.weight", "encoder.bias", "decoder.weight", "bias"], path, "AutoEncoder")
        W_enc, W_dec = enc_w.T.float(), dec_w.T.float()
        # dictionary_learning's from_pretrained (used by the original code) normalises decoder rows to unit
        # norm; fold that positive scale into the encoder so f is what the original sees.
        norms = W_dec.norm(dim=1)
        if torch.any(norms == 0):
            raise MinicircError(f"{path}: decoder has an all-zero feature direction")
        return Dictionary(W_enc * norms, enc_b.float() * norms, W_dec / norms[:, None], bias, "relu",
                          subtract_b_dec=True, source=path)
    if dict_class == "JumpReluAutoEncoder" or (dict_class is None and {"W_enc", "threshold"} <= keys and "k" not in keys):
        W_enc, b_enc, W_dec, b_dec, thr = _need(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], path, "JumpReluAutoEncoder")
        # dictionary_learning's JumpReLU does not subtract b_dec before encoding.
        return Dictionary(W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=thr, subtract_b_dec=False, source=path)
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE") or {"encoder.weight", "k"} <= keys:
        enc_w, enc_b, dec_w, b_dec = _need(state, ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"], path, dict_class or "TopK")
        if dict_class is None:
            raise MinicircError(f"{path}: AutoEncoderTopK and BatchTopKSAE files hold the same keys and no "
                                "config.json says which this is; put the training config.json beside ae.pt")
        W_enc, W_dec = enc_w.T, dec_w.T
        if dict_class == "AutoEncoderTopK":
            k = int(state["k"]) if "k" in state else ((cfg or {}).get("trainer") or {}).get("k")
            return Dictionary(W_enc, enc_b, W_dec, b_dec, "topk", k=k, subtract_b_dec=True, source=path)
        if "threshold" not in state:
            raise MinicircError(f"{path}: BatchTopKSAE file lacks its threshold")
        thr = torch.full((W_enc.shape[1],), float(state["threshold"].reshape(-1)[0]), device=W_enc.device)
        return Dictionary(W_enc, enc_b, W_dec, b_dec, "jumprelu", threshold=thr, subtract_b_dec=True, source=path)
    raise MinicircError(f"{path}: not a dictionary_learning file minicirc knows (dict_class {dict_class!r}, "
                        f"keys {sorted(keys)})")


def save_dictionary_learning(sae, folder):
    """Write a relu Dictionary as dictionary_learning's AutoEncoder (ae.pt + config.json)."""
    if sae.kind != "relu" or not sae.subtract_b_dec:
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


# --- SAELens folders -------------------------------------------------------------------------------

def _version_below_6(cfg):
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if v is None:
        return "metadata" not in cfg
    try:
        return int(str(v).split(".")[0]) < 6
    except ValueError:
        return False


def load_saelens(folder):
    """A SAELens folder: cfg.json + sae_weights.safetensors (architectures standard, jumprelu, topk)."""
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

    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch == "standard" and act == "topk":  # pre-6.0 layout: top-k was an activation of "standard"
        arch = "topk"
    if arch not in ("standard", "jumprelu", "topk"):
        raise MinicircError(f"{cfg_path}: architecture {arch!r} is not supported (standard, jumprelu, topk)")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise MinicircError(f"{cfg_path}: normalize_activations={norm!r} makes the reconstruction depend on "
                            "the input's statistics; minicirc does not support it")
    W_enc, W_dec, b_enc, b_dec = _need(w, ["W_enc", "W_dec", "b_enc", "b_dec"], w_path, f"SAELens {arch}")
    subtract = bool(cfg.get("apply_b_dec_to_input", True))
    if arch == "standard":
        return Dictionary(W_enc, b_enc, W_dec, b_dec, "relu", subtract_b_dec=subtract, source=folder)
    if arch == "jumprelu":
        (thr,) = _need(w, ["threshold"], w_path, "SAELens jumprelu")
        return Dictionary(W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=thr, subtract_b_dec=subtract, source=folder)
    k = cfg.get("k")
    if k is None or _version_below_6(cfg):
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    if k is None:
        raise MinicircError(f"{cfg_path}: topk architecture without k")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # h is multiplied by the decoder row norms before the top-k and f divided by them before decoding:
        # fold both into the weights (f here is the library's f times that positive norm).
        norms = W_dec.float().norm(dim=1)
        W_enc, b_enc, W_dec = W_enc.float() * norms, b_enc.float() * norms, W_dec.float() / norms[:, None]
    return Dictionary(W_enc, b_enc, W_dec, b_dec, "topk", k=k, subtract_b_dec=subtract, source=folder)


# --- one dictionary, and a whole tree --------------------------------------------------------------

def _candidates(folder):
    """Dictionary files directly in `folder` or one level deeper."""
    found = []
    for d in [folder] + sorted(os.path.join(folder, s) for s in os.listdir(folder)
                                if os.path.isdir(os.path.join(folder, s))):
        if os.path.exists(os.path.join(d, "ae.pt")):
            found.append(os.path.join(d, "ae.pt"))
        if os.path.exists(os.path.join(d, "cfg.json")):
            found.append(d)
    return found


def load_sae(path):
    """One dictionary: an `ae.pt`, a SAELens folder, or a folder holding exactly one of those."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MinicircError(f"dictionary path {path} does not exist")
    if os.path.isfile(path):
        if os.path.basename(path).endswith(".pt"):
            return load_dictionary_learning(path)
        raise MinicircError(f"{path}: expected an ae.pt file or a SAELens folder")
    found = _candidates(path)
    if not found:
        raise MinicircError(f"{path}: no dictionary here (no ae.pt, no cfg.json, not even one folder deeper)")
    if len(found) > 1:
        raise MinicircError(f"{path}: ambiguous, several dictionaries: {', '.join(found)}")
    return load_dictionary_learning(found[0]) if found[0].endswith(".pt") else load_saelens(found[0])


def site_folder(site):
    """Folder name of a site in the original code's dictionaries/ tree."""
    if site == "embed":
        return "embed"
    kind, layer = site.rsplit("_", 1)
    return {"attn": "attn_out_layer", "mlp": "mlp_out_layer", "resid": "resid_out_layer"}[kind] + layer


def load_saes(sae_dir, model):
    """{site: dictionary} from a tree laid out like the original code's dictionaries/ folder."""
    sae_dir = os.fspath(sae_dir)
    if not os.path.isdir(sae_dir):
        raise MinicircError(f"SAE directory {sae_dir} does not exist")
    by_folder = {site_folder(s): s for s in model.sites}
    present = sorted(d for d in os.listdir(sae_dir) if os.path.isdir(os.path.join(sae_dir, d)))
    strangers = [d for d in present if d not in by_folder]
    if strangers:
        raise MinicircError(f"{sae_dir}: folders {strangers} match no site of this model "
                            f"({model.cfg.n_layers} layers): SAE tree and model do not belong together")
    missing = [f for f in by_folder if f not in present]
    if missing:
        raise MinicircError(f"{sae_dir}: no dictionary for {missing}")
    saes = {}
    for folder, site in by_folder.items():
        sae = load_sae(os.path.join(sae_dir, folder))
        if sae.d_in != model.cfg.d_model:
            raise MinicircError(f"{sae.source}: dictionary width {sae.d_in} does not match the model's d_model "
                                f"{model.cfg.d_model} (site {site})")
        saes[site] = sae
    return saes


def save_saes(saes, sae_dir):
    """Write {site: relu Dictionary} as a dictionary_learning tree."""
    for site, sae in saes.items():
        save_dictionary_learning(sae, os.path.join(sae_dir, site_folder(site)))


def saes_hash(saes):
    from .hashing import sha256_of
    parts = []
    for site in sorted(saes):
        sae = saes[site]
        parts += [site, sae.kind, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, str(sae.k)]
        # Whether b_dec is subtracted before encoding changes f unless b_dec is 0 (identity dictionaries).
        # Marked only then, so the hashes of dictionaries that subtract it stay what they were.
        if not sae.subtract_b_dec and bool(sae.b_dec.detach().any()):
            parts.append("|b_dec not subtracted")
    return sha256_of(parts)
