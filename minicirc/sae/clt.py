"""Cross-layer transcoders (circuit-tracer's CrossLayerTranscoder): the features of layer l read layer l's MLP
input u_l and write to the MLP outputs of layers l..L-1 (docs/method.md §3.3):

    f_l = encode_l(u_l),   y_t ~ sum over l <= t of f_l @ W_dec_l[:, t - l] + b_dec_t

A CLT enters minicirc as one CrossLayerDictionary per layer, at site mlp_l: a transcoder (reads u_l) whose
`decode` is its own layer's part, f_l @ W_dec_l[:, 0] + b_dec_l, and which also holds `W_out` (F, L - l, d),
the writes of its features to every later MLP output. The error node of mlp_t completes the model's value,

    err_t = y_t - decode_t(f_t) - incoming_t,   incoming_t = sum over l < t of f_l @ W_dec_l[:, t - l]

(`incoming`, `split_sites`), so y_t = decode_t(f_t) + incoming_t + err_t exactly. circuit-tracer's files hold
no skip term for a CLT (its to_safetensors writes none, its loader reads none).
"""
import torch

from ..rows import rows_matmul
from .dictionary import Dictionary
from .sparse import split_rows


class CrossLayerDictionary(Dictionary):
    """Layer `layer` of an `n_layers`-layer cross-layer transcoder: a transcoder at mlp_<layer> whose features
    also write W_out[:, t - layer] into mlp_t for every later t."""

    def __init__(self, W_enc, b_enc, W_out, b_dec, layer, n_layers, **kw):
        super().__init__(W_enc, b_enc, W_out[:, 0], b_dec, **kw)
        self.W_out = torch.nn.Parameter(W_out.float().contiguous(), requires_grad=False)
        self.layer, self.n_layers = layer, n_layers

    def write(self, f, target):
        """f @ W_dec_l[:, target - l]: what features f (dense, (..., F)) write into mlp_target."""
        return f @ self.W_out[:, target - self.layer]

    def write_rows(self, rows, target):
        """write() for features given as rows (n, d)."""
        return rows_matmul(*rows, self.W_out[:, target - self.layer])


def is_clt(sae):
    return isinstance(sae, CrossLayerDictionary)


def clt_sites(saes):
    """The sites holding a layer of a cross-layer transcoder, in layer order."""
    return sorted((s for s, sae in saes.items() if is_clt(sae)), key=lambda s: saes[s].layer)


def incoming(saes, site, rows, n):
    """incoming_t (n, d) of a CLT site: what the features of the earlier CLT layers write into it, from
    {site: rows over the same n tokens} holding those layers (None for a site that is not a CLT's)."""
    t = saes[site]
    if not is_clt(t):
        return None
    out = None
    for s in clt_sites(saes):
        if saes[s].layer < t.layer:
            w = saes[s].write_rows(rows[s], t.layer)
            out = w if out is None else out + w
    return out


def split_sites(saes, sites, values, u, use_ext=None):
    """{site: (feature rows, err)} of recorded site values {site: (B, T, d)} and transcoder inputs u, each site
    split as Dictionary.split (split_rows), a CLT site's error also leaving out what the earlier layers' features
    write into it (incoming). `sites` must hold every layer of a CLT (attribution.site_order checks it)."""
    out, rows = {}, {}
    for s in sites:
        x = values[s]
        r, err = split_rows(saes[s], x, u.get(s), use_ext)
        rows[s] = r
        inc = incoming(saes, s, rows, x.shape[0] * x.shape[1])
        out[s] = (r, err if inc is None else err - inc.view(x.shape))
    return out
