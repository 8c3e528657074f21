"""The CPU's matmul roof that BENCHMARKS.md compares the SmolLM2 SAE work against: GFLOP/s of a
(2048 x 576) @ (576 x 4608) product (a batch of SmolLM2 activations times a 4608-latent encoder) in float32
and bfloat16, best of `--repeats` timed runs after a warm-up.

    python scripts/matmul_roof.py [--threads 2] [--repeats 20]
"""
import argparse
import time

import torch


def gflops(dtype, threads, repeats, m=2048, k=576, n=4608):
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{str(dtype).replace('torch.', '')}: {gflops(dtype, args.threads, args.repeats):.0f} GFLOP/s "
              f"({args.threads} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
