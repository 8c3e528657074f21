"""Node and edge effects: the definitions (docs/method.md §4-6), one short function each.

Every site x is split by its dictionary into features f = encode(x) and an error err = x - decode(f), so
x = decode(f) + err; a transcoder at mlp_l encodes the MLP's input u instead, f = encode(u), and
err = x - decode(f) - skip(u), so x = decode(f) + skip(u) + err (Dictionary.split, splice). A node is one
feature or the error term of a site, at one position. Per site, node effects are a tensor (B, T, F + 1): column F is the error node. The indirect effect of a node on the
metric m (per example) is estimated by
- attrib: IE = (dm/df) * (f_patch - f_clean), the gradient taken on the clean input;
- ig:     the same product with dm/df averaged over `steps` points on the line from clean to patch;
- exact:  activation patching, m(clean with that node set to its patch value) - m(clean).
An edge u -> d between adjacent sites is L_d . (dd/du) . delta_u with the sites between them frozen.

These functions are written to be read (one backward per site, per IG step, per downstream node; one
forward per patched node); states.py, nodes.py and edges.py beside this file compute the same numbers fast,
and the tests hold them equal to these. What both use (the logit-difference metric, the dictionary sites
in model order, the clean and patch site values, the weights out of autograd, and edge_pairs, the site
pairs of §6 with their frozen sites) is in common.py.
"""
from dataclasses import dataclass

import torch

from ..errors import MinicircError
from ..model.sites import site_layer
from ..sae.clt import is_clt

# Shared with the fast path (common.py): the metric, the site order, the site values and the site pairs.
from .common import (  # noqa: F401
    METHODS,
    clean_and_patch_sites,
    clean_and_patch_states,
    clt_edge_error,
    clt_edit,
    edge_pairs,
    frozen_edit,
    frozen_weights,
    inputs_from,
    logit_diff,
    record_sites,
    recording_inputs,
    site_order,
)

# --- per-site clean and patch states --------------------------------------------------------------

@dataclass
class SiteState:
    x_c: torch.Tensor    # (B, T, d) clean site value
    x_p: torch.Tensor    # (B, T, d) patch site value (decode(0) = b_dec when there is no patch)
    f_c: torch.Tensor    # (B, T, F)
    f_p: torch.Tensor
    err_c: torch.Tensor  # (B, T, d)
    err_p: torch.Tensor
    u_c: torch.Tensor | None = None   # a transcoder's input (B, T, d) on the clean input (None for others)
    incoming: torch.Tensor | None = None   # a CLT site's clean incoming writes of the earlier layers (B, T, d)

    @property
    def delta_f(self):
        return self.f_p - self.f_c

    @property
    def delta_err(self):
        return self.err_p - self.err_c


def site_states(model, saes, metric, batch, sites):
    """(m_clean, m_patch or None, {site: SiteState}), each state from the unmodified model on its own input.
    Without patch inputs (zero ablation) the patch state is f = 0, err = 0. A transcoder's x_p is the site with
    its nodes at their patch values and its input clean, decode(f_p) + skip(u_c) + err_p: where its nodes go
    (the skip term follows u, which the nodes do not move). A cross-layer transcoder's error at mlp_t leaves out
    what the earlier layers' features write there (`incoming`, of the same run), and its x_p adds the clean
    incoming writes: the site with its own nodes moved."""
    m_c, clean, m_p, patch, u_c, u_p = clean_and_patch_states(model, metric, batch, sites, saes)
    states = {}

    def incoming(s, key):
        t = saes[s]
        if not is_clt(t):
            return None
        return sum((saes[l].write(getattr(states[l], key), t.layer) for l in sites
                    if is_clt(saes[l]) and saes[l].layer < t.layer), torch.zeros_like(clean[s]))

    with torch.no_grad():
        for s in sites:
            sae = saes[s]
            x_c = clean[s]
            f_c, err_c = sae.split(x_c, u_c.get(s))
            if patch is None:
                f_p, err_p = torch.zeros_like(f_c), torch.zeros_like(err_c)
                x_p = sae.splice(f_p, err_p, u_c.get(s)) if sae.reads else sae.decode(f_p)
            else:
                x_p = patch[s]
                f_p, err_p = sae.split(x_p, u_p.get(s))
                x_p = sae.splice(f_p, err_p, u_c[s]) if sae.reads else x_p
            states[s] = st = SiteState(x_c, x_p, f_c, f_p, err_c, err_p, u_c.get(s))
            if is_clt(sae):
                st.incoming = incoming(s, "f_c")
                st.err_c = err_c - st.incoming
                st.err_p = err_p - incoming(s, "f_p") if patch is not None else err_p
                st.x_p = sae.splice(f_p, st.err_p, u_c[s]) + st.incoming
    return m_c, m_p, states


