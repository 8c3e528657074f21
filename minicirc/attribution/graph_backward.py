"""The backward pass of the local replacement model (docs/method.md §15), one layer at a time, in two ways with
one interface: `HeldLayers` writes it out for the Llama family (Llama, Qwen2, Qwen3, Gemma-2) as the few
matrix products it is, `AutogradLayers` takes it from autograd for any family (GPT-2, GPT-NeoX). Both give,
for a batch of R rows and the prompt's first P positions:

    top(vectors)         the gradient at the last residual stream of vectors[r] · h[P - 1] (h: final norm's output)
    back(k, g, seeds)    from g (R, P, d), the gradient at layer k's output, and the seeds (rows, positions,
                         vectors) on u_k, the transcoder input of layer k: the gradient at layer k's input.

With norm scales and attention patterns held, every map here is linear and the same at every point, so the
gradient is the transposed map applied to the cotangent: nothing is taken from the forward but the held values.
"""
import torch

from ..model.llama import Llama
from .common import frozen_edit, recording_inputs


def held_scale(norm, store, dtype):
    """(T, d): a held RMSNorm as the diagonal map x -> scale ⊙ x, scale[p] = ρ[p] w (Gemma-2: ρ[p] (1 + w))
    with ρ[p] = rsqrt(mean(x[p]²) + eps) held (layers.held, stored (1, T, 1))."""
    w = 1.0 + norm.weight.float() if norm.gemma else norm.weight
    return (store[(norm, "scale")][0] * w).detach().to(dtype)


class HeldLayers:
    """The replacement model's backward pass written out for the Llama family. Layer k is

        a = W_O · mix_P(W_V · (s_in ⊙ x))    (Gemma-2: s_post ⊙ that)        mid = x + a
        u = s_u ⊙ mid (reads "mlp_in"; u = mid for "resid_mid")              out = mid + skip(u) + held

    with mix_P the held pattern (query head h reads key/value head h // G), the s the held norm scales and
    skip(u) = u W_skipᵀ. Its transpose, from g = ∂/∂out and the seeds σ on u:

        g_u = g W_skip + σ      g_mid = g + s_u ⊙ g_u      g_x = g_mid + s_in ⊙ (mixᵀ((s_post ⊙ g_mid) W_O) W_V)

    three matrix products of R·P rows (W_skip d², W_O d·H·hd, W_V d·KV·hd multiply-adds per row) and the
    pattern's. The held values come from one forward pass on the whole prompt; a prefix of P positions reads
    their first P (causal attention and per-token norms give a prefix the same values)."""

    @staticmethod
    def supports(model):
        return isinstance(model, Llama)

    def __init__(self, model, transcoders, tokens):
        with torch.no_grad(), model.frozen_statistics() as store:
            model(tokens[None])
        dtype = model.unembedding.dtype
        cfg = model.cfg
        self.shape = (cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)
        self.layers = []
        for l, layer in enumerate(model.layers):
            tc, attn = transcoders[f"mlp_{l}"], layer.self_attn
            mlp_norm = layer.pre_feedforward_layernorm if cfg.gemma else layer.post_attention_layernorm
            self.layers.append(dict(
                s_in=held_scale(layer.input_layernorm, store, dtype),
                s_post=held_scale(layer.post_attention_layernorm, store, dtype) if cfg.gemma else None,
                s_u=held_scale(mlp_norm, store, dtype) if tc.reads == "mlp_in" else None,
                pattern=store[(attn, "pattern")][0].view(*self.shape[:2], *store[(attn, "pattern")].shape[-2:]),
                W_O=attn.o_proj.weight.detach(), W_V=attn.v_proj.weight.detach(),
                W_skip=tc.W_skip.to(dtype) if tc.has_skip else None))
        self.s_final = held_scale(model.norm, store, dtype)

    def top(self, vectors, P):
        g = vectors.new_zeros(len(vectors), P, vectors.shape[-1])
        g[:, P - 1] = vectors * self.s_final[P - 1]
        return g

    def back(self, k, g, seeds, P):
        """g (m, P, d) for the rows started above layer k (None: none), seeds (pos, vectors) for the rows that
        start at u_k: rows m.. of the result. A starting row's gradient at the layer's output is 0, so its g_u
        and g_mid are σ and s_u ⊙ σ at its own position only: one row of W_O, none of W_skip."""
        H, (KV, G, hd) = self.layers[k], self.shape
        m = 0 if g is None else len(g)
        n = m + (0 if seeds is None else len(seeds[0]))
        ref = g if g is not None else seeds[1]
        rows = torch.arange(m, n, device=ref.device)              # the rows that start here
        g_u = ref.new_zeros(n, P, ref.shape[-1])
        if m and H["W_skip"] is not None:
            torch.matmul(g, H["W_skip"], out=g_u[:m])
        if seeds is not None:
            g_u[rows, seeds[0]] = seeds[1]
        g_mid = g_u if H["s_u"] is None else g_u.mul_(H["s_u"][:P])       # in place: one tensor less
        if m:
            g_mid[:m] += g
        g_a = g_mid if H["s_post"] is None else g_mid * H["s_post"][:P]
        g_z = ref.new_zeros(n, P, KV * G * hd)
        if m:
            torch.matmul(g_a[:m], H["W_O"], out=g_z[:m])
        if seeds is not None:
            g_z[rows, seeds[0]] = g_a[rows, seeds[0]] @ H["W_O"]
        g_v = torch.einsum("ngqk,rqnge->rkne", H["pattern"][:, :, :P, :P], g_z.view(n, P, KV, G, hd))
        return g_mid.addcmul_(g_v.reshape(n, P, KV * hd) @ H["W_V"], H["s_in"][:P])


