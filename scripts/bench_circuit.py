"""Time and peak memory of each circuit stage on a random model/SAE of a size given by flags.

Stages: attrib nodes, IG nodes, edges batched (one vector-Jacobian product for many downstream nodes),
and the baseline measured in the same run: edges with one backward pass per downstream (position, feature)
row, the original code's granularity. Prints a ratio against the baseline.

    python scripts/bench_circuit.py                        # small, a few seconds
    python scripts/bench_circuit.py --d-model 512 --d-mlp 2048 --layers 6 --vocab 50304 \
        --features 32768 --examples 10 --pos 5 --baseline-rows 200   # Pythia-70M scale (BENCHMARKS.md)

Streamed memory and data parallelism (section "find_circuit end to end"): the whole find_circuit (IG nodes
and all edges) at each dataset size of --circuit-sizes with a fixed --batch-size; peak memory should not
grow with the dataset size; the circuit's evaluation (mean ablation, in batches and, as the baseline, in one
slice) is timed beside it. Under torchrun the same section runs data-parallel (rank 0 prints; peak memory
is the largest over ranks):

    python scripts/bench_circuit.py --skip-stages --circuit-sizes 20,80
    torchrun --standalone --nproc-per-node 2 scripts/bench_circuit.py --skip-stages --circuit-sizes 40

Sparse against dense (section "sparse end to end"): the whole find_circuit, each run in its own process so
that peak RSS is the run's own, once with this checkout's minicirc and once with the dense code of
--dense-ref (a commit before issue 14; extracted with `git archive`, the compiled extension copied beside
it), node and edge effects compared (<= 1e-5 relative), times and peaks printed as ratios. --preset issue14
is issue 14's workload (Pythia-70M shape, 19 ReLU SAEs of 32768 features at L0 ~64, 32 x 64 tokens, IG 10
steps + all edges, thresholds 0.02 / 0.01); --sweep-features runs it at each n_features (same L0):

    python scripts/bench_circuit.py --preset issue14 --paths sparse,dense
    python scripts/bench_circuit.py --preset issue14 --sweep-features 8192,32768,131072 --examples 4 --paths sparse,dense

A device against the CPU (scripts/gpu_check.sh): the same find_circuit once with the model and dictionaries on
--device and once on the CPU, each in its own process; time, peak memory (the GPU's allocated memory on cuda),
node and edge effects compared (<= --tolerance, 1e-4 relative). --preset pythia70m is issue 14's shapes on
4 x 32 tokens:

    python scripts/bench_circuit.py --preset pythia70m --device cuda --against-cpu [--json PATH]
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

import minicirc
from minicirc.attribution import reference as attribution
from minicirc.attribution import edges as attribution_edges, nodes as attribution_nodes, states as attribution_states
from minicirc.data import Batch
from minicirc.rows import rows_to_dense


def trim_heap():
    """Give freed heap memory back to the OS (glibc keeps it otherwise), so each measurement starts clean."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few milliseconds from /proc."""

    def __enter__(self):
        trim_heap()
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


