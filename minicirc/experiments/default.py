"""The embedded default: a tiny GPT-NeoX trained on minicirc's synthetic language, and one ReLU SAE per site.

Nothing can be downloaded where minicirc runs, so the project makes its own model. The "full" recipe at
seed 0 ships inside the package (`minicirc/experiments/default_files/`: model/ with config.json, model.safetensors and
tokenizer.json; saes/ with one SAELens folder of safetensors per site; stats.json), so every machine runs the same weights and gets the
same numbers; `scripts/train_default.py --ship` rebuilds those files from the seed. Any other recipe or seed
(the tests' "quick" one) is trained on first use and cached in `$MINICIRC_CACHE` (default
`~/.cache/minicirc`) under a folder named by the recipe's version and seed: a Hugging Face GPT-NeoX
directory (`model/`) and a dictionary_learning tree (`saes/`), plus `stats.json` (agreement accuracy per
template, variance explained, L0 and dead features per site, monosemantic shares per site).

The model is in superposition by construction: the language has 455 ground-truth binary latents
(`tasks.agreement.latent_names`) against d_model 48, and the SAEs are 8x d_model wide.
"""
import json
import os
import time

import torch
from tqdm.auto import tqdm

from ..data import tokenize
from ..errors import MinicircError
from ..files import staged_folder
from ..model import Config, GPTNeoX, load_model, load_tokenizer, save_model
from ..sae import load_saes, save_saelens, save_saes, site_hook
from . import train
from .tasks import agreement, corpus

VERSION = 2
RECIPES = {
    # d_model 48, 3 layers, for a language of 455 binary latents (9.5x d_model: the neurons must be
    # polysemantic); SAEs 8x d_model wide. Learns all four templates to >= 95% in minutes on 2 cores.
    "full": dict(d_model=48, n_layers=3, n_heads=4, d_mlp=192, n_rows=20000, lm_steps=800, lm_batch=64,
                 sae_features=384, sae_steps=3000, sae_l1=1e-2),
    # For smoke tests: same shapes, far fewer steps (the model will not be accurate).
    "quick": dict(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_rows=300, lm_steps=30, lm_batch=32,
                  sae_features=64, sae_steps=60, sae_l1=1e-2),
}


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_files")
SHIPPED_RECIPE = ("full", 0)
N_STATS_ROWS = 4000   # corpus rows whose activations train the SAEs and give their recorded statistics


def cache_root():
    return os.environ.get("MINICIRC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minicirc")


def default_dir(recipe="full", seed=0):
    return os.path.join(cache_root(), f"default-v{VERSION}-{recipe}-seed{seed}")


@torch.no_grad()
def clean_agreement_accuracy(model, tokenizer, n=200, seed=1, split="test"):
    """{template: fraction of held-out clean prompts where the right verb form outscores the wrong one}, as
    stats.json's "agreement_accuracy" records it (the patch prompts are not scored)."""
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
    # no padding, so every position teaches; 800 steps reach 100% held-out agreement on all templates (stats.json).
    seqs = corpus.packed_sequences(tokenizer, r["n_rows"], seq_len=32, seed=seed)
    cfg = Config(vocab_size=tokenizer.get_vocab_size(), d_model=r["d_model"], n_layers=r["n_layers"],
                 n_heads=r["n_heads"], d_mlp=r["d_mlp"], rotary_pct=0.5, max_len=64)
    model = GPTNeoX(cfg)
    losses = train.train_lm(model, seqs, steps=r["lm_steps"], batch_size=r["lm_batch"], seed=seed,
                            pad_id=corpus.PAD_ID, progress=progress)
    accuracy = clean_agreement_accuracy(model, tokenizer)
    acts = train.collect_activations(model, seqs[:N_STATS_ROWS], pad_id=corpus.PAD_ID)
    saes, sae_stats = {}, {}
    for i, site in enumerate(tqdm(model.sites, desc="train SAEs", disable=not progress)):
        saes[site], sae_stats[site] = train.train_sae(acts[site], r["sae_features"], l1=r["sae_l1"],
                                                      steps=r["sae_steps"], seed=seed * 1000 + i)
    stats = {"recipe": recipe, "seed": seed, "config": cfg.to_hf(), "lm_loss_first": losses[0],
             "lm_loss_last": sum(losses[-50:]) / min(50, len(losses)), "agreement_accuracy": accuracy,
             "saes": sae_stats, "monosemantic": monosemantic_shares(model, saes, tokenizer),
             "train_seconds": time.time() - t0}
    with staged_folder(out_dir) as tmp:
        save_model(model, os.path.join(tmp, "model"))
        tokenizer.save(os.path.join(tmp, "model", "tokenizer.json"))
        save_saes(saes, os.path.join(tmp, "saes"))
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
    return model, saes, tokenizer, stats


def get_default(recipe="full", seed=0, progress=True):
    """(model, saes, tokenizer, stats, folder): the package's files for the full recipe at seed 0 (never
    trained here), otherwise from the cache, training them first if absent. Both folders have the same
    layout: model/ (Hugging Face), saes/ (a tree `load_saes` reads), stats.json."""
    if (recipe, seed) == SHIPPED_RECIPE:
        folder = SHIPPED
        if not os.path.exists(os.path.join(folder, "stats.json")):
            raise MinicircError(f"{folder}: stats.json is missing (the package's default files are incomplete; "
                                "rebuild them with scripts/train_default.py --ship)")
    else:
        folder = default_dir(recipe, seed)
        if not os.path.exists(os.path.join(folder, "stats.json")):
            make_default(folder, recipe, seed, progress)
    model = load_model(os.path.join(folder, "model"))
    saes = load_saes(os.path.join(folder, "saes"), model)
    tokenizer = load_tokenizer(os.path.join(folder, "model"))
    with open(os.path.join(folder, "stats.json")) as f:
        stats = json.load(f)
    return model, saes, tokenizer, stats, folder


