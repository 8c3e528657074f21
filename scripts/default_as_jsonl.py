"""Write the embedded default's agreement templates as the original feature-circuits data files, so that
`minicirc compare` can run on them: OUT/<template>_train.json (the demo's discovery draw: train split, seed 0)
and OUT/<template>_test.json (its held-out draw: test split, seed 2), JSON lines with clean_prefix,
patch_prefix, clean_answer, patch_answer.

    python scripts/default_as_jsonl.py OUT [--n-train 200] [--n-test 100]
    minicirc compare --model minicirc/experiments/default_files/model \\
        --saes minicirc/experiments/default_files/saes --data OUT --out compare-default
"""
import argparse
import json
import os

from minicirc.data import FIELDS
from minicirc.experiments.tasks import agreement


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=100)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for template in agreement.TEMPLATES:
        for split, n, seed in (("train", args.n_train, 0), ("test", args.n_test, 2)):
            with open(os.path.join(args.out, f"{template}_{split}.json"), "w") as f:
                for ex in agreement.make_examples(template, n, seed=seed, split=split):
                    f.write(json.dumps({k: getattr(ex, k) for k in FIELDS}) + "\n")


if __name__ == "__main__":
    main()
