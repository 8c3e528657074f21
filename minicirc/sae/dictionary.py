"""Dictionaries (sparse autoencoders) over a site: what each kind computes, and the derivative edges rely on.

Every dictionary computes `f = encode(x)` and `x_hat = decode(f) = f @ W_dec + b_dec`, the error being
err = x - x_hat, from the SAE input s = n(x) - b_dec (the `- b_dec` only where the file format says so;
n is the input normalisation, the identity unless stated) and `pre = s @ W_enc + b_enc`:
- relu:     f = relu(pre)
- jumprelu: f = pre * (pre > threshold), strict, threshold per feature
- topk:     the k largest entries of pre per row, then relu; all others 0. sparsify takes relu first and
            then the top k of relu(pre): the same function (both keep exactly the positive entries among
            the k largest; what else either keeps is 0)
- groupmax: the n_features columns split into k contiguous groups of n_features / k; per group the
            largest entry of pre, then relu, at its column; all others 0 (sparsify's groupmax, which takes
            relu first: the same function)
- gated:    f = relu(pre) * (s @ W_gate + b_gate > 0), W_enc and b_enc being the magnitude path's
            (the gate path shares the file's encoder; the magnitude path scales its columns by exp(r_mag))
- identity: f = x (W_dec = I): the neuron baseline runs through exactly the same code.
Orientation is SAELens': W_enc (d_in, n_features), W_dec (n_features, d_in).

Skip terms and transcoders (sparsify, circuit-tracer): a dictionary may hold W_skip (d_out, d_in), and then
the library's output is decode(f) + skip(x) with skip(x) = x @ W_skip.T, the raw input (also for a sparsify
SAE with skip). A transcoder (`reads` not None) encodes another tensor than the one it reconstructs: it sits
at site mlp_L (its output) and reads the MLP's input of layer L, `reads` naming which value: "mlp_in" (what
the MLP's first projection reads, after the norm) or "resid_mid" (the residual before that norm). Its
features and decode are the library's. The method splices a transcoder at mlp_L as
y = decode(f) + skip(u) + err with f = encode(u), err = y - decode(f) - skip(u) (`split`, `splice`): the
model's value is kept exactly (docs/method.md, Transcoders). An SAE with a skip term (reads None) reads and
reconstructs the same value x, and its skip(x) is a linear function of that very value: the method splices it
as any SAE, x = decode(f) + err with err = x - decode(f) = skip(x) + (x - the library's output), i.e. the skip
term folded into the error node; its features are the library's (docs/method.md §3.1).

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

The loaders (formats.py) validate what they read: shapes and finite values (through `checked`); the
constructor only checks shapes, so building a Dictionary costs no pass over its weights.
"""
import math

import torch
import torch.nn as nn

from ..errors import MinicircError

KINDS = ("relu", "jumprelu", "topk", "groupmax", "gated", "identity")
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")
READS = (None, "mlp_in", "resid_mid")   # what a dictionary encodes: its own site's value, or its layer's MLP input
LAYER_NORM_EPS = 1e-5   # SAELens' layer_norm: x / (std + 1e-5) on the way in, x * std on the way out


class Dictionary(nn.Module):
    def __init__(self, W_enc, b_enc, W_dec, b_dec, kind="relu", threshold=None, k=None,
                 subtract_b_dec=True, source="", W_gate=None, b_gate=None, input_norm="none", site=None,
                 W_skip=None, reads=None):
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
        if kind == "groupmax" and (k is None or int(k) < 1 or n % int(k)):
            raise MinicircError(f"{name}: groupmax needs k >= 1 groups dividing the {n} features, got {k}")
        if W_skip is not None and W_skip.shape != (d_in, d_in):
            raise MinicircError(f"{name}: W_skip has shape {tuple(W_skip.shape)}, expected ({d_in}, {d_in})")
        if reads not in READS:
            raise MinicircError(f"{name}: unknown transcoder input {reads!r} (known: {', '.join(map(str, READS))})")
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
        self.W_skip = nn.Parameter(W_skip.float().contiguous() if W_skip is not None else empty.clone(), requires_grad=False)
        self.reads = reads
        self.W_gate = nn.Parameter(W_gate.float().contiguous() if kind == "gated" else empty.clone(), requires_grad=False)
        self.b_gate = nn.Parameter(b_gate.float().contiguous() if kind == "gated" else empty.clone(), requires_grad=False)

    @property
    def d_in(self):
        return self.W_enc.shape[0]

    @property
    def n_features(self):
        return self.W_enc.shape[1]

    @property
    def has_skip(self):
        return self.W_skip.numel() > 0

    def skip(self, x):
        """The skip term x @ W_skip.T (0 without one): the library's output is decode(f) + skip(x)."""
        return x @ self.W_skip.T if self.has_skip else torch.zeros_like(x)

    def split(self, y, u=None):
        """(f, err) of site value y: f = encode(u), err = y - decode(f) - skip(u) for a transcoder (u its
        input, y the MLP's output); f = encode(y), err = y - decode(f) otherwise (u unused; an SAE's skip(y)
        is then part of err)."""
        if not self.reads:
            return self(y)
        f = self.encode(u)
        return f, y - self.decode(f) - self.skip(u)

    def splice(self, f, err, u=None):
        """decode(f) + skip(u) + err for a transcoder (u its input), decode(f) + err otherwise: the site value
        `split` took apart."""
        x = self.decode(f) + err
        return x + self.skip(u) if self.reads else x

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
        elif self.kind == "groupmax":
            top = pre.unflatten(-1, (self.k, -1)).max(dim=-1)
            cols = top.indices + torch.arange(0, self.n_features, self.n_features // self.k, device=pre.device)
            f = torch.zeros_like(pre).scatter(-1, cols, torch.relu(top.values))
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


def identity_saes(model, neurons="output"):
    """{site: IdentityDictionary}, the neuron baselines: neurons="output" at every site of `model.sites`
    (embed, attn_l, mlp_l, resid_l: the coordinates of what each writes, the original code's IdentityDict);
    "mlp" at every mlp_hidden_l (the MLP's own neurons, d_mlp of them, before the down projection)."""
    if neurons not in ("output", "mlp"):
        raise MinicircError(f"unknown neuron basis {neurons!r} (known: output, mlp)")
    device = next(model.parameters()).device
    sites = model.sites if neurons == "output" else [f"mlp_hidden_{l}" for l in range(model.cfg.n_layers)]
    return {site: IdentityDictionary(model.site_width(site), device) for site in sites}


def checked(sae):
    """`sae` after a pass over its weights: every loader returns through here (the constructor does not scan)."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_gate", "b_gate", "W_skip"):
        if not torch.isfinite(getattr(sae, name)).all():
            raise MinicircError(f"{sae.source or 'dictionary'}: {name} contains NaN or inf")
    return sae


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
