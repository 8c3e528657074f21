"""What the fast path's stages hand each other: a site's clean and patch states with the features as
compressed rows (minicirc.rows: row pointers, feature ids, values) of the active features only, the part of
them the edges read, per-example node effects as rows, and a batch tiled or cut along its examples.

No (tokens x n_features) tensor is made for a dictionary site: the features come from the dictionary's
sparse encode (minicirc.sae.sparse.encode_rows) and the error from its sparse decode; identity dictionaries
(d features) and kinds without a sparse encode go through the dictionary's own encode, a row chunk at a time.
"""
from dataclasses import dataclass

import torch

from ..data import Batch
from ..rows import delta_rows, empty_rows, slice_rows
from ..sae.clt import incoming
from ..sae.sparse import decode_rows, split_rows
from .common import clean_and_patch_states
from .memory import release_freed_memory


@dataclass
class SparseSiteState:
    """A site's clean and patch states with the features as rows over the B * T tokens (row b * T + t):
    reference.SiteState with f_c and f_p as rows."""
    x_c: torch.Tensor    # (B, T, d) clean site value
    x_p: torch.Tensor    # (B, T, d) patch site value (decode(0) = b_dec when there is no patch)
    c: tuple             # clean features: rows (crow (B*T+1,), col (nnz,), val (nnz,))
    p: tuple             # patch features (no entries when there is no patch)
    err_c: torch.Tensor  # (B, T, d)
    err_p: torch.Tensor
    n_features: int

    @property
    def delta_err(self):
        return self.err_p - self.err_c

    def examples(self, lo, hi):
        """The state of examples lo..hi-1."""
        T = self.x_c.shape[1]
        return SparseSiteState(self.x_c[lo:hi], self.x_p[lo:hi], slice_rows(self.c, lo * T, hi * T),
                               slice_rows(self.p, lo * T, hi * T), self.err_c[lo:hi], self.err_p[lo:hi],
                               self.n_features)

    def delta(self):
        """f_p - f_c as rows, exact zeros dropped."""
        return delta_rows(self.c, self.p, self.n_features)

    def for_edges(self):
        """What the edges read (EdgeSiteState): two (B, T, d) tensors a site instead of four, and the delta
        rows and error difference computed once instead of in every chunk of every edge pass."""
        return EdgeSiteState(self.x_c, self.c, self.delta(), self.delta_err, self.n_features)


@dataclass
class EdgeSiteState:
    """SparseSiteState.for_edges: a site's state as the edges read it (edges.upstream_site_edges,
    downstream_rows and upstream_effects use these fields only)."""
    x_c: torch.Tensor         # (B, T, d) clean site value
    c: tuple                  # clean feature rows
    delta_rows: tuple         # f_p - f_c as rows (SparseSiteState.delta)
    delta_err: torch.Tensor   # (B, T, d) err_p - err_c
    n_features: int

    def examples(self, lo, hi):
        """The state of examples lo..hi-1."""
        T = self.x_c.shape[1]
        return EdgeSiteState(self.x_c[lo:hi], slice_rows(self.c, lo * T, hi * T),
                             slice_rows(self.delta_rows, lo * T, hi * T), self.delta_err[lo:hi], self.n_features)


def sparse_site_states(model, saes, metric, batch, sites, use_ext=None):
    """reference.site_states with rows: (m_clean, m_patch or None, {site: SparseSiteState}). Without patch
    inputs (zero ablation) the patch state is f = 0 (no rows), err = 0. A transcoder's x_p is, as there,
    decode(f_p) + skip(u_c) + err_p; a cross-layer transcoder's error leaves out the earlier layers' writes
    (sae.clt.incoming) and its x_p adds the clean ones."""
    m_c, clean, m_p, patch, u_c, u_p = clean_and_patch_states(model, metric, batch, sites, saes)
    states, rows_c, rows_p = {}, {}, {}
    with torch.no_grad():
        for s in sites:
            sae, x_c = saes[s], clean[s]
            B, T, d = x_c.shape
            c, err_c = split_rows(sae, x_c, u_c.get(s), use_ext)
            if patch is None:
                p = empty_rows(B * T, c[2].dtype, x_c.device)
                x_p = dec_p = decode_rows(sae, p, B * T).view(B, T, d)
                err_p = torch.zeros_like(err_c)
            else:
                x_p = patch[s]
                p, err_p, dec_p = split_rows(sae, x_p, u_p.get(s), use_ext, with_decode=True)
            rows_c[s], rows_p[s] = c, p
            inc_c = incoming(saes, s, rows_c, B * T)
            if inc_c is not None:       # a CLT site: its error leaves out the earlier layers' writes
                inc_c = inc_c.view(B, T, d)
                err_c = err_c - inc_c
                err_p = err_p - incoming(saes, s, rows_p, B * T).view(B, T, d) if patch is not None else err_p
            if s in u_c:    # the nodes' patch values with the input clean (and a CLT's clean incoming writes)
                x_p = dec_p + sae.skip(u_c[s]) + err_p
                x_p = x_p if inc_c is None else x_p + inc_c
            states[s] = SparseSiteState(x_c, x_p, c, p, err_c, err_p, sae.n_features)
            release_freed_memory(x_c.device)
    return m_c, m_p, states


@dataclass
class SiteEffects:
    """Per-example node effects of one site: the features as rows over the B * T tokens (the features
    active on clean or patch; every other feature's effect is 0), the error node dense."""
    rows: tuple          # (crow, col, val)
    err: torch.Tensor    # (B, T)
    n_features: int

    def examples(self, lo, hi):
        T = self.err.shape[1]
        return SiteEffects(slice_rows(self.rows, lo * T, hi * T), self.err[lo:hi], self.n_features)


@dataclass
class NodeEffects:
    """Per-example node effects of one batch."""
    m_clean: torch.Tensor           # (B,) metric on the clean inputs
    m_patch: torch.Tensor | None    # (B,) metric on the patch inputs (None without patch inputs)
    states: dict                    # {site: SparseSiteState}
    effects: dict                   # {site: SiteEffects}
    grads: dict | None              # {site: dm/dx (B, T, d)}, the L_d of edges (None for `exact`)


def tile(batch, k):
    """The batch repeated k times along examples (row s*B + b is example b), for batched IG steps."""
    rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))
    return Batch(rep(batch.clean), rep(batch.patch), rep(batch.clean_answer), rep(batch.patch_answer),
                 rep(batch.last), batch.examples * k)


def example_slice(batch, lo, hi):
    """Examples lo..hi-1 with all the batch's positions (slicing a Batch trims them to its longest example)."""
    cut = lambda t: None if t is None else t[lo:hi]
    return Batch(cut(batch.clean), cut(batch.patch), cut(batch.clean_answer), cut(batch.patch_answer),
                 cut(batch.last), batch.examples[lo:hi])
