"""Time `minicirc compare` on a Pythia-70M-shaped random model: 6 layers, d_model 512, d_mlp 2048, vocab 50304,
random ReLU dictionaries of --features features at every one of its 19 sites (about --l0 active per token;
scripts/bench_circuit.py's `build`), on the embedded default's agreement templates written as the original's
JSONL (scripts/default_as_jsonl.py; the default tokenizer's ids lie inside the vocabulary). The embedded
default's own compare runs first in the same process tree, as the baseline of the ratio. Each compare is a
child process (`python -m minicirc compare`); its wall time and peak RSS are printed.

    python scripts/bench_compare.py [--templates simple] [--features 32768] [--threads 2] [--work DIR]

The model and dictionaries are random, so the circuits mean nothing: this measures time and memory only.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import minicirc  # noqa: E402
from bench_circuit import build  # noqa: E402
from minicirc.data import FIELDS  # noqa: E402
from minicirc.experiments.default import SHIPPED  # noqa: E402
from minicirc.experiments.tasks import agreement  # noqa: E402


def write_jsonl(folder, templates, n_train=200, n_test=100):
    os.makedirs(folder, exist_ok=True)
    for template in templates:
        for split, n, seed in (("train", n_train, 0), ("test", n_test, 2)):
            with open(os.path.join(folder, f"{template}_{split}.json"), "w") as f:
                for ex in agreement.make_examples(template, n, seed=seed, split=split):
                    f.write(json.dumps({k: getattr(ex, k) for k in FIELDS}) + "\n")


def timed_compare(model, saes, data, out, threads):
    """(seconds, peak RSS in GiB) of one compare run in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minicirc", "compare", "--model", model, "--saes", saes, "--data", data,
                    "--out", out, "--threads", str(threads), "--overwrite"], check=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # KiB, the largest child so far
    return seconds, (peak if peak > before else float("nan")) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", default="simple", help="comma-separated agreement templates")
    p.add_argument("--features", type=int, default=32768)
    p.add_argument("--l0", type=float, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the files (default: a temporary one, removed)")
    a = p.parse_args()
    templates = a.templates.split(",")
    work = a.work or tempfile.mkdtemp(prefix="bench-compare-")
    try:
        data = os.path.join(work, "data")
        write_jsonl(data, templates)
        base = timed_compare(os.path.join(SHIPPED, "model"), os.path.join(SHIPPED, "saes"), data,
                             os.path.join(work, "out-default"), a.threads)
        print(f"embedded default: {base[0]:.0f} s, peak RSS {base[1]:.2f} GiB", flush=True)
        shape = SimpleNamespace(vocab=50304, d_model=512, layers=6, heads=8, d_mlp=2048, features=a.features,
                                l0=a.l0, seed=0, examples=8, pos=16)
        model, saes, _ = build(shape)
        minicirc.save_model(model, os.path.join(work, "model"))
        shutil.copy(os.path.join(SHIPPED, "model", "tokenizer.json"), os.path.join(work, "model"))
        minicirc.save_saes(saes, os.path.join(work, "saes"))
        del model, saes
        big = timed_compare(os.path.join(work, "model"), os.path.join(work, "saes"), data,
                            os.path.join(work, "out-pythia"), a.threads)
        print(f"Pythia-70M-shaped, {a.features} features x 19 sites: {big[0]:.0f} s, peak RSS {big[1]:.2f} GiB "
              f"({big[0] / base[0]:.1f}x the default's time); templates {', '.join(templates)}, {a.threads} threads")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