class FrozenRun:
    """The replacement model's forward pass with statistics held, cut at every residual stream: leaves[k] is
    the input of layer k (leaves[0] the embedding, leaves[L] the last residual stream), outs[k] layer k's
    output computed from leaves[k], u[k] the transcoder input of layer k, h the final norm's output. Every
    MLP output is held but for its skip term (common.frozen_edit), so the graph from leaves[k] to outs[k] and
    u[k] is layer k of the linear replacement model, and its VJPs can be taken one layer at a time."""

    def __init__(self, model, transcoders, tokens):
        L = model.cfg.n_layers
        self.leaves, self.outs, self.inputs = [], [], {}
        sites = [f"mlp_{l}" for l in range(L)]

        def cut(x, keep=True):
            if keep:
                self.outs.append(x)
            leaf = x.detach().requires_grad_(True)
            self.leaves.append(leaf)
            return leaf
        edit = {"embed": lambda x: cut(x, keep=False)}
        edit.update({f"resid_{l}": cut for l in range(L)})
        edit.update({s: frozen_edit(transcoders[s], s, self.inputs) for s in sites})
        edit = recording_inputs(model, transcoders, sites, edit, self.inputs)
        model(tokens[None], edit=edit, stop_at=f"resid_{L - 1}")
        self.u = [self.inputs[s] for s in sites]
        self.h = model.final_norm(self.leaves[L])


def vjp(outputs, leaf, cotangents):
    """Σ_o cotangent_o · d(output_o)/d(leaf) for a batch of cotangents (R, *output shape) -> (R, *leaf shape)."""
    (g,) = torch.autograd.grad(outputs, leaf, cotangents, retain_graph=True, is_grads_batched=True)
    return g


class AutogradLayers:
    """The same interface from autograd, for any family: a FrozenRun on the prompt's first P positions (kept
    for the next batch of the same P), one batched VJP per layer (`is_grads_batched`)."""

    def __init__(self, model, transcoders, tokens):
        self.model, self.transcoders, self.tokens, self.runs = model, transcoders, tokens, {}

    def run(self, P):
        if P not in self.runs:
            with self.model.frozen_statistics():
                self.runs = {P: FrozenRun(self.model, self.transcoders, self.tokens[:P])}
        return self.runs[P]

    def top(self, vectors, P):
        run = self.run(P)
        seed = vectors.new_zeros(len(vectors), 1, P, vectors.shape[-1])
        seed[:, 0, P - 1] = vectors
        return vjp([run.h], run.leaves[-1], [seed])[:, 0]

    def back(self, k, g, seeds, P):
        run = self.run(P)
        if seeds is not None:
            pos, vecs = seeds
            start = vecs.new_zeros(len(pos), P, vecs.shape[-1])
            g = start if g is None else torch.cat([g, start])
            s = torch.zeros_like(g)
            s[torch.arange(len(g) - len(pos), len(g), device=g.device), pos] = vecs
        outs, cots = [run.outs[k]], [g[:, None]]
        if seeds is not None:
            outs.append(run.u[k])
            cots.append(s[:, None])
        return vjp(outs, run.leaves[k], cots)[:, 0]
