"""A dictionary's sparse view: its features as compressed rows (minicirc.rows) of the active features only,
and everything minicirc reads from a dictionary through them (decode, the error term, a few columns), so
that no (tokens x n_features) tensor is made for a dictionary site.

    encode_rows(sae, x)        = rows of sae.encode(x)
    decode_rows(sae, rows, n)  = sae.decode(dense(rows))
    features_at(sae, x, ids)   = sae.encode(x)[..., ids]
    error_of(sae, x)           = x - sae.decode(sae.encode(x))
"""
import torch

from ..ops import KINDS, sae_encode_sparse
from ..rows import chunk_rows, dense_rows_in_chunks, row_ids, rows_matmul, rows_to_dense


def encode_rows(sae, x, use_ext=None):
    """encode(x) for x (N, d) as rows (crow, col, val): the active features only.

    relu and jumprelu run sae_encode_sparse. top-k runs the dictionary's own encode in row chunks:
    with ties at the k-th value the kernel may keep another of the tied features than torch.topk does, and
    the definitions (and the other libraries) are torch.topk. Identity dictionaries, kinds this module
    does not know and dictionaries with a per-token input normalisation (sae.input_norm) take the same
    chunked path, so any dictionary with encode/decode works."""
    if sae.kind in ("relu", "jumprelu") and getattr(sae, "input_norm", "none") == "none":
        b_dec = sae.b_dec if sae.subtract_b_dec else torch.zeros_like(sae.b_dec)
        return sae_encode_sparse(x, sae.W_enc, sae.b_enc, b_dec, sae.kind, sae.threshold, 0, use_ext)
    with torch.no_grad():
        return dense_rows_in_chunks(sae.encode, x, sae.n_features)


def features_at(sae, x, features):
    """encode(x)[..., features] for x (..., d) without the (tokens x n_features) tensor: the sparse rows, then
    only the asked-for columns, in the order given."""
    shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    features = torch.as_tensor(features, dtype=torch.long, device=x.device)
    crow, col, val = encode_rows(sae, x)
    where = torch.full((sae.n_features,), -1, dtype=torch.long, device=x.device)
    where[features] = torch.arange(len(features), device=x.device)
    j = where[col]
    keep = j >= 0
    out = val.new_zeros(len(x), len(features))
    out[row_ids(crow)[keep], j[keep]] = val[keep]
    return out.view(*shape, len(features))


def error_of(sae, x):
    """x - decode(encode(x)) for x (..., d), through the sparse rows."""
    flat = x.reshape(-1, x.shape[-1])
    return x - decode_rows(sae, encode_rows(sae, flat), len(flat)).view(x.shape)


def affine_decode(sae):
    """Whether decode(f) = f @ W_dec + b_dec (every kind minicirc knows, without a per-token input
    normalisation, whose decode leaves b_dec to the error term; identity has W_dec = I, b_dec = 0)."""
    return (sae.kind in KINDS or sae.kind == "identity") and getattr(sae, "input_norm", "none") == "none"


def decode_rows(sae, rows, n):
    """decode(f) (n, d) of features given as rows: b_dec + the active features' decoder rows."""
    if sae.kind == "identity":
        return rows_to_dense(*rows, sae.n_features)
    if affine_decode(sae):
        return rows_matmul(*rows, sae.W_dec) + sae.b_dec
    # A kind with a decode of its own: the dense features, a row chunk at a time.
    crow, col, val = rows
    step = chunk_rows(sae.n_features)
    parts = [sae.decode(rows_to_dense(crow[lo:hi + 1] - crow[lo], col[crow[lo]:crow[hi]], val[crow[lo]:crow[hi]],
                                          sae.n_features))
             for lo, hi in ((lo, min(n, lo + step)) for lo in range(0, n, step))]
    return torch.cat(parts) if parts else sae.W_dec.new_zeros(0, sae.d_in)


def split_rows(sae, x, u=None, use_ext=None, with_decode=False):
    """Dictionary.split with the features as rows: (features of x (B, T, d) as rows over its B * T tokens,
    error (B, T, d)), from the sparse encode and decode, so no (tokens x n_features) tensor. A transcoder
    encodes its input u (B, T, d) and its error also leaves out skip(u). with_decode: decode(f) (B, T, d) too,
    as a third element (the caller that needs it does not decode again)."""
    B, T, d = x.shape
    rows = encode_rows(sae, (x if u is None else u).reshape(B * T, d), use_ext)
    dec = decode_rows(sae, rows, B * T).view(B, T, d)
    err = x - dec
    err = err if u is None else err - sae.skip(u)
    return (rows, err, dec) if with_decode else (rows, err)
