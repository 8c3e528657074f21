"""The site mechanism every model family shares: site names, the one parser of a site name, and
`SiteModel.forward` with its edit / cache / stop_at arguments.

Sites (docs/method.md §2): `embed` (token embedding output), and per layer l: `attn_l` (attention block
output after its projection), `mlp_l` (MLP output) and `resid_l` (residual stream after layer l); optional
`z_l` (the heads' outputs before the projection), `resid_mid_l` (sequential residual after attention) and
`mlp_hidden_l` (the MLP's neurons: its hidden activation before the down projection).

The site mechanism is a plain argument to `forward`: `edit={site: fn}` replaces the site's value x by
fn(x) for this call only (the function sees the value computed from the already-edited upstream sites),
and `cache={}` is filled with the value that flowed downstream from every site (after any edit). Nothing
outlives the call: there are no module hooks. A family (gpt_neox.py, gpt2.py, llama.py) subclasses
`SiteModel` and only says how a layer computes its attention and MLP outputs (and, for transcoders, what
its MLP reads: `mlp_input`).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MinicircError


@dataclass
class SiteConfig:
    """The fields every family's config has (gpt_neox.Config, gpt2.Config, llama.Config add their own). SiteModel
    also reads max_len, parallel_residual and final_softcap, which each family sets."""
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int


def site_kind(site):
    """'embed', or the kind of a per-layer site: 'attn', 'mlp', 'resid', 'z', 'resid_mid' or 'mlp_hidden'."""
    return site if site == "embed" else site.rsplit("_", 1)[0]


def site_layer(site):
    """The layer of a site name: -1 for embed (it comes before layer 0), l for attn_l, mlp_l, resid_l, z_l,
    resid_mid_l, mlp_hidden_l."""
    return -1 if site == "embed" else int(site.rsplit("_", 1)[1])


def sites_from_layer(sites, first_layer):
    """The sites whose layer is at least `first_layer` (embed counts as layer -1, so first_layer 0 leaves it
    out), in their given order; first_layer None keeps every site."""
    if first_layer is None:
        return list(sites)
    return [s for s in sites if site_layer(s) >= first_layer]


def width_name(site):
    """What a site's width is called, for messages: d_model, or n_heads x head_dim (z_l), or d_mlp (mlp_hidden_l)."""
    return {"z": "n_heads x head_dim", "mlp_hidden": "d_mlp"}.get(site_kind(site), "d_model")


def check_tokens(tokens, vocab_size):
    """Refuse token ids outside 0..vocab_size-1 with a one-line error. For the places tokens enter (loaders,
    commands, user code holding raw ids); forward does not check, as reading the values is a device sync
    on every call."""
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0].item()
        raise MinicircError(f"token id {bad} is out of the vocabulary (size {vocab_size})")


