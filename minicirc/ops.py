"""Sparse SAE kernels: the compiled extension (csrc/) when it is built, the torch reference otherwise.

Two ops, each documented by the dense torch computation it must equal:

- ``sae_encode_sparse(x, W_enc, b_enc, b_dec, kind, threshold, k)`` equals, after ``rows_to_dense``,
  ``activate((x - b_dec) @ W_enc + b_enc, kind, threshold, k)`` (relu, jumprelu with a strict
  ``pre > threshold``, or top-k then relu), without materialising ``(N, n_features)``.
- ``feature_attribution(g_x, W_dec, clean_rows, patch_rows)`` equals, after ``rows_to_dense``,
  ``(g_x @ W_dec.T) * (f_patch - f_clean)`` restricted to the features active on clean or patch.
  The error node's effect is not part of the op: callers add ``(g_x * (err_p - err_c)).sum(-1)``,
  since the gradient reaching the error is ``g_x`` itself.

Rows are minicirc.rows' compressed rows (``crow`` int64 ``(N+1,)``, ``col`` int64 ``(nnz,)``, ``val``
``(nnz,)``; row ``n`` lists its active features with strictly increasing ids). Both ops produce rows in that
form and ``feature_attribution`` requires it of its inputs.

The ops are inference-only (no autograd formula): the wrappers run them under ``no_grad``.
``MINICIRC_NO_EXT=1`` or ``use_ext=False`` force the reference path.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .rows import Rows, delta_rows, dense_rows_in_chunks

_CPU_EXT = False  # minicirc._C loaded: op schemas + CPU kernels
_CUDA_EXT = False  # minicirc._C_cuda loaded: CUDA kernels

KINDS = ("relu", "jumprelu", "topk")
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The CUDA top-k keeps its per-row candidates in shared memory (csrc/minicirc_cuda.cu,
# kTopkMaxK); larger k runs the torch reference.
_CUDA_TOPK_MAX_K = 192


def _load_extension():
    global _CPU_EXT, _CUDA_EXT
    try:
        from . import _C  # noqa: F401  importing it runs the op registrations
    except ImportError:
        return
    _CPU_EXT = True
    spec = importlib.util.find_spec("minicirc._C_cuda") if torch.version.cuda else None
    if spec is not None and spec.origin:
        try:
            # A plain shared library (no Python module init): it only adds CUDA impls.
            torch.ops.load_library(spec.origin)
            _CUDA_EXT = True
        except OSError:
            pass


_load_extension()


def extension_loaded() -> bool:
    """Whether the compiled extension is in use (False under ``MINICIRC_NO_EXT=1``)."""
    return _CPU_EXT and os.environ.get("MINICIRC_NO_EXT", "0") != "1"


def cuda_extension_loaded() -> bool:
    return _CUDA_EXT and extension_loaded()


def _use_ext(device: torch.device, use_ext: bool | None) -> bool:
    if use_ext is False:
        return False
    available = cuda_extension_loaded() if device.type == "cuda" else (
        extension_loaded() and device.type == "cpu")
    if use_ext and not available:
        raise RuntimeError(f"minicirc extension requested but not available for {device} "
                           f"(built: cpu={_CPU_EXT}, cuda={_CUDA_EXT}; MINICIRC_NO_EXT="
                           f"{os.environ.get('MINICIRC_NO_EXT', '0')})")
    return available


def _compute_dtype(device: torch.device, dtype: torch.dtype, ext: bool) -> torch.dtype:
    """Inputs are cast to this dtype. 16-bit floats are upcast to float32 except for the CUDA
    kernels, which read them as they are and accumulate in float32 - the same arithmetic."""
    if ext and device.type == "cuda" and dtype in _CUDA_DTYPES:
        return dtype
    return dtype if dtype in _CPU_DTYPES else torch.float32


# ----------------------------------------------------------------------------- torch reference

def activate(pre: torch.Tensor, kind: str, threshold: torch.Tensor | None = None, k: int = 0) -> torch.Tensor:
    """Dense SAE activation of pre-activations (..., n_features)."""
    if kind == "relu":
        return pre.relu()
    if kind == "jumprelu":
        return pre * (pre > threshold)
    if kind == "topk":
        k = min(k, pre.shape[-1])
        v, i = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, i, v.relu())
    raise ValueError(f"unknown SAE kind {kind!r}; expected one of {KINDS}")


def _encode_reference(x, W_enc, b_enc, b_dec, kind, threshold, k):
    # A (rows, n_features) block of CHUNK_ELEMS at a time, as the C++ kernel: the fallback does not
    # materialise (N, n_features) either.
    return dense_rows_in_chunks(lambda xs: activate((xs - b_dec) @ W_enc + b_enc, kind, threshold, k), x,
                                W_enc.shape[1])


def _attribution_reference(g_x, W_dec, clean, patch):
    n, nf = g_x.shape[0], W_dec.shape[0]
    crow, cols, delta = delta_rows(clean, patch, nf, keep_zeros=True)
    if cols.numel() == 0:
        return crow, cols, delta
    # The sampled product (g_x @ W_dec.T)[rows, cols]: SDDMM, never the dense (N, F) product.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        mask = torch.sparse_csr_tensor(crow, cols, torch.ones_like(delta), (n, nf), check_invariants=False,
                                       device=g_x.device)
        dots = torch.sparse.sampled_addmm(mask, g_x, W_dec.T, beta=0.0).values()
    return crow, cols, dots * delta


# ----------------------------------------------------------------------------- public ops

def sae_encode_sparse(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                      kind: str, threshold: torch.Tensor | None = None, k: int = 0,
                      use_ext: bool | None = None):
    """Active features of ``activate((x - b_dec) @ W_enc + b_enc)`` as rows ``(crow, col, val)``.

    x (N, d_in), W_enc (d_in, n_features), b_enc (n_features,), b_dec (d_in,) (pass zeros when the
    format does not subtract it), threshold (n_features,) for jumprelu, k for topk (k larger than
    n_features keeps every positive pre-activation). ``val`` has x's dtype. On CUDA, top-k with
    k > 192 runs the torch reference.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown SAE kind {kind!r}; expected one of {KINDS}")
    ext = _use_ext(x.device, use_ext)
    if ext and x.device.type == "cuda" and kind == "topk" and min(k, W_enc.shape[1]) > _CUDA_TOPK_MAX_K:
        ext = False
    cd = _compute_dtype(x.device, torch.promote_types(x.dtype, W_enc.dtype), ext)
    th = threshold.to(cd) if kind == "jumprelu" else None
    args = (x.to(cd), W_enc.to(cd), b_enc.to(cd), b_dec.to(cd), kind, th, int(k))
    with torch.no_grad():
        if ext:
            crow, col, val = torch.ops.minicirc.sae_encode_sparse(*args)
        else:
            crow, col, val = _encode_reference(*args)
    return Rows(crow, col, val.to(x.dtype))


