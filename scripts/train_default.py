"""Train (or retrain) the embedded default model and SAEs, and print their statistics.

    python scripts/train_default.py --ship          # full recipe, seed 0 -> minicirc/experiments/default_files (shipped)
    python scripts/train_default.py --out /tmp/d    # the same files somewhere else (to compare with the shipped)
    python scripts/train_default.py --recipe quick --seed 3   # -> $MINICIRC_CACHE/default-v2-quick-seed3

Training is deterministic for a seed on one machine and thread count; on another CPU the float rounding of
the kernels can differ in the last bits, which training amplifies, so there the weights (and the numbers
measured on them) are close but not bitwise equal. That is why the full recipe ships its files.
"""
import argparse
import json
import os
import tempfile

import torch

from minicirc.experiments.default import RECIPES, SHIPPED, default_dir, make_default, ship


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="full", choices=sorted(RECIPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the model is tiny: 1 is fastest)")
    p.add_argument("--ship", action="store_true", help=f"write the package's files ({SHIPPED})")
    p.add_argument("--out", help="write the package's files into this folder instead")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dest = SHIPPED if a.ship else a.out
    if dest is None:
        folder = default_dir(a.recipe, a.seed)
        _, _, _, stats = make_default(folder, a.recipe, a.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model, saes, tokenizer, stats = make_default(os.path.join(tmp, "default"), a.recipe, a.seed)
        os.makedirs(dest, exist_ok=True)
        ship(model, saes, tokenizer, stats, dest)
        folder = dest
    stats = dict(stats)
    stats.pop("config")
    print(json.dumps(stats, indent=1))
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