class SiteModel(nn.Module):
    """What every family shares: the site names, `forward` with its edit / cache / stop_at arguments, and
    the unembedding. A family provides `embed(tokens)`, `layers` whose items have `attn_block(resid, z_site)`,
    `mlp_norm(x)` (the norm before the MLP) and `mlp_block(x, hidden_site)` (each the value written into the
    residual stream; z_site and hidden_site, None or a function, replace the value of the optional site inside
    the block), `final_norm(h)`, the
    (vocab, d_model) matrix `unembedding`, and a cfg with n_layers, d_model, d_mlp, vocab_size, max_len,
    parallel_residual and final_softcap (None, or Gemma-2's cap c: logits = c * tanh(logits / c))."""

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
        the attention output projection); where the MLP reads the residual after attention (not with
        GPT-NeoX's parallel residual), resid_mid_l; and mlp_hidden_l (the MLP's hidden activation, after the
        activation function and, for gated MLPs, the gate product: the input of the down projection).
        Optional sites are computed only when asked for (edit, stop_at or `extra`), so callers that never
        name them pay nothing."""
        names = ["embed"]
        for l in range(self.cfg.n_layers):
            names += [f"z_{l}", f"attn_{l}"] + ([] if self.cfg.parallel_residual else [f"resid_mid_{l}"])
            names += [f"mlp_hidden_{l}", f"mlp_{l}", f"resid_{l}"]
        return names

    def site_graph(self):
        """{site: [the sites its value feeds directly]} over `all_sites`: the computation as a graph whose
        arrows are one block or one sum. Per layer l, with prev = resid_{l-1} (embed for l = 0):
        prev -> z_l -> attn_l (attn_l = W_O z_l + b_O); mlp_hidden_l -> mlp_l (mlp_l = W_down h + b_down,
        then Gemma-2's post-norm); sequential residual: prev, attn_l -> resid_mid_l (their sum),
        resid_mid_l -> mlp_hidden_l, resid_mid_l, mlp_l -> resid_l; parallel residual (GPT-NeoX):
        prev -> mlp_hidden_l and prev, attn_l, mlp_l -> resid_l. Edges are defined over it
        (attribution.common.edge_pairs)."""
        out = {s: [] for s in self.all_sites}
        for l in range(self.cfg.n_layers):
            prev = f"resid_{l - 1}" if l > 0 else "embed"
            z, a, mid, h, m, r = f"z_{l}", f"attn_{l}", f"resid_mid_{l}", f"mlp_hidden_{l}", f"mlp_{l}", f"resid_{l}"
            out[prev].append(z)
            out[z].append(a)
            out[h].append(m)
            if self.cfg.parallel_residual:
                out[prev] += [h, r]
                out[a].append(r)
            else:
                out[prev].append(mid)
                out[a].append(mid)
                out[mid] += [h, r]
            out[m].append(r)
        return out

    def mlp_input(self, layer, reads):
        """(site, fn): where a transcoder at mlp_<layer> finds its input u = fn(value of site). The MLP reads
        resid_mid_l (sequential residual) or the previous residual stream (parallel: resid_{l-1}, embed for
        l = 0); reads "mlp_in" is what its first projection sees, after the norm (fn = the layer's mlp_norm),
        "resid_mid" the value before that norm (fn = identity). u is a function of a site, not a site: the
        site graph and the dictionary sites stay as they are."""
        if self.cfg.parallel_residual:
            site = f"resid_{layer - 1}" if layer > 0 else "embed"
        else:
            site = f"resid_mid_{layer}"
        return site, (self.layers[layer].mlp_norm if reads == "mlp_in" else (lambda x: x))

    def site_width(self, name):
        """The width of a site's value: d_model; n_heads * head_dim for z_l (they differ for Qwen3 and Gemma-2);
        d_mlp for mlp_hidden_l."""
        kind = site_kind(name)
        if kind == "z":
            return self.cfg.n_heads * self.cfg.head_dim
        return self.cfg.d_mlp if kind == "mlp_hidden" else self.cfg.d_model

    def write_direction(self, site, v):
        """The direction that v (site-wide) writes into the residual stream: through the linear map after an
        inner site, W_O v for z_l and W_down v for mlp_hidden_l (the family's `projection(site)`; Gemma-2's
        post-norm after it left out); v itself at every other site, whose value the residual stream adds."""
        if site_kind(site) not in ("z", "mlp_hidden"):
            return v
        W = self.projection(site).weight     # (d_model, site width)
        return v.to(W) @ W.T

    @contextmanager
    def frozen_statistics(self):
        """Within: every norm's scale (RMSNorm's rsqrt(mean(x²) + eps), LayerNorm's sqrt(var(x) + eps)) and every
        attention pattern takes the value it had on the first forward pass inside, detached (layers.held); yields
        the store. Then the model is linear in its residual stream (norms are diagonal scalings, attention a fixed
        mixing of values): the local replacement model of attribution graphs, whose gradients are direct effects
        and whose forward passes on moved inputs are that linear map. Outside, every module computes as before."""
        modules = [m for m in self.modules() if hasattr(type(m), "frozen")]
        if any(m.frozen is not None for m in modules):
            raise MinicircError("this model's statistics are frozen already (frozen_statistics does not nest)")
        store = {}
        for m in modules:
            m.frozen = store
        try:
            yield store
        finally:
            for m in modules:
                m.frozen = None

    def check_sites(self, names):
        known = set(self.all_sites)
        for name in names:
            if name not in known:
                mid = "" if self.cfg.parallel_residual else ", resid_mid_l"
                raise MinicircError(f"unknown site {name!r}; this model has sites embed, attn_l, mlp_l, "
                                    f"resid_l{mid}, z_l and mlp_hidden_l for l in 0..{self.cfg.n_layers - 1}")

    def forward(self, tokens, edit=None, cache=None, stop_at=None, extra=(), start=None, clean=None):
        """tokens (batch, pos) -> logits (batch, pos, vocab).

        edit: {site: fn(x) -> x'} replaces a site's value for this call.
        cache: a dict to fill with {site: value that flowed downstream}.
        stop_at: a site name; return after computing it (returns None instead of logits), for callers that
        only need sites up to a layer (z_l stops after its attention block, mlp_hidden_l after its MLP).
        extra: optional sites (z_l, resid_mid_l, mlp_hidden_l) to put in cache too; those in edit or stop_at are
        computed anyway.
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
                try:        # `clean` may fill itself on first read (attribution.nodes.Tiled): no `in` test
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

        def inner(name):
            """What a block calls on the value of an optional site inside it (z_l, mlp_hidden_l), or None
            where that site is not asked for (or lies below start)."""
            if name in wanted and order.index(name) >= first:
                return lambda v: site(name, lambda: v)
            return None

        resid = site("embed", lambda: self.embed(tokens))
        if stop_at == "embed":
            return None
        for l, layer in enumerate(self.layers):
            if order.index(f"resid_{l}") < first:      # the whole layer is below start
                site(f"attn_{l}", None), site(f"mlp_{l}", None)
                resid = site(f"resid_{l}", None)
                continue
            z, h = f"z_{l}", f"mlp_hidden_{l}"
            attn = site(f"attn_{l}", lambda: layer.attn_block(resid, inner(z)))
            if stop_at in (z, f"attn_{l}"):
                return None
            if self.cfg.parallel_residual:
                # GPT-NeoX: the MLP reads the same input as attention.
                mlp = site(f"mlp_{l}", lambda: layer.mlp_block(resid, inner(h)))
                out = resid + attn + mlp
            else:
                # Sequential: the MLP reads the residual after attention.
                mid = resid + attn
                if f"resid_mid_{l}" in wanted:
                    mid = site(f"resid_mid_{l}", lambda: mid)
                    if stop_at == f"resid_mid_{l}":
                        return None
                mlp = site(f"mlp_{l}", lambda: layer.mlp_block(mid, inner(h)))
                out = mid + mlp
            if stop_at in (h, f"mlp_{l}"):
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
