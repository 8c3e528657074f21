"""The embedded default: a tiny GPT-NeoX trained on minicirc's synthetic language, and one ReLU SAE per site.

Nothing can be downloaded where minicirc runs, so the project makes its own model. It is trained on first
use and cached in `$MINICIRC_CACHE` (default `~/.cache/minicirc`) under a folder named by the recipe's
version and seed: a Hugging Face GPT-NeoX directory (`model/`: config.json, model.safetensors,
tokenizer.json) and a dictionary_learning tree (`saes/`), plus `stats.json` (agreement accuracy per
template, variance explained and L0 per site). The same seed gives the same files.
"""
import json
import os
import shutil
import tempfile
import time

import torch

from . import train
from .data import tokenize
from .model import Config, GPTNeoX, load_model, load_tokenizer, save_model
from .sae import load_saes, save_saes
from .tasks import agreement, corpus

VERSION = 1
RECIPES = {
    # d_model 64, 3 layers: learns all four templates to >= 95% in a few minutes on 2 cores.
    "full": dict(d_model=64, n_layers=3, n_heads=4, d_mlp=256, n_rows=20000, lm_steps=600, lm_batch=64,
                 sae_features=256, sae_steps=3000, sae_l1=1e-2),
    # For smoke tests: same shapes, far fewer steps (the model will not be accurate).
    "quick": dict(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_rows=300, lm_steps=30, lm_batch=32,
                  sae_features=64, sae_steps=60, sae_l1=1e-2),
}


def cache_root():
    return os.environ.get("MINICIRC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minicirc")


def default_dir(recipe="full", seed=0):
    return os.path.join(cache_root(), f"default-v{VERSION}-{recipe}-seed{seed}")


@torch.no_grad()
def agreement_accuracy(model, tokenizer, n=200, seed=1, split="test"):
    """Fraction of held-out examples per template where the right verb form outscores the wrong one."""
    out = {}
    for template in agreement.TEMPLATES:
        ex = agreement.make_examples(template, n, seed=seed, split=split)
        batch = tokenize(ex, tokenizer, vocab_size=model.cfg.vocab_size)
        logits = model(batch.clean)
        rows = torch.arange(len(batch))
        last = logits[rows, batch.last]
        out[template] = (last[rows, batch.clean_answer] > last[rows, batch.patch_answer]).float().mean().item()
    return out


def make_default(out_dir, recipe="full", seed=0, progress=True):
    """Train the model and the SAEs and write them to out_dir (atomically: a temporary folder renamed)."""
    r = RECIPES[recipe]
    torch.manual_seed(seed)
    t0 = time.time()
    tokenizer = corpus.build_tokenizer()
    # Documents packed into rows of 32 tokens (each row starts at a document start, like a prompt):
    # no padding, so every position teaches; 600 steps reach 100% held-out agreement on all templates.
    seqs = corpus.packed_sequences(tokenizer, r["n_rows"], seq_len=32, seed=seed)
    cfg = Config(vocab_size=tokenizer.get_vocab_size(), d_model=r["d_model"], n_layers=r["n_layers"],
                 n_heads=r["n_heads"], d_mlp=r["d_mlp"], rotary_pct=0.5, max_len=64)
    model = GPTNeoX(cfg)
    losses = train.train_lm(model, seqs, steps=r["lm_steps"], batch_size=r["lm_batch"], seed=seed,
                            pad_id=corpus.PAD_ID, progress=progress)
    accuracy = agreement_accuracy(model, tokenizer)
    acts = train.collect_activations(model, seqs[:4000], pad_id=corpus.PAD_ID)
    saes, sae_stats = {}, {}
    from tqdm.auto import tqdm
    for i, site in enumerate(tqdm(model.sites, desc="train SAEs", disable=not progress)):
        saes[site], sae_stats[site] = train.train_sae(acts[site], r["sae_features"], l1=r["sae_l1"],
                                                      steps=r["sae_steps"], seed=seed * 1000 + i)
    stats = {"recipe": recipe, "seed": seed, "config": cfg.to_hf(), "lm_loss_first": losses[0],
             "lm_loss_last": sum(losses[-50:]) / min(50, len(losses)), "agreement_accuracy": accuracy,
             "saes": sae_stats, "train_seconds": time.time() - t0}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-default-")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is ordinary user data
    try:
        save_model(model, os.path.join(tmp, "model"))
        tokenizer.save(os.path.join(tmp, "model", "tokenizer.json"))
        save_saes(saes, os.path.join(tmp, "saes"))
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return model, saes, tokenizer, stats


def get_default(recipe="full", seed=0, progress=True):
    """(model, saes, tokenizer, stats, folder): from the cache, training them first if absent."""
    folder = default_dir(recipe, seed)
    if not os.path.exists(os.path.join(folder, "stats.json")):
        make_default(folder, recipe, seed, progress)
    model = load_model(os.path.join(folder, "model"))
    saes = load_saes(os.path.join(folder, "saes"), model)
    tokenizer = load_tokenizer(os.path.join(folder, "model"))
    with open(os.path.join(folder, "stats.json")) as f:
        stats = json.load(f)
    return model, saes, tokenizer, stats, folder
