"""Benchmark: the sparse kernels against the dense torch path, measured in the same run.

Pipeline (the kernel targets of BENCHMARKS.md): encode clean, encode patch, per-feature attribution, on
N=2048 tokens, d=512, 16384 features, about 64 features active per token (ReLU SAE).
- dense:  f = relu((x - b_dec) @ W_enc + b_enc) twice, then (g @ W_dec.T) * (f_p - f_c)
- sparse: ops.sae_encode_sparse twice, then ops.feature_attribution (extension)
- sparse-reference: the same ops with MINICIRC_NO_EXT=1 (torch fallback), for information
Each path runs in its own process so that peak memory (VmHWM above the resident inputs, glibc
told to mmap every allocation >= 64 KiB so freed memory is returned) is not polluted by another.
Targets on CPU: sparse >= 1.2x faster and <= 1/5 of the dense peak memory.
With a GPU (and the CUDA extension) it also times N=4096, 32768 features on the device.

    python scripts/bench_kernels.py [--n 2048 --d 512 --s 16384 --l0 64 --reps 5] [--json PATH]
    python scripts/bench_kernels.py --device cuda --n 4096 --s 32768 --reps 20 --json PATH   # the device section only
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def make_inputs(n, d, s, l0, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, s, generator=gen) / d ** 0.5
    W_dec = torch.randn(s, d, generator=gen) / d ** 0.5
    # Pre-activations are close to N(0, 1) per feature, so this bias fires about l0 features.
    b_enc = -torch.special.ndtri(torch.tensor(1 - l0 / s)) + torch.zeros(s)
    b_dec = torch.randn(d, generator=gen) * 0.01
    x_c = torch.randn(n, d, generator=gen)
    x_p = (x_c + 0.5 * torch.randn(n, d, generator=gen)) / 1.25 ** 0.5
    g = torch.randn(n, d, generator=gen)
    return [t.to(device) for t in (x_c, x_p, g, W_enc, W_dec, b_enc, b_dec)]


def dense_path(x_c, x_p, g, W_enc, W_dec, b_enc, b_dec):
    f_c = ((x_c - b_dec) @ W_enc + b_enc).relu()
    f_p = ((x_p - b_dec) @ W_enc + b_enc).relu()
    return (g @ W_dec.T) * (f_p - f_c)


def sparse_path(x_c, x_p, g, W_enc, W_dec, b_enc, b_dec):
    from minicirc import ops
    rc = ops.sae_encode_sparse(x_c, W_enc, b_enc, b_dec, "relu")
    rp = ops.sae_encode_sparse(x_p, W_enc, b_enc, b_dec, "relu")
    return ops.feature_attribution(g, W_dec, rc, rp)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(path, n, d, s, l0, reps):
    """Runs in a fresh process: peak memory of one call, then the median time of `reps` calls."""
    torch.manual_seed(0)
    inputs = make_inputs(n, d, s, l0)
    fn = dense_path if path == "dense" else sparse_path
    with torch.no_grad():
        out = fn(*inputs)  # warm-up (thread pool, BLAS buffers)
        del out
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        rss0 = _status_kb("VmRSS")
        out = fn(*inputs)
        peak_mb = (_status_kb("VmHWM") - rss0) / 1024
        info = {}
        if path != "dense":
            from minicirc import ops
            from minicirc.rows import rows_to_dense
            crow, col, val = out
            info = {"nnz": int(col.numel()), "ext": ops.extension_loaded()}
            # Sanity: the sparse rows equal the dense effect on the first rows.
            m = 128
            ref = dense_path(inputs[0][:m], inputs[1][:m], inputs[2][:m], *inputs[3:])
            got = rows_to_dense(crow[:m + 1], col[:int(crow[m])], val[:int(crow[m])], s)
            info["max_abs_diff"] = float((got - ref).abs().max())
        del out
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"path": path, "ms": 1e3 * statistics.median(times), "peak_mb": peak_mb,
                      "threads": torch.get_num_threads(), **info}))


def run_worker(path, args, no_ext=False):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("MINICIRC_NO_EXT", None)
    if no_ext:
        env["MINICIRC_NO_EXT"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--n", str(args.n), "--d", str(args.d),
           "--s", str(args.s), "--l0", str(args.l0), "--reps", str(args.reps)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker {path} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def scatter_rows(crow, col, val, n_features):
    """Compressed rows (crow, col, val) as a dense (N, n_features) tensor, on their device."""
    row = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    out = torch.zeros(crow.numel() - 1, n_features, dtype=val.dtype, device=val.device)
    out[row, col] = val
    return out


def bench_device(device="cuda", n=4096, d=512, s=32768, l0=64, reps=20):
    """Dense path against the sparse ops on one device, in this process: time, peak memory, the encode's
    share of a plain matmul's throughput, and the sparse rows checked against the dense effect on the first
    rows. On the CPU (scripts/gpu_check.sh --dry-run) peak memory is VmHWM above the RSS before the call."""
    from minicirc import ops
    inputs = make_inputs(n, d, s, l0, device=device)
    cuda = device == "cuda"

    def timed(fn):
        for _ in range(3 if cuda else 1):
            fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps, (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps, max(_status_kb("VmHWM") - rss0, 0) / 1024

    with torch.no_grad():
        x_c, x_p, g, W_enc, W_dec, b_enc, b_dec = inputs
        ms_dense, mb_dense = timed(lambda: dense_path(*inputs))
        ms_sparse, mb_sparse = timed(lambda: sparse_path(*inputs))
        ms_mm, _ = timed(lambda: x_c @ W_enc)
        ms_enc, _ = timed(lambda: ops.sae_encode_sparse(x_c, W_enc, b_enc, b_dec, "relu"))
        # Correctness on the device: the sparse rows against the dense effect on the first rows.
        crow, col, val = sparse_path(*inputs)
        m = min(n, 128)
        ref = dense_path(inputs[0][:m], inputs[1][:m], inputs[2][:m], *inputs[3:])
        got = scatter_rows(crow[:m + 1], col[:int(crow[m])], val[:int(crow[m])], s)
        max_abs_diff, max_abs_ref = float((got - ref).abs().max()), float(ref.abs().max())
    flops = 2 * n * d * s
    res = {"device": device, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "n": n, "d": d, "s": s, "l0": l0,
           "reps": reps, "extension_loaded": ops.extension_loaded(),
           "cuda_extension_loaded": ops.cuda_extension_loaded(), "nnz": int(col.numel()),
           "ms_dense": ms_dense, "mb_dense": mb_dense, "ms_sparse": ms_sparse, "mb_sparse": mb_sparse,
           "speedup": ms_dense / ms_sparse, "memory_ratio": mb_sparse / mb_dense if mb_dense > 0 else None,
           "ms_encode": ms_enc, "ms_matmul": ms_mm, "encode_tflops": flops / ms_enc / 1e9,
           "matmul_tflops": flops / ms_mm / 1e9, "encode_share_of_matmul": ms_mm / ms_enc,
           "check_rows": m, "max_abs_diff": max_abs_diff, "max_abs_ref": max_abs_ref,
           "rel_diff": max_abs_diff / max(max_abs_ref, 1e-30)}
    ext = ops.cuda_extension_loaded() if cuda else ops.extension_loaded()
    print(f"\n{device.upper()} ({res['device_name']}), N={n} d={d} S={s} L0~{l0}, "
          f"{device} extension loaded: {ext}")
    mem = f"{res['memory_ratio']:.3f}" if res["memory_ratio"] is not None else "n/a"
    print(f"  dense torch path   {ms_dense:9.2f} ms  peak {mb_dense:8.1f} MB")
    print(f"  sparse (ops)       {ms_sparse:9.2f} ms  peak {mb_sparse:8.1f} MB")
    print(f"  speedup {ms_dense / ms_sparse:.2f}x (target >= 4x)   memory ratio {mem}")
    print(f"  encode {res['encode_tflops']:.1f} TFLOP/s vs torch matmul {res['matmul_tflops']:.1f} TFLOP/s "
          f"({ms_mm / ms_enc:.2f} of the matmul; target >= 0.5 of the roof)")
    print(f"  sparse vs dense on the first {m} rows: max|diff| {max_abs_diff:.2e} (max|effect| {max_abs_ref:.2e})")
    return res


def bench_cuda(n=4096, d=512, s=32768, l0=64, reps=20):
    return bench_device("cuda", n, d, s, l0, reps)


def compare_cpu(args):
    """One configuration: dense path, extension and torch reference, each in its own process."""
    print(f"CPU, {torch.get_num_threads()} threads, N={args.n} d={args.d} S={args.s} L0~{args.l0}, "
          f"median of {args.reps}")
    dense = run_worker("dense", args)
    sparse = run_worker("sparse", args)
    ref = run_worker("sparse", args, no_ext=True)
    for name, r in [("dense torch path", dense), ("sparse, extension", sparse), ("sparse, torch reference", ref)]:
        extra = f"  nnz {r['nnz']}  max|diff| {r['max_abs_diff']:.1e}  ext={r['ext']}" if "nnz" in r else ""
        print(f"  {name:24s} {r['ms']:8.1f} ms  peak {r['peak_mb']:7.1f} MB{extra}")
    speed, mem = dense["ms"] / sparse["ms"], sparse["peak_mb"] / dense["peak_mb"]
    ok = speed >= 1.2 and mem <= 0.2 and sparse["ext"]
    print(f"  extension vs dense: {speed:.2f}x faster (target >= 1.2x), peak memory ratio {mem:.3f} "
          f"(target <= 0.2): {'PASS' if ok else 'FAIL'}")
    print(f"  reference vs dense: {dense['ms'] / ref['ms']:.2f}x faster, peak memory ratio "
          f"{ref['peak_mb'] / dense['peak_mb']:.3f}")
    return ok, {"dense": dense, "sparse": sparse, "reference": ref, "speedup": speed, "memory_ratio": mem, "ok": ok}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--s", type=int, default=16384)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--worker", choices=["dense", "sparse"])
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--grid", action="store_true", help="run the full N x S x L0 grid (several minutes)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="only the in-process section on this device at --n/--d/--s/--l0, --reps timed calls "
                        "(scripts/gpu_check.sh: cuda at N=4096 d=512 S=32768; cpu with tiny sizes in its dry run)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.n, args.d, args.s, args.l0, args.reps)
    results = {}

    def write_json():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    if args.device:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
        results["device"] = bench_device(args.device, args.n, args.d, args.s, args.l0, args.reps)
        write_json()
        return 0

    if args.grid:  # the issue's grid: N in {2048, 4096}, S in {16384, 32768}, L0 in {32, 64, 128}
        print(f"CPU, {torch.get_num_threads()} threads, d={args.d}, median of {args.reps}; ratios vs the dense path")
        print(f"  {'N':>5} {'S':>6} {'L0':>4} | {'dense ms':>9} {'ext x':>6} {'ext mem':>8} | {'ref x':>6} {'ref mem':>8}")
        ok = True
        for n, s_, l0 in itertools.product((2048, 4096), (16384, 32768), (32, 64, 128)):
            cfg = argparse.Namespace(**{**vars(args), "n": n, "s": s_, "l0": l0})
            dense, sparse, ref = (run_worker("dense", cfg), run_worker("sparse", cfg),
                                  run_worker("sparse", cfg, no_ext=True))
            print(f"  {n:5d} {s_:6d} {l0:4d} | {dense['ms']:9.1f} {dense['ms'] / sparse['ms']:6.2f} "
                  f"{sparse['peak_mb'] / dense['peak_mb']:8.3f} | {dense['ms'] / ref['ms']:6.2f} "
                  f"{ref['peak_mb'] / dense['peak_mb']:8.3f}", flush=True)
    else:
        ok, results["cpu"] = compare_cpu(args)
    if torch.cuda.is_available() and not args.no_cuda:
        results["device"] = bench_cuda()
    write_json()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