# --- node effects -----------------------------------------------------------------------------------

def node_edit(sae, site, st, f, err):
    """The edit that puts a site's nodes at f and err: `site` replaced by decode(f) + err (a transcoder's by
    decode(f) + skip(u) + err, u its clean input); a cross-layer transcoder's by decode(f) + incoming + err
    (the clean incoming writes), and every later MLP output t moved by what f - f_c writes there."""
    if not is_clt(sae):
        return {site: lambda x: sae.splice(f, err, st.u_c)}
    return clt_edit(sae, site, lambda x: sae.splice(f, err, st.u_c) + st.incoming,
                    lambda t: sae.write(f - st.f_c, site_layer(t)))


def node_gradient(model, sae, metric, batch, site, f, err, st):
    """(dm/df, dm/derr) with the site's nodes at f and err (node_edit), f and err leaves; every other site plain.

    One backward of the summed metric: examples do not interact in the model, so it gives each example's own
    gradient. (Decoding is affine, so dm/df = (dm/dx) @ W_dec.T and dm/derr = dm/dx, the site gradient.)"""
    f = f.detach().clone().requires_grad_(True)
    err = err.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        m = metric(model, batch, batch.clean, node_edit(sae, site, st, f, err))
        # A metric that never reads this site does not depend on it: gradient zero.
        g_f, g_err = (torch.autograd.grad(m.sum(), [f, err], allow_unused=True) if m.requires_grad
                      else (None, None))
    return (torch.zeros_like(f) if g_f is None else g_f.detach(),
            torch.zeros_like(err) if g_err is None else g_err.detach())


def effects_from_gradients(g_f, g_err, st):
    """[g_f * delta_f, g_err . delta_err]: (B, T, F + 1), the error node last."""
    return torch.cat([g_f * st.delta_f, (g_err * st.delta_err).sum(-1, keepdim=True)], -1)


def ig_gradients(model, saes, metric, batch, states, steps):
    """{site: (dm/df, dm/derr)} averaged over f = (1-a) f_c + a f_p, err = (1-a) err_c + a err_p,
    a = k/steps for k = 0..steps-1 (a left Riemann sum of the path integral; steps=1 is attrib)."""
    out = {}
    for s, st in states.items():
        sums = None
        for k in range(steps):
            a = k / steps
            g = node_gradient(model, saes[s], metric, batch, s, (1 - a) * st.f_c + a * st.f_p,
                              (1 - a) * st.err_c + a * st.err_p, st)
            sums = g if sums is None else (sums[0] + g[0], sums[1] + g[1])
        out[s] = (sums[0] / steps, sums[1] / steps)
    return out


def attrib_effects(model, saes, metric, batch, states):
    """Attribution patching: {site: (B, T, F + 1)} with IE = (dm/df)(f_c) * (f_p - f_c), and for the error
    (dm/derr)(err_c) . (err_p - err_c)."""
    grads = ig_gradients(model, saes, metric, batch, states, 1)
    return {s: effects_from_gradients(*grads[s], states[s]) for s in states}


def ig_effects(model, saes, metric, batch, states, steps):
    """Integrated gradients: {site: (B, T, F + 1)} with IE = mean_k (dm/df)(f at a = k/steps) * delta_f,
    one site interpolated at a time (the others keep their clean values), and the same for the error."""
    grads = ig_gradients(model, saes, metric, batch, states, steps)
    return {s: effects_from_gradients(*grads[s], states[s]) for s in states}


