"""Train (or retrain) the embedded default model and SAEs into the cache, and print their statistics.

    python scripts/train_default.py                 # full recipe, seed 0 -> $MINICIRC_CACHE/default-v1-full-seed0
    python scripts/train_default.py --recipe quick --seed 3
"""
import argparse
import json

import torch

from minicirc.default import RECIPES, default_dir, make_default


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="full", choices=sorted(RECIPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the model is tiny: 1 is fastest)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    folder = default_dir(a.recipe, a.seed)
    _, _, _, stats = make_default(folder, a.recipe, a.seed)
    stats.pop("config")
    print(json.dumps(stats, indent=1))
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