def feature_attribution(g_x: torch.Tensor, W_dec: torch.Tensor, clean_rows, patch_rows,
                        use_ext: bool | None = None):
    """Node effects of the features active on clean or patch, as rows over their union.

    ``val[e] = (g_x[n] . W_dec[i]) * (f_patch[n, i] - f_clean[n, i])`` for each entry ``e = (n, i)``;
    g_x (N, d) is the gradient of the metric at the site, W_dec (n_features, d), clean_rows and
    patch_rows as produced by ``sae_encode_sparse``. The error node's effect,
    ``(g_x * (err_p - err_c)).sum(-1)``, is computed by the caller.
    """
    dt = torch.promote_types(g_x.dtype, W_dec.dtype)
    ext = _use_ext(g_x.device, use_ext)
    cd = _compute_dtype(g_x.device, dt, ext)
    clean = (clean_rows[0], clean_rows[1], clean_rows[2].to(cd))
    patch = (patch_rows[0], patch_rows[1], patch_rows[2].to(cd))
    with torch.no_grad():
        if ext:
            crow, col, val = torch.ops.minicirc.feature_attribution(g_x.to(cd), W_dec.to(cd), *clean, *patch)
        else:
            crow, col, val = _attribution_reference(g_x.to(cd), W_dec.to(cd), clean, patch)
    return Rows(crow, col, val.to(dt))


if _CPU_EXT:
    @torch.library.register_fake("minicirc::sae_encode_sparse")
    def _(x, W_enc, b_enc, b_dec, kind, threshold, k):
        nnz = torch.library.get_ctx().new_dynamic_size()
        return (x.new_empty(x.shape[0] + 1, dtype=torch.long), x.new_empty(nnz, dtype=torch.long),
                x.new_empty(nnz))

    @torch.library.register_fake("minicirc::feature_attribution")
    def _(g_x, W_dec, clean_crow, clean_col, clean_val, patch_crow, patch_col, patch_val):
        nnz = torch.library.get_ctx().new_dynamic_size()
        return (g_x.new_empty(g_x.shape[0] + 1, dtype=torch.long), g_x.new_empty(nnz, dtype=torch.long),
                g_x.new_empty(nnz))
