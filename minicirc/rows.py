"""Compressed rows: the sparse form every site's features take in minicirc (CSR without the matrix object).

    crow int64 (N+1,)   row n's entries are col[crow[n]:crow[n+1]], val[crow[n]:crow[n+1]]
    col  int64 (nnz,)   feature ids, strictly increasing within a row
    val  (nnz,)         values

`Rows(crow, col, val)` names the three; it is a tuple, so `crow, col, val = rows` works everywhere. The ops
(ops.py) produce rows in this form and require it of their inputs.
"""
import warnings
from typing import NamedTuple

import torch

# Elements of a transient (rows x n_features) block wherever a dense encode or decode runs a row chunk at a
# time (the torch reference encode, a dictionary's own encode or decode, the edges' cotangents); the C++
# kernel's kChunkElems (csrc/minicirc_cpu.cpp) is the same number.
CHUNK_ELEMS = 1 << 22


class Rows(NamedTuple):
    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor


def chunk_rows(n_features):
    """How many rows of n_features columns make one CHUNK_ELEMS block (at least 1)."""
    return max(1, CHUNK_ELEMS // max(n_features, 1))


def dense_rows_in_chunks(dense_of, x, n_features):
    """Rows of dense_of(x), an (N, n_features) function of x's rows, run a chunk_rows block of rows at a
    time: the whole (N, n_features) tensor is never made."""
    step = chunk_rows(n_features)
    return cat_rows([dense_to_rows(dense_of(x[i:i + step])) for i in range(0, max(len(x), 1), step)])


def empty_rows(n: int, dtype=torch.float32, device=None):
    """Rows with no active feature (e.g. the all-zero patch state when there is no patch)."""
    return Rows(torch.zeros(n + 1, dtype=torch.long, device=device),
                torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=dtype, device=device))


def row_ids(crow: torch.Tensor) -> torch.Tensor:
    """The row index of every stored entry."""
    n = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff())


def dense_to_rows(dense: torch.Tensor):
    """(N, F) -> rows of its non-zero entries (row-major, so ids increase within a row)."""
    r, c = dense.nonzero(as_tuple=True)
    crow = torch.zeros(dense.shape[0] + 1, dtype=torch.long, device=dense.device)
    crow[1:] = torch.bincount(r, minlength=dense.shape[0]).cumsum(0)
    return Rows(crow, c, dense[r, c])


def rows_to_dense(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n_features: int) -> torch.Tensor:
    """Scatter rows to a dense (N, n_features) tensor, zeros elsewhere."""
    out = val.new_zeros(crow.numel() - 1, n_features)
    out[row_ids(crow), col] = val
    return out


def cat_rows(parts):
    """Rows of several row blocks, one after the other (the blocks of a chunked encode)."""
    if len(parts) == 1:
        return parts[0]
    crows = [parts[0][0]] + [p[0][1:] for p in parts[1:]]
    offsets = torch.tensor([0] + [int(p[0][-1]) for p in parts[:-1]], device=parts[0][0].device).cumsum(0)
    crow = torch.cat([c + o for c, o in zip(crows, offsets)])
    return Rows(crow, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def rows_from_entries(n: int, row: torch.Tensor, col: torch.Tensor, val: torch.Tensor):
    """Rows from entries already sorted by (row, col)."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=row.device)
    crow[1:] = torch.bincount(row, minlength=n).cumsum(0)
    return Rows(crow, col, val)


def delta_rows(clean, patch, n_features: int, keep_zeros: bool = False):
    """patch - clean as rows over the union of their entries. Exact zeros (entries active on both with no
    change) are dropped, or kept with keep_zeros: the whole union, as feature_attribution returns it."""
    n = clean[0].numel() - 1
    kc = row_ids(clean[0]) * n_features + clean[1]
    kp = row_ids(patch[0]) * n_features + patch[1]
    keys = torch.cat([kc, kp]).unique()  # sorted: row-major order, increasing ids per row
    dtype = torch.promote_types(clean[2].dtype, patch[2].dtype)
    delta = torch.zeros(keys.numel(), dtype=dtype, device=keys.device)
    delta.index_add_(0, torch.searchsorted(keys, kp), patch[2].to(dtype))
    delta.index_add_(0, torch.searchsorted(keys, kc), -clean[2].to(dtype))
    if not keep_zeros:
        nz = delta != 0
        keys, delta = keys[nz], delta[nz]
    return rows_from_entries(n, keys // max(n_features, 1), keys % max(n_features, 1), delta)


def rows_matmul(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The rows as an (N, n_features) matrix times W (n_features, d): (N, d), never the dense matrix."""
    n = crow.numel() - 1
    if val.numel() == 0:
        return W.new_zeros(n, W.shape[1])
    # torch's sparse CSR product has no 16-bit CPU kernel: those run in float32 (as the other ops here)
    cd = W.dtype if W.dtype in (torch.float32, torch.float64) or W.device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        m = torch.sparse_csr_tensor(crow, col, val.to(cd), (n, W.shape[0]), check_invariants=False,
                                    device=W.device)
        return (m @ W.to(cd)).to(W.dtype)


def slice_rows(rows, lo, hi):
    """Rows lo..hi-1 of rows (crow, col, val)."""
    crow, col, val = rows
    a, b = int(crow[lo]), int(crow[hi])
    return Rows(crow[lo:hi + 1] - a, col[a:b], val[a:b])
