"""Time and peak memory of each circuit stage on a random model/SAE of a size given by flags.

Stages: attrib nodes, IG nodes, edges batched (one vector-Jacobian product for many downstream nodes),
and the baseline measured in the same run: edges with one backward pass per downstream (position, feature)
row, the original code's granularity. Prints a ratio against the baseline.

    python scripts/bench_circuit.py                        # small, a few seconds
    python scripts/bench_circuit.py --d-model 512 --d-mlp 2048 --layers 6 --vocab 50304 \
        --features 32768 --examples 10 --pos 5 --baseline-rows 200   # DESIGN.md section 13 scale
"""
import argparse
import os
import threading
import time

import torch

import minicirc
from minicirc import attribution
from minicirc.data import Batch


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few milliseconds from /proc."""

    def __enter__(self):
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def watch(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.003)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.mb = (self.peak - self.base) / 2**20


def stage(name, fn, results):
    t = time.perf_counter()
    with PeakRSS() as mem:
        out = fn()
    results[name] = (time.perf_counter() - t, mem.mb)
    print(f"{name:<34} {results[name][0]:9.2f} s   peak +{mem.mb:8.1f} MB", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-mlp", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--l0", type=float, default=32, help="target active features per token")
    p.add_argument("--examples", type=int, default=10)
    p.add_argument("--pos", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--node-threshold", type=float, default=0.1)
    p.add_argument("--baseline-rows", type=int, default=None,
                   help="time the one-row-at-a-time baseline on this many rows and extrapolate (default: all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    cfg = minicirc.Config(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, d_mlp=a.d_mlp)
    model = minicirc.GPTNeoX(cfg).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 1.5 / a.d_model ** 0.5 if prm.dim() > 1 else 0.02)
    # Random SAEs whose encoder bias gives about `l0` active features per token.
    saes = {}
    for s in model.sites:
        W_enc = torch.randn(a.d_model, a.features) / a.d_model ** 0.5
        frac = min(0.5, a.l0 / a.features)
        bias = -torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - frac)).item()
        saes[s] = minicirc.Dictionary(W_enc, torch.full((a.features,), bias), torch.randn(a.features, a.d_model) / a.l0 ** 0.5,
                                      torch.zeros(a.d_model), "relu")
    B, T = a.examples, a.pos
    batch = Batch(torch.randint(0, a.vocab, (B, T)), torch.randint(0, a.vocab, (B, T)), torch.randint(0, a.vocab, (B,)),
                  torch.randint(0, a.vocab, (B,)), torch.full((B,), T - 1), [None] * B)
    print(f"model d={a.d_model} layers={a.layers} vocab={a.vocab}; {len(saes)} SAEs x {a.features} features; "
          f"{B} examples x {T} tokens; {torch.get_num_threads()} threads")
    res = {}
    stage("nodes attrib", lambda: attribution.node_effects(model, saes, attribution.logit_diff, batch, "attrib"), res)
    m_c, m_p, states, eff, grads = stage(
        f"nodes ig ({a.steps} steps)",
        lambda: attribution.node_effects(model, saes, attribution.logit_diff, batch, "ig", a.steps), res)
    allv = torch.cat([torch.cat([f.flatten(), e.flatten()]) for f, e in eff.values()]).abs()
    print(f"  per-example node effects: max {allv.max():.3g}, "
          f"{int((allv > a.node_threshold).sum())} entries above the node threshold {a.node_threshold}")
    edges = stage("edges batched (vmap)", lambda: attribution.edge_effects(
        model, saes, batch, states, grads, eff, a.node_threshold, "none"), res)
    n_rows = sum(len(k) for k, _ in edges.values())
    print(f"  {n_rows} downstream (position, feature) rows over {len(edges)} site pairs")
    pairs = attribution.edge_pairs(model, attribution.site_order(model, saes))
    if a.baseline_rows is not None and a.baseline_rows < n_rows:
        # Restrict the loop to a random sample of rows by raising the threshold per pair is not exact;
        # instead time the loop on the first pairs until baseline_rows rows are done and extrapolate.
        done, t_loop, chosen = 0, 0.0, []
        for pr in pairs:
            k = len(edges.get((pr[0], pr[1]), ([], None))[0])
            if done >= a.baseline_rows:
                break
            chosen.append(pr)
            done += k
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            attribution.edge_effects(model, saes, batch, states, grads, eff, a.node_threshold, "none",
                                     pairs=chosen, use_vmap=False)
        t_loop = (time.perf_counter() - t0) * n_rows / max(done, 1)
        res["edges one row at a time"] = (t_loop, mem.mb)
        print(f"{'edges one row at a time (extrap.)':<34} {t_loop:9.2f} s   peak +{mem.mb:8.1f} MB  "
              f"({done} of {n_rows} rows timed)")
    else:
        stage("edges one row at a time", lambda: attribution.edge_effects(
            model, saes, batch, states, grads, eff, a.node_threshold, "none", use_vmap=False), res)
    print(f"edges speed-up, batched vs one row at a time: "
          f"{res['edges one row at a time'][0] / res['edges batched (vmap)'][0]:.1f}x")


if __name__ == "__main__":
    main()