class PeakCUDA:
    """Peak CUDA memory allocated above the level at entry (--device cuda); the block waits for the GPU."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()
        self.mb = (self.peak - self.base) / 2**20


PEAK = PeakRSS      # PeakCUDA with --device cuda: timings then include waiting for the GPU


def stage(name, fn, results):
    t = time.perf_counter()
    with PEAK() as mem:
        out = fn()
    results[name] = (time.perf_counter() - t, mem.mb)
    print(f"{name:<34} {results[name][0]:9.2f} s   peak +{mem.mb:8.1f} MB", flush=True)
    return out


def build(a):
    """The random model and dictionaries of the flags (the same for every process with the same flags)."""
    torch.manual_seed(a.seed)
    cfg = minicirc.Config(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, d_mlp=a.d_mlp)
    model = minicirc.GPTNeoX(cfg).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 1.5 / a.d_model ** 0.5 if prm.dim() > 1 else 0.02)
    # Random SAEs whose encoder bias gives about `l0` active features per token. The encoder is scaled by
    # each site's activation size (measured on random tokens), so that pre-activations are ~N(0, 1): with an
    # unscaled encoder the sites' small activations left every feature inactive (L0 = 0).
    cache = {}
    with torch.no_grad():
        model(torch.randint(0, a.vocab, (a.examples, a.pos)), cache=cache)
    saes = {}
    for s in model.sites:
        W_enc = torch.randn(a.d_model, a.features) / (a.d_model ** 0.5 * cache[s].std().item())
        frac = min(0.5, a.l0 / a.features)
        bias = -torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - frac)).item()
        saes[s] = minicirc.Dictionary(W_enc, torch.full((a.features,), bias), torch.randn(a.features, a.d_model) / a.l0 ** 0.5,
                                      torch.zeros(a.d_model), "relu")
    return model, saes, cache


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
    p.add_argument("--circuit-sizes", default="20,80",
                   help="dataset sizes for the end-to-end find_circuit section ('' to skip it)")
    p.add_argument("--batch-size", type=int, default=10, help="batch size of the end-to-end section")
    p.add_argument("--circuit-data", default="tiled,fresh",
                   help="end-to-end data: 'tiled' (the same examples repeated: fixed circuit) and/or 'fresh'")
    p.add_argument("--skip-stages", action="store_true", help="only the end-to-end find_circuit section")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model, SAEs and data live (cuda: peak memory is the GPU's, RSS otherwise)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="issue14: issue 14's workload; pythia70m: the same shapes on fewer tokens, the GPU check's "
                        "(sets the sizes; flags after it win)")
    p.add_argument("--paths", default=None,
                   help="sparse end to end: comma list of paths to run, each in its own process (sparse, dense)")
    p.add_argument("--sweep-features", default=None, help="sparse end to end at each of these n_features")
    p.add_argument("--edge-threshold", type=float, default=0.01)
    p.add_argument("--dense-ref", default="7e15fa2", help="the commit whose (dense) minicirc is the dense path")
    p.add_argument("--dense-max-features", type=int, default=32768,
                   help="skip the dense path above this n_features (its dense states would not fit in memory)")
    p.add_argument("--ig-tokens", type=int, default=None, help="attribution.nodes.IG_TOKENS for the sparse path")
    p.add_argument("--against-cpu", action="store_true",
                   help="find_circuit on --device and on the CPU, each in its own process: time, peak memory (the "
                        "GPU's on cuda), node and edge effects compared (<= --tolerance relative)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="--against-cpu: largest relative difference of node and edge effects (tests/test_device.py's)")
    p.add_argument("--json", metavar="PATH", help="--against-cpu: also write the results as JSON to PATH")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)   # internal: one run, results to this folder
    argv = sys.argv[1:]
    if "--preset" in argv:   # the preset's values first, so that explicit flags override them
        argv = PRESETS[argv[argv.index("--preset") + 1]] + argv
    a = p.parse_args(argv)
    if a.child:
        return child_run(a)
    if a.against_cpu:
        return against_cpu(a)
    if a.paths:
        return sparse_against_dense(a)
    global PEAK
    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
        PEAK = PeakCUDA
    dist_run = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    rank = 0
    if dist_run:
        from minicirc.attribution import distributed
        rank, world, a.device = distributed.init(a.device)
        if rank != 0:  # only rank 0 prints
            import builtins
            builtins.print = lambda *args, **kw: None
    model, saes, cache = build(a)
    def random_batch(B, T):   # on the CPU: find_circuit moves each slice, the stages below the whole batch
        return Batch(torch.randint(0, a.vocab, (B, T)), torch.randint(0, a.vocab, (B, T)),
                     torch.randint(0, a.vocab, (B,)), torch.randint(0, a.vocab, (B,)), torch.full((B,), T - 1),
                     [None] * B)

    B, T = a.examples, a.pos
    batch = random_batch(B, T)
    with torch.no_grad():
        l0 = sum((saes[s].encode(cache[s]) != 0).sum(-1).float().mean().item() for s in saes) / len(saes)
    model, saes = model.to(a.device), {s: d.to(a.device) for s, d in saes.items()}
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"model d={a.d_model} layers={a.layers} vocab={a.vocab}; {len(saes)} SAEs x {a.features} features "
          f"(mean L0 {l0:.1f}); {B} examples x {T} tokens; {where}")
    if not a.skip_stages and not dist_run:
        stages(a, model, saes, batch.to(a.device))
    if a.circuit_sizes:
        end_to_end(a, model, saes, random_batch, dist_run)
    if dist_run:
        distributed.finish()


def end_to_end(a, model, saes, random_batch, dist_run):
    """find_circuit (IG nodes + all edges, aggregation sum) at each dataset size, fixed batch size.

    `tiled`: --examples random examples repeated, so the circuit (its set of edge entries) is the same at every
    size and only the dataset grows: peak memory should stay flat. `fresh`: new random examples, which keep
    activating new features, so the circuit itself grows and peak memory follows the number of edge entries."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist_run else 1
    sizes = [int(x) for x in a.circuit_sizes.split(",") if x.strip()]
    print(f"find_circuit end to end: batch size {a.batch_size}, {world} process(es) x "
          f"{torch.get_num_threads()} threads, {a.steps} IG steps, node threshold {a.node_threshold}")
    extra = {"distributed": True} if dist_run else {}
    run = lambda b: minicirc.find_circuit(model, saes, b, steps=a.steps, node_threshold=a.node_threshold,
                                          batch_size=a.batch_size, progress=False, **extra)
    base = random_batch(a.examples, a.pos)
    data = {(kind, n): attribution_states.tile(base, -(-n // len(base)))[:n] if kind == "tiled" else random_batch(n, a.pos)
            for kind in a.circuit_data.split(",") for n in sizes}   # the same data whatever the world size
    run(attribution_states.tile(base, world)[:a.batch_size * world])   # warm-up: first-call allocations, lazy imports
    for kind in a.circuit_data.split(","):
        for n in sizes:
            b = data[(kind, n)]
            if dist_run:
                dist.barrier()
            t = time.perf_counter()
            with PEAK() as mem:
                c = run(b)
            dt = time.perf_counter() - t
            peak = torch.tensor([mem.mb, mem.peak / 2**20], dtype=torch.float64, device=a.device)  # NCCL: on the GPU
            if dist_run:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            n_edges = sum(v._nnz() for _, v in c.edges.values())
            print(f"  {kind:5s} {n:5d} examples: {dt:8.2f} s ({n / dt:6.2f} examples/s)   peak +{peak[0]:8.1f} MB "
                  f"(total {peak[1]:7.1f} MB)   {n_edges:9d} edge entries", flush=True)
            if not dist_run:
                evaluate(model, saes, b, c.kept_nodes(), a.batch_size)
            del c


def evaluate(model, saes, batch, nodes, batch_size):
    """Faithfulness of the circuit by mean ablation in slices of batch_size examples, and, as the baseline in
    the same run, with the whole dataset as one slice (how evaluation ran before it was batched)."""
    from minicirc import evaluation
    for label, bs in [(f"batches of {batch_size}", batch_size), ("one slice (baseline)", len(batch))]:
        trim_heap()
        t = time.perf_counter()
        with PEAK() as mem:
            r = evaluation.faithfulness(model, saes, batch, nodes, batch_size=bs)
        print(f"        evaluate, {label:<22} {time.perf_counter() - t:8.2f} s   peak +{mem.mb:8.1f} MB   "
              f"faithfulness {r['faithfulness']:.4f} ({len(nodes)} nodes kept)", flush=True)


def dense_views(eff, states):
    """The baseline's dense inputs: {site: (B, T, F + 1)} node effects (column F the error) and the
    definitions' SiteState (dense f_c, f_p) of every site."""
    out_eff, out_st = {}, {}
    for s, e in eff.items():
        B, T = e.err.shape
        f = rows_to_dense(*e.rows, e.n_features).view(B, T, e.n_features)
        out_eff[s] = torch.cat([f, e.err[..., None].to(f.dtype)], -1)
        st = states[s]
        dense = lambda rows: rows_to_dense(*rows, st.n_features).view(B, T, st.n_features)
        out_st[s] = attribution.SiteState(st.x_c, st.x_p, dense(st.c), dense(st.p), st.err_c, st.err_p)
    return out_eff, out_st


def original_style_rows(model, saes, batch, states, grads, eff, thr, pair, keys):
    """One backward pass per downstream row, as the original code does; returns how many rows it ran."""
    u, d, frozen = pair
    su, sae_u, sae_d = states[u], saes[u], saes[d]
    f_leaf = su.f_c.detach().clone().requires_grad_(True)
    e_leaf = su.err_c.detach().clone().requires_grad_(True)
    rec = {}

    def freeze(s):
        def fn(x):
            return x.detach()
        return fn

    def keep(x):
        rec["y"] = x
        return x
    edit = {s: freeze(s) for s in frozen}
    edit[u] = lambda x: sae_u.decode(f_leaf) + e_leaf
    edit[d] = keep
    sink = 0.0
    with torch.enable_grad():
        model(batch.clean, edit=edit, stop_at=d)
        y = rec["y"]
        f_d = sae_d.encode(y)
        e_d = y - sae_d.decode(f_d)
        L = grads[d]
        L_f = L @ sae_d.W_dec.T
        F_d = f_d.shape[-1]
        sel_f, sel_e = eff[d][..., :F_d].abs() > thr, eff[d][..., F_d].abs() > thr
        for t, i in (divmod(k, F_d + 1) for k in keys):     # keys: flat indices into (T, F_d + 1)
            if i == F_d:
                target = (e_d[:, t] * L[:, t] * sel_e[:, t, None]).sum()
            else:
                target = (f_d[:, t, i] * L_f[:, t, i] * sel_f[:, t, i]).sum()
            gf, ge = torch.autograd.grad(target, [f_leaf, e_leaf], retain_graph=True, allow_unused=True)
            with torch.no_grad():
                if gf is not None:
                    sink += float((gf * su.delta_f).sum())
                if ge is not None:
                    sink += float((ge * su.delta_err).sum())
    return len(keys)


def stages(a, model, saes, batch):
    res = {}
    stage("nodes attrib", lambda: attribution_nodes.node_effects(model, saes, attribution.logit_diff, batch, "attrib"), res)
    r = stage(f"nodes ig ({a.steps} steps)",
              lambda: attribution_nodes.node_effects(model, saes, attribution.logit_diff, batch, "ig", a.steps), res)
    states, eff, grads = r.states, r.effects, r.grads
    dense_eff, dense_st = dense_views(eff, states)
    allv = torch.cat([e.flatten() for e in dense_eff.values()]).abs()
    print(f"  per-example node effects: max {allv.max():.3g}, "
          f"{int((allv > a.node_threshold).sum())} entries above the node threshold {a.node_threshold}")
    edges = stage("edges batched (vmap)", lambda: attribution_edges.edge_effects(
        model, saes, batch, states, grads, eff, a.node_threshold, "none"), res)
    n_rows = sum(len(k) for k, _ in edges.values())
    print(f"  {n_rows} downstream (position, feature) rows over {len(edges)} site pairs")
    # Baseline: the original code's structure, one backward pass per downstream (position, feature) row
    # through the spliced graph (dense feature leaves at U, autograd through D's encoder). Timed on up to
    # --baseline-rows rows taken pair by pair, then extrapolated per row to all rows.
    pairs = attribution.edge_pairs(model, attribution.site_order(model, saes))
    limit = a.baseline_rows if a.baseline_rows is not None else n_rows
    done, t0 = 0, time.perf_counter()
    with PEAK() as mem:
        for pair in pairs:
            keys = edges.get(pair[:2], ([], None))[0]
            if done >= limit or not keys:
                continue
            done += original_style_rows(model, saes, batch, dense_st, grads, dense_eff, a.node_threshold, pair,
                                        keys[:limit - done])
    t_loop = (time.perf_counter() - t0) * n_rows / max(done, 1)
    res["edges one row at a time"] = (t_loop, mem.mb)
    print(f"{'edges one row at a time' + (' (extrap.)' if done < n_rows else ''):<34} {t_loop:9.2f} s   "
          f"peak +{mem.mb:8.1f} MB  ({done} of {n_rows} rows timed)")
    print(f"edges speed-up, batched vs one row at a time: "
          f"{res['edges one row at a time'][0] / res['edges batched (vmap)'][0]:.1f}x")

# --- sparse end to end: this checkout against the dense code, each run in its own process ---------------

PYTHIA70M = ["--d-model", "512", "--d-mlp", "2048", "--layers", "6", "--heads", "8", "--vocab", "50304",
             "--features", "32768", "--l0", "64"]
PRESETS = {"issue14": PYTHIA70M + ["--examples", "32", "--pos", "64", "--steps", "10",
                                   "--node-threshold", "0.02", "--edge-threshold", "0.01", "--batch-size", "32"],
           # The GPU check's (scripts/gpu_check.sh): issue 14's shapes and settings on 4 x 32 tokens (1/16 of its
           # tokens), so that the CPU run it is compared with stays well under a minute on 16 cores (on the 2-core
           # CPU, 2026-12-07, under load: 46 s at 2 x 16 tokens, 99 s at 4 x 16, 185 s at 8 x 32).
           "pythia70m": PYTHIA70M + ["--examples", "4", "--pos", "32", "--steps", "10",
                                     "--node-threshold", "0.02", "--edge-threshold", "0.01", "--batch-size", "4"]}


def child_run(a):
    """One find_circuit (IG nodes + all edges) of the flags' workload; writes stats.json and the circuit."""
    if a.ig_tokens and hasattr(attribution_nodes, "IG_TOKENS"):
        attribution_nodes.IG_TOKENS = a.ig_tokens
    model, saes, cache = build(a)
    B, T = a.examples, a.pos
    batch = Batch(torch.randint(0, a.vocab, (B, T)), torch.randint(0, a.vocab, (B, T)),
                  torch.randint(0, a.vocab, (B,)), torch.randint(0, a.vocab, (B,)), torch.full((B,), T - 1), [None] * B)
    del cache
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    # Built on the CPU (the same random draws whatever the device), then moved; find_circuit moves each slice.
    model, saes = model.to(a.device), {s: d.to(a.device) for s, d in saes.items()}
    with torch.no_grad():   # L0 on the workload's own clean tokens, a slice at a time
        c = {}
        model(batch.clean[:4].to(a.device), cache=c)
        from minicirc import ops
        l0 = sum(int(ops.sae_encode_sparse(c[s].reshape(-1, a.d_model), d.W_enc, d.b_enc, d.b_dec, "relu")[1].numel())
                 / c[s].shape[0] / c[s].shape[1] for s, d in saes.items()) / len(saes)
        del c
    weights = sum(t.numel() * t.element_size() for d in saes.values() for t in (d.W_enc, d.W_dec)) / 2**20
    t0 = time.perf_counter()
    # sampled during the run only (building the random SAEs has its own transients); on cuda, the GPU's peak too
    with PeakRSS() as mem, (PeakCUDA() if cuda else contextlib.nullcontext()) as gpu:
        circuit = minicirc.find_circuit(model, saes, batch, method="ig", steps=a.steps, node_threshold=a.node_threshold,
                                        edge_threshold=a.edge_threshold, batch_size=a.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    before, peak = mem.base / 2**20, mem.peak / 2**20
    circuit.save(a.child)
    stats = {"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before, "sae_weights_mb": weights, "l0": l0,
             "threads": torch.get_num_threads(), "minicirc": os.path.dirname(minicirc.__file__),
             "kept_nodes": len(circuit.kept_nodes()), "edge_entries": sum(v._nnz() for _, v in circuit.edges.values()),
             "device": a.device, "device_name": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:   # GPU memory allocated: the peak during the run, and the level before it (model + SAEs)
        stats.update(peak_gpu_mb=gpu.peak / 2**20, gpu_before_mb=gpu.base / 2**20)
    with open(os.path.join(a.child, "stats.json"), "w") as f:
        json.dump(stats, f)


def child_flags(a):
    """The flags that define the workload (model, dictionaries, data, settings), for a --child run."""
    flags = ["--d-model", a.d_model, "--d-mlp", a.d_mlp, "--layers", a.layers, "--heads", a.heads, "--vocab", a.vocab,
             "--features", a.features, "--l0", a.l0, "--examples", a.examples, "--pos", a.pos, "--steps", a.steps,
             "--node-threshold", a.node_threshold, "--edge-threshold", a.edge_threshold,
             "--batch-size", a.batch_size, "--seed", a.seed]
    if a.ig_tokens:
        flags += ["--ig-tokens", a.ig_tokens]
    return [str(x) for x in flags]


def against_cpu(a):
    """--against-cpu: one find_circuit (IG nodes + all edges) on --device and the same on the CPU, each in its
    own process (same random model, dictionaries and data: both are drawn on the CPU); node and edge effects
    compared with compare_circuits. With --device cpu both runs are on the CPU (gpu_check.sh's dry run)."""
    out = tempfile.mkdtemp(prefix="bench-against-cpu-")
    print(f"model d={a.d_model} d_mlp={a.d_mlp} layers={a.layers} vocab={a.vocab}; {1 + 3 * a.layers} relu SAEs x "
          f"{a.features} features, target L0 {a.l0}; {a.examples} examples x {a.pos} tokens; IG {a.steps} steps + all "
          f"edges, thresholds {a.node_threshold} / {a.edge_threshold}; {a.device} against cpu", flush=True)
    result = {"device": a.device, "workload": {k: getattr(a, k.replace("-", "_")) for k in
                                               ("d-model", "d-mlp", "layers", "heads", "vocab", "features", "l0",
                                                "examples", "pos", "steps", "node-threshold", "edge-threshold",
                                                "batch-size", "seed")},
              "tolerance": a.tolerance, "runs": {}, "folder": out}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    def write_json():   # after each step, so that a run stopped at its time limit leaves what it measured
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)

    for label, device in (("device", a.device), ("cpu", "cpu")):
        folder = os.path.join(out, label)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *child_flags(a), "--device", device,
                            "--child", folder], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  {device:4s} run failed after {time.perf_counter() - t:.0f} s (exit {r.returncode}):\n{r.stderr}",
                  flush=True)
            result["runs"][label] = {"device": device, "failed": r.returncode, "stderr": r.stderr[-4000:]}
            write_json()
            continue
        with open(os.path.join(folder, "stats.json")) as f:
            result["runs"][label] = st = json.load(f)
        gpu = (f"   peak GPU memory {st['peak_gpu_mb']:8.0f} MB (model + SAEs {st['gpu_before_mb']:.0f} MB)"
               if "peak_gpu_mb" in st else "")
        print(f"  {device:4s} ({st['device_name']}, {st['threads']} threads): {st['seconds']:8.2f} s   peak RSS "
              f"{st['peak_rss_mb']:8.0f} MB{gpu}   L0 {st['l0']:.1f}   {st['kept_nodes']} nodes kept, "
              f"{st['edge_entries']} edge entries", flush=True)
        write_json()
    ok = False
    if all("seconds" in result["runs"].get(k, {}) for k in ("device", "cpu")):
        nodes, edges = compare_circuits(os.path.join(out, "device"), os.path.join(out, "cpu"))
        ok = max(nodes, edges) <= a.tolerance
        result.update(node_rel_diff=nodes, edge_rel_diff=edges)
        print(f"  {a.device} against cpu: largest relative difference: nodes {nodes:.2g}, edges {edges:.2g} "
              f"({'ok' if ok else 'ABOVE'}: tolerance {a.tolerance:g})", flush=True)
    result["ok"] = ok
    print(f"circuits and stats.json of both runs: {out}")
    write_json()
    return 0 if ok else 1


def dense_checkout(ref):
    """minicirc at commit `ref` in a temporary folder (git archive), with this checkout's compiled extension."""
    import shutil
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = tempfile.mkdtemp(prefix="minicirc-dense-")
    archive = subprocess.run(["git", "-C", here, "archive", ref, "minicirc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    for f in os.listdir(os.path.join(here, "minicirc")):
        if f.endswith(".so"):
            shutil.copy(os.path.join(here, "minicirc", f), os.path.join(root, "minicirc", f))
    return root


def compare_circuits(dir_a, dir_b):
    """Largest |a - b| / max|a| over node effects and over edge effects; edges as sparse tensors (an entry
    stored in one and not the other counts as 0 there: the dense code also stored exact zeros)."""
    from safetensors.torch import load_file
    A, B = load_file(os.path.join(dir_a, "effects.safetensors")), load_file(os.path.join(dir_b, "effects.safetensors"))
    if set(A) != set(B):
        return float("inf"), float("inf")
    rel = lambda x, y: ((x - y).abs().max() / x.abs().max().clamp(min=1e-30)).item() if x.numel() else 0.0
    nodes = max(rel(A[k].double(), B[k].double()) for k in A if k.startswith("nodes."))
    edges = 0.0
    for k in (k[:-len(".indices")] for k in A if k.endswith(".indices")):
        if not (torch.equal(A[k + ".rows"], B[k + ".rows"]) and torch.equal(A[k + ".shape"], B[k + ".shape"])):
            return nodes, float("inf")
        shape = tuple(A[k + ".shape"].tolist())
        ea = torch.sparse_coo_tensor(A[k + ".indices"], A[k + ".values"].double(), shape, check_invariants=True)
        eb = torch.sparse_coo_tensor(B[k + ".indices"], B[k + ".values"].double(), shape, check_invariants=True)
        diff = (ea - eb).coalesce().values()
        if diff.numel():
            edges = max(edges, (diff.abs().max() / ea.coalesce().values().abs().max().clamp(min=1e-30)).item())
    return nodes, edges


def sparse_against_dense(a):
    paths = a.paths.split(",")
    sizes = [int(x) for x in a.sweep_features.split(",")] if a.sweep_features else [a.features]
    dense_root = dense_checkout(a.dense_ref) if "dense" in paths else None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp(prefix="bench-sparse-")
    flags, skip = [], {"--paths", "--sweep-features", "--dense-max-features", "--dense-ref"}
    argv = sys.argv[1:]
    for j, x in enumerate(argv):
        if x not in skip and (j == 0 or argv[j - 1] not in skip):
            flags.append(x)
    print(f"model d={a.d_model} d_mlp={a.d_mlp} layers={a.layers} vocab={a.vocab}; {1 + 3 * a.layers} relu SAEs, "
          f"target L0 {a.l0}; "
          f"{a.examples} examples x {a.pos} tokens; IG {a.steps} steps + all edges, thresholds {a.node_threshold} / "
          f"{a.edge_threshold}; {torch.get_num_threads()} threads; dense = minicirc at {a.dense_ref}", flush=True)
    rows = []
    for F in sizes:
        res = {}
        for path in paths:
            if path == "dense" and F > a.dense_max_features:
                print(f"  {F:7d} features, dense : skipped (above --dense-max-features {a.dense_max_features})", flush=True)
                continue
            folder = os.path.join(out, f"{path}-{F}")
            env = dict(os.environ, PYTHONPATH=dense_root if path == "dense" else here)
            t = time.perf_counter()
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, "--features", str(F), "--child", folder],
                               env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"  {F:7d} features, {path}: failed after {time.perf_counter() - t:.0f} s (exit {r.returncode}): "
                      f"{r.stderr.strip().splitlines()[-1:] or ''}", flush=True)
                continue
            with open(os.path.join(folder, "stats.json")) as f:
                res[path] = st = json.load(f)
            print(f"  {F:7d} features, {path:6s}: {st['seconds']:8.1f} s   peak RSS {st['peak_rss_mb']:8.0f} MB "
                  f"(SAE weights {st['sae_weights_mb']:.0f} MB, peak beyond the RSS before the run "
                  f"{st['peak_rss_mb'] - st['rss_before_mb']:.0f} MB)   L0 {st['l0']:.1f}   {st['kept_nodes']} nodes kept, "
                  f"{st['edge_entries']} edge entries", flush=True)
        if "sparse" in res and "dense" in res:
            dn, de = compare_circuits(os.path.join(out, f"sparse-{F}"), os.path.join(out, f"dense-{F}"))
            s_, d_ = res["sparse"], res["dense"]
            print(f"  {F:7d} features: dense / sparse time {d_['seconds'] / s_['seconds']:.2f}x, peak RSS "
                  f"{d_['peak_rss_mb'] / s_['peak_rss_mb']:.2f}x; largest relative difference: nodes {dn:.2g}, "
                  f"edges {de:.2g} {'(ok: <= 1e-5)' if max(dn, de) <= 1e-5 else '(ABOVE 1e-5)'}", flush=True)
        rows.append((F, res))
    if dense_root:
        import shutil
        shutil.rmtree(dense_root, ignore_errors=True)
    print(f"circuits and stats.json of every run: {out}")
    if len(rows) > 1 and all("sparse" in r for _, r in rows):
        (F0, r0), (F1, r1) = rows[0], rows[-1]
        beyond = lambda st: st["peak_rss_mb"] - st["sae_weights_mb"]
        print(f"sparse: {F1 // F0}x the features -> peak RSS beyond the SAE weights {beyond(r1['sparse']):.0f} MB vs "
              f"{beyond(r0['sparse']):.0f} MB ({beyond(r1['sparse']) / beyond(r0['sparse']):.2f}x; target <= 1.5x)")


if __name__ == "__main__":
    main()