# --- the files shipped in the package --------------------------------------------------------------

def ship(model, saes, tokenizer, stats, out_dir):
    """Write the package's default files, safetensors and json only: model/ (config.json, model.safetensors,
    tokenizer.json: the Hugging Face layout), saes/<hook name>/ (one SAELens folder per site: cfg.json,
    sae_weights.safetensors; `load_saes` and the CLI's --saes read it) and stats.json: the layout of a
    cached default, with safetensors for the SAEs."""
    save_model(model, os.path.join(out_dir, "model"))
    tokenizer.save(os.path.join(out_dir, "model", "tokenizer.json"))
    for site, sae in saes.items():
        # A plain ReLU SAE, (x - b_dec) @ W_enc + b_enc, as train.train_sae trains it: no normalisation, no
        # TransformerLens centring.
        save_saelens(sae, os.path.join(out_dir, "saes", site_hook(site)), site_hook(site))
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)


# --- superposition, measured: which units are monosemantic for a known latent ----------------------

MONOSEMANTIC_R = 0.8     # |correlation| with one latent over all tokens: it explains >= 64% of the variance
MIN_POSITIVES = 5        # a latent seen on fewer tokens is left out (one rare word would correlate by chance)


def monosemantic(acts, latents, r=MONOSEMANTIC_R):
    """acts (N tokens, U units), latents (N, K) 0/1, both over ALL tokens. Returns (mask (U,) bool, best (U,)
    latent index, best |r| (U,)): a unit is monosemantic when its activation's Pearson correlation with
    its best latent is at least `r` in absolute value. A unit that is the sum of two independent,
    equally likely latents has |r| <= 1/sqrt(2) with each, so it is not; a constant unit (dead) has no
    correlation and is not either."""
    a = acts.double()
    y = latents.double()
    a = a - a.mean(0)
    y = y - y.mean(0)
    a_norm, y_norm = a.norm(dim=0), y.norm(dim=0)
    corr = (a.T @ y) / (a_norm[:, None] * y_norm[None, :]).clamp(min=1e-30)
    corr[a_norm < 1e-12] = 0.0
    best_r, best = corr.abs().max(dim=1)
    return best_r >= r, best, best_r


@torch.no_grad()
def token_activations(model, saes, tokenizer, n=250, seed=4):
    """Every site's values and SAE codes on the clean prefixes of `n` held-out examples per template, with
    the grammar's latents of the same tokens: ({site: (N, d)}, {site: (N, F)}, latents (N, K), names)."""
    names = agreement.latent_names()
    values, codes, rows = {}, {}, []
    for template in agreement.TEMPLATES:
        examples = agreement.make_examples(template, n, seed=seed, split="test")
        # One template's prefixes all have the same length: no padding.
        ids = torch.tensor([tokenizer.encode(ex.clean_prefix).ids for ex in examples])
        cache = {}
        model(ids, cache=cache)
        for site, v in cache.items():
            v = v.reshape(-1, v.shape[-1])
            values.setdefault(site, []).append(v)
            codes.setdefault(site, []).append(saes[site].encode(v))
        for ex in examples:
            lat = agreement.token_latents(ex)
            rows += [list(col) for col in zip(*(lat[k] for k in names))]
    latents = torch.tensor(rows, dtype=torch.float64)
    return ({s: torch.cat(v) for s, v in values.items()}, {s: torch.cat(v) for s, v in codes.items()}, latents, names)


def monosemantic_shares(model, saes, tokenizer, n=250, seed=4, r=MONOSEMANTIC_R):
    """{"criterion", "n_latents", "n_tokens", "sites": {site: {"neurons": share, "features": share, ...}}}: the share of a site's neurons (its d_model basis
    directions) and of its SAE features that are monosemantic (see `monosemantic`) over every token of
    `n` held-out prefixes per template; latents seen on fewer than MIN_POSITIVES tokens are left out.
    Dead features count as not monosemantic (the share is over all features). "<kind>_latents" counts the
    distinct latents those units are monosemantic for: a share can be high because many units follow one
    loud latent (on this default, neurons mostly follow "word is the", the first token, whose activations
    are far larger than the others'), and that count tells how much of the grammar the units name."""
    values, codes, latents, names = token_activations(model, saes, tokenizer, n, seed)
    keep = latents.sum(0) >= MIN_POSITIVES
    latents, names = latents[:, keep], [nm for nm, k in zip(names, keep.tolist()) if k]
    out = {"criterion": f"|Pearson r| >= {r} with one latent over all tokens", "n_latents": len(names),
           "n_tokens": latents.shape[0], "sites": {}}
    for site in model.sites:
        row = {}
        for kind, acts in (("neurons", values[site]), ("features", codes[site])):
            mask, best, _ = monosemantic(acts, latents, r)
            row[kind] = mask.double().mean().item()
            row[f"{kind}_latents"] = len({names[i] for i in best[mask].tolist()})
        row["features_alive"] = (codes[site] != 0).any(0).double().mean().item()
        out["sites"][site] = row
    return out