def exact_effects(model, saes, metric, batch, states):
    """Activation patching: {site: (B, T, F + 1)} with IE = m(clean, node set to its patch value) - m(clean),
    one forward per (position, node): inside the edit the site is re-encoded, the one feature (or the error)
    at one position is set to its patch value and decode(f) + err is written back (a transcoder: re-split with
    its clean input u, decode(f) + skip(u) + err written back)."""
    with torch.no_grad():
        m_c = metric(model, batch, batch.clean, {})
        out = {}
        for s, st in states.items():
            sae = saes[s]
            B, T, F = st.f_c.shape
            eff = torch.zeros(B, T, F + 1, dtype=st.f_c.dtype, device=st.f_c.device)
            for t in range(T):
                for i in range(F + 1):
                    if is_clt(sae):     # the one node moved, its writes to the later layers too
                        f, err = st.f_c.clone(), st.err_c.clone()
                        if i < F:
                            f[:, t, i] = st.f_p[:, t, i]
                        else:
                            err[:, t] = st.err_p[:, t]
                        eff[:, t, i] = metric(model, batch, batch.clean, node_edit(sae, s, st, f, err)) - m_c
                        continue

                    def edit(x, t=t, i=i, sae=sae, st=st):
                        f, err = (v.clone() for v in sae.split(x, st.u_c))
                        if i < F:
                            f[:, t, i] = st.f_p[:, t, i]
                        else:
                            err[:, t] = st.err_p[:, t]
                        return sae.splice(f, err, st.u_c)
                    eff[:, t, i] = metric(model, batch, batch.clean, {s: edit}) - m_c
            out[s] = eff
    return out


# --- edge effects -----------------------------------------------------------------------------------

def edge_effects(model, saes, batch, states, grads, effects, node_threshold, aggregation="sum", pairs=None):
    """Edge effects of one batch, summed over its examples, one backward per downstream node.

    For the pair (U, D): U's value is spliced as decode(f_U) + err_U (leaves at their clean values; a
    transcoder's + skip(u_U), its clean input), the frozen sites pass their value with no gradient (a frozen
    transcoder's nodes are held, its skip term skip(u) still follows u: it is a linear path, not a node), and
    D's value y is re-split, f_D = encode(y), err_D = y - decode(f_D) (a transcoder: f_D = encode(u_D),
    err_D = y - decode(f_D) - skip(u_D), u_D its input in this same run). A downstream node (example b,
    position t, column i) takes part when its per-example node effect |effects[D][b, t, i]| > node_threshold;
    its edge from each upstream node is
        L_D[b, t, i] * d(node)/d(upstream node) * delta of the upstream node,
    with L_D the downstream node's gradient (grads[D] = dm/dx_D, the site gradient: dm/df_i =
    grads @ W_dec[i], dm/derr = grads). Examples are summed, and with `sum` aggregation positions too.

    Returns {(U, D): (rows, values)}: rows (R,) long, the downstream nodes' indices into D's aggregated node
    tensor ((F_D + 1,) for `sum`, (T, F_D + 1) for `none`, flattened), ascending; values (R, F_U + 1) for
    `sum`, (R, T, F_U + 1) for `none`, the error in column F_U. Not defined for cross-layer transcoders."""
    if clt_edge_error(saes):
        raise MinicircError(clt_edge_error(saes))
    pairs = pairs if pairs is not None else edge_pairs(model, site_order(model, saes))
    out = {}
    for U, D, frozen in pairs:
        sae_u, sae_d, su = saes[U], saes[D], states[U]
        f_u = su.f_c.clone().requires_grad_(True)
        err_u = su.err_c.clone().requires_grad_(True)
        recorded, inputs = {}, {}
        edit = {U: lambda x: sae_u.splice(f_u, err_u, su.u_c), D: lambda x: recorded.setdefault("y", x)}
        edit.update({s: frozen_edit(saes.get(s), s, inputs) for s in frozen})
        edit = recording_inputs(model, saes, [D, *frozen], edit, inputs)
        sums = {}
        with frozen_weights(model), torch.enable_grad():
            model(batch.clean, edit=edit, stop_at=D)
            y = recorded["y"]
            f_d, err_d = sae_d.split(y, inputs.get(D))
            L_f = grads[D] @ sae_d.W_dec.T
            F_d = f_d.shape[-1]
            for b, t, i in torch.nonzero(effects[D].abs() > node_threshold).tolist():
                value = L_f[b, t, i] * f_d[b, t, i] if i < F_d else (grads[D][b, t] * err_d[b, t]).sum()
                if not value.requires_grad:
                    continue
                g_f, g_err = torch.autograd.grad(value, [f_u, err_u], retain_graph=True, allow_unused=True)
                g_f = torch.zeros_like(f_u) if g_f is None else g_f
                g_err = torch.zeros_like(err_u) if g_err is None else g_err
                per_position = effects_from_gradients(g_f, g_err, su).sum(0)            # (T, F_U + 1)
                row, v = (i, per_position.sum(0)) if aggregation == "sum" else (t * (F_d + 1) + i, per_position)
                sums[row] = sums[row] + v if row in sums else v.detach()
        if sums:
            rows = sorted(sums)
            out[(U, D)] = (torch.tensor(rows, dtype=torch.long, device="cpu"), torch.stack([sums[r] for r in rows]))
    return out

